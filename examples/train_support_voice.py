"""Teach SmolLM2-135M-Instruct the voice of "Northwind Routers" support, and measure it.

The data (examples/northwind_support/) answers router questions in one house
style: every reply opens with "Hi there!" and signs off "Happy surfing! —
Nora, Northwind Routers Support". The evaluation file holds questions on
topics the training file never mentions, so the adapter must carry the style
over to new questions, not recall answers.

Before/after figures on the held-out questions: greeting rate, sign-off rate,
perplexity of the reference answers, and the word overlap (F1) of the greedy
answers with the references.

    python examples/train_support_voice.py            # ~8.5 CPU-minutes: 4-5 min on 2 idle cores
    python examples/train_support_voice.py --steps 40 --out /tmp/northwind

:data:`SETTINGS` are exactly the quickstart's ``edgepeft train`` command (README.md)
(a test checks that they agree), so ``--from DIR`` can report on an adapter that
command trained (``make demo`` does that) instead of training again.

Writes the adapter to --out and the figures to --results (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from edgepeft.contracts.metrics import normalize
from edgepeft.train.record import read_record

HERE = Path(__file__).resolve().parent
DATA = HERE / "northwind_support"

# = edgepeft train --data examples/northwind_support/train.jsonl --eval-data examples/northwind_support/eval.jsonl
#     --steps 30 --batch-size 2 --lr 2e-3 --max-length 160 --warmup 0.1 --eval-before --eval-generate 8
#     --max-new-tokens 96   (rank 8 by default)
SETTINGS = dict(data=str(DATA / "train.jsonl"), eval_data=str(DATA / "eval.jsonl"), rank=8, learning_rate=2e-3,
                max_steps=30, batch_size=2, max_length=160, warmup=0.1, eval_before=True, eval_generate=8,
                max_new_tokens=96)


def style(samples: list[dict]) -> dict:
    """Share of generated answers that open and close in the Northwind voice."""
    preds = [normalize(s["prediction"]) for s in samples]
    n = max(len(preds), 1)
    return {"greeting": sum(p.startswith("hi there") for p in preds) / n,
            "sign_off": sum("happy surfing" in p and "northwind routers support" in p for p in preds) / n,
            "answers": len(preds)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--out", default=str(HERE / "out" / "northwind-voice"))
    ap.add_argument("--results", default=str(HERE / "out" / "northwind-voice.json"))
    ap.add_argument("--steps", type=int, default=SETTINGS["max_steps"])
    ap.add_argument("--eval-generate", type=int, default=SETTINGS["eval_generate"])
    ap.add_argument("--max-new-tokens", type=int, default=SETTINGS["max_new_tokens"])
    ap.add_argument("--from", dest="trained", metavar="DIR",
                    help="report on an adapter the README's command already trained (copied to --out) instead of training")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    if args.trained:  # the adapter goes to --out either way, where make bench looks for it
        record = read_record(args.trained)
        if Path(args.trained).resolve() != Path(args.out).resolve():
            shutil.copytree(args.trained, args.out, dirs_exist_ok=True)
    else:
        from edgepeft.train import train

        record = train(**(SETTINGS | {"max_steps": args.steps, "eval_generate": args.eval_generate,
                                      "max_new_tokens": args.max_new_tokens}),
                       out=args.out, base=args.base, overwrite=True, progress=not args.quiet).record
    wall = time.monotonic() - t0 if not args.trained else record["runtime"]["wall_seconds"]
    return report(record, wall, args.out, args.results)


def report(record: dict, wall: float, adapter: str, results: str) -> dict:
    """Print the before/after table from a training record (its samples stay on the server) and write it."""
    m = record["metrics"]
    before, after = m["baseline"], m["eval"]
    rows = {
        "greeting 'Hi there!'": (style(before["samples"])["greeting"], style(after["samples"])["greeting"]),
        "sign-off 'Happy surfing! — Nora'": (style(before["samples"])["sign_off"], style(after["samples"])["sign_off"]),
        "perplexity of reference answers": (before["perplexity"], after["perplexity"]),
        "answer overlap with reference (F1)": (before["answer_match"]["overlap"], after["answer_match"]["overlap"]),
    }
    print(f"\nNorthwind support voice: {record['base']['name']}, LoRA r={record['adapter']['rank']}, "
          f"{m['train']['steps']} steps, {after['examples']} held-out questions "
          f"({style(after['samples'])['answers']} answered), {wall:.0f} s")
    print(f"{'metric':36} {'base':>10} {'adapter':>10}")
    for name, (b, a) in rows.items():
        print(f"{name:36} {b:>10.3f} {a:>10.3f}")
    print("\nexample answer after training:\n  Q:", after["samples"][0]["prompt"].split("user\n")[-1].split("<|im_end|>")[0])
    print("  A:", after["samples"][0]["prediction"])
    summary = {"example": "northwind_support_voice", "base": record["base"], "steps": m["train"]["steps"],
               "wall_seconds": round(wall, 1), "train_seconds": record["runtime"]["train_seconds"],
               "before": {k: v[0] for k, v in rows.items()}, "after": {k: v[1] for k, v in rows.items()},
               "adapter": str(adapter)}
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    Path(results).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nadapter: {adapter}\nresults: {results}")
    return summary


if __name__ == "__main__":
    main()
