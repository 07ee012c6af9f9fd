"""TOML in (stdlib tomllib) and a small TOML writer for the flat tables edgepeft uses."""

from __future__ import annotations

import json
import tomllib
from typing import Any

TOMLDecodeError = tomllib.TOMLDecodeError


def loads(text: str) -> dict:
    return tomllib.loads(text)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(data: dict) -> str:
    """Write top-level scalars and one level of tables as TOML (None values are omitted)."""
    head = [f"{k} = {_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, dict)]
    parts = ["\n".join(head)] if head else []
    for key, table in data.items():
        if not isinstance(table, dict):
            continue
        if any(isinstance(v, dict) for v in table.values()):
            raise TypeError(f"table {key!r} nests deeper than edgepeft's TOML files do")
        body = "\n".join(f"{k} = {_value(v)}" for k, v in table.items() if v is not None)
        parts.append(f"[{key}]\n{body}" if body else f"[{key}]")
    return "\n\n".join(parts) + "\n"
