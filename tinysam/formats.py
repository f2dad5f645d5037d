"""Reading the fields of the JSON files we take in (ONNX manifests, quant.json, COCO and LVIS
annotations, detections): each field checked once, at load, and every problem one
``FormatError`` naming the file and the field. Torch-free.
"""

from __future__ import annotations

import math
from typing import Any


class FormatError(ValueError):
    """A structured file with a missing or mistyped field."""


def is_int(value: Any) -> bool:
    """An integer (JSON ``3`` or ``3.0``), not a bool, not ``1.7``."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def is_number(value: Any) -> bool:
    """A finite number, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_KINDS = {
    "an integer": is_int,
    "a finite number": is_number,
    "a string": lambda v: isinstance(v, str),
    "a non-empty string": lambda v: isinstance(v, str) and bool(v),
    "true or false": lambda v: isinstance(v, bool),
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
}


def require(value: Any, kind: str, where: str, field: str) -> Any:
    """``value`` if it is of ``kind`` (a key of the table above), else a FormatError."""
    if not _KINDS[kind](value):
        shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
        raise FormatError(f"{where}: {field} must be {kind}, got {shown}")
    return int(value) if kind == "an integer" else value


def field(
    mapping: dict, key: str, kind: str, where: str, prefix: str = "", default: Any = ...
) -> Any:
    """``mapping[key]`` checked to be of ``kind``; missing is an error unless ``default``."""
    name = f"{prefix}{key}"
    if not isinstance(mapping, dict):
        raise FormatError(f"{where}: {prefix.rstrip('.') or 'the file'} must be an object")
    if key not in mapping:
        if default is not ...:
            return default
        raise FormatError(f"{where}: {name} is missing")
    return require(mapping[key], kind, where, name)


def numbers(value: Any, count: int, where: str, name: str) -> list[float]:
    """A list of ``count`` finite numbers."""
    if not (isinstance(value, list) and len(value) == count and all(map(is_number, value))):
        raise FormatError(f"{where}: {name} must be a list of {count} finite numbers")
    return [float(v) for v in value]


def plain_file_name(value: Any, where: str, name: str) -> str:
    """A file name inside the file's own folder: no directories, no ``..``."""
    require(value, "a non-empty string", where, name)
    if "/" in value or "\\" in value or value in (".", ".."):
        raise FormatError(f"{where}: {name} must be a file name in the same folder, got {value!r}")
    return value
