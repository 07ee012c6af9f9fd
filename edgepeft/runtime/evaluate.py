"""Held-out metrics computed on the device runtime, in the training record's shapes.

``edgepeft eval`` runs labelled data through :class:`~edgepeft.runtime.Engine`
(the quantized graph, the adapter file as shipped) and reports the figures
training reported on PyTorch, with the same definitions
(:mod:`edgepeft.contracts.metrics`), so the two sit side by side:

- classifiers: loss (mean cross-entropy of the true label), accuracy, macro F1,
  per-label scores, confusion, per-slice figures, and the share flagged for review;
- decoders: loss and perplexity over the reference answers' tokens (the tokens
  training puts its loss on), and answer exact / contains / overlap for greedy
  answers to the first ``generate`` prompts.

Rows are already checked records (``{"text", "label"}``, ``{"messages"}``,
``{"prompt", "completion"}`` or ``{"text"}``). Raises :class:`EngineError` or
:class:`AdapterError` from the engine, and :class:`EngineError` for a label
the adapter does not know.
"""

from __future__ import annotations

import math

from ..contracts.metrics import answer_scores, answer_summary, label_scores, round_figure, slice_scores
from ..errors import EngineError


def classifier_metrics(engine, rows: list[dict], *, adapter: str | None, labels: list[str],
                       slice_column: str | None = None, batch_size: int = 32) -> dict:
    """See the module docstring; ``labels`` are the adapter's label names in id order."""
    index = {name: i for i, name in enumerate(labels)}
    truth = []
    for n, r in enumerate(rows, 1):
        label = str(r["label"])
        if label not in index:
            raise EngineError(f"record {n} has label {label!r}, which adapter {adapter!r} does not know",
                              hint=f"its labels are: {', '.join(labels)}")
        truth.append(index[label])
    preds, nll, flagged = [], 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        for _row, t, res in zip(chunk, truth[start:], engine.classify([x["text"] for x in chunk], adapter=adapter)):
            preds.append(index[res.label])
            nll -= math.log(max(res.probabilities[labels[t]], 1e-12))
            flagged += res.needs_review
    n = len(rows)
    out = {"task": "classification", "examples": n, "loss": round_figure(nll / n) if n else None}
    out.update(label_scores(truth, preds, labels))
    out["slices"] = slice_scores([str(r.get(slice_column, "")) for r in rows], truth, preds, labels) \
        if slice_column else None
    out["needs_review"] = round_figure(flagged / n) if n else None
    return out


def _messages(row: dict) -> list[dict] | None:
    if "messages" in row:
        return row["messages"]
    if "prompt" in row:
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return system + [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    return None


def _scored_tokens(engine, row: dict) -> tuple[list[int], list[bool]]:
    """Token ids of a record and which of them count for the loss (the answers; every token of plain text)."""
    codec = engine.codec
    msgs = _messages(row)
    if msgs is None:
        enc = codec.tok.encode(row["text"] + (codec.eos_token or ""), add_special_tokens=True)
        return list(enc.ids), [True] * len(enc.ids)
    if codec.chat_template:
        full = codec.render(msgs, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                before = codec.render(msgs[:i], add_generation_prompt=True) if i else ""
                upto = codec.render(msgs[: i + 1], add_generation_prompt=False)
                if full.startswith(upto) and upto.startswith(before):
                    spans.append((len(before), len(upto)))
        if not spans:
            spans = [(len(codec.render(msgs[:-1])), len(full))]
    else:
        prompt = "\n".join(m["content"] for m in msgs[:-1]) + "\n"
        full = prompt + msgs[-1]["content"] + (codec.eos_token or "")
        spans = [(len(prompt), len(full))]
    enc = codec.tok.encode(full, add_special_tokens=False)
    scored = [any(a <= start < b for a, b in spans) and end > start for start, end in enc.offsets]
    return list(enc.ids), scored


def decoder_metrics(engine, rows: list[dict], *, adapter: str | None, generate: int, max_new_tokens: int) -> dict:
    """See the module docstring. Records longer than the context are cut to it, as training cuts to max_length."""
    total, count = 0.0, 0
    for row in rows:
        ids, scored = _scored_tokens(engine, row)
        ids, scored = ids[: engine.max_context], scored[: engine.max_context]
        if len(ids) < 2 or not any(scored[1:]):
            continue
        logps = engine.token_logprobs(ids, adapter=adapter)
        for lp, keep in zip(logps, scored[1:]):
            if keep:
                total -= lp
                count += 1
    loss = total / count if count else None
    out = {"task": "causal-lm", "examples": len(rows), "loss": round_figure(loss),
           "perplexity": round_figure(math.exp(min(loss, 50.0))) if loss is not None else None, "answer_match": None,
           "samples": []}
    scores = []
    for row in [r for r in rows if _messages(r) is not None][:generate]:
        msgs = _messages(row)
        kw = {"messages": msgs[:-1]} if engine.codec.chat_template else \
            {"prompt": "\n".join(m["content"] for m in msgs[:-1]) + "\n"}
        answer = engine.generate(**kw, adapter=adapter, max_new_tokens=max_new_tokens, temperature=0.0).text.strip()
        sc = answer_scores(answer, msgs[-1]["content"])
        scores.append(sc)
        out["samples"].append({"prompt": msgs[-2]["content"], "reference": msgs[-1]["content"], "prediction": answer,
                               "exact": sc["exact"], "contains": sc["contains"], "overlap": round_figure(sc["overlap"])})
    out["answer_match"] = answer_summary(scores)
    return out
