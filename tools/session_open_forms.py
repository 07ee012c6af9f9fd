"""How long ONNX Runtime takes to open one graph, and what it then holds, by how the graph reaches it
(an experiment tool).

    python tools/session_open_forms.py MODEL.onnx [--reps 3] [--external]

Each measurement is a fresh process (2 threads, the device's session options), the forms interleaved:
``path`` opens the bundle's own file by path; ``sealed`` first copies it into an in-memory file, as the
engine's verified copy is (a memfd, opened by its /proc path); with ``--external`` (needs onnx: server
side), ``external`` saves the graph once with its weights in a separate data file and hands them to ONNX
Runtime as OrtValues over an in-memory copy (:mod:`edgepeft.runtime.external_data`), the form that keeps
the copy resident. Prints per form the median time to open, the resident and private memory after open,
and the system's free memory at the start (with the page cache full, the in-memory copy costs more:
benchmarks/README.md, "Where it stands"). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _mem() -> dict:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(val.split()[0]) / 1024
    return out


def _copy_to_memfd(path: Path) -> int:
    fd = os.memfd_create(path.name, os.MFD_CLOEXEC)
    with open(path, "rb") as fh:
        while block := fh.read(2 << 20):
            os.write(fd, block)
    return fd


def child(form: str, graph: str) -> dict:
    import mmap
    import time

    from edgepeft.runtime.external_data import external_tensors, initializers_from
    from edgepeft.runtime.session import open_session, return_freed_heap

    keep = []
    if form == "path":
        t0 = time.perf_counter()
        sess = open_session(graph, providers=None, threads=2)
    elif form == "sealed":
        fd = _copy_to_memfd(Path(graph))
        t0 = time.perf_counter()
        sess = open_session(f"/proc/self/fd/{fd}", providers=None, threads=2)
        os.close(fd)
    else:
        gfd, dfd = _copy_to_memfd(Path(graph)), _copy_to_memfd(Path(graph + ".data"))
        gview = memoryview(mmap.mmap(gfd, os.fstat(gfd).st_size, access=mmap.ACCESS_READ))
        data = memoryview(mmap.mmap(dfd, os.fstat(dfd).st_size, access=mmap.ACCESS_READ))
        os.close(dfd)
        t0 = time.perf_counter()
        weights = initializers_from(external_tensors(gview, Path(graph).name + ".data"), data)
        sess = open_session(f"/proc/self/fd/{gfd}", providers=None, threads=2, initializers=weights)
        keep.append(data)
    open_s = time.perf_counter() - t0
    return_freed_heap()
    keep.append(sess)
    return {"open_s": open_s} | _mem()


def _free_mib() -> float:
    with open("/proc/meminfo", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("MemFree:")) / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graph", type=Path, nargs="?")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--external", action="store_true", help="also the external-data form (writes a copy to /tmp)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(*a.child)))
        return 0
    if a.graph is None:
        ap.error("name the graph (a model.onnx)")
    forms = {"path": str(a.graph), "sealed": str(a.graph)}
    tmp = None
    if a.external:
        import onnx

        tmp = tempfile.TemporaryDirectory(prefix="open-forms-")
        out = Path(tmp.name) / "model.onnx"
        onnx.save_model(onnx.load(str(a.graph)), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        forms["external"] = str(out)
    print(f"free memory at the start: {_free_mib():.0f} MiB")
    runs: dict[str, list[dict]] = {f: [] for f in forms}
    for _ in range(a.reps):
        for form, graph in forms.items():
            proc = subprocess.run([sys.executable, __file__, "--child", form, graph], capture_output=True, text=True,
                                  env=os.environ | {"PYTHONPATH": str(ROOT)}, check=True)
            runs[form].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for form, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{form:9s} open {med['open_s'] * 1e3:6.0f} ms   resident {med['VmRSS']:6.0f} MiB   "
              f"private {med['RssAnon']:6.0f} MiB")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
