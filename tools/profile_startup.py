"""Where a bundle's open to first token and resident memory go, beside onnxruntime-genai (an experiment tool).

    python tools/profile_startup.py [--reps N] [--code DIR] BUNDLE_DIR ... [--genai MODEL_DIR] --pub KEY.pub

Each measurement is a fresh process (warm page cache, cold process, 2 threads), interleaved across the
systems and repeated; medians are printed with the CPU and the 1-minute load average. For edgepeft it splits
``Engine(...)`` into hashing the graph into its verified in-memory copy, creating the ONNX Runtime session
and the rest, then times the first streamed token, with resident memory (all, private, peak) after open and
after the first token. The process's CPU time for the open and for the first token is printed beside wall
time: on shared cores it moves far less with other load. A system may be given as ``CODE_DIR=BUNDLE_DIR``: that process imports edgepeft from
``CODE_DIR`` (e.g. an exported copy of main), so old and new code run side by side in one run. genai runs
``og.Model``, ``og.Tokenizer`` on the same prompt text, then one token. The benchmark's own figures are ``make bench``'s memory
section (benchmarks/sec_memory.py); this splits them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def _mem(tag: str) -> dict[str, int]:
    s = _status()
    return {f"rss_{tag}": s["VmRSS"], f"anon_{tag}": s.get("RssAnon", 0), f"shmem_{tag}": s.get("RssShmem", 0)}


def _cpu_s() -> float:
    """CPU seconds this process used so far (all threads): less sensitive to other load than wall time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(owner, name: str, into: dict, key: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its wall time to ``into[key]`` (a no-op where it is absent)."""
    fn = getattr(owner, name, None)
    if fn is None:
        return

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - t

    setattr(owner, name, wrapper)


def child_edgepeft(bundle: str, pub: str, text: str) -> dict:
    import onnxruntime  # noqa: F401  native libraries before the clock, as the benchmark's probe does
    import tokenizers  # noqa: F401

    from edgepeft.contracts import verify
    from edgepeft.runtime import engine

    out: dict = {}
    _timed(verify.BundleFiles, "open_verified", out, "hash_graph_s")
    _timed(engine, "open_session", out, "session_s")
    t0, c0 = time.perf_counter(), _cpu_s()
    eng = engine.Engine(bundle, [pub], threads=2)
    out["open_s"], out["open_cpu_s"] = time.perf_counter() - t0, _cpu_s() - c0
    out |= _mem("open")
    t1, c1 = time.perf_counter(), _cpu_s()
    stream = eng.generate(text, max_new_tokens=4, temperature=0.0, stream=True)
    next(iter(stream))
    out["first_token_s"], out["first_cpu_s"] = time.perf_counter() - t1, _cpu_s() - c1
    out["open_to_first_token_s"] = time.perf_counter() - t0
    for _ in stream:
        pass
    out |= _mem("first")
    return out


def child_genai(model_dir: str, text: str) -> dict:
    import onnxruntime_genai as og

    out: dict = {}
    t0, c0 = time.perf_counter(), _cpu_s()
    model = og.Model(model_dir)
    out["open_s"] = out["session_s"] = time.perf_counter() - t0
    out["open_cpu_s"] = _cpu_s() - c0
    out |= _mem("open")
    t1, c1 = time.perf_counter(), _cpu_s()
    ids = og.Tokenizer(model).encode(text)  # from the text, as edgepeft's open builds its tokenizer
    out["tokenizer_s"] = time.perf_counter() - t1
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 64, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    gen.generate_next_token()
    out["first_token_s"], out["first_cpu_s"] = time.perf_counter() - t1, _cpu_s() - c1
    out["open_to_first_token_s"] = time.perf_counter() - t0
    out |= _mem("first")
    return out


def _prompt() -> tuple[str, list[int]]:
    from benchmarks.fixtures import bench_prompt, real_models

    return bench_prompt(real_models().decoder_dir, 32)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


KEYS = ["hash_graph_s", "session_s", "open_s", "open_cpu_s", "first_token_s", "first_cpu_s", "open_to_first_token_s", "rss_open", "anon_open",
        "shmem_open", "rss_first", "anon_first", "peak"]


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*", help="bundle folders, or CODE_DIR=BUNDLE_DIR")
    ap.add_argument("--genai", action="append", default=[], help="an onnxruntime-genai model folder")
    ap.add_argument("--pub", help="the public key the bundles are signed with")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        spec = json.loads(a.child)
        res = child_genai(spec["dir"], spec["text"]) if spec["kind"] == "genai" else \
            child_edgepeft(spec["bundle"], spec["pub"], spec["text"])
        res["peak"] = _status().get("VmHWM", 0)
        print(json.dumps(res))
        return
    text, _ = _prompt()
    systems: list[tuple[str, dict, str]] = []
    for b in a.bundles:
        code, _, bundle = b.rpartition("=")
        systems.append((b, {"kind": "edgepeft", "bundle": bundle, "pub": a.pub, "text": text}, code or str(ROOT)))
    for g in a.genai:
        systems.append((f"genai {Path(g).name}", {"kind": "genai", "dir": g, "text": text}, str(ROOT)))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in systems}
    loads = []
    for _ in range(a.reps):
        for name, spec, code in systems:
            env = os.environ | {"PYTHONPATH": code + os.pathsep + str(ROOT)}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            loads.append(os.getloadavg()[0])
    print(f"{_cpu()}, {os.cpu_count()} CPUs, 2 threads, {a.reps} interleaved reps; 1-min load average "
          f"median {statistics.median(loads):.2f} (min {min(loads):.2f}, max {max(loads):.2f})")
    print("medians; times in ms, memory in MiB")
    print(f"{'system':60s} " + " ".join(f"{k.replace('_s', ''):>9.9s}" for k in KEYS))
    for name, rs in runs.items():
        row = []
        for k in KEYS:
            vals = [r[k] for r in rs if k in r]
            if not vals:
                row.append(f"{'-':>9s}")
                continue
            med = statistics.median(vals)
            row.append(f"{med * 1e3:9.0f}" if k.endswith("_s") else f"{med / 2 ** 20:9.0f}")
        print(f"{name[-60:]:60s} " + " ".join(row))


if __name__ == "__main__":
    main(sys.argv[1:])
