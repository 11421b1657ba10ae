"""A progress bar over bytes read and tensors done (stderr, only when asked)."""

from __future__ import annotations

from tqdm import tqdm

from .pipeline import ALL_PASSES, Loaded
from .tensors import TensorTask


class Progress:
    def __init__(self, tasks: list[TensorTask], enabled: bool) -> None:
        self.total_tensors = len(tasks)
        self.done = 0
        self.bar = None
        if enabled:
            total = sum(task.planned_read_bytes for task in tasks)
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="merging", dynamic_ncols=True, leave=False)

    def advance(self, loaded: Loaded) -> None:
        if self.bar is None:
            return
        final_pass = loaded.pass_index == ALL_PASSES or loaded.task.merge is None \
            or loaded.pass_index == loaded.task.merge.stat_passes
        if loaded.last and final_pass:
            self.done += 1
            self.bar.set_postfix_str(f"tensors {self.done}/{self.total_tensors}", refresh=False)
        self.bar.update(loaded.bytes_read)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()  # the final state, even for merges faster than one refresh
            self.bar.close()

