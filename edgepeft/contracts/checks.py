"""Health-check files: JSON lines of ``{"input", "expect": {"contains"|"equals"|"label": ...}, "adapter",
"max_new_tokens"}``, read the same way by `edgepeft build`, `edgepeft update create` and `edgepeft agent`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


def read_health_checks(path) -> list[dict]:
    """Health checks from a JSON-lines file (one ``{"input", "expect", ...}`` per line); [] for None.

    Raises :class:`UsageError` naming the file and line.
    """
    if path is None:
        return []
    checks = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read health-check file {path}: {exc.strerror or exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            checks.append(json.loads(line))
        except ValueError as exc:
            raise UsageError(f"{path}:{n} is not a JSON object: {exc}",
                             hint='one object per line, e.g. {"input": "hi", "expect": {"contains": "Northwind"}}') from exc
    return checks


def load_health_checks(path) -> list:
    """The checks in ``path`` validated as :class:`~edgepeft.contracts.manifest.HealthCheck` objects (a device's
    own checks); raises :class:`UsageError` or :class:`~edgepeft.errors.SpecError` naming the line."""
    from .fields import Fields
    from .manifest import HealthCheck

    return [HealthCheck.from_fields(Fields(c, str(path), f"line {i + 1}"))
            for i, c in enumerate(read_health_checks(path))]
