"""Continuous batching: concurrent requests, each with its own adapters, decode together in one run per step.

Why: on a CPU a decode step is bound by reading the base weights; a step for four rows reads them
once instead of four times, so requests that would each run alone share the cost. The graph makes a
mixed batch possible: its adapter slots take one tensor per row (:mod:`edgepeft.export.slots`), so a
step binds, per slot group that some row uses, a [rows, ...] tensor whose row i holds row i's adapter
(zeros for a row without one; every adapter padded to the group's widest rank or size: :mod:`.rowslots`,
which the encoder's mixed classify/embed batches share). No node is added for this: a request alone runs
the graph exactly as before.

How it runs:

- One key/value buffer per cache input, [rows, kv_heads, max_len, head_dim]; row ``r`` belongs to
  one request. A request prefills alone at batch 1 into its row, with its own adapters bound as the
  batch-1 decoder binds them (a :class:`.decoder.DecodeContext` over the row's slice, which shares its
  memory), then joins the running batch. Where the start of its prompt is in the prompt cache for the
  same adapters (:mod:`.prompt_cache`), those key/values are copied into the row and only the rest is
  prefilled.
- A step runs rows [0, n) with one token each and an attention mask right-padded per row:
  ``GroupQueryAttention`` takes each row's length (``seqlens_k``) and writes each row's new key/value
  at that row's own position in the shared buffer.
- The per-row adapter tensors persist between steps; when the rows change, only rows whose adapter
  changed are rewritten (one adapter's tensors per joining request).
- A request that ends, or whose consumer stops iterating (a closed stream, a client gone), leaves
  before the next step; the last row moves into its place so the batch stays contiguous.
- With one request running, the step is the batch-1 decoder's run on that row's binding, in the
  consumer's own thread: the request's own adapter tensors, views of the adapter file, as before.
- No thread of its own: a consumer that wants its next token and has none runs a *round* (admit waiting
  requests, FIFO, each prefilled; then one step for every row) unless another consumer is running one.
  Requests wait FIFO for a free row and join between steps, so none starves while others decode.

Classifiers and embeddings are not batched across requests; one request's texts, one adapter per text, share a
run through the same per-row tensors (:mod:`.classify`).

A prefix adapter (prefix or prompt tuning) is its row's first cache positions, as in the batch-1 decoder.
A request's answer never depends on what else runs. So two kinds of graph get no batcher, and their
requests decode alone, one per run, as before: a graph whose slots are declared with shapes (bundles
built before per-row slots), and one with int8 LoRA B slots (``lora_b = "int8"``), whose
``DynamicQuantizeMatMul`` quantizes a step's activations with one scale for all rows, so that a row's
answer would move with its neighbours (measured on SmolLM2-135M: greedy tokens parted within 7-23 steps).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..errors import EngineError
from .decoder import check_room, kv_buffer
from .prompt_cache import PromptCache
from .registry import slot_group
from .rowslots import bind_rows, row_groups, takes_row_slots

_END = object()
_PREFILLED = object()


class _Request:
    """One request in the batcher: what it asked for and where it stands."""

    def __init__(self, ids, pick, budget, stops, adapters, values, prefix, on_prefill):
        self.ids, self.pick, self.budget, self.stops = ids, pick, budget, stops
        self.key = tuple(a.key for a in adapters)
        self.groups = {slot_group(n): a for a in adapters for n in a.arrays}  # slot group -> the adapter setting it
        self.values = tuple(values)
        self.prefix, self.on_prefill = prefix, on_prefill
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.total = 0  # cache positions in use (prefix, prompt, fed tokens)
        self.made = 0  # tokens handed out
        self.tok = -1  # the token to feed next


class Batcher:
    """Decodes concurrent requests together (see the module docstring). Thread-safe; at most ``rows``
    decode at once, the rest wait in arrival order.

    Built by :meth:`for_graph`, which returns None for a graph that cannot batch rows with different
    adapters (no row masks, or slots the masks do not cover): such a graph's requests decode alone.
    """

    @classmethod
    def for_graph(cls, runner, model_info: dict, rows: int, prompt_cache_bytes: int = 0) -> Batcher | None:
        """A batcher for ``runner``'s graph, or None when rows batched together would not each get the answer
        they get alone (see the module docstring: shaped slots, int8 LoRA B slots): its requests decode alone."""
        slots = model_info.get("slots") or {}
        if slots and not takes_row_slots(runner.session):
            return None
        if "int8" in (model_info.get("slot_dtypes") or {}).values():
            return None
        return cls(runner, model_info, rows, prompt_cache_bytes)

    def __init__(self, runner, model_info: dict, rows: int, prompt_cache_bytes: int = 0):
        self.runner, self.ort, self.session = runner, runner.ort, runner.session
        self.rows = int(rows)
        self.cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.groups = row_groups(self.session, model_info, self.rows)  # per-row tensors (:mod:`.rowslots`)
        r = runner
        shape = (self.rows, r.kv_heads, r.max_len, r.head_dim)
        self.kv = [kv_buffer(shape, r.kv_dtype) for _ in r.kv_pairs]  # resident only where rows write
        self.ctx = [r.context([buf[i:i + 1] for buf in self.kv]) for i in range(self.rows)]
        self.active: list[_Request] = []
        self.waiting: list[_Request] = []
        self._cond = threading.Condition()
        self._in_round = False  # a consumer thread is running a round (admissions and one step)
        self._closed = False
        self._batch = None  # (binding, ids array, logits array, the rows it was made for)
        self.steps = self.batched_steps = self.most_rows = 0

    # -- the request side ---------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], *, pick: Callable[[np.ndarray], int], max_new_tokens: int,
                 stop_ids: Sequence[int] = (), adapters: Sequence = (), adapter_values=(), prefix=None,
                 on_prefill=None) -> Iterator[int]:
        """Yield generated token ids (a stop id ends the stream and is not yielded), as
        :meth:`.decoder.DecoderRunner.generate` does; ``adapters`` are the request's loaded adapters
        (their ``key``, ``arrays`` and, for a prefix adapter, ``prefix``). Closing the iterator takes the
        request out of the batch before the next step. The request takes its place in line at this call; it
        decodes while some consumer reads (its own, or another request's that runs the steps). Raises :class:`EngineError` when the prompt
        leaves no room in the context, or when the engine is closed.
        """
        n = len(prompt_ids)
        p = prefix.prefix_len if prefix is not None else 0
        if n == 0:
            raise EngineError("the prompt is empty", hint="send at least one token of text")
        check_room(n, p, self.runner.max_len)
        budget = min(int(max_new_tokens), self.runner.max_len - n - p)
        req = _Request(np.asarray([prompt_ids], np.int64), pick, budget, {int(s) for s in stop_ids}, adapters,
                       adapter_values, prefix, on_prefill)
        with self._cond:
            if self._closed:
                raise EngineError("this engine is closed", hint="open the bundle again")
            self.waiting.append(req)  # queued now, in call order
        return self._consume(req)

    def stats(self) -> dict:
        """Requests decoding and waiting now; steps run so far, how many of them with several rows, and
        the most rows one step had."""
        with self._cond:
            return {"active": len(self.active), "waiting": len(self.waiting), "steps": self.steps,
                    "batched_steps": self.batched_steps, "most_rows": self.most_rows}

    def _consume(self, req: _Request) -> Iterator[int]:
        try:
            while True:
                try:
                    item = req.out.get_nowait()
                except queue.Empty:
                    self._drive(req)
                    continue
                if item is _END:
                    return
                if item is _PREFILLED:
                    req.on_prefill()
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with self._cond:
                req.cancelled = True
                if req in self.waiting:
                    self.waiting.remove(req)
                if not self._in_round and req in self.active:
                    self._leave(req)  # no round runs (none can start while the lock is held)

    def drop_adapter(self, key_part) -> None:
        """Forget which rows hold an adapter being unloaded or replaced (its key is never reused, so this only
        keeps the bookkeeping short; the runner forgets the rows' bindings)."""
        with self._cond:
            for g in self.groups.values():
                g.forget(key_part)
        if self.cache is not None:
            self.cache.drop(key_part)

    def close(self) -> None:
        """Refuse new requests (the engine closes once the running ones are done)."""
        with self._cond:
            self._closed = True

    # -- rounds: run by the consumers' own threads --------------------------------------------------
    def _drive(self, req: _Request) -> None:
        """Run a round (admissions, then one step for every row) in this consumer's thread, unless another
        consumer runs one: then wait for it to end or for a token of ``req``. So one request alone decodes in
        its own thread exactly as the batch-1 decoder does, and no thread runs when nobody reads."""
        with self._cond:
            if self._in_round:
                while self._in_round and req.out.empty():
                    self._cond.wait()
                return
            self._in_round = True
        try:
            self._round()
        finally:
            with self._cond:
                for gone in [r for r in self.active if r.cancelled]:  # done now: no row waits for a next round
                    self._leave(gone)
                self._in_round = False
                self._cond.notify_all()

    def _round(self) -> None:
        with self._cond:
            for req in [r for r in self.active if r.cancelled]:
                self._leave(req)
            joining = []
            while self.waiting and len(self.active) + len(joining) < self.rows:
                joining.append(self.waiting.pop(0))
        for req in joining:
            self._prefill(req)
        if self.active:
            self._step()

    def _finish(self, req: _Request, item=_END) -> None:
        req.out.put(item)
        req.cancelled = True

    def _leave(self, req: _Request) -> None:
        """Take ``req`` out of the batch; the last row moves into its place (its used positions copied)."""
        i, last = self.active.index(req), len(self.active) - 1
        if i != last:
            moved = self.active[last]
            for buf in self.kv:
                buf[i, :, :moved.total] = buf[last, :, :moved.total]
            self.ctx[i].prefix_key = self.ctx[last].prefix_key
            self.active[i] = moved
        self.active.pop()
        self._batch = None

    def _emit(self, req: _Request, tok: int) -> bool:
        """Hand ``tok`` to the request; False when the request is done (a stop id, its budget, cancelled)."""
        if tok in req.stops or req.cancelled:
            self._finish(req)
            return False
        req.out.put(tok)
        req.made += 1
        if req.made >= req.budget:
            self._finish(req)
            return False
        req.tok = tok
        return True

    def _prefill(self, req: _Request) -> None:
        """Run ``req``'s prompt alone at batch 1 into the next free row; it joins the batch unless done."""
        if req.cancelled:
            return
        row = len(self.active)
        ctx, r = self.ctx[row], self.runner
        try:
            ctx.bind_adapters(r, req.key, req.values)
            p = ctx.load_prefix(req.prefix)
            n = req.ids.shape[1]
            done = self._from_cache(req, row, p)
            b = ctx.binding
            b.bind_ortvalue_input("input_ids", self.ort.OrtValue.ortvalue_from_numpy(req.ids[:, done:]))
            b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(r.ones[:, :p + n]))
            full = np.empty((1, 1 if r.last_only else n - done, r.vocab), np.float32)
            b.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(full))
            try:
                self.session.run_with_iobinding(b)
            finally:
                b.bind_ortvalue_input("input_ids", ctx.ids_ov)
                b.bind_ortvalue_output("logits", ctx.logits_ov)
            if self.cache is not None:
                self.cache.store(req.key, req.ids[0], [buf[row, :, p:p + n] for buf in self.kv])
            if req.on_prefill is not None:
                req.out.put(_PREFILLED)
            tok = req.pick(full[0, -1])
        except BaseException as exc:  # noqa: BLE001 (the request's consumer raises it)
            self._finish(req, exc)
            return
        req.total = p + n
        with self._cond:
            if self._emit(req, tok):
                self.active.append(req)
                self._batch = None

    def _from_cache(self, req: _Request, row: int, p: int) -> int:
        """Copy the cached key/values of the longest known start of ``req``'s prompt (same adapters) into
        ``row`` after its ``p`` prefix positions; returns the prompt tokens that need no prefill (0: none)."""
        if self.cache is None:
            return 0
        done, arrays = self.cache.reuse(req.key, req.ids[0])
        for buf, arr in zip(self.kv, arrays):
            buf[row, :, p:p + done] = arr[:, :done]
        return done

    def _step(self) -> None:
        """One token for every row in the batch."""
        rows = list(self.active)
        self.steps += 1
        self.batched_steps += len(rows) > 1
        self.most_rows = max(self.most_rows, len(rows))
        try:
            for req in rows:
                req.total += 1
            if len(rows) == 1:
                logits = self._step_alone(rows[0])
            else:
                logits = self._step_batch(rows)
        except BaseException as exc:  # noqa: BLE001 (every request of the failed step gets the error)
            with self._cond:
                for req in rows:
                    self._finish(req, exc)
                    self._leave(req)
            return
        with self._cond:
            for i, req in enumerate(rows):
                try:
                    tok = req.pick(logits[i, 0])
                except BaseException as exc:  # noqa: BLE001
                    self._finish(req, exc)
                    continue
                self._emit(req, tok)
            for req in [r for r in rows if r.cancelled]:
                self._leave(req)

    def _step_alone(self, req: _Request) -> np.ndarray:
        """The batch-1 decoder's step on row 0 with the request's own adapter binding."""
        ctx, r = self.ctx[0], self.runner
        ctx.bind_adapters(r, req.key, req.values)
        b = ctx.binding
        ctx.ids[0, 0] = req.tok
        b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(r.ones[:, :req.total]))
        self.session.run_with_iobinding(b)
        return ctx.logits

    def _step_batch(self, rows: Sequence[_Request]) -> np.ndarray:
        """One run over rows [0, n): the rows' cache slices, per-row adapter tensors for every slot group a row
        uses (made again only when the rows change), and an attention mask of each row's length."""
        n = len(rows)
        if self._batch is None or self._batch[3] != [id(r) for r in rows]:
            b = self.session.io_binding()
            for (past, present), buf in zip(self.runner.kv_pairs, self.kv):
                ov = self.ort.OrtValue.ortvalue_from_numpy(buf[:n])
                b.bind_ortvalue_input(past, ov)
                b.bind_ortvalue_output(present, ov)
            users = {g: [req.groups.get(g) for req in rows] for g in self.groups}
            for name, arr in bind_rows(self.groups, users).items():  # groups no row uses keep their defaults
                b.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(arr))
            ids = np.zeros((n, 1), np.int64)
            logits = np.empty((n, 1, self.runner.vocab), np.float32)
            b.bind_ortvalue_input("input_ids", self.ort.OrtValue.ortvalue_from_numpy(ids))
            b.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(logits))
            self._batch = (b, ids, logits, [id(r) for r in rows])
        b, ids, logits = self._batch[:3]
        totals = np.array([r.total for r in rows], np.int64)
        ids[:, 0] = [r.tok for r in rows]
        mask = (np.arange(int(totals.max()))[None, :] < totals[:, None]).astype(np.int64)
        b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(mask))
        self.session.run_with_iobinding(b)
        return logits


__all__ = ["Batcher", "takes_row_slots"]
