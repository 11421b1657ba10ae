"""The contract between the engine and a merge method.

A method sees one output tensor at a time as a stream of aligned chunks of
its inputs. It may gather statistics over the whole tensor in one or more
passes (``observe``/``end_pass``), then produces each output chunk in a final
elementwise pass (``apply``). It never touches files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """A method parameter: its name, type, default (or REQUIRED) and meaning."""

    name: str
    type: type
    default: Any
    help: str


@dataclass
class Chunk:
    """The same element range of every input, as raw stored bits.

    experts has one row per expert (uint16 for bf16/f16, uint32 for f32) and
    one encoding for all rows; base, when present, is a 1-D array of its own
    encoding. start is the index of the first element in the whole tensor.
    """

    experts: np.ndarray
    encoding: int
    base: np.ndarray | None
    base_encoding: int
    start: int

    @property
    def size(self) -> int:
        return self.experts.shape[1]


@dataclass
class OutChunk:
    data: np.ndarray
    encoding: int


@dataclass(frozen=True)
class TensorContext:
    """What a method knows about the tensor it merges."""

    name: str
    shape: tuple[int, ...]
    params: dict[str, Any]
    model_params: tuple[dict[str, Any], ...]
    has_base: bool

    @property
    def n_experts(self) -> int:
        return len(self.model_params)


class TensorMerge(ABC):
    """Merges one tensor: ``stat_passes`` statistics passes, then one apply pass."""

    stat_passes: int = 0
    uses_base: bool = False  # whether chunks must carry the base model's values
    # Elements that must arrive together in one chunk (a row, or the whole tensor);
    # None: any chunk (starting at a multiple of the kernels' reduction block).
    chunk_unit: int | None = None
    # Memory the method holds besides the chunk buffers (bytes), checked against the budget.
    working_bytes: int = 0

    def observe(self, pass_index: int, chunk: Chunk) -> None:  # noqa: B027
        """Accumulate statistics of one chunk (only called if stat_passes > 0)."""

    def end_pass(self, pass_index: int) -> None:  # noqa: B027
        """Called after the last chunk of a statistics pass: solve what needs solving."""

    @abstractmethod
    def apply(self, chunk: Chunk, out: OutChunk) -> None:
        """Write the merged values of this chunk into out."""


class MergeMethod(ABC):
    """One merge method: what it needs, its parameters, and its per-tensor work."""

    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str] = ""
    base_model: ClassVar[Literal["required", "optional", "unused"]] = "unused"
    min_experts: ClassVar[int] = 1
    max_experts: ClassVar[int | None] = None
    params: ClassVar[tuple[Param, ...]] = ()
    model_params: ClassVar[tuple[Param, ...]] = ()
    notes: ClassVar[str] = ""
    # The base model, when given, is the first of the inputs rather than a reference.
    base_goes_first: ClassVar[bool] = False

    def check_inputs(self, n_experts: int, has_base: bool) -> str | None:
        """Return a message saying why this many inputs cannot be merged, or None."""
        if self.base_model == "required" and not has_base:
            return f"method {self.name!r} needs a base model (--base)"
        if self.base_model == "unused" and has_base:
            return f"method {self.name!r} does not use a base model; drop --base"
        if n_experts < self.min_experts:
            return f"method {self.name!r} needs at least {self.min_experts} models, got {n_experts}"
        if self.max_experts is not None and n_experts > self.max_experts:
            return f"method {self.name!r} takes at most {self.max_experts} models, got {n_experts}"
        return None

    @abstractmethod
    def for_tensor(self, context: TensorContext) -> TensorMerge:
        """The per-tensor merge, with parameters already resolved for this tensor."""
