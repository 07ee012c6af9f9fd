"""Choosing the next token from one row of logits: greedy, temperature, nucleus (top-p).

Works on the last position's logits only (one vocab-sized float32 row), so it
costs microseconds per token; validation happens once, where a request enters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EngineError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy; ``top_p`` in (0, 1] keeps the smallest set of tokens
    whose probabilities add up to at least ``top_p``. Raises :class:`EngineError` when invalid."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (0.0 <= float(self.temperature) <= 100.0):
            raise EngineError(f"temperature {self.temperature} is out of range",
                              hint="use 0 for greedy decoding or a value like 0.7")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise EngineError(f"top_p {self.top_p} is out of range", hint="use a value in (0, 1], e.g. 0.9")


class Sampler:
    """Stateful picker (one per request, so concurrent requests never share a random stream)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        z -= z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]
            sub = probs[keep] / probs[keep].sum()
            return int(keep[self._rng.choice(len(keep), p=sub)])
        return int(self._rng.choice(len(probs), p=probs))
