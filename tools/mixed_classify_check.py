"""Mixed classify batches on all-MiniLM-L6-v2: does a text answer as alone, and what does one run cost?

    python tools/mixed_classify_check.py [--threads 2] [--rounds 100]

Builds the embedded all-MiniLM-L6-v2 as fp32, int4 and int8 bundles with three random classifiers (LoRA
rank 8 on query/value with 3 labels, LoRA rank 4 on query/key/value with 2, a bottleneck of 16 with 4), and an
fp32 bundle built without per-row slots, as edgepeft built them before. Prints, per kind, the largest
probability difference between a text in a mixed ``classify`` call and the same text alone, and the median
time of 8 texts (3 adapters) as one mixed call, as one call per adapter and as 8 single-text calls, for texts
of varied and of equal length (int4: also what writing the mixed call's per-row tensors costs); then one
adapter's 8 texts on the graph with and without per-row slots. The calls compared are alternated one by one,
so a shared machine's changing load hits them alike. docs/http-api.md ("Classifiers: one adapter per input")
quotes it.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TEXTS = ["the parcel arrived two days late and the box was damaged", "great service, thank you so much",
         "how do I change the billing address on my account", "never buying from this shop again",
         "the refund has not arrived yet", "can you ship to Norway", "it works", "what a waste of money"]
MIXED = ["a", "b", "bn", "a", "b", "bn", "a", "b"]
LABELS = {"a": ["l0", "l1", "l2"], "b": ["no", "yes"], "bn": ["w", "x", "y", "z"]}


def _timed(calls: dict, rounds: int) -> dict:
    """Median ms of each call, the calls alternated one by one (a loaded machine's drift hits all alike)."""
    for f in calls.values():
        f()
    times: dict = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def main(threads: int, rounds: int) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's edgepeft; the builders live with the tests
    from test_export_support import make_bottleneck_adapter, make_peft_adapter
    from test_runtime_support import training_record

    import edgepeft.export.encoder_graph as eg
    from edgepeft.bundle.build import build_bundle
    from edgepeft.contracts.signing import generate_keypair
    from edgepeft.models.base import resolve_base
    from edgepeft.runtime import Engine
    from edgepeft.runtime.registry import slot_group
    from edgepeft.runtime.rowslots import bind_rows, row_groups

    root = Path(tempfile.mkdtemp(prefix="mixed-classify-"))
    priv, pub = generate_keypair(root / "key")
    base = Path(resolve_base(None, task="classification").path)
    dirs = {n: root / n for n in LABELS}
    make_peft_adapter(base, dirs["a"], task="classification", r=8, alpha=16, targets=("query", "value"), seed=1,
                      num_labels=3)
    make_peft_adapter(base, dirs["b"], task="classification", r=4, alpha=8, targets=("query", "key", "value"),
                      seed=2, num_labels=2)
    make_bottleneck_adapter(base, dirs["bn"], task="classification", size=16, seed=3, num_labels=4, scale=0.05)
    for n, d in dirs.items():
        training_record(d, labels=LABELS[n])

    def build(tag: str, quant: str, row_slots: bool = True) -> Path:
        orig = eg.build_encoder
        eg.build_encoder = functools.partial(orig, row_slots=row_slots)
        try:
            return build_bundle(base=str(base), adapters=list(dirs.items()), target="x86-64-gateway", key=priv,
                                out=root / tag, quant=quant, slot_rank=8, task="classification").bundle_dir
        finally:
            eg.build_encoder = orig

    same = [TEXTS[0]] * len(TEXTS)
    for quant in ("fp32", "int4", "int8"):
        with Engine(build(quant, quant), [pub], threads=threads) as e:
            got = e.classify(TEXTS, adapter=MIXED)
            worst = max(abs(r.probabilities[k] - e.classify([t], adapter=n)[0].probabilities[k])
                        for t, n, r in zip(TEXTS, MIXED, got) for k in r.probabilities)
            print(f"{quant}: mixed vs alone, largest probability difference {worst:.3g}", flush=True)
            for tag, ts in (("varied lengths", TEXTS), ("equal lengths", same)):
                got = _timed({"one mixed call": lambda ts=ts: e.classify(ts, adapter=MIXED),
                              "one call per adapter": lambda ts=ts: [e.classify(
                                  [t for t, m in zip(ts, MIXED) if m == n], adapter=n) for n in LABELS],
                              "8 single-text calls": lambda ts=ts: [e.classify([t], adapter=n)
                                                                    for t, n in zip(ts, MIXED)]}, rounds)
                print(f"  {tag}: " + ", ".join(f"{k} {v} ms" for k, v in got.items()), flush=True)
            if quant == "int4":  # what writing the per-row tensors of the mixed call costs, and how much it writes
                rows = [e.registry.get(n) for n in MIXED]
                users = {g: [a if any(slot_group(k) == g for k in a.arrays) else None for a in rows]
                         for g in row_groups(e.session, e.model_info, len(rows))}
                feeds = bind_rows(row_groups(e.session, e.model_info, len(rows)), users)
                took = _timed({"write": lambda: bind_rows(row_groups(e.session, e.model_info, len(rows)), users)},
                              rounds * 2)["write"]
                print(f"  per-row tensors: {sum(v.nbytes for v in feeds.values()) / 1e6:.1f} MB, {took} ms to write",
                      flush=True)
    new, old = Engine(root / "fp32", [pub], threads=threads), Engine(build("old", "fp32", False), [pub],
                                                                        threads=threads)
    with new, old:
        got = _timed({"per-row slots": lambda: new.classify(TEXTS, adapter="a"),
                      "shaped slots": lambda: old.classify(TEXTS, adapter="a")}, rounds)
        print("fp32, one adapter, 8 texts: " + ", ".join(f"{k} {v} ms" for k, v in got.items()))

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args()
    main(args.threads, args.rounds)
