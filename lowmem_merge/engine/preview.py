"""What a merge will do, without doing it: `lowmem-merge plan`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..units import format_bytes
from .job import MergeJob
from .run import MergePlan, Sizing, plan_merge, size_merge

SHOWN_STREAMED = 10


@dataclass
class MergePreview:
    job: MergeJob
    plan: MergePlan
    sizing: Sizing
    disk_free: int

    @property
    def bytes_to_read(self) -> int:
        return sum(task.planned_read_bytes for task in self.plan.tasks)

    @property
    def bytes_to_write(self) -> int:
        return sum(task.output.nbytes for task in self.plan.tasks)

    def lines(self) -> list[str]:
        tasks, sizing = self.plan.tasks, self.sizing
        merged = sum(t.merge is not None for t in tasks)
        streamed = [t for t in tasks if t.passes > 1 or t.numel > t.chunk]
        fits = "fits" if self.disk_free >= self.bytes_to_write else "DOES NOT FIT"
        lines = [
            f"method          {self.job.method.name} ({self.plan.n_experts} experts)",
            f"output          {self.job.output} ({self.job.output_format})",
            f"tensors         {len(tasks)}: {merged} merged, {len(tasks) - merged} copied",
            f"read            {format_bytes(self.bytes_to_read)} (each input once, more for"
            " tensors streamed in several passes)",
            f"write           {format_bytes(self.bytes_to_write)} plus headers;"
            f" {format_bytes(self.disk_free)} free there: {fits}",
            f"budget          {format_bytes(sizing.max_memory)} ({sizing.budget_source})",
            f"chunk           {sizing.chunk:,} elements, {sizing.element_bytes} buffer bytes"
            " each",
            f"predicted peak  {format_bytes(sizing.predicted_peak)} (process"
            f" {format_bytes(sizing.rss)}, buffers"
            f" {format_bytes(sizing.chunk * sizing.element_bytes)}, working"
            f" {format_bytes(sizing.working)}, dirty page cache {format_bytes(2 * sizing.window)},"
            " reserve)",
            f"streamed        {len(streamed)} tensors larger than a chunk",
            *self._device_lines(),
        ]
        for task in streamed[:SHOWN_STREAMED]:
            chunks = -(-task.numel // task.chunk)
            lines.append(f"  {task.output.name}: {chunks} chunks, {task.passes} passes")
        if len(streamed) > SHOWN_STREAMED:
            lines.append(f"  ... and {len(streamed) - SHOWN_STREAMED} more")
        return lines


    def _device_lines(self) -> list[str]:
        on_gpu = [t for t in self.plan.tasks if t.device == "cuda"]
        lines = [f"device          {self.plan.devices.description}"]
        if on_gpu:
            elements = sum(t.numel for t in on_gpu)
            lines.append(f"on the GPU      {len(on_gpu)} tensors, {elements:,} elements")
            lines += [f"  {t.output.name}" for t in on_gpu[:SHOWN_STREAMED]]
            if len(on_gpu) > SHOWN_STREAMED:
                lines.append(f"  ... and {len(on_gpu) - SHOWN_STREAMED} more")
        return lines


def preview_merge(job: MergeJob) -> MergePreview:
    """Plan and size a merge exactly as run_merge would, and stop before writing."""
    plan = plan_merge(job)
    sizing = size_merge(job, plan)
    return MergePreview(job, plan, sizing, shutil.disk_usage(_existing(job.output)).free)


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path
