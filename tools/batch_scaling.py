"""How concurrent requests scale inside one Engine, without HTTP (an experiment tool).

    python tools/batch_scaling.py BUNDLE_DIR --pub KEY.pub [--clients 1,4,8] [--rounds 3] [--prompt-cache-mb 16]

Opens the bundle (2 threads, room for 8 rows), then runs rounds of N threads at once, each a 48-token greedy
chat completion on another adapter (the first on the bare base, then the bundle's adapters in order), and
prints per N: aggregate tokens/s, the median time to first token, and the median time of one batched step and
of one prefill (the batcher's own calls, timed by wrapping them). Section 11 of the benchmark measures the same
over HTTP; the difference between the two is the server's share. Compare runs of one invocation only.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _timed(cls, name: str, into: dict, key) -> None:
    """Wrap ``cls.name`` so each call's seconds go to ``into[key(args)]``."""
    inner = getattr(cls, name)

    def wrapper(self, *args):
        t0 = time.perf_counter()
        try:
            return inner(self, *args)
        finally:
            into.setdefault(key(args), []).append(time.perf_counter() - t0)
    setattr(cls, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--pub", type=Path, required=True, help="the bundle's trusted public key")
    ap.add_argument("--clients", default="1,4,8", help="comma list of N")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-cache-mb", type=float, default=16.0)
    a = ap.parse_args(argv)

    from edgepeft.runtime import Engine
    from edgepeft.runtime.batching import Batcher

    steps: dict = {}
    _timed(Batcher, "_step_batch", steps, lambda args: len(args[0]))
    _timed(Batcher, "_step_alone", steps, lambda args: 1)
    _timed(Batcher, "_prefill", steps, lambda args: "prefill")
    clients = [int(x) for x in a.clients.split(",") if x.strip()]
    with Engine(a.bundle, [a.pub], threads=2, max_concurrent=max(clients),
                prompt_cache_mb=a.prompt_cache_mb) as engine:
        names = [None] + engine.registry.names()

        def one(adapter, out: list) -> None:
            t0, first, n = time.perf_counter(), None, 0
            for _ in engine.generate(messages=[{"role": "user", "content": QUESTION}], adapter=adapter,
                                     max_new_tokens=48, stream=True, temperature=0):
                n += 1
                first = first if first is not None else time.perf_counter() - t0
            out.append((n, first))

        def round_(n: int) -> tuple[float, float]:
            out: list = []
            threads = [threading.Thread(target=one, args=(names[i % len(names)], out)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(o[0] for o in out) / (time.perf_counter() - t0), statistics.median(o[1] for o in out)

        for n in clients:  # warm-up: adapters loaded, buffers touched
            round_(n)
        steps.clear()
        res: dict[int, list] = {n: [] for n in clients}
        for _ in range(a.rounds):
            for n in clients:
                res[n].append(round_(n))
        base = statistics.median(r[0] for r in res[clients[0]])
        for n in clients:
            agg = statistics.median(r[0] for r in res[n])
            ttft = statistics.median(r[1] for r in res[n])
            step = steps.get(n)
            step_ms = f"{statistics.median(step) * 1e3:.2f} ms" if step else "n/a"
            print(f"{n} clients: {agg:.1f} tok/s ({agg / base:.2f}x {clients[0]}), first token {ttft * 1e3:.0f} ms, "
                  f"step of {n} rows {step_ms}")
        if steps.get("prefill"):
            print(f"prefill: {statistics.median(steps['prefill']) * 1e3:.1f} ms (median of {len(steps['prefill'])})")
        print(engine.stats())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
