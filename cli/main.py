"""lowmem-merge commands: merge, run, convert, plan, diagnose, demo, inspect, methods."""

from __future__ import annotations

import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

import click

from lowmem_merge.config import build_job, job_from_yaml, parse_assignment
from lowmem_merge.engine import MergeReport, preview_merge, run_merge
from lowmem_merge.errors import Interrupted, MergeError
from lowmem_merge.io import open_model
from lowmem_merge.methods import METHODS
from lowmem_merge.units import format_bytes

GGUF_SUMMARY_KEYS = ("general.architecture", "general.name", "general.file_type")


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"lowmem-merge: error: {message}", err=True)
    sys.exit(code)


def _run(job) -> MergeReport:
    try:
        return run_merge(job)
    except Interrupted as exc:
        _fail(str(exc), 130)
    except MergeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted before writing started; nothing was written", 130)


def _print_report(report: MergeReport) -> None:
    for line in report.lines():
        click.echo(line)


def _run_options(command):
    """Options every merging command takes: budget, threads, shards, seed, overwrite, quiet."""
    for option in reversed([
        click.option("--max-memory", help="Memory budget, e.g. 2GiB (default: half of"
                     " available)."),
        click.option("--threads", type=int, help="Compute threads (default: all cores)."),
        click.option("--format", "output_format", type=click.Choice(["safetensors", "gguf"]),
                     help="Output format (default: gguf when the output ends in .gguf)."),
        click.option("--shard-size", help="Largest output shard (default: 5GB for"
                     " safetensors; GGUF is one file unless given)."),
        click.option("--seed", type=int, help="Seed of random drop masks (dare_*, della*)."),
        click.option("--force", is_flag=True, help="Replace an existing output folder."),
        click.option("--nan-policy", type=click.Choice(["warn", "error"]), default="warn",
                     show_default=True, help="NaN or Inf in an input tensor: warn naming it,"
                     " or stop with an error."),
        click.option("--resume", is_flag=True, help="Continue an interrupted merge of the"
                     " same command from its journal (finished tensors are not redone)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True, help="Where the kernels run: auto uses a usable GPU"
                     " (the cuda extra) for large tensors; cuda sends every merged tensor to it."),
        click.option("--max-gpu-memory", help="GPU memory budget, e.g. 8GiB (default: 80% of"
                     " the GPU's free memory)."),
        click.option("--executor", type=click.Choice(["local", "ray"]),
                     help="local (default), or ray: a task per output file on a Ray cluster."),
        click.option("--ray-address", help="Ray cluster to join (auto or HOST:PORT; default:"
                     " start a local Ray with --threads CPUs)."),
        click.option("--ray-task-cpus", type=int, help="CPUs each Ray task asks for and"
                     " computes with (default 1)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no report."),
    ]):
        command = option(command)
    return command


def _build_and_run(build, quiet: bool, **options) -> None:
    """Build a job (errors are one line), run it, print the report unless quiet."""
    try:
        job = build(**options, progress=not quiet and sys.stderr.isatty())
    except MergeError as exc:
        _fail(str(exc))
    report = _run(job)
    if not quiet:
        _print_report(report)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lowmem-merge")
