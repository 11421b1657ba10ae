"""The CUDA backend: the dispatched kernels on a GPU, streamed within a device budget.

A call receives one host chunk (the engine's pinned, reused buffers) and walks it in spans
that fit the device budget. Span k is copied to the device on stream k % 2 into that
stream's own reused buffers while the kernels of span k - 1 run on the other stream, so
copies and kernels overlap; results come back on the same streams. The N-dimensional solves
stay on the host: a call returns exactly what the CPU kernel would have written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda

from ..arrays import REDUCTION_BLOCK
from ..gguf_quants import block_layout
from ..gguf_quants import quantize_into as cpu_quantize_into
from . import arrays as device_arrays
from . import gguf_quants as device_quants
from . import sparse as device_sparse

SLOTS = 2  # span buffers, one per stream: copy one span while the other computes
# Device memory kept back from the budget for the small per-call arrays (partials, grams,
# histograms) and the kernels' own needs.
RESERVED_BYTES = 16 * 1024**2


@dataclass
class Span:
    lo: int
    hi: int
    slot: int

    @property
    def width(self) -> int:
        return self.hi - self.lo


class CudaKernels:
    """Serves the dispatched kernels (see kernels/dispatch.py) on one CUDA device."""

    name = "cuda"

    def __init__(self, budget: int, reserved: int = RESERVED_BYTES) -> None:
        if budget <= reserved:
            raise ValueError(f"a GPU budget of {budget} bytes leaves nothing for data"
                             f" (at least {reserved} bytes are kept for small arrays)")
        self.budget = budget
        self.reserved = reserved
        self.streams = [cuda.stream() for _ in range(SLOTS)]
        self._slots: list[Any] = [None] * SLOTS  # uint8 device buffers, grown on demand
        self.copied_to_device = 0
        self.copied_to_host = 0

    # -- host and device memory ---------------------------------------------------

    @staticmethod
    def host_buffer(nbytes: int) -> np.ndarray:
        """Page-locked host memory, so copies to the device run asynchronously."""
        return cuda.pinned_array(max(nbytes, 1), np.uint8)

    def span_elements(self, bytes_per_element: int, unit: int) -> int:
        """Elements per span so that both slots fit the budget; a multiple of ``unit``."""
        per_slot = (self.budget - self.reserved) // SLOTS
        elements = per_slot // max(bytes_per_element, 1) // unit * unit
        if elements == 0:
            need = SLOTS * unit * bytes_per_element + self.reserved
            raise MemoryError(f"the GPU budget ({self.budget} bytes) cannot hold {unit} elements"
                              f" at {bytes_per_element} bytes each; it needs {need} bytes")
        return elements

    def _slot_buffer(self, slot: int, nbytes: int) -> Any:
        buffer = self._slots[slot]
        if buffer is None or buffer.size < nbytes:
            self.streams[slot].synchronize()
            buffer = self._slots[slot] = cuda.device_array(nbytes, np.uint8)
        return buffer

    def _spans(self, n: int, bytes_per_element: int, unit: int) -> Iterator[Span]:
        step = self.span_elements(bytes_per_element, unit)
        for index, lo in enumerate(range(0, max(n, 1), step)):
            yield Span(lo, min(n, lo + step), index % SLOTS)

    def _upload(self, span: Span, arrays: list[np.ndarray | None],
                out: np.ndarray | None = None, out_span: Span | None = None) -> list[Any]:
        """Copies span.lo:span.hi of each host array (rows of 2-D ones) into the slot, and
        lays out room for ``out``'s rows out_span.lo:out_span.hi after them (appended to
        the views returned); all in the slot's one buffer."""
        sizes = [0 if a is None else _rows(a) * span.width * a.itemsize for a in arrays]
        out_bytes = 0 if out is None else _out_row_bytes(out) * (out_span or span).width
        buffer = self._slot_buffer(span.slot, sum(_aligned(s) for s in sizes) + out_bytes)
        stream = self.streams[span.slot]
        views, offset = [], 0
        for host, size in zip(arrays, sizes, strict=True):
            if host is None:
                views.append(None)
                continue
            view = buffer[offset:offset + size].view(host.dtype)
            if host.ndim == 2:
                view = view.reshape(host.shape[0], span.width)
                for row in range(host.shape[0]):
                    view[row].copy_to_device(host[row, span.lo:span.hi], stream=stream)
            else:
                view.copy_to_device(host[span.lo:span.hi], stream=stream)
            self.copied_to_device += size
            views.append(view)
            offset += _aligned(size)
        if out is not None:
            view = buffer[offset:offset + out_bytes].view(out.dtype)
            views.append(view.reshape((out_span or span).width, *out.shape[1:])
                         if out.ndim > 1 else view)
        return views

    def _to_device(self, host: np.ndarray) -> Any:
        """A small array every stream reads: copied synchronously, so no stream runs ahead."""
        self.copied_to_device += host.nbytes
        return cuda.to_device(np.ascontiguousarray(host))

    def _to_host(self, device: Any, host: np.ndarray) -> None:
        self.synchronize()
        device.copy_to_host(host)
        self.copied_to_host += host.nbytes

    def synchronize(self) -> None:
        for stream in self.streams:
            stream.synchronize()

    # -- the dispatched kernels -------------------------------------------------

    def gram_blocks(self, stack: np.ndarray, encoding: int, base: np.ndarray,
                    base_encoding: int, subtract_base: bool, partials: np.ndarray) -> None:
        d_partials = cuda.device_array(partials.shape, partials.dtype)
        base_in = base if subtract_base else None
        for span in self._spans(stack.shape[1], _element_bytes(stack, base_in), REDUCTION_BLOCK):
            d_stack, d_base = self._upload(span, [stack, base_in])
            blocks = d_partials[span.lo // REDUCTION_BLOCK:-(-span.hi // REDUCTION_BLOCK)]
            device_arrays.gram_blocks(d_stack, encoding, d_stack[0] if d_base is None else d_base,
                                      base_encoding, subtract_base, blocks,
                                      stream=self.streams[span.slot])
        self._to_host(d_partials, partials)

    def weighted_sum(self, stack: np.ndarray, encoding: int, coefficients: np.ndarray,
                     base: np.ndarray, base_encoding: int, base_coefficient: float,
                     around_base: bool, out: np.ndarray, out_encoding: int) -> None:
        d_coefficients = self._to_device(coefficients)
        base_in = base if around_base else None
        per_element = _element_bytes(stack, base_in) + out.itemsize
        for span in self._spans(stack.shape[1], per_element, 1):
            d_stack, d_base, d_out = self._upload(span, [stack, base_in], out)
            device_arrays.weighted_sum(d_stack, encoding, d_coefficients,
                                       d_stack[0] if d_base is None else d_base, base_encoding,
                                       base_coefficient, around_base, d_out, out_encoding,
                                       stream=self.streams[span.slot])
            self._download_span(d_out, out, span)
        self.synchronize()

    def line_gram(self, stack: np.ndarray, encoding: int, base: np.ndarray, base_encoding: int,
                  subtract_base: bool, row_length: int, by_row: bool, out: np.ndarray) -> None:
        d_out = self._to_device(out)
        base_in = base if subtract_base else None
        # Column grams add every row into the same matrices: one stream keeps that in order.
        spans = self._spans(stack.shape[1], _element_bytes(stack, base_in), row_length)
        for span in spans if by_row else _on_one_slot(spans):
            d_stack, d_base = self._upload(span, [stack, base_in])
            target = d_out[span.lo // row_length:span.hi // row_length] if by_row else d_out
            device_arrays.line_gram(d_stack, encoding, d_stack[0] if d_base is None else d_base,
                                    base_encoding, subtract_base, row_length, by_row, target,
                                    stream=self.streams[span.slot])
        self._to_host(d_out, out)

    def line_weighted_sum(self, stack: np.ndarray, encoding: int, coefficients: np.ndarray,
                          base: np.ndarray, base_encoding: int, base_coefficient: float,
                          around_base: bool, row_length: int, by_row: bool, first_row: int,
                          out: np.ndarray, out_encoding: int) -> None:
        d_coefficients = self._to_device(coefficients)
        base_in = base if around_base else None
        per_element = _element_bytes(stack, base_in) + out.itemsize
        for span in self._spans(stack.shape[1], per_element, row_length):
            d_stack, d_base, d_out = self._upload(span, [stack, base_in], out)
            device_arrays.line_weighted_sum(
                d_stack, encoding, d_coefficients, d_stack[0] if d_base is None else d_base,
                base_encoding, base_coefficient, around_base, row_length, by_row,
                first_row + span.lo // row_length, d_out, out_encoding,
                stream=self.streams[span.slot])
            self._download_span(d_out, out, span)
        self.synchronize()

    def magnitude_histogram(self, stack: np.ndarray, encoding: int, base: np.ndarray,
                            base_encoding: int, buckets: np.ndarray | None,
                            parts: np.ndarray) -> None:
        # Counts are integers added atomically: any span order gives the CPU's totals. The
        # device adds into the first part only, so only it travels (the CPU has one per
        # thread; the caller sums them).
        first = parts[:1]
        d_parts = self._to_device(first)
        d_buckets = None if buckets is None else self._to_device(buckets)
        for span in self._spans(stack.shape[1], _element_bytes(stack, base), 1):
            d_stack, d_base = self._upload(span, [stack, base])
            device_sparse.magnitude_histogram(d_stack, encoding, d_base, base_encoding,
                                              d_buckets, d_parts, stream=self.streams[span.slot])
        self._to_host(d_parts, first)

    def threshold_ties(self, stack: np.ndarray, encoding: int, base: np.ndarray,
                       base_encoding: int, thresholds: np.ndarray, counts: np.ndarray) -> None:
        d_thresholds = self._to_device(thresholds)
        d_counts = cuda.device_array(counts.shape, counts.dtype)
        for span in self._spans(stack.shape[1], _element_bytes(stack, base), REDUCTION_BLOCK):
            d_stack, d_base = self._upload(span, [stack, base])
            blocks = d_counts[span.lo // REDUCTION_BLOCK:-(-span.hi // REDUCTION_BLOCK)]
            device_sparse.threshold_ties(d_stack, encoding, d_base, base_encoding, d_thresholds,
                                         blocks, stream=self.streams[span.slot])
        self._to_host(d_counts, counts)

    def task_vector_l1(self, stack: np.ndarray, encoding: int, base: np.ndarray,
                       base_encoding: int, keep_kind: int, start: int, block: int,
                       selection: tuple, partials: np.ndarray) -> None:
        d_partials = cuda.device_array(partials.shape, partials.dtype)
        d_selection = self._selection_to_device(selection)
        for span in self._spans(stack.shape[1], _element_bytes(stack, base),
                                _sparse_unit(block)):
            d_stack, d_base = self._upload(span, [stack, base])
            device_sparse.task_vector_l1(
                d_stack, encoding, d_base, base_encoding, keep_kind, start + span.lo, block,
                _selection_from(d_selection, span), d_partials[span.lo // block:
                                                               -(-span.hi // block)],
                stream=self.streams[span.slot])
        self._to_host(d_partials, partials)

    def task_vector_merge(self, stack: np.ndarray, encoding: int, base: np.ndarray,
                          base_encoding: int, keep_kind: int, consensus: bool, start: int,
                          block: int, selection: tuple, weights: np.ndarray,
                          scales: np.ndarray, normalize: bool, scale_out: float,
                          out: np.ndarray, out_encoding: int) -> None:
        d_selection = self._selection_to_device(selection)
        d_weights = self._to_device(weights)
        d_scales = self._to_device(scales)
        per_element = _element_bytes(stack, base) + out.itemsize
        for span in self._spans(stack.shape[1], per_element, _sparse_unit(block)):
            d_stack, d_base, d_out = self._upload(span, [stack, base], out)
            device_sparse.task_vector_merge(
                d_stack, encoding, d_base, base_encoding, keep_kind, consensus, start + span.lo,
                block, _selection_from(d_selection, span), d_weights, d_scales, normalize,
                scale_out, d_out, out_encoding, stream=self.streams[span.slot])
            self._download_span(d_out, out, span)
        self.synchronize()

    def quantize_into(self, values: np.ndarray, qtype: int, out: np.ndarray) -> None:
        if not device_quants.can_quantize_on_device(qtype):
            cpu_quantize_into(values, qtype, out)
            return
        block_elements, block_bytes = block_layout(qtype)
        n_blocks = values.shape[0] // block_elements
        blocks_out = out.reshape(n_blocks, block_bytes) if n_blocks else out
        per_block = block_elements * values.itemsize + block_bytes
        for span in self._spans(n_blocks, per_block, 1):
            d_values, d_out = self._upload(_element_span(span, block_elements), [values],
                                           blocks_out, span)
            device_quants.quantize_into(d_values, qtype, d_out.reshape(-1),
                                        stream=self.streams[span.slot])
            self._download_span(d_out, blocks_out, span)
        self.synchronize()

    # -- helpers ------------------------------------------------------------------

    def _download_span(self, d_out: Any, out: np.ndarray, span: Span) -> None:
        d_out.copy_to_host(out[span.lo:span.hi], stream=self.streams[span.slot])
        self.copied_to_host += d_out.nbytes

    def _selection_to_device(self, selection: tuple) -> tuple:
        return tuple(self._to_device(part) for part in selection)


def _out_row_bytes(out: np.ndarray) -> int:
    return out.itemsize * math.prod(out.shape[1:])


def _rows(array: np.ndarray) -> int:
    return array.shape[0] if array.ndim == 2 else 1


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 256) * 256  # keeps every view aligned for any element type


def _element_bytes(stack: np.ndarray, base: np.ndarray | None) -> int:
    return stack.shape[0] * stack.itemsize + (0 if base is None else base.itemsize)


def _on_one_slot(spans: Iterator[Span]) -> Iterator[Span]:
    for span in spans:
        yield Span(span.lo, span.hi, 0)


def _element_span(span: Span, block_elements: int) -> Span:
    return Span(span.lo * block_elements, span.hi * block_elements, span.slot)


def _sparse_unit(block: int) -> int:
    """Spans hold whole blocks (rows for DELLA's rank rule) and whole reduction blocks."""
    return math.lcm(block, REDUCTION_BLOCK)


def _selection_from(selection: tuple, span: Span) -> tuple:
    """The selection arrays seen from a span: per-block tie counts start at its first block."""
    thresholds, quotas, seen, seeds, densities, epsilons = selection
    return (thresholds, quotas, seen[span.lo // REDUCTION_BLOCK:], seeds, densities, epsilons)
