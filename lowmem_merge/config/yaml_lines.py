"""YAML loading that remembers the line of every mapping key, for errors that point there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeError


class LinedDict(dict):
    """A mapping from YAML that knows the line of each of its keys (1-based)."""

    lines: dict[str, int]

    def line(self, key: str) -> int | None:
        return self.lines.get(key)


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LinedDict:
    mapping = LinedDict(loader.construct_mapping(node, deep=True))
    mapping.lines = {str(key.value): key.start_mark.line + 1 for key, _ in node.value}
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise MergeError(f"{path}: cannot read the config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise MergeError(f"{path}: not valid YAML: {exc}") from None