@click.option("-v", "--verbose", is_flag=True, help="Log what the merge decides.")
def main(verbose: bool) -> None:
    """Merge large language models out of core, under a RAM budget."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _merge_options(command):
    """Options that describe a merge of MODELS: method, base, weights, parameters, dtype."""
    for option in reversed([
        click.option("-m", "--method", default="karcher", show_default=True,
                     type=click.Choice(sorted(METHODS)), help="Merge method."),
        click.option("--base", help="Base model (task-vector methods; config and tokenizer"
                     " source)."),
        click.option("--weights", help="Comma-separated weight per model, e.g. 0.5,0.3,0.2."),
        click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
                     help="Method parameter; repeat. A comma list is a gradient over layers."),
        click.option("--dtype", help="Output dtype: bfloat16, float16 or float32; for GGUF also"
                     " q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k"
                     " (default: as input)."),
    ]):
        command = option(command)
    return _run_options(command)


def _merge_arguments(weights: str | None, params: tuple[str, ...]) -> dict:
    try:
        weight_values = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        _fail(f"--weights {weights!r}: expected comma-separated numbers")
    try:
        return {"weights": weight_values, "params": dict(parse_assignment(p) for p in params)}
    except MergeError as exc:
        _fail(str(exc))


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("-o", "--out", "output", required=True, type=click.Path(path_type=Path),
              help="Output model folder, or a .gguf file.")
@_merge_options
def merge(models, output, weights, params, quiet, **options) -> None:
    """Merge MODELS (folders, .safetensors or .gguf files, hub ids org/name[@rev]) into OUT."""
    _build_and_run(build_job, quiet, models=models, output=output,
                   **_merge_arguments(weights, params), **options)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", "output", type=click.Path(path_type=Path),
              help="Output (for a YAML config it may also follow the config).")
@_merge_options
def plan(inputs, output, weights, params, quiet, **options) -> None:
    """Show what a merge would do, without merging: INPUTS are the merge's MODELS, or a
    mergekit YAML CONFIG [OUTPUT]. Takes the options of merge (or run)."""
    options.pop("progress", None)
    config = Path(inputs[0])
    try:
        if config.suffix.lower() in (".yml", ".yaml") and len(inputs) <= 2:
            target = output or (Path(inputs[1]) if len(inputs) == 2 else None)
            if target is None:
                _fail("plan CONFIG needs the output: plan CONFIG OUTPUT")
            for key in ("method", "base", "dtype"):
                options.pop(key)
            job = job_from_yaml(config, target, **options)
        else:
            if output is None:
                _fail("plan MODELS... needs -o OUTPUT")
            job = build_job(inputs, output, **_merge_arguments(weights, params), **options)
        preview = preview_merge(job)
    except MergeError as exc:
        _fail(str(exc))
    for line in preview.lines():
        click.echo(line)


@main.command()
@click.argument("model")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--dtype", help="Output dtype or GGUF file type (q8_0, q4_k_m, ...; default: as"
              " input).")
@_run_options
def convert(model, output, dtype, quiet, **options) -> None:
    """Convert MODEL to OUTPUT: safetensors <-> GGUF, or to another dtype or quantization.

    Streams like a merge (it is one: passthrough of a single model), under --max-memory.
    """
    _build_and_run(build_job, quiet, models=[model], output=output, method="passthrough",
                   dtype=dtype, **options)


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@_run_options
def run(config, output, quiet, **options) -> None:
    """Run a mergekit YAML CONFIG, writing the merged model to OUTPUT."""
    _build_and_run(job_from_yaml, quiet, path=config, output=output, **options)


@main.command()
@click.option("--keep", type=click.Path(path_type=Path),
              help="Keep the demo models and the merge in this folder.")
@click.option("--max-memory", default="512MiB", show_default=True, help="Memory budget.")
def demo(keep: Path | None, max_memory: str) -> None:
    """Make a base and three small Llama-shaped experts, merge them with Karcher."""
    from lowmem_merge.synthetic import LlamaShape, write_experts

    with tempfile.TemporaryDirectory(prefix="lowmem-merge-demo-") as scratch:
        root = keep or Path(scratch)
        base, experts = write_experts(root, LlamaShape(), 3, seed=0)
        click.echo(f"made a base and 3 Llama-shaped experts under {root}")
        job = build_job(experts, root / "merged", method="karcher", base=base,
                        max_memory=max_memory, force=True,
                        progress=sys.stderr.isatty())
        _print_report(_run(job))


@main.command()
@click.argument("model")
@click.option("--limit", type=int, default=None, help="List at most this many tensors.")
def inspect(model: str, limit: int | None) -> None:
    """List MODEL's tensors: dtype (or GGUF type), shape, parameters and bytes."""
    try:
        opened = open_model(model)
    except MergeError as exc:
        _fail(str(exc))
    tensors = sorted(opened.tensors.values(), key=lambda t: (str(t.path), t.offset))
    width = max((len(t.name) for t in tensors), default=4)
    click.echo(f"{'tensor':<{width}}  {'dtype':<7} {'shape':<20} {'params':>14} {'bytes':>12}")
    for info in tensors[:limit]:
        shape = "x".join(map(str, info.shape)) or "scalar"
        click.echo(f"{info.name:<{width}}  {info.dtype:<7} {shape:<20} {info.numel:>14,}"
                   f" {format_bytes(info.nbytes):>12}")
    if limit is not None and len(tensors) > limit:
        click.echo(f"... {len(tensors) - limit} more")
    dtypes = Counter(t.dtype for t in tensors)
    if opened.is_gguf:
        click.echo("GGUF " + ", ".join(
            f"{key.removeprefix('general.')} {opened.gguf_metadata[key].value}"
            for key in GGUF_SUMMARY_KEYS if key in opened.gguf_metadata))
    click.echo(f"{len(tensors)} tensors, {sum(t.numel for t in tensors):,} parameters,"
               f" {format_bytes(sum(t.nbytes for t in tensors))}"
               f" ({', '.join(f'{d}: {n}' for d, n in sorted(dtypes.items()))})")


