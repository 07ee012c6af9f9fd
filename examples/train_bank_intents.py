"""Train an intent classifier for a bank's support inbox on all-MiniLM-L6-v2, and measure it.

The data (examples/bank_intents/) holds customer messages labelled
card_lost / suspicious_charge / balance / transfer, each written twice: as
typed in the banking app ("slice": "app") and as a terse SMS ("slice": "sms").
The evaluation file holds messages whose wording never appears in training.
Per-slice figures show whether the adapter serves SMS users as well as app
users: a bias that a single accuracy number would hide.

    python examples/train_bank_intents.py        # about 1 minute on 2 CPU cores

:data:`SETTINGS` are exactly docs/walkthrough.md's ``edgepeft train`` command for the
classifier (a test checks that they agree), so ``--from DIR`` can report on an
adapter that command trained (``make demo`` does that) instead of training again.

Writes the adapter (with edgepeft_labels.json) to --out and the figures to --results (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from edgepeft.train.record import read_record

HERE = Path(__file__).resolve().parent
DATA = HERE / "bank_intents"

# = edgepeft train --data examples/bank_intents/train.jsonl --eval-data examples/bank_intents/eval.jsonl
#     --steps 40 --batch-size 8 --lr 3e-3 --max-length 64 --warmup 0.1 --eval-before   (rank 8 by default)
SETTINGS = dict(data=str(DATA / "train.jsonl"), eval_data=str(DATA / "eval.jsonl"), rank=8, learning_rate=3e-3,
                max_steps=40, batch_size=8, max_length=64, warmup=0.1, eval_before=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="default: the embedded all-MiniLM-L6-v2")
    ap.add_argument("--out", default=str(HERE / "out" / "bank-intents"))
    ap.add_argument("--results", default=str(HERE / "out" / "bank-intents.json"))
    ap.add_argument("--steps", type=int, default=SETTINGS["max_steps"])
    ap.add_argument("--from", dest="trained", metavar="DIR",
                    help="report on an adapter the walkthrough's command already trained (copied to --out) instead of training")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    if args.trained:  # the adapter goes to --out either way, where make bench looks for it
        record = read_record(args.trained)
        if Path(args.trained).resolve() != Path(args.out).resolve():
            shutil.copytree(args.trained, args.out, dirs_exist_ok=True)
    else:
        from edgepeft.train import train

        record = train(**(SETTINGS | {"max_steps": args.steps}), out=args.out, base=args.base, overwrite=True,
                       progress=not args.quiet).record
    wall = time.monotonic() - t0 if not args.trained else record["runtime"]["wall_seconds"]
    return report(record, wall, args.out, args.results)


def report(record: dict, wall: float, adapter: str, results: str) -> dict:
    """Print the before/after table from a training record and write it to ``results`` (JSON)."""
    m = record["metrics"]
    before, after = m["baseline"], m["eval"]
    rows = {"accuracy": (before["accuracy"], after["accuracy"]), "macro F1": (before["macro_f1"], after["macro_f1"])}
    for label in record["labels"]:
        rows[f"F1 {label}"] = (before["per_label"][label]["f1"], after["per_label"][label]["f1"])
    for name in sorted(after["slices"] or {}):
        rows[f"accuracy, slice {name}"] = (before["slices"][name]["accuracy"], after["slices"][name]["accuracy"])
    print(f"\nBank intents: {record['base']['name']}, LoRA r={record['adapter']['rank']} + classifier head, "
          f"{m['train']['steps']} steps, {after['examples']} held-out messages, {wall:.0f} s")
    print(f"{'metric':32} {'base':>8} {'adapter':>8}")
    for name, (b, a) in rows.items():
        print(f"{name:32} {b:>8.3f} {a:>8.3f}")
    summary = {"example": "bank_intents", "base": record["base"], "labels": record["labels"],
               "steps": m["train"]["steps"], "wall_seconds": round(wall, 1),
               "train_seconds": record["runtime"]["train_seconds"],
               "before": {k: v[0] for k, v in rows.items()}, "after": {k: v[1] for k, v in rows.items()},
               "adapter": str(adapter)}
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    Path(results).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\nadapter: {adapter}\nresults: {results}")
    return summary


if __name__ == "__main__":
    main()
