"""Two bundles' decode speed side by side in one process (an experiment tool).

    python tools/engine_ab.py BUNDLE_A BUNDLE_B --pub KEY.pub [--adapter NAME] [--rounds 10] [--tokens 64]

Opens both with the device's Engine (2 threads, no prompt cache), then alternates them for ``--rounds`` rounds:
in each, a greedy generation of ``--tokens`` tokens from the same prompt, bare and (``--adapter``) with that
adapter, timed from the first streamed token. Prints the median tokens/s of each and B over A. On a shared
machine this is how a graph change is judged: a full benchmark run's same-run ratios swing by several percent,
an interleaved A/B in one process far less. Example (benchmarks/README.md, packed against split gate|up B): build
the same bundle twice, once with ``edgepeft.export.slots.PACK_GATE_UP_MAX_ZEROS = 0``, then compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROMPT = ("The harbour was quiet in the early morning. The boats rocked gently against the pier while gulls "
          "circled above.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--pub", type=Path, required=True, help="the public key both bundles are signed with")
    ap.add_argument("--adapter", help="also time with this adapter (both bundles must carry it)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args(argv)
    from edgepeft.runtime.engine import Engine

    engines = {p: Engine(str(p), [str(a.pub)], threads=2, prompt_cache_mb=0) for p in (a.a, a.b)}
    settings = [None] + ([a.adapter] if a.adapter else [])
    speeds: dict[tuple, list[float]] = {}
    for _ in range(a.rounds):
        for path, eng in engines.items():
            for adapter in settings:
                first, n = None, 0
                for _tok in eng.generate(PROMPT, adapter=adapter, max_new_tokens=a.tokens, temperature=0.0,
                                         stream=True):
                    first = first or time.perf_counter()
                    n += 1
                speeds.setdefault((path, adapter), []).append((n - 1) / (time.perf_counter() - first))
    for adapter in settings:
        ma, mb = (statistics.median(speeds[(p, adapter)]) for p in (a.a, a.b))
        print(f"{adapter or 'no adapter'}: A {ma:.1f} tok/s, B {mb:.1f} tok/s, B/A {mb / ma:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
