"""The Northwind support voice as prompt tuning, prefix tuning and a bottleneck adapter, and how much each moves.

The same data and held-out questions as ``train_support_voice.py`` (LoRA): every reply in
training opens with "Hi there!" and signs off "Happy surfing! — Nora, Northwind Routers
Support"; the evaluation questions are on topics training never saw. Each family is trained
on SmolLM2-135M-Instruct with the settings below and measured before/after on the held-out
questions: greeting and sign-off rates of greedy answers, perplexity of the reference
answers, word overlap (F1) with them, and how many numbers the adapter trains.

    python examples/train_adapter_families.py                       # all three: ~25 CPU-minutes
    python examples/train_adapter_families.py --only prompt-tuning
    python examples/train_adapter_families.py --from prompt-tuning=adapters/northwind-prompt

:data:`SETTINGS` ``["prompt-tuning"]`` is exactly the ``edgepeft train --method
prompt-tuning`` command of the README's quickstart and docs/walkthrough.md (a test checks it), so ``--from``
reports on the adapter ``make demo`` trained. The bare base is measured once (the first run's ``--eval-before``)
and is the "before" of every family: same base, same questions, same greedy settings.

Writes each adapter to ``--out/<method>`` and the figures to ``--results`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from edgepeft.train.record import read_record

HERE = Path(__file__).resolve().parent
DATA = HERE / "northwind_support"
_COMMON = dict(data=str(DATA / "train.jsonl"), eval_data=str(DATA / "eval.jsonl"), max_steps=30, batch_size=2,
               max_length=160, warmup=0.1, eval_before=True, eval_generate=8, max_new_tokens=96)
SETTINGS = {
    # = edgepeft train --method prompt-tuning --data examples/northwind_support/train.jsonl
    #     --eval-data examples/northwind_support/eval.jsonl --steps 30 --batch-size 2 --max-length 160
    #     --warmup 0.1 --eval-before --eval-generate 8 --max-new-tokens 96      (20 virtual tokens, lr 3e-2)
    "prompt-tuning": _COMMON | dict(method="prompt-tuning"),
    "prefix-tuning": _COMMON | dict(method="prefix-tuning", learning_rate=1e-2),
    "bottleneck": _COMMON | dict(method="bottleneck", learning_rate=2e-3),
}


def style(samples: list[dict]) -> dict:
    """Share of generated answers that open and close in the Northwind voice."""
    from edgepeft.contracts.metrics import normalize

    preds = [normalize(s["prediction"]) for s in samples]
    n = max(len(preds), 1)
    return {"greeting": sum(p.startswith("hi there") for p in preds) / n,
            "sign_off": sum("happy surfing" in p and "northwind routers support" in p for p in preds) / n}


def figures(held: dict) -> dict:
    s = style(held["samples"])
    return {"greeting 'Hi there!'": s["greeting"], "sign-off 'Happy surfing! — Nora'": s["sign_off"],
            "perplexity of reference answers": held["perplexity"],
            "answer overlap with reference (F1)": (held.get("answer_match") or {}).get("overlap")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--out", default=str(HERE / "out" / "northwind-families"))
    ap.add_argument("--results", default=str(HERE / "out" / "northwind-families.json"))
    ap.add_argument("--only", action="append", choices=list(SETTINGS), help="train only these (repeatable)")
    ap.add_argument("--steps", type=int, default=None, help="override every family's optimizer steps")
    ap.add_argument("--eval-generate", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--from", dest="trained", action="append", default=[], metavar="METHOD=DIR",
                    help="report on an adapter already trained with SETTINGS[METHOD] (repeatable) instead of training")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    given = dict(t.split("=", 1) for t in args.trained)
    methods = list(given) if given else (args.only or list(SETTINGS))
    records, baseline = {}, None
    for method in methods:
        out = Path(args.out) / method
        t0 = time.monotonic()
        if method in given:
            rec = read_record(given[method])
            if Path(given[method]).resolve() != out.resolve():
                shutil.copytree(given[method], out, dirs_exist_ok=True)
        else:
            from edgepeft.train import train

            over = {k: v for k, v in (("max_steps", args.steps), ("eval_generate", args.eval_generate),
                                      ("max_new_tokens", args.max_new_tokens)) if v is not None}
            opts = SETTINGS[method] | over | {"eval_before": baseline is None}
            rec = train(**opts, out=str(out), base=args.base, overwrite=True, progress=not args.quiet).record
            rec["runtime"]["example_seconds"] = round(time.monotonic() - t0, 1)
        baseline = baseline or rec["metrics"].get("baseline")
        records[method] = rec
    return report(records, baseline, args.results)


def report(records: dict, baseline: dict | None, results: str) -> dict:
    """Print one before/after table over the families and write it as JSON."""
    if baseline is None:
        raise SystemExit("no bare-base figures: train, or pass --from, at least one run made with --eval-before")
    before = figures(baseline)
    rows = {m: figures(r["metrics"]["eval"]) for m, r in records.items()}
    first = next(iter(records.values()))
    print(f"\nNorthwind support voice on {first['base']['name']}, {baseline['examples']} held-out questions")
    print(f"{'metric':36} {'base':>10} " + " ".join(f"{m:>14}" for m in rows))
    for k, b in before.items():
        print(f"{k:36} {_f(b):>10} " + " ".join(f"{_f(r[k]):>14}" for r in rows.values()))
    trained = {m: r["adapter"]["trainable_params"] for m, r in records.items()}
    print(f"{'trained numbers':36} {'':>10} " + " ".join(f"{trained[m]:>14,}" for m in rows))
    for m, r in records.items():
        print(f"\n{m}, first held-out answer:\n  {r['metrics']['eval']['samples'][0]['prediction'][:200]}")
    summary = {"example": "northwind_support_voice_families", "base": first["base"], "before": before,
               "after": rows, "trainable_params": trained,
               "settings": {m: {k: r["options"][k] for k in ("method", "max_steps", "learning_rate",
                                                              "virtual_tokens", "bottleneck_size", "placement")}
                            for m, r in records.items()},
               "train_seconds": {m: r["runtime"]["train_seconds"] for m, r in records.items()}}
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    Path(results).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nresults: {results}")
    return summary


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
