"""Does a bundle fit its target? Size, estimated runtime memory, adapter rank, context.

The memory estimate counts what the device runtime really holds, and is documented so a
user can see where the number comes from:

- the graph as ONNX Runtime holds it: **measured** at build time by opening the built graph in
  a session (:func:`.session_memory.measure_session`): ONNX Runtime keeps the stored initializers *and* what it
  derives from them (pre-packed int4/int8 weights, fp32 copies of fp16 constants), well above
  the file's size. Where the session cannot be opened on the build host, or the graph is over
  :data:`.session_memory.MEASURE_MAX_BYTES` (opening a 3B-8B graph would take more memory than the
  streamed build), twice the file stands in, and the report says so;
- one key/value cache at the target's context length per request decoding at once (the
  target's ``max_concurrent``, 4 unless it says otherwise, which is also the engine's default
  on that target: each concurrent request owns one), and for a decoder the engine's default prompt
  cache (:data:`edgepeft.runtime.prompt_cache.DEFAULT_MIB`);
- every adapter as the engine holds it: fp32 payloads as they are, fp16 payloads expanded
  to fp32 (2x their file), int8 payloads expanded to fp32 (4x);
- a fixed allowance for Python, numpy, ONNX Runtime's library, the tokenizer and the engine:
  112 MiB (the benchmark's memory section prints this estimate beside the measured resident memory).

The measurements behind these constants are in docs/measured-defaults.md.

The peak while the engine opens is the measured peak of opening the session (the engine hands
ONNX Runtime its verified bytes as a sealed file, as the measurement does) plus adapters and the
allowance; unmeasured, the estimate plus the graph file once more. That peak is what is compared
with the budget (an out-of-memory kill happens at the peak).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..contracts.target import TargetProfile
from ..errors import TargetFitError
from ..runtime.prompt_cache import DEFAULT_MIB as PROMPT_CACHE_MIB
from .session_memory import SessionMemory

MIB = 1 << 20
RUNTIME_OVERHEAD_MIB = 112  # Python, numpy, onnxruntime, tokenizers, engine (docs/measured-defaults.md)
# bytes held per payload byte once loaded (as fp32; int4 also expands the all-zero groups it leaves out)
EXPANSION = {"fp32": 1, "fp16": 2, "int8": 4, "int4": 10}
UNMEASURED_FACTOR = 2  # session bytes per graph byte where unmeasured (docs/measured-defaults.md)
DEFAULT_CONCURRENCY = 4  # a target's budgets.max_concurrent when it names none


@dataclass(frozen=True)
class FitReport:
    bundle_mib: float
    memory_mib: float
    kv_cache_mib: float
    max_rank: int
    context: int
    adapters_mib: float = 0.0
    open_peak_mib: float = 0.0
    concurrency: int = DEFAULT_CONCURRENCY
    session_mib: float = 0.0
    measured: bool = False  # the session's memory was measured (else the graph file stands in)

    def to_dict(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def kv_cache_bytes(model_info: dict, context: int, bytes_per_value: int = 4) -> int:
    """Key + value cache for one sequence of ``context`` tokens (0 for encoders)."""
    if model_info.get("task") != "causal-lm":
        return 0
    layers, heads, dim = (int(model_info.get(k, 0)) for k in ("num_layers", "num_kv_heads", "head_dim"))
    return 2 * layers * heads * dim * context * bytes_per_value


def adapter_resident_bytes(adapters) -> int:
    """What the engine holds for adapters given as ``(file bytes, payload dtype)`` pairs."""
    return sum(int(size) * EXPANSION.get(dtype, 4) for size, dtype in adapters)


def check_fit(target: TargetProfile, *, bundle_bytes: int, weight_bytes: int, adapter_bytes: int | None = None,
              model_info: dict, max_rank: int, adapters=None, concurrency: int | None = None,
              session: SessionMemory | None = None, external_bytes: int = 0) -> FitReport:
    """Estimate and compare against ``target``; raises :class:`TargetFitError` listing every overrun.

    ``adapters``: ``(file bytes, dtype)`` per adapter (``adapter_bytes`` alone counts as fp32 files);
    ``concurrency``: requests decoding at once (default: the target's ``max_concurrent``);
    ``session``: the graph's session memory from :func:`.session_memory.measure_session` (else the file stands in);
    ``external_bytes``: the graph's external data file (``model.onnx.data``), whose verified copy the engine
    holds for the session's life (:mod:`edgepeft.runtime.external_data`).
    """
    concurrency = concurrency or target.budgets.max_concurrent
    context = min(target.budgets.max_context, int(model_info.get("max_context") or target.budgets.max_context))
    kv_one = kv_cache_bytes(model_info, context)
    kv = kv_one * concurrency + (PROMPT_CACHE_MIB * MIB if kv_one else 0)
    held = adapter_resident_bytes(adapters if adapters is not None else [(adapter_bytes or 0, "fp32")])
    report = _report(bundle_bytes, weight_bytes, kv, held, session, max_rank=max_rank, context=context,
                     concurrency=concurrency, external=external_bytes)
    memory, peak = report.memory_mib, report.open_peak_mib
    problems = []
    if report.bundle_mib > target.budgets.storage_mib:
        problems.append(f"bundle is {report.bundle_mib:.1f} MiB, storage budget is {target.budgets.storage_mib} MiB")
    if peak > target.budgets.memory_mib:
        graph = (f"the graph's session {report.session_mib:.1f} (measured; the file is {weight_bytes / MIB:.1f})"
                 if report.measured else f"weights {weight_bytes / MIB:.1f}")
        problems.append(f"estimated runtime memory is {memory:.1f} MiB ({graph} + "
                        f"KV cache {kv / MIB:.1f} for {concurrency} requests at {context} tokens and the prompt cache + adapters "
                        f"{held / MIB:.1f} as fp32 + {RUNTIME_OVERHEAD_MIB} overhead"
                        + (f" + the verified copy of its data file {external_bytes / MIB:.1f}" if external_bytes else "")
                        + f"), {peak:.1f} MiB while it "
                        f"opens; memory budget is {target.budgets.memory_mib} MiB")
    if max_rank > target.budgets.max_adapter_rank:
        problems.append(f"adapter rank {max_rank} is above the target's limit {target.budgets.max_adapter_rank}")
    if problems:
        raise TargetFitError(f"the bundle does not fit target {target.name}: " + "; ".join(problems),
                             hint="use a smaller --quant, fewer or lower-rank adapters, or a larger target")
    return report


def _report(bundle_bytes: int, weight_bytes: int, kv: int, held: int, session: SessionMemory | None, *,
            max_rank: int, context: int, concurrency: int, external: int = 0) -> FitReport:
    graph = session.resident if session is not None else UNMEASURED_FACTOR * weight_bytes
    # an external data file stays in memory as the verified copy ONNX Runtime reads it from
    memory = (graph + kv + held + external) / MIB + RUNTIME_OVERHEAD_MIB
    if session is not None:  # the engine hands the session its verified bytes as a file: counted in the measure
        peak = max(memory, (session.peak + held + external) / MIB + RUNTIME_OVERHEAD_MIB)
    else:
        peak = memory + (weight_bytes - external) / MIB  # the verified graph beside the session's copy
    return FitReport(bundle_mib=bundle_bytes / MIB, memory_mib=memory, kv_cache_mib=kv / MIB, max_rank=max_rank,
                     context=context, adapters_mib=held / MIB, open_peak_mib=peak, concurrency=concurrency,
                     session_mib=graph / MIB, measured=session is not None)


def manifest_estimate(manifest: dict, concurrency: int | None = None,
                      session: SessionMemory | None = None) -> FitReport:
    """The same estimate for a built bundle, from its manifest (no budget check): what the
    benchmark compares measured memory with. ``concurrency`` defaults to the bundle target's;
    ``session``: the graph's measured session memory (else the file stands in)."""
    budgets = (manifest.get("target") or {}).get("budgets") or {}
    concurrency = concurrency or int(budgets.get("max_concurrent") or DEFAULT_CONCURRENCY)
    sizes = {f["path"]: f["size"] for f in manifest["files"]}
    model = manifest["model"]
    graph = model.get("graph", "model.onnx")
    weight = sum(size for path, size in sizes.items() if path == graph or path.startswith(graph + "."))
    adapters = [(sizes.get(a["file"], 0), a.get("dtype", "fp32")) for a in manifest.get("adapters", [])]
    context = int((manifest.get("generation") or {}).get("max_context") or model.get("max_context") or 0)
    kv = kv_cache_bytes(model, context) * concurrency
    return _report(sum(sizes.values()), weight, kv, adapter_resident_bytes(adapters), session,
                   max_rank=max((a.get("rank", 0) for a in manifest.get("adapters", [])), default=0),
                   context=context, concurrency=concurrency, external=sizes.get(graph + ".data", 0))

