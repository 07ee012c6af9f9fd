"""Section 4b: the example adapters' task metrics, measured on the device path.

The examples (``examples/train_*.py``) train real adapters and record their
PyTorch metrics. Here the same adapters are built into bundles and evaluated
through ``Engine`` at each quantization, so the table shows what quantization
and export cost on the actual task, next to the PyTorch figure from training.
Adapters that were not trained yet are skipped with a note (run the examples).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.runtime.evaluate import decoder_metrics

from . import sys_edgepeft
from .context import Context
from .harness import Section, Skip
from .systems import pubkey

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INT4_PAYLOAD = "edgepeft int4, int4 payload"


def _out_dir(ctx: Context) -> Path:
    return Path(ctx.settings.examples_out) if ctx.settings.examples_out else EXAMPLES / "out"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _style(preds: list[str]) -> dict[str, float]:
    p = [_normalize(x) for x in preds]
    n = max(len(p), 1)
    return {"greeting": sum(x.startswith("hi there") for x in p) / n,
            "sign_off": sum("happy surfing" in x and "northwind routers support" in x for x in p) / n}


def _bank(ctx: Context, sec: Section, adapter: Path, quants: list[str]) -> None:
    rows = _jsonl(EXAMPLES / "bank_intents" / "eval.jsonl")
    if ctx.smoke:
        rows = rows[:4]
    g = sec.group("task.bank_intents.accuracy", f"bank-intents adapter: accuracy on {len(rows)} held-out texts",
                  "higher", ["PyTorch + PEFT (training record)"])
    rec = json.loads((adapter / "edgepeft_training.json").read_text())
    ref = ((rec.get("metrics") or {}).get("eval") or {}).get("accuracy")
    summary = _out_dir(ctx) / "bank-intents.json"
    if ref is None and summary.is_file():
        ref = json.loads(summary.read_text()).get("after", {}).get("accuracy")
    if isinstance(ref, (int, float)):
        g.add("PyTorch + PEFT (training record)", "", [float(ref)])
    for q in quants:
        try:
            b = sys_edgepeft.build(ctx.work, f"task-bank-{q}", base=None, adapters=[("bank", adapter)], quant=q,
                                   task="classification", log=ctx.log)
            eng = sys_edgepeft.EdgeClassifier(b, pubkey(ctx), "bank").engine
            preds = eng.classify([r["text"] for r in rows], adapter="bank")
            acc = sum(p.label == r["label"] for p, r in zip(preds, rows)) / len(rows)
            g.add(f"edgepeft {q}", "", [acc])
        except Skip as exc:
            ctx.skip(f"bank-intents on edgepeft {q}", str(exc))


def _as_chat(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]}


def _northwind(ctx: Context, sec: Section, adapter: Path, quants: list[str]) -> None:
    rows = _jsonl(EXAMPLES / "northwind_support" / "eval.jsonl")[: 4 if ctx.smoke else 16]
    title = f"northwind-voice adapter: share of {len(rows)} held-out answers in the house style"
    ref = ["PyTorch + PEFT (training record)"]
    g_greet = sec.group("task.northwind.greeting", title + " (greeting)", "higher", ref)
    g_sign = sec.group("task.northwind.sign_off", title + " (sign-off)", "higher", ref)
    g_ppl = sec.group("task.northwind.perplexity", f"northwind-voice adapter: perplexity of the {len(rows)} held-out "
                      "reference answers", "lower", ref)
    summary = _out_dir(ctx) / "northwind-voice.json"
    if summary.is_file():
        after = json.loads(summary.read_text()).get("after", {})
        for g, key in ((g_greet, "greeting 'Hi there!'"), (g_sign, "sign-off 'Happy surfing! — Nora'"),
                       (g_ppl, "perplexity of reference answers")):
            if isinstance(after.get(key), (int, float)):
                g.add("PyTorch + PEFT (training record)", "", [float(after[key])])
    # the int4 bundle once more with the smallest update payload (4-bit adapter), the rank-8 payload goal's task check
    forms = [(q, "fp32", f"edgepeft {q}") for q in quants]
    if "int4" in quants:
        forms.append(("int4", "int4", INT4_PAYLOAD))
    for q, payload, label in forms:
        try:
            b = sys_edgepeft.build(ctx.work, f"task-northwind-{q}" + (f"-{payload}" if payload != "fp32" else ""),
                                   base=None, adapters=[("voice", adapter)], quant=q, adapter_dtype=payload,
                                   log=ctx.log)
            eng = sys_edgepeft.EdgeDecoder(b, pubkey(ctx), "voice").engine
            preds = [eng.generate(messages=[{"role": "user", "content": r["prompt"]}], adapter="voice",
                                  max_new_tokens=96, temperature=0.0).text for r in rows]
            st = _style(preds)
            g_greet.add(label, "", [st["greeting"]])
            g_sign.add(label, "", [st["sign_off"]])
            g_ppl.add(label, "", [decoder_metrics(eng, [_as_chat(r) for r in rows], adapter="voice", generate=0,
                                                  max_new_tokens=1)["perplexity"]])
        except Skip as exc:
            ctx.skip(f"northwind-voice on {label}", str(exc))


def run_into(ctx: Context, sec: Section) -> None:
    """Add the example-adapter groups to the quality section ``sec``."""
    if not ctx.wanted("edgepeft"):
        return
    quants = ["int8"] if ctx.smoke else ["fp32", "int8", "int4"]
    found = False
    for name, fn, cls_quants in (("bank-intents", _bank, ["fp32", "int8"]), ("northwind-voice", _northwind, quants)):
        adapter = _out_dir(ctx) / name
        if not (adapter / "adapter_config.json").is_file():
            ctx.skip(f"example adapter {name}", f"not trained yet: run examples/train_*.py (expects {adapter})")
            continue
        if ctx.smoke:
            continue  # the smoke models are not the examples' bases
        found = True
        try:
            fn(ctx, sec, adapter, cls_quants if name == "bank-intents" else quants)
        except Exception as exc:  # an example that cannot be evaluated must not lose the section
            ctx.skip(f"example adapter {name}", f"{type(exc).__name__}: {str(exc)[:300]}")
    if found:
        sec.notes.append("Example adapters: PyTorch figures come from the training run's own evaluation; "
                         "edgepeft figures are the same adapter built into a bundle and run through Engine.")


def goal_int4_payload(sec: Section) -> dict:
    """The rank-8 all-linear int4 update keeps the task: the northwind adapter's house style on the int4 bundle
    as with the fp32 payload, and its held-out perplexity within 2 % of it."""
    goal = {"name": "int4 adapter payload keeps the task metric", "target": "style shares equal, perplexity within 2 %"}
    figs = {}
    for gid in ("task.northwind.greeting", "task.northwind.sign_off", "task.northwind.perplexity"):
        g = sec.find(gid)
        ref, got = (g.get("edgepeft int4"), g.get(INT4_PAYLOAD)) if g else (None, None)
        if ref is None or got is None:
            return goal | {"met": None, "measured": "not measured (train examples/train_northwind_voice.py)"}
        figs[gid.rsplit(".", 1)[-1]] = (ref.median, got.median)
    (g0, g1), (s0, s1), (p0, p1) = figs["greeting"], figs["sign_off"], figs["perplexity"]
    met = g1 >= g0 and s1 >= s0 and p1 <= p0 * 1.02
    return goal | {"met": met, "measured": f"greeting {g1:.2f} (fp32 payload {g0:.2f}), sign-off {s1:.2f} ({s0:.2f}), "
                                          f"perplexity {p1:.2f} ({p0:.2f})"}
