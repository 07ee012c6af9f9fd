"""Classification and embeddings on an encoder bundle: batch, run once with the adapter's weights,
flag low confidence.

The head is itself an adapter slot, so each adapter brings its own labels and
head; a merged bundle carries its labels in ``manifest.model["labels"]``. A
result whose top probability is under the adapter's ``review_threshold`` is
marked ``needs_review``: people oversee the decisions the model is unsure of.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import numpy as np

from ..errors import AdapterError, EngineError
from .results import Classification, Embeddings

EMBEDDINGS = "embeddings"  # the encoder graph's pooled output, before the classification head


def _texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise EngineError("this needs a non-empty list of texts", hint='send a list such as ["great product"]')
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise EngineError(f"text {i} is empty", hint="send non-empty strings")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: the tokenizer would fail with a TypeError
            raise EngineError(f"text {i} holds a lone UTF-16 surrogate", hint="send text that is valid UTF-8") from None
    return list(texts)


def _batch(engine, texts: Sequence[str]) -> dict:
    tok = engine.codec.tok
    encs = tok.encode_batch(list(texts), add_special_tokens=True)
    longest = max(len(e.ids) for e in encs)
    if longest > engine.max_context:
        raise EngineError(f"a text is {longest} tokens, longer than the context of {engine.max_context}",
                          hint=f"shorten or split texts to under {engine.max_context} tokens")
    pad = engine.codec.tok.token_to_id("[PAD]") or 0
    ids = np.full((len(encs), longest), pad, np.int64)
    mask = np.zeros((len(encs), longest), np.int64)
    types = np.zeros((len(encs), longest), np.int64)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n], mask[i, :n], types[i, :n] = e.ids, 1, e.type_ids
    wanted = {i.name for i in engine.session.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: v for k, v in feeds.items() if k in wanted}


def classify_batch(engine, texts, adapter: str | None, review_threshold: float | None = None) -> list[Classification]:
    """See :meth:`Engine.classify`."""
    texts = _texts(texts)
    feeds = _batch(engine, texts)
    request_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    status = "error"
    chosen = []
    try:
        with engine.registry.activate(adapter) as chosen:
            a = chosen[0] if chosen else None
            merged = engine.model_info.get("merged") or {}  # a merged bundle carries its head's labels
            labels = list(a.labels) if a is not None and a.labels else \
                list(engine.model_info.get("labels") or merged.get("labels") or [])
            if not labels:
                raise AdapterError("the bare base has no classification head",
                                   hint=f"name an adapter: {', '.join(engine.registry.names()) or 'none loaded'}")
            own = a.review_threshold if a is not None else merged.get("review_threshold")
            threshold = float(next(t for t in (review_threshold, own, engine.review_threshold) if t is not None))
            logits = engine.session.run(["logits"], feeds | engine.registry.feeds(chosen))[0]
            if logits.ndim != 2 or logits.shape[1] != len(labels):
                raise EngineError(f"the model returned {list(logits.shape)} logits for {len(labels)} labels",
                                  hint="the adapter's head and its label list disagree; rebuild the adapter")
            z = logits - logits.max(axis=1, keepdims=True)
            probs = np.exp(z)
            probs /= probs.sum(axis=1, keepdims=True)
            out = []
            for row in probs:
                k = int(np.argmax(row))
                out.append(Classification(
                    label=labels[k], score=float(row[k]),
                    probabilities={lab: float(p) for lab, p in zip(labels, row)},
                    needs_review=bool(row[k] < threshold), threshold=threshold,
                    adapter=a.name if a else None, adapter_version=a.version if a else None, request_id=request_id))
            status = "ok"
            return out
    finally:
        engine.audit_request("classify", request_id, chosen, status, engine.digest("\x1e".join(texts)), texts=len(texts),
                      ms=round((time.perf_counter() - t0) * 1000, 2),
                      needs_review=[r.needs_review for r in out] if status == "ok" else None)


def embed_batch(engine, texts, adapter: str | None, normalize: bool = True) -> Embeddings:
    """See :meth:`Engine.embed`."""
    if EMBEDDINGS not in {o.name for o in engine.session.get_outputs()}:
        raise EngineError("this bundle's graph has no embeddings output (it was built by an older edgepeft)",
                          hint="rebuild the bundle with `edgepeft build` to get /v1/embeddings")
    texts = _texts(texts)
    feeds = _batch(engine, texts)
    request_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    status, chosen = "error", []
    try:
        with engine.registry.activate(adapter) as chosen:
            vectors = engine.session.run([EMBEDDINGS], feeds | engine.registry.feeds(chosen))[0].astype(np.float32)
            if normalize:
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            a = chosen[0] if chosen else None
            status = "ok"
            return Embeddings(vectors=vectors, tokens=int(feeds["attention_mask"].sum()), adapter=a.name if a else None,
                              adapter_version=a.version if a else None, request_id=request_id)
    finally:
        engine.audit_request("embed", request_id, chosen, status, engine.digest("\x1e".join(texts)), texts=len(texts),
                      ms=round((time.perf_counter() - t0) * 1000, 2))
