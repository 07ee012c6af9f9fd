"""Continuous batching: concurrent requests, each with its own adapters, decode together in one run per step.

Why: on a CPU a decode step is bound by reading the base weights; a step for four rows reads them
once instead of four times, so requests that would each run alone share the cost. The graph makes a
mixed batch possible (its row masks, :mod:`edgepeft.export.slots`): a step binds the batch's adapters
side by side (a *bank*, built once per set of adapters) and a mask per group kind that keeps each
row to its own adapters' columns.

How it runs:

- One key/value buffer per cache input, [rows, kv_heads, max_len, head_dim]; row ``r`` belongs to
  one request. A request prefills alone at batch 1 into its row, with its own adapters bound as the
  batch-1 decoder binds them (a :class:`.decoder.DecodeContext` over the row's slice, which shares its
  memory), then joins the running batch.
- A step runs rows [0, n) with one token each and an attention mask right-padded per row:
  ``GroupQueryAttention`` takes each row's length (``seqlens_k``) and writes each row's new key/value
  at that row's own position in the shared buffer.
- A request that ends, or whose consumer stops iterating (a closed stream, a client gone), leaves
  before the next step; the last row moves into its place so the batch stays contiguous.
- With one request running, the step is the batch-1 decoder's run on that row's binding: the request's
  own adapter tensors, the masks at their defaults, no bank.
- One scheduler thread runs prefills and steps; requests wait FIFO for a free row and join between
  steps, so none starves while others decode.

A prefix adapter (prefix or prompt tuning) is its row's first cache positions, as in the batch-1
decoder; bottleneck adapters enter the bank like LoRA (their up-bias through an always-on unit per
adapter, see :meth:`_Bank._bottleneck`). A graph without row masks (bundles built before them) gets no
batcher: its requests decode alone, as before.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..contracts.methods import BOTTLENECK_TAG, bottleneck_names
from ..errors import EngineError
from .decoder import check_room

ROW_MASK_META = "edgepeft.row_masks"  # graph metadata written by edgepeft.export.slots.row_mask_layout
UNIT = 64.0  # the always-on bottleneck unit's pre-activation: relu, silu and gelu all return it unchanged
_END = object()
_PREFILLED = object()


def row_mask_layout(session) -> dict | None:
    """The graph's row-mask layout (its ``edgepeft.row_masks`` metadata), or None for a graph without masks."""
    raw = session.get_modelmeta().custom_metadata_map.get(ROW_MASK_META)
    if not raw:
        return None
    try:
        layout = json.loads(raw)
    except ValueError as exc:
        raise EngineError(f"the graph's {ROW_MASK_META} metadata is not JSON: {exc}",
                          hint="rebuild the bundle with edgepeft build") from exc
    return layout if isinstance(layout, dict) else None


class _LoraKind:
    """One group kind of the graph (``qkv``, ``gate_up`` ...): its mask, module order and per-layer slots."""

    def __init__(self, key: str, spec: dict, inputs: dict):
        self.key, self.mask = key, spec["mask"]
        self.modules, self.split = list(spec["modules"]), bool(spec["split_b"])
        self.m = len(self.modules)
        self.layers = []  # (A name, in_dim, [(B name, out_dim, dtype)] one per module when split, else one)
        i = 0
        while f"layers.{i}.{key}.lora_A" in inputs:
            a = f"layers.{i}.{key}.lora_A"
            bs = [f"layers.{i}.{key}.lora_B.{mod}" for mod in self.modules] if self.split \
                else [f"layers.{i}.{key}.lora_B"]
            if any(b not in inputs for b in bs):
                raise EngineError(f"the graph has {a} without its B slots", hint="rebuild the bundle")
            self.layers.append((a, int(inputs[a][0][0]), [(b, int(inputs[b][0][1]), inputs[b][1]) for b in bs]))
            i += 1

    def names(self) -> set:
        return {a for a, _, _ in self.layers} | {b for _, _, bs in self.layers for b, _, _ in bs}


