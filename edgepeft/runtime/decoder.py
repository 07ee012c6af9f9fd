"""The decode loop: one ONNX Runtime session, IOBinding, a shared key/value buffer per layer.

Why it looks like this (a naive ``session.run`` loop reached ~70 tok/s where
onnxruntime-genai did ~150 on the same graph):

- The graph uses ``GroupQueryAttention``; binding ``past_key_values.i`` and
  ``present.i`` to the *same* max-length buffer makes ORT append in place
  (past_present_share_buffer) instead of copying the whole cache every token.
- Everything is bound once per request through an ``IOBinding``: the input id
  and the last-position logits are preallocated numpy arrays that ORT reads
  and writes directly; per token only the attention mask (a view of one shared
  row of ones) is rebound. No per-token numpy copy of the cache or of logits.
- ``run_with_iobinding`` ignores ``RunOptions`` adapters, so adapters are bound
  as ordinary inputs: read-only views over the adapter file's memory map
  (zero copy). A request context keeps one IOBinding per adapter set it has
  served (KV buffers + that set's tensors), so a request naming an adapter the
  context has seen before binds nothing: switching is a dictionary lookup.
- A prefix adapter (prefix or prompt tuning) is the first positions of the cache:
  its key/values are copied into the context's buffers, the request's tokens follow
  at the positions after it (GroupQueryAttention takes a non-empty past with a
  multi-token prompt at batch 1 since ONNX Runtime 1.19), and the attention mask
  covers both. Decoding never writes below the prompt, so a context that served a
  prefix last keeps it: the next request with the same prefix copies nothing.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import EngineError

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class DecodeContext:
    """The per-request state: one KV buffer set of ``max_len`` positions and, per adapter set, an
    IOBinding of those buffers plus that set's tensors (kept, so switching back binds nothing).
    ``kv``: buffers to use instead of new ones ([1, kv_heads, max_len, head_dim] each, e.g. one row of
    a batch's buffers, :mod:`.batching`); get one from :meth:`DecoderRunner.context`.

    The KV buffers are the memory; a binding is only ~300 references, so a context keeps up to
    ``MAX_BINDINGS`` of them (least recently used dropped first). ``bindings`` is changed only
    under the runner's lock; the binding a running request uses is its own reference.
    """

    MAX_BINDINGS = 32

    def __init__(self, runner: DecoderRunner, kv: list | None = None):
        r = runner
        shape = (1, r.kv_heads, r.max_len, r.head_dim)
        self.kv = kv if kv is not None else [kv_buffer(shape, r.kv_dtype) for _ in r.kv_pairs]
        self.kv_ov = [r.ort.OrtValue.ortvalue_from_numpy(a) for a in self.kv]
        self.ids = np.zeros((1, 1), np.int64)
        self.ids_ov = r.ort.OrtValue.ortvalue_from_numpy(self.ids)
        self.logits = np.empty((1, 1, r.vocab), np.float32)
        self.logits_ov = r.ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.adapter_key: tuple = ()
        self.prefix_key: tuple | None = None  # the prefix whose key/values fill the cache's first positions
        self.binding = self._new_binding(r, ())
        self.bindings: OrderedDict[tuple, object] = OrderedDict({(): self.binding})

    def _new_binding(self, r: DecoderRunner, values: Iterable[tuple[str, object]]):
        """A binding of this context's KV buffers plus ``values`` (slot name, OrtValue), ready for a decode
        step (the one-token id and logits buffers); unbound slots use their (empty) defaults."""
        b = r.session.io_binding()
        for (past, present), ov in zip(r.kv_pairs, self.kv_ov):
            b.bind_ortvalue_input(past, ov)
            b.bind_ortvalue_output(present, ov)
        b.bind_ortvalue_input("input_ids", self.ids_ov)
        b.bind_ortvalue_output("logits", self.logits_ov)
        for name, ov in values:
            b.bind_ortvalue_input(name, ov)
        return b

    def bind_adapters(self, r: DecoderRunner, key: tuple, values: Iterable[tuple[str, object]]) -> None:
        """Make ``values`` the adapter inputs: O(1) when this context has bound ``key`` before
        (``values`` is then not even read, so callers may pass a generator)."""
        if key == self.adapter_key:
            return
        with r._cond:
            b = self.bindings.get(key)
            if b is not None:
                self.bindings.move_to_end(key)
        if b is None:  # first use of this adapter set on this context: bind it once, outside the lock
            b = self._new_binding(r, values)
            with r._cond:
                self.bindings[key] = b
                for old in list(self.bindings)[: max(0, len(self.bindings) - self.MAX_BINDINGS)]:
                    if old not in ((), self.adapter_key, key):
                        del self.bindings[old]
        self.binding, self.adapter_key = b, key

    def load_prefix(self, prefix) -> int:
        """Put ``prefix``'s key/values (one [kv_heads, P, head_dim] array per cache buffer) at the cache's
        first positions, unless they are there already; returns P (0 without a prefix)."""
        if prefix is None:
            self.prefix_key = None  # this request's tokens overwrite whatever prefix was there
            return 0
        if self.prefix_key != prefix.key:
            n = prefix.prefix_len
            for buf, arr in zip(self.kv, prefix.prefix):
                buf[0, :, :n, :] = arr
            self.prefix_key = prefix.key
        return prefix.prefix_len

    def forget(self, key_part, *, idle: bool) -> None:
        """Drop bindings naming ``key_part`` (caller holds the runner's lock). A running request
        keeps its own binding; its context falls back to the no-adapter binding when released."""
        for k in [k for k in self.bindings if key_part in k]:
            del self.bindings[k]
        if self.prefix_key == key_part:
            self.prefix_key = None
        if idle and self.adapter_key not in self.bindings:
            self.binding, self.adapter_key = self.bindings[()], ()


class DecoderRunner:
    """Greedy/sampled generation over a GQA decoder graph (see the module docstring).

    Thread-safe: each request takes its own context; at most ``max_contexts`` run at once
    (more wait). Raises :class:`EngineError` for a graph that breaks the decoder contract.
    """

    def __init__(self, session, *, num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int,
                 max_context: int, max_contexts: int = 4, max_idle_contexts: int = 4):
        import onnxruntime as ort

        self.ort, self.session = ort, session
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        self.kv_pairs = []
        for i in range(num_layers):
            for w in ("key", "value"):
                past, present = f"past_key_values.{i}.{w}", f"present.{i}.{w}"
                if past not in inputs or present not in outputs:
                    raise EngineError(f"the decoder graph lacks {past} or {present}",
                                      hint="the bundle's model.onnx does not follow the decoder contract; rebuild it")
                self.kv_pairs.append((past, present))
        for name in ("input_ids", "attention_mask"):
            if name not in inputs:
                raise EngineError(f"the decoder graph has no input {name!r}", hint="rebuild the bundle")
        if "logits" not in outputs:
            raise EngineError("the decoder graph has no output 'logits'", hint="rebuild the bundle")
        logits_shape = next(o.shape for o in session.get_outputs() if o.name == "logits")
        # a graph may compute logits for the last position only ([batch, 1, vocab]): then prefill needs 1 row
        self.last_only = len(logits_shape) == 3 and logits_shape[1] == 1
        kv_type = inputs[self.kv_pairs[0][0]].type
        if kv_type not in _NP:
            raise EngineError(f"unsupported key/value cache type {kv_type}", hint="export with float32 caches")
        self.kv_dtype = _NP[kv_type]
        self.kv_heads, self.head_dim, self.vocab = num_kv_heads, head_dim, vocab_size
        self.max_len = int(max_context)
        self.ones = np.ones((1, self.max_len), np.int64)
        self._free: list[DecodeContext] = []
        self._all: weakref.WeakSet = weakref.WeakSet()  # every live context (idle or running)
        self._busy = 0
        self.max_contexts, self.max_idle = max_contexts, max_idle_contexts
        self._cond = threading.Condition()
        self.batcher = None  # a .batching.Batcher when the graph can decode rows with different adapters together

    # -- contexts -------------------------------------------------------------------------
    def context(self, kv: list) -> DecodeContext:
        """A context over ``kv`` (see :class:`DecodeContext`) that :meth:`drop_adapter` also cleans."""
        ctx = DecodeContext(self, kv)
        with self._cond:
            self._all.add(ctx)
        return ctx

    def _acquire(self, key: tuple) -> DecodeContext:
        """An idle context if there is one (preferably bound to ``key``, else one that has bound it
        before, else the most recently used: its binding for ``key`` is made once and kept); else a
        new context while fewer than ``max_contexts`` run; else wait."""
        with self._cond:
            while True:
                if self._free:
                    free = self._free
                    pick = next((i for i in range(len(free) - 1, -1, -1) if free[i].adapter_key == key), None)
                    if pick is None:
                        pick = next((i for i in range(len(free) - 1, -1, -1) if key in free[i].bindings),
                                    len(free) - 1)
                    self._busy += 1
                    return free.pop(pick)
                if self._busy < self.max_contexts:
                    self._busy += 1
                    break
                self._cond.wait()
        try:
            ctx = DecodeContext(self)
        except BaseException:
            with self._cond:
                self._busy -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._all.add(ctx)
        return ctx

    def _release(self, ctx: DecodeContext) -> None:
        with self._cond:
            self._busy -= 1
            if ctx.adapter_key not in ctx.bindings:  # its adapter was unloaded or replaced meanwhile
                ctx.binding, ctx.adapter_key = ctx.bindings[()], ()
            self._free.append(ctx)  # most recently used last
            if len(self._free) > self.max_idle:
                self._free.pop(0)
            self._cond.notify()

    def drop_adapter(self, key_part) -> None:
        """Forget every binding of an adapter being unloaded or replaced (they hold its memory), and tell the batcher."""
        with self._cond:
            idle = {id(c) for c in self._free}
            for c in list(self._all):
                c.forget(key_part, idle=id(c) in idle)
        if self.batcher is not None:
            self.batcher.drop_adapter(key_part)

    # -- scoring --------------------------------------------------------------------------
    def prefill_logits(self, ids: Sequence[int], *, adapter_key: tuple = (),
                       adapter_values: Iterable[tuple[str, object]] = (), prefix=None) -> np.ndarray:
        """Logits at every position of ``ids`` ([len(ids), vocab]) from one prefill: what perplexity needs.
        ``prefix``: a loaded prefix adapter (``key``, ``prefix`` arrays, ``prefix_len``) placed before ``ids``.

        Raises :class:`EngineError` when the sequence does not fit the context, or when the graph
        returns the last position's logits only.
        """
        n = len(ids)
        p = prefix.prefix_len if prefix is not None else 0
        if self.last_only:
            raise EngineError("this decoder graph returns only the last position's logits, so it cannot score text",
                              hint="rebuild the bundle with edgepeft build, whose graphs return every position")
        if n == 0 or n + p > self.max_len:
            after = f" after a prefix of {p}" if p else ""
            raise EngineError(f"a text of {n} tokens cannot be scored in a context of {self.max_len}{after}",
                              hint=f"keep scored texts between 1 and {self.max_len - p} tokens")
        ctx = self._acquire(tuple(adapter_key))
        try:
            ctx.bind_adapters(self, tuple(adapter_key), adapter_values)
            ctx.load_prefix(prefix)
            b = ctx.binding
            b.bind_ortvalue_input("input_ids", self.ort.OrtValue.ortvalue_from_numpy(np.asarray([ids], np.int64)))
            b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(self.ones[:, :p + n]))
            full = np.empty((1, n, self.vocab), np.float32)
            b.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(full))
            self.session.run_with_iobinding(b)
            b.bind_ortvalue_input("input_ids", ctx.ids_ov)  # leave the binding as generate() expects it
            b.bind_ortvalue_output("logits", ctx.logits_ov)
            return full[0]
        finally:
            self._release(ctx)

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], *, pick: Callable[[np.ndarray], int], max_new_tokens: int,
                 stop_ids: Sequence[int] = (), adapter_key: tuple = (),
                 adapter_values: Iterable[tuple[str, object]] = (), on_prefill=None, prefix=None,
                 adapters: Sequence = ()) -> Iterator[int]:
        """Yield generated token ids (a stop id ends the stream and is not yielded).

        ``adapter_key`` identifies ``adapter_values`` (e.g. ``(("name", "version"),)``) so a
        context already bound to them is reused. ``prefix``: a loaded prefix adapter whose
        key/values precede the prompt (see the module docstring). ``adapters``: the loaded adapters
        behind them; with a :attr:`batcher` the request then decodes in the batch with other requests
        (:mod:`.batching`), else alone. Raises :class:`EngineError` when the prompt (after the prefix)
        leaves no room in the context.
        """
        if self.batcher is not None and (adapters or not adapter_key):
            return self.batcher.generate(prompt_ids, pick=pick, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                         adapters=adapters, adapter_values=adapter_values, prefix=prefix,
                                         on_prefill=on_prefill)
        return self._generate_alone(prompt_ids, pick, max_new_tokens, stop_ids, adapter_key, adapter_values,
                                    on_prefill, prefix)

    def _generate_alone(self, prompt_ids, pick, max_new_tokens, stop_ids, adapter_key, adapter_values, on_prefill,
                        prefix) -> Iterator[int]:
        """The batch-1 decode loop on a context of its own (see the module docstring)."""
        n = len(prompt_ids)
        p = prefix.prefix_len if prefix is not None else 0
        if n == 0:
            raise EngineError("the prompt is empty", hint="send at least one token of text")
        check_room(n, p, self.max_len)
        budget = min(int(max_new_tokens), self.max_len - n - p)
        stops = set(int(s) for s in stop_ids)
        ctx = self._acquire(tuple(adapter_key))
        try:
            ctx.bind_adapters(self, tuple(adapter_key), adapter_values)
            ctx.load_prefix(prefix)
            b = ctx.binding
            ids = np.asarray([prompt_ids], np.int64)
            b.bind_ortvalue_input("input_ids", self.ort.OrtValue.ortvalue_from_numpy(ids))
            b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(self.ones[:, :p + n]))
            full = np.empty((1, 1 if self.last_only else n, self.vocab), np.float32)
            b.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(full))
            self.session.run_with_iobinding(b)
            if on_prefill is not None:
                on_prefill()
            tok = pick(full[0, -1])
            del full
            b.bind_ortvalue_input("input_ids", ctx.ids_ov)
            b.bind_ortvalue_output("logits", ctx.logits_ov)
            total = p + n
            for step in range(budget):
                if tok in stops:
                    return
                yield tok
                if step == budget - 1:
                    return
                ctx.ids[0, 0] = tok
                total += 1
                b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(self.ones[:, :total]))
                self.session.run_with_iobinding(b)
                tok = pick(ctx.logits[0, 0])
        finally:
            self._release(ctx)


def kv_buffer(shape: tuple, dtype) -> np.ndarray:
    """A zero-filled key/value buffer whose memory becomes resident only where positions are written.

    Why not ``np.empty``: numpy asks the kernel for transparent huge pages for arrays of 4 MiB or more, and a
    cache buffer is written a position at a time in every head, so each first write would make a whole 2 MiB
    page resident (a batch's buffers, [rows, ...], reach that size). An anonymous mapping advised against huge
    pages keeps resident memory to what requests wrote.
    """
    import mmap

    count = int(np.prod(shape))
    region = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere the kernel has no such default to opt out of
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(region, dtype, count=count).reshape(shape)


def check_room(prompt_tokens: int, prefix_tokens: int, max_len: int) -> None:
    """Raise :class:`EngineError` unless a prompt (after a prefix of ``prefix_tokens``) leaves room to generate."""
    if prompt_tokens + prefix_tokens >= max_len:
        if prefix_tokens:
            raise EngineError(f"the prompt is {prompt_tokens} tokens after the adapter's prefix of {prefix_tokens}; "
                              f"the context holds {max_len}",
                              hint=f"shorten the prompt to under {max_len - prefix_tokens} tokens")
        raise EngineError(f"the prompt is {prompt_tokens} tokens; the context holds {max_len}",
                          hint=f"shorten the prompt to under {max_len} tokens")
