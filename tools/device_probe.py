"""Time the device runtime on the prebuilt tiny bundles: open, prefill, decode; one JSON object out.

    python tools/device_probe.py FIXTURES_DIR OUT.json [--reps 3] [--tokens 32]
    python tools/device_probe.py --bundle DIR --key PUB OUT.json [--tokens 32]

The second form answers a few chat prompts greedily on a real bundle (e.g. SmolLM2-135M int4) and
records token ids and times, so two machines can be compared token for token.

Runs the same way natively on the host and inside the emulated aarch64 device (tools/aarch64.sh), so
the two files can be compared: under emulation only ratios mean anything (the emulated/native
slowdown of each figure, and int4 against fp32 within one machine). Device-side code only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = [("fp32", "decoder", None), ("int4", "decoder-int4", None), ("int4 + adapter", "decoder-int4", "alpha")]
PROMPT = "hello how can i help you today"


def _engine(fixtures: Path, kind: str):
    from edgepeft.runtime import Engine

    root = fixtures / kind
    t0 = time.perf_counter()
    engine = Engine(root / "bundle", [root / "keys" / "device.pub"], threads=1)
    return engine, time.perf_counter() - t0


CHATS = ["My Wi-Fi keeps dropping every evening. What should I do?", "Write one sentence about the sea."]


def greedy_answers(bundle: Path, key: Path, tokens: int) -> dict:
    """Greedy answers to CHATS on one bundle: token ids, text and times per prompt."""
    from edgepeft.runtime import Engine

    t0 = time.perf_counter()
    engine = Engine(bundle, [key], threads=1)
    opened = time.perf_counter() - t0
    answers = []
    for chat in CHATS:
        res = engine.generate(messages=[{"role": "user", "content": chat}], max_new_tokens=tokens)
        n = len(res.token_ids)
        answers.append({"chat": chat, "token_ids": res.token_ids, "text": res.text, "seconds": res.seconds,
                        "first_token_s": res.first_token_seconds,
                        "decode_tok_s": (n - 1) / (res.seconds - res.first_token_seconds) if n > 1 else None})
    return {"bundle": engine.manifest.base["name"], "quantization": engine.manifest.quantization,
            "open_s": opened, "answers": answers}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fixtures", type=Path, nargs="?")
    ap.add_argument("out", type=Path)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--key", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's edgepeft, not an installed one
    import onnxruntime

    if args.bundle is not None:
        result = greedy_answers(args.bundle, args.key, args.tokens)
        args.out.write_text(json.dumps(result | {"machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
                                                  "threads": 1}, indent=1, ensure_ascii=False))
        return 0
    if args.fixtures is None:
        ap.error("pass FIXTURES_DIR, or --bundle and --key")

    samples: dict = {name: {"open_s": [], "first_token_s": [], "decode_tok_s": []} for name, _, _ in SYSTEMS}
    engines = {kind: _engine(args.fixtures, kind)[0] for _, kind, _ in SYSTEMS}  # also the warm-up of opening
    for _name, kind, adapter in SYSTEMS:  # warm-up
        engines[kind].generate(PROMPT, adapter=adapter, max_new_tokens=4)
    for rep in range(args.reps):  # interleaved, starting system rotating
        order = SYSTEMS[rep % len(SYSTEMS):] + SYSTEMS[:rep % len(SYSTEMS)]
        for name, kind, adapter in order:
            samples[name]["open_s"].append(_engine(args.fixtures, kind)[1])  # verify + session, a fresh engine
            res = engines[kind].generate(PROMPT, adapter=adapter, max_new_tokens=args.tokens)
            n = len(res.token_ids)
            samples[name]["first_token_s"].append(res.first_token_seconds)
            if n > 1:
                samples[name]["decode_tok_s"].append((n - 1) / (res.seconds - res.first_token_seconds))
    figures = {name: {k: {"median": statistics.median(v), "samples": v} for k, v in fig.items() if v}
               for name, fig in samples.items()}
    args.out.write_text(json.dumps({
        "machine": platform.machine(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
        "threads": 1, "reps": args.reps, "new_tokens": args.tokens, "prompt": PROMPT, "figures": figures,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
