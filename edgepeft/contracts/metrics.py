"""Metric definitions shared by training, ``edgepeft eval`` on a device, and what a bundle may carry.

The training record, the device-side evaluation and a rollout gate must mean
the same thing by "accuracy" or "answer overlap", so the arithmetic lives here
once, in plain Python (no numpy, no torch).

A bundle's manifest carries an adapter's metric *values* only
(:func:`manifest_metrics`): held-out prompts, reference answers and
predictions stay in the training record on the server, because a bundle is
copied to every device and the data may be personal (health, finance).
"""

from __future__ import annotations

import re
from collections import Counter

# Decoder answer match, the same for training's held-out figures and `edgepeft eval` on a device:
ANSWER_PROMPTS = 32  # at most this many held-out prompts are answered greedily
ANSWER_MAX_NEW_TOKENS = 64  # tokens per generated answer


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: for forgiving answer matching."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_scores(prediction: str, reference: str) -> dict:
    """How a generated answer compares with the reference (both normalized).

    ``exact``: the same words; ``contains``: the reference appears whole inside the
    answer (meaningful for short answers only); ``overlap``: word-level F1 between
    the two (SQuAD's token F1), which credits a long answer for the words it
    shares with the reference even when it is phrased differently.
    """
    p, r = normalize(prediction), normalize(reference)
    common = Counter(p.split()) & Counter(r.split())
    same = sum(common.values())
    if same:
        precision, recall = same / len(p.split()), same / len(r.split())
        overlap = 2 * precision * recall / (precision + recall)
    else:
        overlap = 0.0
    return {"exact": p == r, "contains": bool(r) and r in p, "overlap": overlap}


def answer_summary(scores: list[dict]) -> dict | None:
    """Mean of :func:`answer_scores` over generated answers: {generated, exact, contains, overlap}."""
    if not scores:
        return None
    n = len(scores)
    return {"generated": n, "exact": round_figure(sum(s["exact"] for s in scores) / n),
            "contains": round_figure(sum(s["contains"] for s in scores) / n),
            "overlap": round_figure(sum(s["overlap"] for s in scores) / n)}


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
        per[name] = {"precision": round_figure(prec), "recall": round_figure(rec), "f1": round_figure(f1), "support": tp + fn}
        if tp + fp + fn:
            f1s.append(f1)
    n = len(truth)
    return {"accuracy": round_figure(sum(t == p for t, p in zip(truth, preds)) / n) if n else None,
            "macro_f1": round_figure(sum(f1s) / len(f1s)) if f1s else None,
            "per_label": per, "confusion": confusion}


def slice_scores(slices: list[str], truth: list[int], preds: list[int], labels: list[str]) -> dict:
    """Accuracy and macro F1 per slice value (e.g. app / sms), so a bias a single figure hides shows."""
    groups: dict = {}
    for s, t, p in zip(slices, truth, preds):
        groups.setdefault(s, []).append((t, p))
    out = {}
    for name in sorted(groups):
        ts, ps = zip(*groups[name])
        sc = label_scores(list(ts), list(ps), labels)
        out[name] = {"examples": len(ts), "accuracy": sc["accuracy"], "macro_f1": sc["macro_f1"]}
    return out


def round_figure(x):
    """Every figure is rounded to 6 places (None stays None)."""
    return None if x is None else round(float(x), 6)


def manifest_metrics(metrics: dict | None) -> dict:
    """The part of a training record's ``metrics`` that may travel in a bundle: numbers, never data.

    Keeps numbers, booleans and None, and the dicts and lists built of them (label
    and slice names appear only as keys); drops every other string value and the
    ``samples`` lists of held-out prompts, references and predictions. ``task``
    stays, being one of a fixed set of names, and so does ``record_sha256``, the
    hash of the training record the figures come from.
    """
    def keep(value):
        if value is None or isinstance(value, (bool, int, float)):
            return value, True
        if isinstance(value, dict):
            return {str(k): v for k, (v, ok) in ((k, keep(v)) for k, v in value.items())
                    if ok and k != "samples"}, True
        if isinstance(value, list):
            items = [keep(v) for v in value]
            return [v for v, ok in items if ok], all(ok for _, ok in items)
        return None, False

    out, _ = keep(dict(metrics or {}))
    if isinstance((metrics or {}).get("task"), str):
        out["task"] = metrics["task"]
    if re.fullmatch(r"sha256:[0-9a-f]{64}", str((metrics or {}).get("record_sha256", ""))):
        out["record_sha256"] = metrics["record_sha256"]
    for part in ("eval", "baseline"):
        if isinstance(out.get(part), dict) and isinstance(((metrics or {}).get(part) or {}).get("task"), str):
            out[part]["task"] = metrics[part]["task"]
    return out
