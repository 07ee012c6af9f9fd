"""Does a bundle fit its target? Size, estimated runtime memory, adapter rank, context.

The memory estimate is deliberately simple and documented, so a user can see
where the number comes from: weights as stored, plus the key/value cache at
the target's context length, plus the loaded adapters, plus a fixed allowance
for ONNX Runtime's arenas and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TargetFitError
from ..spec.target import TargetProfile

MIB = 1 << 20
RUNTIME_OVERHEAD_MIB = 40  # ORT session, arenas, tokenizer, Python: measured ~30-40 MiB on x86-64


@dataclass(frozen=True)
class FitReport:
    bundle_mib: float
    memory_mib: float
    kv_cache_mib: float
    max_rank: int
    context: int

    def to_dict(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def kv_cache_bytes(model_info: dict, context: int, bytes_per_value: int = 4) -> int:
    """Key + value cache for one sequence of ``context`` tokens (0 for encoders)."""
    if model_info.get("task") != "causal-lm":
        return 0
    layers, heads, dim = (int(model_info.get(k, 0)) for k in ("num_layers", "num_kv_heads", "head_dim"))
    return 2 * layers * heads * dim * context * bytes_per_value


def check_fit(target: TargetProfile, *, bundle_bytes: int, weight_bytes: int, adapter_bytes: int,
              model_info: dict, max_rank: int) -> FitReport:
    """Estimate and compare against ``target``; raises :class:`TargetFitError` listing every overrun."""
    context = min(target.budgets.max_context, int(model_info.get("max_context") or target.budgets.max_context))
    kv = kv_cache_bytes(model_info, context)
    memory = (weight_bytes + kv + adapter_bytes) / MIB + RUNTIME_OVERHEAD_MIB
    report = FitReport(bundle_mib=bundle_bytes / MIB, memory_mib=memory, kv_cache_mib=kv / MIB,
                       max_rank=max_rank, context=context)
    problems = []
    if report.bundle_mib > target.budgets.storage_mib:
        problems.append(f"bundle is {report.bundle_mib:.1f} MiB, storage budget is {target.budgets.storage_mib} MiB")
    if memory > target.budgets.memory_mib:
        problems.append(f"estimated runtime memory is {memory:.1f} MiB (weights {weight_bytes / MIB:.1f} + "
                        f"KV cache {kv / MIB:.1f} at {context} tokens + adapters {adapter_bytes / MIB:.1f} + "
                        f"{RUNTIME_OVERHEAD_MIB} overhead), memory budget is {target.budgets.memory_mib} MiB")
    if max_rank > target.budgets.max_adapter_rank:
        problems.append(f"adapter rank {max_rank} is above the target's limit {target.budgets.max_adapter_rank}")
    if problems:
        raise TargetFitError(f"the bundle does not fit target {target.name}: " + "; ".join(problems),
                             hint="use a smaller --quant, fewer or lower-rank adapters, or a larger target")
    return report
