"""What ONNX Runtime holds for a graph once it is open: measured, for the fit check (:mod:`.fit`).

ONNX Runtime keeps a graph's stored initializers and what it derives from them (pre-packed int4/int8
weights, fp32 copies of fp16 constants), well above the file's size; the file size is no estimate of that.
"""

from __future__ import annotations

from dataclasses import dataclass

# Larger graphs are not opened to measure (a 1B-parameter int4 graph is smaller): opening one would take
# more memory than the streamed build itself, so their session is estimated from the file (.fit says so)
MEASURE_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class SessionMemory:
    """What an ONNX Runtime session of a graph holds once open, and at most while opening (bytes)."""
    resident: int
    peak: int


def _rss() -> tuple[int, int] | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            d = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def measure_session(graph_path, threads: int = 1, timeout: float = 300.0) -> SessionMemory | None:
    """Open ``graph_path`` in an ONNX Runtime CPU session (the device's session options) in a fresh
    process and return how much resident memory the session added, and its peak while opening; None
    where this cannot be measured (no /proc, the graph does not open here, the process fails).

    A fresh process, because in the building process freed memory is reused and the figure comes out
    low (docs/measured-defaults.md).
    """
    import json
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-m", "edgepeft.bundle.session_memory", str(graph_path), str(threads)],
                              capture_output=True, text=True, timeout=timeout)
        out = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    if not out:
        return None
    return SessionMemory(resident=int(out["resident"]), peak=int(out["peak"]))


def _measure_here(graph_path: str, threads: int) -> dict | None:
    """The measurement itself, in the process that runs it (see :func:`measure_session`)."""
    import onnxruntime as ort  # the library itself is in the runtime allowance, not in the session

    from ..runtime.session import return_freed_heap, session_options

    so = session_options(threads)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _rss()
    if before is None:
        return None
    try:
        sess = ort.InferenceSession(graph_path, so, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own types; a graph for another provider is not measured here
        return None
    return_freed_heap()  # as the engine does once open
    after = _rss()
    del sess
    if after is None:
        return None
    resident = max(0, after[0] - before[0])
    return {"resident": resident, "peak": max(resident, after[1] - before[0]) if reset else resident}


if __name__ == "__main__":  # python -m edgepeft.bundle.session_memory GRAPH THREADS: one JSON line
    import json
    import sys

    print(json.dumps(_measure_here(sys.argv[1], int(sys.argv[2]))))
