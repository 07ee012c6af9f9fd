"""Held-out metrics, in one stable dict shape that a rollout gate can read.

``TrainResult.metrics`` (and ``edgepeft_training.json["metrics"]``)::

    {"schema": 1, "task": "causal-lm" | "classification",
     "train": {"steps", "examples", "dropped_too_long", "loss_first", "loss_last", "loss_last10"},
     "eval": <held-out dict below, adapter on> | None (no held-out data),
     "baseline": <the same dict for the bare base> | None (unless eval_before)}

Held-out dict, decoder (``task == "causal-lm"``)::

    {"task": "causal-lm", "examples": int, "loss": float, "perplexity": float,
     "answer_match": {"generated": int, "exact": float, "contains": float, "overlap": float} | None,
     "samples": [{"prompt", "reference", "prediction", "exact", "contains", "overlap"}, ...]}

``overlap`` is the word-level F1 of each greedy answer with its reference: it
rises when the adapter answers in the data's words and style, where
``contains`` (the whole reference inside the answer) stays near 0 for any
answer longer than a sentence. Definitions: :mod:`edgepeft.contracts.metrics`.
``samples`` stay in the training record on the server; bundles carry values only.

Held-out dict, classifier (``task == "classification"``)::

    {"task": "classification", "examples": int, "loss": float, "accuracy": float,
     "macro_f1": float, "per_label": {name: {"precision", "recall", "f1", "support"}},
     "slices": {column_value: {"examples", "accuracy", "macro_f1"}} | None,
     "confusion": [[int]]  (rows: true label id, columns: predicted id)}

Every float is rounded to 6 places; keys never disappear (absent parts are None).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from ..contracts.metrics import answer_scores, answer_summary, label_scores, normalize, round_figure, slice_scores
from .encode import collate, prompt_text

__all__ = ["causal_metrics", "classification_metrics", "generate", "label_scores", "mean_loss", "normalize"]

SAMPLES_KEPT = 32  # generated answers kept in the record, for people and example scripts


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
    result = {"task": "causal-lm", "examples": len(items), "loss": round_figure(loss),
              "perplexity": round_figure(math.exp(min(loss, 50.0))) if loss is not None else None,
              "answer_match": None, "samples": []}
    pairs = [p for p in (prompt_text(tok, r) for r in rows[:generate_limit]) if p is not None]
    if not pairs:
        return result
    preds = generate(model, tok, [p for p, _ in pairs], device=device, max_new_tokens=max_new_tokens)
    scores = []
    for (prompt, ref), pred in zip(pairs, preds):
        sc = answer_scores(pred, ref)
        scores.append(sc)
        if len(result["samples"]) < SAMPLES_KEPT:
            result["samples"].append({"prompt": prompt, "reference": ref, "prediction": pred,
                                      "exact": sc["exact"], "contains": sc["contains"], "overlap": round_figure(sc["overlap"])})
    result["answer_match"] = answer_summary(scores)
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
    result = {"task": "classification", "examples": len(items), "loss": round_figure(loss)}
    result.update(label_scores(truth, preds, labels))
    result["slices"] = None
    if slice_column:
        result["slices"] = slice_scores([str(row.get(slice_column, "")) for row in rows], truth, preds, labels)
    result["samples"] = [{"text": row.get("text"), "reference": labels[t], "prediction": labels[p]}
                         for row, t, p in list(zip(rows, truth, preds))[:SAMPLES_KEPT]]
    return result
