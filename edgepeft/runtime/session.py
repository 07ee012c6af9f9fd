"""Creating the one ONNX Runtime session of an engine, tuned for on-device decoding.

Provider order and thread count come from the bundle's target profile (or the
caller's overrides); providers this onnxruntime build lacks are skipped, and the
CPU provider is always the last fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import BundleError, EngineError


def choose_providers(wanted: Sequence[str] | None) -> list[str]:
    """The wanted providers this build has, in order, ending with CPUExecutionProvider."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    chosen = [p for p in (wanted or []) if p in have and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


def session_options(threads: int, *, spinning: bool = True, optimized_model: Path | None = None):
    """SessionOptions for a latency-bound single-stream workload.

    - ``intra_op_num_threads`` = the target's threads; inter-op 1 (the graph is a chain);
    - full graph optimization (fuses the remaining elementwise ops);
    - memory pattern on: shapes repeat every decode step, so ORT reuses one plan;
    - ``session.intra_op.allow_spinning``: worker threads spin between the many small
      per-token kernels instead of sleeping (faster decode; turn off to save power).
    """
    import onnxruntime as ort

    if not isinstance(threads, int) or threads < 1:
        raise EngineError(f"threads must be a positive integer, got {threads!r}", hint="e.g. threads=2")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_mem_pattern = True
    so.enable_cpu_mem_arena = True
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_model is not None:
        so.optimized_model_filepath = str(optimized_model)
    return so


MIN_ORT_INT4 = (1, 27)  # older onnxruntime computes these int4 graphs wrongly (logits off by up to ~9)


def check_runtime(quantization: dict) -> None:
    """Refuse a graph this onnxruntime is known to compute wrongly (raises :class:`BundleError`)."""
    import onnxruntime as ort

    version = tuple(int(x) for x in ort.__version__.split(".")[:2] if x.isdigit())
    if quantization.get("weights") == "int4" and version < MIN_ORT_INT4:
        want = ".".join(map(str, MIN_ORT_INT4))
        raise BundleError(f"onnxruntime {ort.__version__} computes int4 graphs wrongly (measured: logits off by up to "
                          f"8.6 where 1.27 and later agree with the reference)",
                          hint=f"install onnxruntime>={want} (Python 3.11 or later), or use an int8 bundle")


def return_freed_heap() -> bool:
    """Give the heap memory freed while a session was built back to the system (glibc's ``malloc_trim``).

    Why: opening a graph parses it, folds its constants and pre-packs its weights; glibc keeps the
    blocks freed on the way in its arenas, so resident memory stays as if they were live (measured on
    SmolLM2 int4 after open: 78 MiB for the GGUF-block graph, 34 MiB for the re-quantized one, in a few
    milliseconds). With another C library (no ``malloc_trim``) nothing happens and False is returned.
    """
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def open_session(model, *, providers: Sequence[str] | None, threads: int, spinning: bool = True,
                 name: str = "model.onnx", initializers: tuple[list[str], list] | None = None):
    """One InferenceSession from the graph's verified bytes or a path to them. ``initializers``: (names,
    OrtValues) of the graph's external weights, from verified memory (:mod:`.external_data`); ONNX Runtime
    then reads no data file. Raises :class:`BundleError` when the graph cannot be loaded."""
    import onnxruntime as ort

    so = session_options(threads, spinning=spinning)
    if initializers is not None:
        so.add_external_initializers(*initializers)
    try:
        src = bytes(model) if isinstance(model, (bytes, bytearray, memoryview)) else str(model)
        return ort.InferenceSession(src, so, providers=choose_providers(providers))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"onnxruntime cannot load {name}: {str(exc)[:300]}",
                          hint="the bundle may need a newer onnxruntime, or was built for another target") from exc
