"""Measure which learning rate and how many passes move the held-out metric on small data (the examples'
sizes), with the embedded classifier (all-MiniLM-L6-v2) and decoder (SmolLM2-135M-Instruct) or the tiny
random bases: the measurement behind edgepeft train's small-data defaults (docs/training.md).

    python tools/small_data_defaults.py classifier [--rows 28] [--lrs 2e-4,1e-3,3e-3] [--epochs 1,3,6]
    python tools/small_data_defaults.py decoder --base tiny|embedded [--rows 25] ...

Prints one JSON line per run: rows, lr, epochs, steps, held-out loss and metric before -> after, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _subset(src: Path, rows: int, out: Path) -> str:
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out.write_text("\n".join(lines[:rows]) + "\n", encoding="utf-8")
    return str(out)


def main(argv=None) -> int:
    from edgepeft.train import train

    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["classifier", "decoder"])
    ap.add_argument("--base", choices=["tiny", "embedded"], default="embedded")
    ap.add_argument("--rows", type=int, default=None, help="training rows (default: the whole example file)")
    ap.add_argument("--lrs", default="2e-4,1e-3,3e-3")
    ap.add_argument("--epochs", default="1,3,6")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edgepeft-defaults-"))
    folder = ROOT / "examples" / ("bank_intents" if args.task == "classifier" else "northwind_support")
    data = str(folder / "train.jsonl")
    if args.rows:
        data = _subset(folder / "train.jsonl", args.rows, work / "train.jsonl")
    base = None
    if args.base == "tiny":
        from edgepeft.train.tiny import tiny_bert, tiny_llama

        base = str((tiny_bert if args.task == "classifier" else tiny_llama)(work / "base"))
    max_length = args.max_length or (64 if args.task == "classifier" else 160)
    for lr in [float(x) for x in args.lrs.split(",")]:
        for epochs in [float(x) for x in args.epochs.split(",")]:
            t0 = time.monotonic()
            rec = train(data=data, eval_data=str(folder / "eval.jsonl"), out=str(work / f"a-{lr}-{epochs}"), base=base,
                        learning_rate=lr, epochs=epochs, batch_size=args.batch_size, max_length=max_length,
                        eval_before=True, eval_generate=3, max_new_tokens=48, progress=False, overwrite=True).record
            m = rec["metrics"]
            key = "accuracy" if args.task == "classifier" else "perplexity"
            print(json.dumps({"task": args.task, "base": rec["base"]["name"], "rows": m["train"]["examples"],
                              "lr": lr, "epochs": epochs, "steps": m["train"]["steps"],
                              "loss": [m["baseline"]["loss"], m["eval"]["loss"]],
                              key: [m["baseline"][key], m["eval"][key]],
                              "seconds": round(time.monotonic() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
