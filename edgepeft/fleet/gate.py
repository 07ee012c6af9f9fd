"""The eval gate: a rollout does not start when the adapter's held-out metrics are under the plan's floors.

Adapters hide bias in slices: an adapter can reach 0.9 accuracy overall while it
fails the customers of one app or one language. Floors apply to the overall
metric and to slices (one by name, or ``*`` for every slice). The metrics come
from the training record named by the plan, or from the update packages
themselves (signed metric values, never samples).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RolloutError


def _package_metrics(packages) -> list[tuple[str, dict]]:
    from ..contracts.update import read_metadata_unverified

    out = []
    for p in packages:
        meta = read_metadata_unverified(Path(p).read_bytes()[:1 << 21], str(p))
        if meta.adapter is not None:
            out.append((f"{meta.name} v{meta.version}", (meta.adapter.metrics or {}).get("eval") or {}))
    return out


def check_gate(plan) -> list[str]:
    """What the gate found (one line per floor checked); raises :class:`RolloutError` on any failure."""
    if plan.record is not None:
        try:
            record = json.loads(Path(plan.record).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RolloutError(f"eval gate: cannot read the training record {plan.record}: {exc}",
                               hint="point eval_gate.record at the adapter's edgepeft_training.json") from exc
        sources = [(str(plan.record), (record.get("metrics") or {}).get("eval") or {})]
    else:
        sources = _package_metrics(plan.packages)
    sources = [(name, m) for name, m in sources if m]
    if not sources:
        if plan.require_record or plan.floors:
            raise RolloutError("eval gate: the adapter has no training record with held-out metrics, and the plan "
                               "demands one", hint="train it with held-out data (--eval-data), or set eval_gate.record")
        return ["eval gate: no floors"]
    seen, failures = [], []
    for name, m in sources:
        for fl in plan.floors:
            if fl.slice is None:
                checks = [("overall", m.get(fl.metric))]
            else:
                slices = m.get("slices") or {}
                if fl.slice != "*" and fl.slice not in slices:
                    failures.append(f"{name}: slice {fl.slice!r} has no {fl.metric} in the record "
                                    f"(slices: {', '.join(slices) or 'none'})")
                    continue
                checks = [(f"slice {k!r}", (v or {}).get(fl.metric)) for k, v in slices.items()
                          if fl.slice in ("*", k)]
                if not checks:
                    failures.append(f"{name}: the record has no slices, the plan floors {fl.metric} per slice")
            for where, value in checks:
                if not isinstance(value, (int, float)):
                    failures.append(f"{name}: {where} has no metric {fl.metric!r}")
                elif value < fl.min:
                    failures.append(f"{name}: {fl.metric} {where} = {value:.3f}, under the floor {fl.min:.3f}")
                else:
                    seen.append(f"{name}: {fl.metric} {where} = {value:.3f} >= {fl.min:.3f}")
    if failures:
        raise RolloutError("eval gate: " + "; ".join(failures),
                           hint="improve the adapter on those slices (more or better data) before rolling it out")
    return seen
