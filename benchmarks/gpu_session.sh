#!/usr/bin/env bash
# Everything the CUDA path needs a real GPU for, in one unattended run, with every result
# written under OUT (default ./gpu-session):
#
#   versions.txt   the GPU, driver, Python and numba-cuda versions
#   tests.log      the CUDA tests on the GPU (LOWMEM_TEST_REAL_CUDA=1), the PTX check included
#   bench.md       benchmarks/bench_cuda.py: kernel throughputs, the --device auto crossover,
#   cuda.json      and the TinyLlama-shaped merges against the I/O floor and --device cpu
#
# Usage, from the repository root of a machine with an NVIDIA GPU and numba-cuda:
#   bash benchmarks/gpu_session.sh [--tests-only | --bench-only]
# Packages the machine lacks (gguf, say) can wait as wheels in ./.whl; they are installed into
# a private folder, never over the machine's own. Models for the merges are made under
# BENCH_ROOT (default /tmp/lowmem-bench) unless already there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session}
BENCH_ROOT=${BENCH_ROOT:-/tmp/lowmem-bench}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The checkout itself runs, from a private folder: nothing is installed over the machine's own.
SITE=/tmp/lowmem-site
mkdir -p "$SITE"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target "$SITE" .whl/*.whl || exit 1
fi
ln -sfn "$PWD/cli" "$SITE/lowmem_merge_cli"  # the command's package, as pyproject.toml maps it
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PYTHON" - <<'EOF'
import sys
from importlib.metadata import version
print("python", sys.version.split()[0])
for name in ("numpy", "numba", "numba-cuda", "gguf", "safetensors"):
    print(name, version(name))
from lowmem_merge.engine.devices import cuda_problem
print("cuda_problem:", cuda_problem() or "none: the GPU is usable")
EOF
} 2>&1 | tee "$OUT/versions.txt"

status=0
if [ "${1:-}" != "--bench-only" ]; then
    LOWMEM_TEST_REAL_CUDA=1 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
        tests/test_cuda_arrays.py tests/test_cuda_sparse.py tests/test_cuda_quants.py \
        tests/test_cuda_engine.py tests/test_ptx.py 2>&1 | tee "$OUT/tests.log"
    status=${PIPESTATUS[0]}
fi
if [ "${1:-}" != "--tests-only" ]; then
    "$PYTHON" benchmarks/make_experts.py --out "$BENCH_ROOT" --shape tinyllama --experts 3 \
        2>&1 | tail -3
    "$PYTHON" benchmarks/bench_cuda.py --root "$BENCH_ROOT" --json "$OUT/cuda.json" 2>&1 \
        | tee "$OUT/bench.md"
    status=$(( status || PIPESTATUS[0] ))
fi
exit "$status"
