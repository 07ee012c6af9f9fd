"""Held-out metrics, in one stable dict shape that a rollout gate can read.

``TrainResult.metrics`` (and ``edgepeft_training.json["metrics"]``)::

    {"schema": 1, "task": "causal-lm" | "classification",
     "train": {"steps", "examples", "dropped_too_long", "loss_first", "loss_last", "loss_last10"},
     "eval": <held-out dict below, adapter on> | None (no held-out data),
     "baseline": <the same dict for the bare base> | None (unless eval_before)}

Held-out dict, decoder (``task == "causal-lm"``)::

    {"task": "causal-lm", "examples": int, "loss": float, "perplexity": float,
     "answer_match": {"generated": int, "exact": float, "contains": float} | None,
     "samples": [{"prompt", "reference", "prediction", "exact", "contains"}, ...]}

Held-out dict, classifier (``task == "classification"``)::

    {"task": "classification", "examples": int, "loss": float, "accuracy": float,
     "macro_f1": float, "per_label": {name: {"precision", "recall", "f1", "support"}},
     "slices": {column_value: {"examples", "accuracy", "macro_f1"}} | None,
     "confusion": [[int]]  (rows: true label id, columns: predicted id)}

Every float is rounded to 6 places; keys never disappear (absent parts are None).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

from .encode import collate, prompt_text

SAMPLES_KEPT = 32  # generated answers kept in the record, for people and example scripts


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: for forgiving answer matching."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def mean_loss(model, items: list[dict], pad_id: int, batch_size: int, device) -> float | None:
    """Token-weighted (decoders) or example-weighted (classifiers) mean loss over ``items``."""
    import torch

    if not items:
        return None
    total, weight = 0.0, 0
    with _eval_mode(model), torch.no_grad():
        for chunk in _batches(items, batch_size):
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            out = model(**batch)
            labels = batch["labels"]
            n = int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else labels.shape[0]
            total += float(out.loss) * n
            weight += n
    return total / max(weight, 1)


def causal_metrics(model, tok, rows: list[dict], items: list[dict], *, batch_size: int, device,
                   generate_limit: int, max_new_tokens: int) -> dict:
    """Loss, perplexity and greedy answer match on held-out decoder records."""
    loss = mean_loss(model, items, tok.pad_token_id, batch_size, device)
    result = {"task": "causal-lm", "examples": len(items), "loss": _r(loss),
              "perplexity": _r(math.exp(min(loss, 50.0))) if loss is not None else None,
              "answer_match": None, "samples": []}
    pairs = [p for p in (prompt_text(tok, r) for r in rows[:generate_limit]) if p is not None]
    if not pairs:
        return result
    preds = generate(model, tok, [p for p, _ in pairs], device=device, max_new_tokens=max_new_tokens)
    exact = contains = 0
    for (prompt, ref), pred in zip(pairs, preds):
        e = normalize(pred) == normalize(ref)
        c = bool(normalize(ref)) and normalize(ref) in normalize(pred)
        exact, contains = exact + e, contains + c
        if len(result["samples"]) < SAMPLES_KEPT:
            result["samples"].append({"prompt": prompt, "reference": ref, "prediction": pred,
                                      "exact": e, "contains": c})
    result["answer_match"] = {"generated": len(pairs), "exact": _r(exact / len(pairs)),
                              "contains": _r(contains / len(pairs))}
    return result


def generate(model, tok, prompts: list[str], *, device, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy completions of already-templated ``prompts`` (left-padded batches), special tokens dropped."""
    import torch

    side = tok.padding_side
    tok.padding_side = "left"
    outs = []
    try:
        with _eval_mode(model), torch.no_grad():
            for chunk in _batches(prompts, batch_size):
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                new = gen[:, enc["input_ids"].shape[1]:]
                outs += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return outs


def predict_labels(model, items: list[dict], pad_id: int, batch_size: int, device) -> list[int]:
    import torch

    preds = []
    with _eval_mode(model), torch.no_grad():
        for chunk in _batches(items, batch_size):
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items() if k != "labels"}
            preds += model(**batch).logits.argmax(-1).tolist()
    return preds


def classification_metrics(model, rows: list[dict], items: list[dict], labels: list[str], *, pad_id: int,
                           batch_size: int, device, slice_column: str | None) -> dict:
    """Accuracy, macro F1, per-label precision/recall/F1 and per-slice figures on held-out records."""
    loss = mean_loss(model, items, pad_id, batch_size, device)
    preds = predict_labels(model, items, pad_id, batch_size, device) if items else []
    truth = [it["labels"] for it in items]
    result = {"task": "classification", "examples": len(items), "loss": _r(loss)}
    result.update(label_scores(truth, preds, labels))
    result["slices"] = None
    if slice_column:
        groups: dict = {}
        for row, t, p in zip(rows, truth, preds):
            groups.setdefault(str(row.get(slice_column, "")), []).append((t, p))
        result["slices"] = {}
        for name in sorted(groups):
            ts, ps = zip(*groups[name])
            s = label_scores(list(ts), list(ps), labels)
            result["slices"][name] = {"examples": len(ts), "accuracy": s["accuracy"], "macro_f1": s["macro_f1"]}
    return result


def label_scores(truth: list[int], preds: list[int], labels: list[str]) -> dict:
    """Accuracy, macro F1 (over labels present in truth or predictions), per-label scores, confusion."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(truth, preds):
        confusion[t][p] += 1
    per, f1s = {}, []
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        fp = sum(confusion[j][i] for j in range(k)) - tp
        fn = sum(confusion[i]) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[name] = {"precision": _r(prec), "recall": _r(rec), "f1": _r(f1), "support": tp + fn}
        if tp + fp + fn:
            f1s.append(f1)
    n = len(truth)
    return {"accuracy": _r(sum(t == p for t, p in zip(truth, preds)) / n) if n else None,
            "macro_f1": _r(sum(f1s) / len(f1s)) if f1s else None,
            "per_label": per, "confusion": confusion}


def _r(x):
    return None if x is None else round(float(x), 6)