@main.command()
@click.argument("merged")
@click.option("--experts", "-e", multiple=True, required=True,
              help="An expert of the merge; repeat (or give them space-separated in quotes).")
@click.option("--base", help="Base model: measure task vectors (weights minus the base).")
@click.option("--prompts", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Prompt file (one per line) for activation diagnostics.")
@click.option("--activations/--no-activations", default=None,
              help="Per-layer activation variance and effective rank (needs torch and"
              " transformers; default: when --prompts is given).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG of it per layer.")
def diagnose(merged, experts, base, prompts, activations, json_path, plot) -> None:
    """How MERGED relates to its experts: norms and angles per tensor and layer (streamed),
    and optionally activation variance and effective rank per layer."""
    from lowmem_merge.diagnose import weight_diagnostics
    from lowmem_merge.diagnose.activations import layer_activations, read_prompts
    from lowmem_merge.diagnose.report import (
        report_dict,
        summary_lines,
        write_json,
        write_plot,
    )

    expert_refs = [ref for item in experts for ref in item.split()]
    try:
        tensors, layers = weight_diagnostics(merged, expert_refs, base)
        functional = None
        if activations or (activations is None and prompts is not None):
            texts = read_prompts(prompts)
            functional = {ref: layer_activations(ref, texts) for ref in [*expert_refs, merged]}
        for line in summary_lines(tensors, layers):
            click.echo(line)
        if functional:
            click.echo("hidden state  " + "  ".join(f"rank {Path(r).name}" for r in functional))
            for index in range(len(next(iter(functional.values())).effective_rank)):
                click.echo(f"{index:12d}  " + "  ".join(
                    f"{values.effective_rank[index]:.2f}" for values in functional.values()))
        report = report_dict(tensors, layers, functional)
        if json_path:
            write_json(json_path, report)
        if plot:
            write_plot(plot, layers, functional)
    except MergeError as exc:
        _fail(str(exc))


@main.command()
def methods() -> None:
    """List merge methods with their parameters and defaults."""
    for method in METHODS.values():
        click.echo(f"{method.name}: {method.summary}")
        click.echo(f"  base model: {method.base_model}; models: {method.min_experts}"
                   f"..{method.max_experts or 'N'}; {method.reference}")
        for param in method.params:
            click.echo(f"  --param {param.name}={param.default!r}: {param.help}")
        for param in method.model_params:
            click.echo(f"  per model {param.name} (--weights) default {param.default!r}:"
                       f" {param.help}")
        if method.notes:
            click.echo(f"  {method.notes}")


if __name__ == "__main__":
    main()
