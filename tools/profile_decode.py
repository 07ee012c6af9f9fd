"""Where a decoder graph's decode time goes, op type by op type (an experiment tool).

    python tools/profile_decode.py [--rows N] [--adapters] BUNDLE_DIR [BUNDLE_DIR ...]

Opens each bundle's model.onnx in ONNX Runtime (2 threads, the device's session options), runs a 16-token
prompt, then 40 decode steps of one token per row, and prints the time per step without profiling, then
again in a profiling session with the kernel time per op type. docs/quantization.md quotes it for the graph
that carries a GGUF's blocks against the re-quantized one (e.g. the benchmark's
benchmarks/work/bundles/dec-int4-r8-all and dec-int4-r8-requantize). Profiling adds its own overhead: compare
graphs within one run.

``--rounds R`` compares the bundles instead: each one's time per step, alternated for R rounds in one
process. ``--rows N`` decodes N rows per step, as continuous batching does (benchmarks/README.md, "Batching: where a
step's time goes as rows grow"); ``--adapters`` binds every adapter slot with a different random adapter per
row, at the manifest's slot shapes (per-row tensors, as :mod:`edgepeft.runtime.rowslots` binds them), where
the default leaves the slots empty. genai model folders work without ``--adapters``.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path


def _session(bundle: Path, profiling: bool):
    import onnxruntime as ort

    from edgepeft.runtime.session import session_options

    so = session_options(2)
    if profiling:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    return ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _slot_feeds(bundle: Path, rows: int) -> dict:
    """A different random adapter per row for every slot: [rows, *shape] float32 (small values)."""
    import numpy as np

    manifest = bundle / "manifest.json"
    model = json.loads(manifest.read_text())["model"] if manifest.is_file() else {}
    shapes = model.get("slot_shapes")
    if not shapes:
        raise SystemExit(f"{bundle}: no manifest with model.slot_shapes, so --adapters has no slots to fill")
    if model.get("slot_dtypes"):
        raise SystemExit(f"{bundle}: its LoRA B slots are int8 (lora_b = \"int8\"), which are never batched; "
                         "profile it without --adapters, or a bundle with fp32 slots")
    rng = np.random.default_rng(0)
    return {n: (0.01 * rng.standard_normal((rows, *s))).astype(np.float32) for n, s in shapes.items()}


def profile(bundle: Path, rows: int = 1, adapters: bool = False, steps: int = 40) -> None:
    import numpy as np

    slots = _slot_feeds(bundle, rows) if adapters else {}
    for profiling in (False, True):
        sess = _session(bundle, profiling)
        kv = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        heads, dim = kv[0].shape[1], kv[0].shape[3]
        dim = dim if isinstance(dim, int) else 64  # onnxruntime-genai names the head dim (SmolLM2's is 64)
        past = {i.name: np.zeros((rows, heads, 256, dim), np.float32) for i in kv}

        def run(ids: list[int], pos: int) -> None:
            feeds = {"input_ids": np.array([ids] * rows, np.int64),
                     "attention_mask": np.ones((rows, pos + len(ids)), np.int64)}
            sess.run(["logits"], feeds | past | slots)

        run(list(range(1, 17)), 0)
        t0 = time.perf_counter()
        for k in range(steps):
            run([5], 16 + k)
        per_step = (time.perf_counter() - t0) / steps
        what = f"{bundle.name}, {rows} row{'s' if rows > 1 else ''}{', an adapter per row' if adapters else ''}"
        if not profiling:
            print(f"{what}: {per_step * 1e3:.2f} ms per step")
            continue
        events = json.loads(Path(sess.end_profiling()).read_text())
        spent, count = collections.Counter(), collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                spent[e["args"]["op_name"]] += e["dur"]
                count[e["args"]["op_name"]] += 1
        runs = steps + 1
        print(f"  profiling on: {per_step * 1e3:.2f} ms per step; kernels {sum(spent.values()) / runs / 1e3:.2f} ms per run")
        for op, us in spent.most_common(14):
            print(f"  {op:34s} {us / runs / 1e3:7.3f} ms  {count[op] // runs:5d} nodes")


def interleaved(bundles: list[Path], rows: int, adapters: bool, rounds: int, steps: int = 30) -> None:
    """Time per step of each bundle, the bundles alternated for ``rounds`` rounds in one process (no profiling):
    on a shared machine, how two graphs are compared."""
    import statistics

    import numpy as np

    setups = []
    for b in bundles:
        sess = _session(b, False)
        kv = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        dim = kv[0].shape[3] if isinstance(kv[0].shape[3], int) else 64
        past = {i.name: np.zeros((rows, kv[0].shape[1], 256, dim), np.float32) for i in kv}
        setups.append((b, sess, past | (_slot_feeds(b, rows) if adapters else {})))
    times: dict[Path, list[float]] = {b: [] for b in bundles}
    for _ in range(rounds):
        for b, sess, fixed in setups:
            t0 = time.perf_counter()
            for k in range(steps):
                sess.run(["logits"], {"input_ids": np.full((rows, 1), 5, np.int64),
                                      "attention_mask": np.ones((rows, 17 + k), np.int64)} | fixed)
            times[b].append((time.perf_counter() - t0) / steps)
    first = statistics.median(times[bundles[0]])
    for b in bundles:
        med = statistics.median(times[b])
        print(f"{b.name}, {rows} row(s){', an adapter per row' if adapters else ''}: {med * 1e3:.2f} ms per step "
              f"(median of {rounds} interleaved rounds; {med / first:.3f}x the first)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--rows", type=int, default=1, help="rows decoded per step (default 1)")
    ap.add_argument("--adapters", action="store_true", help="a different random adapter per row in every slot")
    ap.add_argument("--rounds", type=int, default=0,
                    help="time the bundles alternated for this many rounds instead of profiling each")
    a = ap.parse_args(argv)
    if a.rows < 1:
        ap.error("--rows must be at least 1")
    if a.rounds > 0:
        interleaved(a.bundles, a.rows, a.adapters, a.rounds)
        return 0
    for b in a.bundles:
        profile(b, a.rows, a.adapters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
