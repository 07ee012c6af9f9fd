"""Classification and embeddings on an encoder bundle: batch, run once with the adapters' weights,
flag low confidence.

The head is itself an adapter slot, so each adapter brings its own labels and
head; a merged bundle carries its labels in ``manifest.model["labels"]``. A
result whose top probability is under the adapter's ``review_threshold`` is
marked ``needs_review``: people oversee the decisions the model is unsure of.

Texts for different adapters (one adapter name, or None, per text) are tokenized once and run together:
on a graph with per-row slots (:mod:`.rowslots`) in one run, row i bound to its own adapter (each head
padded with zero columns to the widest label count, each row's logits cut back to its own labels). A
text's answer never depends on its neighbours of another adapter, so rows go to separate runs, one per
adapter as a single-adapter request always ran, where that would not hold: graphs built before per-row
slots (their slots declared with shapes), and int8 graphs, whose ``DynamicQuantizeMatMul`` quantizes a
run's activations with one scale for all its rows. Rows without an adapter also run apart from rows
with one where the checkpoint's own head is the default (per-row tensors hold zeros, not that head).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import numpy as np

from ..errors import AdapterError, EngineError
from .registry import slot_group
from .results import Classification, Embeddings
from .rowslots import bind_rows, row_groups, takes_row_slots

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


def per_text(adapter, n: int) -> list | None:
    """``adapter`` as one entry per text when it is a list (or tuple), else None (one adapter for all).
    Raises :class:`EngineError` for a list of the wrong length or an entry that is neither a name nor None."""
    if not isinstance(adapter, (list, tuple)):
        return None
    if len(adapter) != n:
        raise EngineError(f"{len(adapter)} adapters for {n} texts",
                          hint="name one adapter (or None for the base) per text, or one adapter for all")
    for i, a in enumerate(adapter):
        if a is not None and not isinstance(a, str):
            raise EngineError(f"adapter {i} is {type(a).__name__}, not a name", hint="use adapter names or None")
    return list(adapter)


def _activate(engine, stack, adapter, names: list | None, n: int) -> tuple[list, list]:
    """``(the loaded adapter of each of the n texts or None, the distinct adapters)``, each held in use until
    ``stack`` closes. One adapter for all (``names`` None): activated as a request always was. One per text:
    one :meth:`.registry.AdapterRegistry.activate` per distinct name, since texts side by side may each set
    the same slots (their own heads) without overlapping. Raises :class:`AdapterError`."""
    if names is None:
        chosen = stack.enter_context(engine.registry.activate(adapter))
        return [chosen[0] if chosen else None] * n, chosen
    by_name = {}
    for name in names:
        if name is not None and name not in by_name:
            by_name[name] = stack.enter_context(engine.registry.activate(name))[0]
    return [None if name is None else by_name[name] for name in names], list(by_name.values())


def _rows_independent(engine) -> bool:
    """Whether rows with different adapters may share a run (see the module docstring)."""
    quant = engine.model_info.get("quant") or {}
    return takes_row_slots(engine.session) and quant.get("weights") != "int8"


def _groups(a) -> set[str]:
    """The slot groups adapter ``a`` sets (none for no adapter)."""
    return set() if a is None else {slot_group(n) for n in a.arrays}


def _default_heads(engine) -> list[str]:
    """The head slot groups whose default is the checkpoint's own head rather than empty."""
    stages = {h["module"] for h in engine.model_info.get("head") or [] if h.get("default")}
    slots = engine.model_info.get("slots") or {}
    return sorted({slot_group(n) for n in slots if n.startswith("head.") and slot_group(n)[len("head."):] in stages})


def _runs(engine, rows: list, heads: bool) -> list[list[int]]:
    """Row indices by run: one run for all where rows are independent, else one per adapter. ``heads``:
    the head slots matter (classification); rows that set a head with a checkpoint default and rows that
    do not then run apart."""
    if _rows_independent(engine):
        fixed = _default_heads(engine) if heads else []
        keys = [tuple(g in _groups(a) for g in fixed) for a in rows]
    else:
        keys = [None if a is None else a.key for a in rows]
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.values())


def _run(engine, output: str, feeds: dict, rows: list, idx: list[int], heads: bool):
    """``output`` for rows ``idx``: one adapter's own tensors when they share one (the batch-1 path),
    else per-row tensors (:func:`.rowslots.bind_rows`; ``heads`` False leaves the head slots out)."""
    part = {k: v[idx] for k, v in feeds.items()}
    width = int(part["attention_mask"].sum(axis=1).max())
    part = {k: v[:, :width] for k, v in part.items()}
    users = [rows[i] for i in idx]
    if len({id(a) for a in users}) == 1:  # every row the same adapter (or none): its own tensors, as before
        return engine.session.run([output], part | engine.registry.feeds([a for a in users[:1] if a is not None]))[0]
    groups = row_groups(engine.session, engine.model_info, len(idx))
    sets = [_groups(a) for a in users]
    by_group = {g: [a if g in s else None for a, s in zip(users, sets)]
                for g in groups if heads or not g.startswith("head.")}
    return engine.session.run([output], part | bind_rows(groups, by_group))[0]


