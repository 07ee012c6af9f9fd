"""Choosing the next token from one row of logits: greedy, temperature, top-k, nucleus (top-p),
repetition / frequency / presence penalties, seeded randomness and log-probabilities.

Works on the last position's logits only (one vocab-sized float32 row), so it
costs microseconds per token; validation happens once, where a request enters.
The plain greedy path (no penalty, no log-probabilities) is one ``argmax``.

Penalties follow the two conventions apps know:

- ``repetition_penalty`` (transformers / CTRL): every token already in the prompt or the
  answer has its logit divided by the penalty when positive, multiplied when negative;
- ``frequency_penalty`` / ``presence_penalty`` (OpenAI): the logit of a token the answer
  already holds is lowered by ``frequency * count + presence``; the prompt does not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import EngineError

MAX_LOGPROBS = 20


def _number(name: str, value, lo: float, hi: float, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise EngineError(f"{name} must be a number, got {value!r}", hint=hint)
    value = float(value)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise EngineError(f"{name} {value} is out of range", hint=hint)
    return value


def _whole(name: str, value, lo: int, hi: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise EngineError(f"{name} must be a whole number, got {value!r}", hint=hint)
    if not lo <= int(value) <= hi:
        raise EngineError(f"{name} {value} is out of range", hint=hint)
    return int(value)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Raises :class:`EngineError` when a value is invalid.

    - ``temperature == 0`` means greedy (penalties still apply, as in transformers);
    - ``top_k`` > 0 keeps the ``top_k`` likeliest tokens; ``top_p`` in (0, 1] keeps the smallest
      set whose probabilities add up to at least ``top_p``;
    - ``seed``: the same seed, prompt and settings give the same answer;
    - ``logprobs``: None, or how many alternatives (0-20) to report beside each chosen token's
      log-probability (of the model's distribution, before penalties and temperature).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "temperature", _number("temperature", self.temperature, 0.0, 100.0,
                                          "use 0 for greedy decoding or a value like 0.7"))
        set_(self, "top_p", _number("top_p", self.top_p, 0.0, 1.0, "use a value in (0, 1], e.g. 0.9"))
        if self.top_p == 0.0:
            raise EngineError("top_p 0.0 is out of range", hint="use a value in (0, 1], e.g. 0.9")
        set_(self, "top_k", _whole("top_k", self.top_k, 0, 1 << 20, "use 0 (off) or e.g. 40"))
        set_(self, "repetition_penalty", _number("repetition_penalty", self.repetition_penalty, 0.01, 10.0,
                                                 "use 1.0 (off) or a value like 1.1"))
        for name in ("frequency_penalty", "presence_penalty"):
            set_(self, name, _number(name, getattr(self, name), -2.0, 2.0, "use a value from -2 to 2, e.g. 0.5"))
        if self.seed is not None:
            set_(self, "seed", _whole("seed", self.seed, 0, (1 << 63) - 1, "use a whole number >= 0"))
        if self.logprobs is not None:
            set_(self, "logprobs", _whole("logprobs", self.logprobs, 0, MAX_LOGPROBS,
                                          f"ask for 0 to {MAX_LOGPROBS} alternatives per token"))

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


class Sampler:
    """Stateful picker (one per request, so concurrent requests never share a random stream).

    ``prompt_ids`` are what the repetition penalty counts besides the answer. With
    ``params.logprobs`` set, :attr:`records` holds ``(token, logprob, [(id, logprob), ...])``
    for every pick, in order.
    """

    def __init__(self, params: SamplingParams, prompt_ids=()):
        self.params = params
        self._rng = None  # made at the first random pick: greedy requests never import numpy.random
        self._seen: set[int] = set(int(i) for i in prompt_ids) if params.repetition_penalty != 1.0 else set()
        self._counts: dict[int, int] = {}
        self.records: list[tuple[int, float, list]] = []

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        z = self._penalize(logits) if p.penalized else logits
        if p.temperature == 0.0:
            tok = int(np.argmax(z))
        else:
            tok = self._draw(z)
        if p.logprobs is not None:
            self._record(logits, tok)
        if p.penalized:
            self._seen.add(tok)
            self._counts[tok] = self._counts.get(tok, 0) + 1
        return tok

    def _penalize(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        z = np.array(logits, dtype=np.float32, copy=True)  # the decode loop's buffer stays untouched
        if p.repetition_penalty != 1.0 and self._seen:
            idx = np.fromiter(self._seen, np.int64, len(self._seen))
            v = z[idx]
            z[idx] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if self._counts and (p.frequency_penalty or p.presence_penalty):
            idx = np.fromiter(self._counts, np.int64, len(self._counts))
            n = np.fromiter(self._counts.values(), np.float32, len(self._counts))
            z[idx] -= p.frequency_penalty * n + p.presence_penalty
        return z

    def _choice(self, probs: np.ndarray) -> int:
        """An index drawn with probabilities ``probs`` from this request's stream (seeded by ``params.seed``)."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.params.seed)
        return int(self._rng.choice(len(probs), p=probs))

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        z = logits.astype(np.float64) / p.temperature
        cand = None
        if 0 < p.top_k < z.shape[0]:
            cand = np.argpartition(-z, p.top_k - 1)[: p.top_k]
            z = z[cand]
        z -= z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]
            sub = probs[keep] / probs[keep].sum()
            pick = int(keep[self._choice(sub)])
        else:
            pick = self._choice(probs)
        return int(cand[pick]) if cand is not None else pick

    def _record(self, logits: np.ndarray, tok: int) -> None:
        z = logits.astype(np.float64)
        z = z - z.max()
        logz = math.log(float(np.exp(z).sum()))
        k = self.params.logprobs
        top = []
        if k:
            idx = np.argpartition(-z, k - 1)[:k] if k < z.shape[0] else np.arange(z.shape[0])
            idx = idx[np.argsort(-z[idx], kind="stable")]
            top = [(int(i), float(z[i] - logz)) for i in idx]
        self.records.append((tok, float(z[tok] - logz), top))
