"""Prompt cache: the key/values of recent prompts, per adapter setting, so a prompt that starts like one
already seen prefills only what differs.

Why: on a CPU, prefill is compute-bound and an app sends the same system prompt, instructions or few-shot
examples before every question; recomputing them costs each request more than many decode steps (and in a
batch, every row waits while a joining request prefills). llama.cpp's server keeps such a cache per slot;
here it is kept per adapter setting, since a LoRA on the key or value projections changes the cached
values: an entry is found only by the same adapters (their keys, never reused across versions), and an
adapter's entries go when it is unloaded.

An entry holds one [kv_heads, tokens, head_dim] copy per cache buffer for the prompt's positions (after a
prefix adapter's own positions, which the decoder places itself). The reused part of a new prompt is its
longest common start with an entry, less its last token, whose logits must be computed. Each adapter setting
keeps one entry: a prompt that shares a start with it cuts it to that start (what the setting's prompts have
in common, such as a system prompt, is what the next one will likely reuse), and one that shares none
replaces it. So a prompt repeated whole is reused whole until another prompt comes between. Entries are
dropped least recently used first to stay within ``max_bytes``. What is reused is what that adapter setting computed
for those very tokens, so an answer does not depend on whether it was cached beyond floating-point rounding
(the attention over a cached start sums in another order; tests/test_prompt_cache.py states the tolerance).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

MIN_TOKENS = 8  # a shorter common start is not worth a lookup and a copy
DEFAULT_MIB = 16  # the engine's default budget, which the build's fit check counts (edgepeft.bundle.fit)


class PromptCache:
    """Thread-safe; ``max_bytes`` 0 keeps nothing."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[int, tuple[tuple, np.ndarray, list[np.ndarray], int]] = OrderedDict()
        self._bytes = 0
        self._next = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.reused_tokens = 0

    def reuse(self, key: tuple, ids: Sequence[int]) -> tuple[int, list[np.ndarray]]:
        """(tokens reusable from the start of ``ids``, the entry's arrays) for adapter setting ``key``;
        (0, []) when no entry shares at least :data:`MIN_TOKENS` tokens. The arrays are read-only: copy the
        first tokens out of them."""
        ids = np.asarray(ids)
        best, arrays, best_id = 0, [], None
        with self._lock:
            for eid, (k, toks, arrs, _) in self._entries.items():
                if k != key:
                    continue
                n = min(len(toks), len(ids) - 1)
                eq = toks[:n] == ids[:n]
                same = n if eq.all() else int(np.argmin(eq))
                if same > best:
                    best, arrays, best_id = same, arrs, eid
            if best < MIN_TOKENS:
                self.misses += 1
                return 0, []
            self._entries.move_to_end(best_id)
            self.hits += 1
            self.reused_tokens += best
        return best, arrays

    def store(self, key: tuple, ids: Sequence[int], arrays: list[np.ndarray]) -> None:
        """Keep what ``ids`` (whose key/values are ``arrays``, one [kv_heads, tokens, head_dim] view per cache
        buffer, copied here) leaves worth keeping for ``key``: the start it shares with the setting's entry
        (cut to it), else the whole prompt in its place. An entry too short or too big for the cache is not
        kept."""
        ids = np.array(ids, copy=True)
        with self._lock:
            old = next(((eid, e) for eid, e in self._entries.items() if e[0] == key), None)
            if old is not None:
                eid, (_, toks, arrs, nbytes) = old
                n = min(len(toks), len(ids))
                eq = toks[:n] == ids[:n]
                same = n if eq.all() else int(np.argmin(eq))
                del self._entries[eid]
                self._bytes -= nbytes
                if same >= MIN_TOKENS:  # keep the common start (the entry's own copy, cut)
                    ids, arrays = toks[:same], [a[:, :same] for a in arrs]
            size = sum(a.nbytes for a in arrays) + ids.nbytes
            if len(ids) < MIN_TOKENS or size > self.max_bytes:
                return
            arrays = [a.copy() for a in arrays]  # only what is kept is copied
            while self._entries and self._bytes + size > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][3]
            self._entries[self._next] = (key, ids, arrays, size)
            self._next += 1
            self._bytes += size

    def drop(self, key_part) -> None:
        """Forget every entry of an adapter setting that includes ``key_part`` (an adapter being unloaded)."""
        with self._lock:
            for eid, (k, _, _, nbytes) in list(self._entries.items()):
                if key_part in k:
                    del self._entries[eid]
                    self._bytes -= nbytes

    def stats(self) -> dict:
        """Entries, bytes held and the budget, lookups that found a start and that did not, tokens reused."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens}


__all__ = ["PromptCache", "MIN_TOKENS", "DEFAULT_MIB"]