def _labels(engine, a) -> list:
    merged = engine.model_info.get("merged") or {}  # a merged bundle carries its head's labels
    labels = list(a.labels) if a is not None and a.labels else \
        list(engine.model_info.get("labels") or merged.get("labels") or [])
    if not labels:
        raise AdapterError("the bare base has no classification head",
                           hint=f"name an adapter: {', '.join(engine.registry.names()) or 'none loaded'}")
    return labels


def classify_batch(engine, texts, adapter, review_threshold: float | None = None) -> list[Classification]:
    """See :meth:`Engine.classify`."""
    from contextlib import ExitStack

    texts = _texts(texts)
    names = per_text(adapter, len(texts))
    feeds = _batch(engine, texts)
    request_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    status = "error"
    chosen = []
    try:
        with ExitStack() as stack:
            rows, chosen = _activate(engine, stack, adapter, names, len(texts))
            merged = engine.model_info.get("merged") or {}
            labels = [_labels(engine, a) for a in rows]  # every text's, before anything runs
            logits = [None] * len(texts)
            for idx in _runs(engine, rows, heads=True):
                got = _run(engine, "logits", feeds, rows, idx, heads=True)
                own = {len(labels[i]) for i in idx}
                if got.ndim != 2 or (len(own) == 1 and got.shape[1] != len(labels[idx[0]])) \
                        or got.shape[1] < max(own):
                    raise EngineError(f"the model returned {list(got.shape)} logits for {max(own)} labels",
                                      hint="the adapter's head and its label list disagree; rebuild the adapter")
                for j, i in enumerate(idx):
                    logits[i] = got[j, :len(labels[i])]  # a wider neighbour's zero columns cut off
            out = []
            for i, a in enumerate(rows):
                own = a.review_threshold if a is not None else merged.get("review_threshold")
                threshold = float(next(t for t in (review_threshold, own, engine.review_threshold) if t is not None))
                z = np.exp(logits[i] - logits[i].max())
                row = z / z.sum()
                k = int(np.argmax(row))
                out.append(Classification(
                    label=labels[i][k], score=float(row[k]),
                    probabilities={lab: float(p) for lab, p in zip(labels[i], row)},
                    needs_review=bool(row[k] < threshold), threshold=threshold,
                    adapter=a.name if a else None, adapter_version=a.version if a else None, request_id=request_id))
            status = "ok"
            return out
    finally:
        engine.audit_request("classify", request_id, chosen, status, engine.digest("\x1e".join(texts)), texts=len(texts),
                      ms=round((time.perf_counter() - t0) * 1000, 2),
                      needs_review=[r.needs_review for r in out] if status == "ok" else None)


def embed_batch(engine, texts, adapter, normalize: bool = True) -> Embeddings:
    """See :meth:`Engine.embed`."""
    from contextlib import ExitStack

    if EMBEDDINGS not in {o.name for o in engine.session.get_outputs()}:
        raise EngineError("this bundle's graph has no embeddings output (it was built by an older edgepeft)",
                          hint="rebuild the bundle with `edgepeft build` to get /v1/embeddings")
    texts = _texts(texts)
    names = per_text(adapter, len(texts))
    feeds = _batch(engine, texts)
    request_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    status, chosen = "error", []
    try:
        with ExitStack() as stack:
            rows, chosen = _activate(engine, stack, adapter, names, len(texts))
            parts = [(idx, _run(engine, EMBEDDINGS, feeds, rows, idx, heads=False))
                     for idx in _runs(engine, rows, heads=False)]
            vectors = np.empty((len(texts), parts[0][1].shape[1]), np.float32)
            for idx, part in parts:
                vectors[idx] = part
            if normalize:
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            status = "ok"
            if names is None:
                a = chosen[0] if chosen else None
                name, version = (a.name, a.version) if a else (None, None)
            else:  # one per text
                name = [a.name if a else None for a in rows]
                version = [a.version if a else None for a in rows]
            return Embeddings(vectors=vectors, tokens=int(feeds["attention_mask"].sum()), adapter=name,
                              adapter_version=version, request_id=request_id)
    finally:
        engine.audit_request("embed", request_id, chosen, status, engine.digest("\x1e".join(texts)), texts=len(texts),
                      ms=round((time.perf_counter() - t0) * 1000, 2))
