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
  (zero copy). A request context keeps its adapter bound between requests, so
  the next request with the same adapter binds nothing (switching is a lookup).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import EngineError

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class _Context:
    """The per-request state: one IOBinding and one KV buffer set of ``max_len`` positions."""

    def __init__(self, runner: "DecoderRunner"):
        r = runner
        self.binding = r.session.io_binding()
        shape = (1, r.kv_heads, r.max_len, r.head_dim)
        self.kv = [np.empty(shape, r.kv_dtype) for _ in r.kv_pairs]
        self.kv_ov = [r.ort.OrtValue.ortvalue_from_numpy(a) for a in self.kv]
        self.ids = np.zeros((1, 1), np.int64)
        self.ids_ov = r.ort.OrtValue.ortvalue_from_numpy(self.ids)
        self.logits = np.empty((1, 1, r.vocab), np.float32)
        self.logits_ov = r.ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.adapter_key: tuple = ()
        self._bind_kv(r)

    def _bind_kv(self, r: "DecoderRunner") -> None:
        b = self.binding
        for (past, present), ov in zip(r.kv_pairs, self.kv_ov):
            b.bind_ortvalue_input(past, ov)
            b.bind_ortvalue_output(present, ov)

    def bind_adapters(self, r: "DecoderRunner", key: tuple, values: Sequence[tuple[str, object]]) -> None:
        """Make ``values`` (slot name, OrtValue) the adapter inputs; unbound slots use their defaults."""
        if key == self.adapter_key:
            return
        if self.adapter_key:  # inputs cannot be unbound one by one: start over
            self.binding.clear_binding_inputs()
            for (past, _), ov in zip(r.kv_pairs, self.kv_ov):
                self.binding.bind_ortvalue_input(past, ov)
        for name, ov in values:
            self.binding.bind_ortvalue_input(name, ov)
        self.adapter_key = key


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
        self._ones = np.ones((1, self.max_len), np.int64)
        self._free: list[_Context] = []
        self._busy = 0
        self.max_contexts, self.max_idle = max_contexts, max_idle_contexts
        self._cond = threading.Condition()

    # -- contexts -------------------------------------------------------------------------
    def _acquire(self, key: tuple) -> _Context:
        """A context already bound to ``key`` if one is idle (switching then binds nothing); else a
        new one while the pool has room; else the least recently used idle one (rebound)."""
        with self._cond:
            while True:
                for i in range(len(self._free) - 1, -1, -1):
                    if self._free[i].adapter_key == key:
                        self._busy += 1
                        return self._free.pop(i)
                room = self._busy + len(self._free) < self.max_idle and self._busy < self.max_contexts
                if self._free and not room:
                    self._busy += 1
                    return self._free.pop(0)
                if self._busy < self.max_contexts:
                    self._busy += 1
                    break
                self._cond.wait()
        try:
            return _Context(self)
        except BaseException:
            with self._cond:
                self._busy -= 1
                self._cond.notify()
            raise

    def _release(self, ctx: _Context) -> None:
        with self._cond:
            self._busy -= 1
            self._free.append(ctx)  # most recently used last
            if len(self._free) > self.max_idle:
                self._free.pop(0)
            self._cond.notify()

    def drop_adapter(self, key_part: str) -> None:
        """Forget idle contexts bound to an adapter being unloaded (they hold its memory map)."""
        with self._cond:
            self._free = [c for c in self._free if key_part not in c.adapter_key]

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], *, pick: Callable[[np.ndarray], int], max_new_tokens: int,
                 stop_ids: Sequence[int] = (), adapter_key: tuple = (),
                 adapter_values: Sequence[tuple[str, object]] = (), on_prefill=None) -> Iterator[int]:
        """Yield generated token ids (a stop id ends the stream and is not yielded).

        ``adapter_key`` identifies ``adapter_values`` (e.g. ``(("name", "version"),)``) so a
        context already bound to them is reused. Raises :class:`EngineError` when the prompt
        leaves no room in the context.
        """
        n = len(prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty", hint="send at least one token of text")
        if n >= self.max_len:
            raise EngineError(f"the prompt is {n} tokens; the context holds {self.max_len}",
                              hint=f"shorten the prompt to under {self.max_len} tokens")
        budget = min(int(max_new_tokens), self.max_len - n)
        stops = set(int(s) for s in stop_ids)
        ctx = self._acquire(tuple(adapter_key))
        try:
            ctx.bind_adapters(self, tuple(adapter_key), adapter_values)
            b = ctx.binding
            ids = np.asarray([prompt_ids], np.int64)
            b.bind_ortvalue_input("input_ids", self.ort.OrtValue.ortvalue_from_numpy(ids))
            b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(self._ones[:, :n]))
            full = np.empty((1, 1 if self.last_only else n, self.vocab), np.float32)
            b.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(full))
            self.session.run_with_iobinding(b)
            if on_prefill is not None:
                on_prefill()
            tok = pick(full[0, -1])
            del full
            b.bind_ortvalue_input("input_ids", ctx.ids_ov)
            b.bind_ortvalue_output("logits", ctx.logits_ov)
            total = n
            for step in range(budget):
                if tok in stops:
                    return
                yield tok
                if step == budget - 1:
                    return
                ctx.ids[0, 0] = tok
                total += 1
                b.bind_ortvalue_input("attention_mask", self.ort.OrtValue.ortvalue_from_numpy(self._ones[:, :total]))
                self.session.run_with_iobinding(b)
                tok = pick(ctx.logits[0, 0])
        finally:
            self._release(ctx)