class _Bank:
    """The slot tensors and mask layout for one set of adapters decoding together (see the module docstring).

    LoRA, per group kind: A = the adapters' A side by side, module-major then adapter-major, each padded
    to the set's largest rank R with zero columns (so the graph's per-module Split still cuts at module
    borders); B = the matching rows (zero rows for padding). Columns of adapter k for module j:
    ``[(j*K + k)*R, (j*K + k + 1)*R)``.
    """

    def __init__(self, batcher: Batcher, adapters: Sequence):
        self.keys = tuple(a.key for a in adapters)
        self.values: list = []  # (input name, OrtValue)
        self.arrays: list = []  # keeps the bound arrays alive
        self.columns: dict = {}  # mask name -> (width, {adapter key: [column slices]})
        for kind in batcher.kinds:
            self._lora(batcher, kind, [a for a in adapters if kind.names() & set(a.arrays)])
        if batcher.bottleneck is not None:
            self._bottleneck(batcher, [a for a in adapters if any(BOTTLENECK_TAG in n for n in a.arrays)])

    def _bind(self, ort, name: str, arr: np.ndarray) -> None:
        self.arrays.append(arr)
        self.values.append((name, ort.OrtValue.ortvalue_from_numpy(arr)))

    def _lora(self, b: Batcher, kind: _LoraKind, users: list) -> None:
        if not users:
            return  # the kind keeps its defaults: empty slots, mask 1.0
        m, k_n = kind.m, len(users)
        ranks = [a.arrays[n].shape[1] // m for a in users for n in a.arrays if n.endswith(f".{kind.key}.lora_A")]
        r_max = max(ranks)
        width = m * k_n * r_max
        for a_name, in_dim, bs in kind.layers:
            big_a = np.zeros((in_dim, width), np.float32)
            big_bs = [np.zeros((width // (m if kind.split else 1), out), _DTYPES[dt]) for _, out, dt in bs]
            for k, ad in enumerate(users):
                a = ad.arrays.get(a_name)
                if a is None:
                    continue
                r = a.shape[1] // m
                for j in range(m):
                    col = (j * k_n + k) * r_max
                    big_a[:, col:col + r] = a[:, j * r:(j + 1) * r]
                    if kind.split:
                        big_bs[j][k * r_max:k * r_max + r] = ad.arrays[bs[j][0]]
                    else:
                        big_bs[0][col:col + r] = ad.arrays[bs[0][0]][j * r:(j + 1) * r]
            self._bind(b.ort, a_name, big_a)
            for (name, _, _), arr in zip(bs, big_bs):
                self._bind(b.ort, name, arr)
        self.columns[kind.mask] = (width, {ad.key: [slice((j * k_n + k) * r_max, (j * k_n + k + 1) * r_max)
                                                    for j in range(m)] for k, ad in enumerate(users)})

    def _bottleneck(self, b: Batcher, users: list) -> None:
        """Bottleneck points: D, d and U side by side per adapter, plus one always-on unit per adapter
        (a zero column of D, bias :data:`UNIT`, U's row = up-bias / UNIT) that adds the adapter's up-bias
        only in its rows; the up-bias slot itself is bound to zeros."""
        if not users:
            return
        sizes = []
        for ad in users:
            down = next(v for n, v in ad.arrays.items() if n.endswith(BOTTLENECK_TAG + "down.weight"))
            sizes.append(int(down.shape[1]))
        offsets = np.cumsum([0] + [s + 1 for s in sizes])
        width, dim = int(offsets[-1]), b.hidden
        for names in b.bottleneck_points:
            big_d, big_db = np.zeros((dim, width), np.float32), np.zeros((width,), np.float32)
            big_u = np.zeros((width, dim), np.float32)
            for k, ad in enumerate(users):
                if names["down.weight"] not in ad.arrays:
                    continue
                o, s = int(offsets[k]), sizes[k]
                big_d[:, o:o + s] = ad.arrays[names["down.weight"]]
                big_db[o:o + s] = ad.arrays[names["down.bias"]]
                big_u[o:o + s] = ad.arrays[names["up.weight"]]
                big_db[o + s] = UNIT
                big_u[o + s] = ad.arrays[names["up.bias"]] / np.float32(UNIT)
            for part, arr in (("down.weight", big_d), ("down.bias", big_db), ("up.weight", big_u),
                              ("up.bias", np.zeros((dim,), np.float32))):
                self._bind(b.ort, names[part], arr)
        self.columns[b.bottleneck] = (width, {ad.key: [slice(int(offsets[k]), int(offsets[k + 1]))]
                                              for k, ad in enumerate(users)})

    def masks(self, rows: Sequence[_Request]) -> list:
        """(mask name, array [len(rows), 1, width]) with 1 in each row's adapters' columns."""
        out = []
        for name, (width, where) in self.columns.items():
            mask = np.zeros((len(rows), 1, width), np.float32)
            for i, req in enumerate(rows):
                for key in req.keys:
                    for cols in where.get(key, ()):
                        mask[i, 0, cols] = 1.0
            out.append((name, mask))
        return out


_DTYPES = {"tensor(float)": np.float32, "tensor(int8)": np.int8}


class _Request:
    """One request in the batcher: what it asked for and where it stands."""

    def __init__(self, ids, pick, budget, stops, adapters, values, prefix, on_prefill):
        self.ids, self.pick, self.budget, self.stops = ids, pick, budget, stops
        self.adapters = [a for a in adapters if not getattr(a, "prefix", ())]  # the bank's part of it
        self.keys = tuple(a.key for a in self.adapters)
        self.key = tuple(a.key for a in adapters)
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

    BANKS = 2  # banks kept (by adapter set); a bank is a copy of its adapters' tensors

    @classmethod
    def for_graph(cls, runner, model_info: dict, rows: int) -> Batcher | None:
        """A batcher for ``runner``'s graph, or None when the graph has no row masks for all its slots.
        Raises :class:`EngineError` for unreadable row-mask metadata."""
        layout = row_mask_layout(runner.session)
        slots = set(model_info.get("slots") or {})
        if layout is None:
            return None if slots else cls(runner, {"lora": {}, "bottleneck": None}, model_info, rows)
        return cls(runner, layout, model_info, rows) if cls._covers(runner, layout, slots, model_info) else None

    @staticmethod
    def _covers(runner, layout: dict, slots: set, model_info: dict) -> bool:
        inputs = {i.name for i in runner.session.get_overridable_initializers()}
        masks = {spec["mask"] for spec in (layout.get("lora") or {}).values()}
        if layout.get("bottleneck"):
            masks.add(layout["bottleneck"])
        if not masks <= inputs:
            return False
        covered = {n for n in slots if ".lora_" in n and n.split(".")[2] in (layout.get("lora") or {})}
        if layout.get("bottleneck"):
            covered |= {n for n in slots if BOTTLENECK_TAG in n}
        return covered == slots

    def __init__(self, runner, layout: dict, model_info: dict, rows: int):
        self.runner, self.ort, self.session = runner, runner.ort, runner.session
        self.rows = int(rows)
        inputs = {i.name: (tuple(i.shape), i.type) for i in self.session.get_overridable_initializers()}
        self.kinds = [_LoraKind(k, spec, inputs) for k, spec in (layout.get("lora") or {}).items()]
        self.bottleneck = layout.get("bottleneck")
        self.hidden = int(model_info.get("hidden_size") or 0)
        points = ((model_info.get("bottleneck") or {}).get("points") or []) if self.bottleneck else []
        self.bottleneck_points = [bottleneck_names(p, i) for i in range(int(model_info.get("num_layers") or 0))
                                  for p in points]
        r = runner
        shape = (self.rows, r.kv_heads, r.max_len, r.head_dim)
        self.kv = [np.empty(shape, r.kv_dtype) for _ in r.kv_pairs]  # pages are touched only where rows write
        self.ctx = [r.context([buf[i:i + 1] for buf in self.kv]) for i in range(self.rows)]
        self.banks: OrderedDict[tuple, _Bank] = OrderedDict()
        self.active: list[_Request] = []
        self.waiting: list[_Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._batch = None  # (binding, ids array, logits array, rows it was made for, bank, masks)
        self.steps = self.batched_steps = self.most_rows = 0

    # -- the request side ---------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], *, pick: Callable[[np.ndarray], int], max_new_tokens: int,
                 stop_ids: Sequence[int] = (), adapters: Sequence = (), adapter_values=(), prefix=None,
                 on_prefill=None) -> Iterator[int]:
        """Yield generated token ids (a stop id ends the stream and is not yielded), as
        :meth:`.decoder.DecoderRunner.generate` does; ``adapters`` are the request's loaded adapters
        (their ``key``, ``arrays`` and, for a prefix adapter, ``prefix``). Closing the iterator takes the
        request out of the batch before the next step. The request is queued by this call, so an iterator
        that is never read nor closed still decodes (up to ``max_new_tokens``). Raises :class:`EngineError` when the prompt
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
            self.waiting.append(req)  # queued now, in call order; the iterator only reads its tokens
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="edgepeft-batch", daemon=True)
                self._thread.start()
            self._cond.notify_all()
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
                item = req.out.get()
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

    def drop_adapter(self, key_part) -> None:
        """Forget the banks holding an adapter being unloaded or replaced (the runner forgets the rows' bindings)."""
        with self._cond:
            for k in [k for k in self.banks if key_part in k]:
                del self.banks[k]

    def close(self) -> None:
        """Stop the scheduler thread once the running requests are done (new ones are refused)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the scheduler thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not self.active:
                    self._cond.wait()
                if self._closed and not self.waiting and not self.active:
                    self._thread = None
                    return
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
            b = ctx.binding
            b.bind_ortvalue_input("input_ids", self.ort.OrtValue.ortvalue_from_numpy(req.ids))
            b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(r.ones[:, :p + n]))
            full = np.empty((1, 1 if r.last_only else n, r.vocab), np.float32)
            b.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(full))
            try:
                self.session.run_with_iobinding(b)
            finally:
                b.bind_ortvalue_input("input_ids", ctx.ids_ov)
                b.bind_ortvalue_output("logits", ctx.logits_ov)
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

    def _bank(self, rows: Sequence[_Request]) -> _Bank:
        """The bank for the adapters of ``rows`` (made once per set, the last :attr:`BANKS` kept)."""
        adapters = {}
        for req in rows:
            for a in req.adapters:
                adapters.setdefault(a.key, a)
        key = tuple(sorted(adapters, key=repr))
        with self._cond:
            bank = self.banks.get(key)
            if bank is not None:
                self.banks.move_to_end(key)
                return bank
        bank = _Bank(self, [adapters[k] for k in key])
        with self._cond:
            self.banks[key] = bank
            while len(self.banks) > self.BANKS:
                self.banks.popitem(last=False)
        return bank

    def _step_batch(self, rows: Sequence[_Request]) -> np.ndarray:
        """One run over rows [0, n): a binding of the rows' cache slices, the bank and the masks (made again
        when the rows change), the attention mask of each row's length."""
        n = len(rows)
        if self._batch is None or self._batch[3] != [id(r) for r in rows]:
            bank = self._bank(rows)
            b = self.session.io_binding()
            for (past, present), buf in zip(self.runner.kv_pairs, self.kv):
                ov = self.ort.OrtValue.ortvalue_from_numpy(buf[:n])
                b.bind_ortvalue_input(past, ov)
                b.bind_ortvalue_output(present, ov)
            keep = []
            for name, arr in [*bank.masks(rows)]:
                keep.append(arr)
                b.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(arr))
            for name, ov in bank.values:
                b.bind_ortvalue_input(name, ov)
            ids = np.zeros((n, 1), np.int64)
            logits = np.empty((n, 1, self.runner.vocab), np.float32)
            b.bind_ortvalue_input("input_ids", self.ort.OrtValue.ortvalue_from_numpy(ids))
            b.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(logits))
            self._batch = (b, ids, logits, [id(r) for r in rows], bank, keep)
        b, ids, logits = self._batch[:3]
        totals = np.array([r.total for r in rows], np.int64)
        ids[:, 0] = [r.tok for r in rows]
        mask = (np.arange(int(totals.max()))[None, :] < totals[:, None]).astype(np.int64)
        b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(mask))
        self.session.run_with_iobinding(b)
        return logits


__all__ = ["Batcher", "row_mask_layout"]
