"""Parameter settings as mergekit writes them, and their value for one tensor.

A setting is a scalar, a gradient (a list of numbers interpolated over the
layers), or a list of {filter, value} conditions matched against the tensor
name, the first match winning.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import MergeError
from ..methods import REQUIRED, Param


def evaluate(setting: Any, tensor: str, position: float) -> Any:
    """The value of a setting for one tensor at a layer position in [0, 1] (None: no match)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list) and setting:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            scaled = position * (len(setting) - 1)
            low = int(scaled)
            high = min(len(setting) - 1, low + 1)
            fraction = scaled - low
            return (1 - fraction) * setting[low] + fraction * setting[high]
        if all(isinstance(v, (bool, int, float, str)) for v in setting):
            return setting[int(position * (len(setting) - 1))]
        for condition in setting:
            name_filter = condition.get("filter") if isinstance(condition, dict) else None
            if name_filter in (None, "*") or name_filter in tensor:
                return evaluate(condition.get("value"), tensor, position)
        return None
    raise MergeError(f"cannot use {setting!r} as a parameter value")


def check_setting(param: Param, setting: Any, where: str) -> None:
    """Reject settings whose values can never be of the parameter's type."""
    if isinstance(setting, list):
        for item in setting:
            value = item.get("value") if isinstance(item, dict) else item
            if isinstance(item, dict) and set(item) - {"filter", "value"}:
                prefix = f"{where}: " if where else ""
                raise MergeError(f"{prefix}condition keys must be 'filter' and 'value', got"
                                 f" {sorted(item)}")
            check_setting(param, value, where)
        return
    coerce(param, setting, where)


def coerce(param: Param, value: Any, where: str) -> Any:
    kind = param.type
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and float(value).is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, kind):
        return value
    prefix = f"{where}: " if where else ""
    raise MergeError(f"{prefix}{param.name} must be {kind.__name__}, got {value!r}")


def resolve(param: Param, settings: list[dict[str, Any]], tensor: str, position: float,
            where: str) -> Any:
    """First setting that applies to this tensor, else the parameter's default."""
    for scope in settings:
        if param.name in scope:
            value = evaluate(scope[param.name], tensor, position)
            if value is not None:
                return coerce(param, value, f"{where}, tensor {tensor}")
    if param.default is REQUIRED:
        raise MergeError(f"{where}: parameter {param.name!r} is required"
                         f" (no value applies to tensor {tensor})")
    return param.default


def parse_assignment(text: str) -> tuple[str, Any]:
    """'key=value' from the command line; value as YAML, a comma list becomes a list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MergeError(f"--param {text!r}: expected key=value")
    try:
        value = yaml.safe_load(raw) if "," not in raw or raw.strip().startswith("[") \
            else [yaml.safe_load(part) for part in raw.split(",")]
    except yaml.YAMLError as exc:
        raise MergeError(f"--param {text!r}: cannot read the value ({exc})") from None
    return key.strip(), value
