"""Creating the one ONNX Runtime session of an engine, tuned for on-device decoding.

Provider order and thread count come from the bundle's target profile (or the
caller's overrides); providers this onnxruntime build lacks are skipped, and the
CPU provider is always the last fallback.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

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


@contextmanager
def sealed_file(data):
    """A path whose content is ``data`` and can no longer change: a sealed memfd (Linux), else None.

    Why: ONNX Runtime keeps a whole extra copy of a model it is given as bytes (measured +78 MiB of
    private memory for SmolLM2's int4 graph, ``benchmarks.sec_memory``), but not of one it reads from
    a file. Handing it the bundle's file path would load bytes that may have changed since they were
    hashed; a memfd sealed against writes, truncation and growth holds exactly the verified bytes,
    and is gone once closed.
    """
    import fcntl

    seals = getattr(fcntl, "F_SEAL_WRITE", None)
    if not hasattr(os, "memfd_create") or seals is None or not os.path.isdir("/proc/self/fd"):
        yield None
        return
    try:
        fd = os.memfd_create("edgepeft-model", os.MFD_ALLOW_SEALING | getattr(os, "MFD_CLOEXEC", 0))
    except OSError:
        yield None
        return
    try:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def open_session(model, *, providers: Sequence[str] | None, threads: int, spinning: bool = True,
                 name: str = "model.onnx"):
    """One InferenceSession from the graph's verified bytes (or a path); raises :class:`BundleError`
    when the graph cannot be loaded. Bytes reach ONNX Runtime through :func:`sealed_file` where the
    system has one (less memory), else as bytes."""
    import onnxruntime as ort

    so = session_options(threads, spinning=spinning)
    try:
        if not isinstance(model, (bytes, bytearray, memoryview)):
            return ort.InferenceSession(str(model), so, providers=choose_providers(providers))
        with sealed_file(model) as path:
            src = path if path is not None else bytes(model)
            return ort.InferenceSession(src, so, providers=choose_providers(providers))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"onnxruntime cannot load {name}: {str(exc)[:300]}",
                          hint="the bundle may need a newer onnxruntime, or was built for another target") from exc
