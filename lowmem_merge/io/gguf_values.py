"""GGUF metadata values: a typed value per key, as the file stores it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType


@dataclass(frozen=True)
class MetaValue:
    """One metadata value with its GGUF type; arrays carry their item type."""

    type: GGUFValueType
    value: Any  # int, float, bool, str, or a list of items for ARRAY
    item_type: GGUFValueType | None = None

    @classmethod
    def string(cls, text: str) -> MetaValue:
        return cls(GGUFValueType.STRING, text)

    @classmethod
    def uint32(cls, number: int) -> MetaValue:
        return cls(GGUFValueType.UINT32, int(number))

    @classmethod
    def float32(cls, number: float) -> MetaValue:
        return cls(GGUFValueType.FLOAT32, float(number))

    @classmethod
    def boolean(cls, flag: bool) -> MetaValue:
        return cls(GGUFValueType.BOOL, bool(flag))

    @classmethod
    def array(cls, item_type: GGUFValueType, items: list) -> MetaValue:
        return cls(GGUFValueType.ARRAY, list(items), item_type)


# Metadata of one GGUF file, in the order it is written.
Metadata = dict[str, MetaValue]
