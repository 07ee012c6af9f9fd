"""What a request returns: generated text, or labels with probabilities and a review flag."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass


@dataclass
class GenerationResult:
    """A finished generation. ``finish_reason``: "stop" (end token or stop string) or "length"."""

    text: str
    token_ids: list
    finish_reason: str
    prompt_tokens: int
    adapter: str | None
    adapter_version: int | list | None  # one adapter: its version; several: their versions in order
    request_id: str
    seconds: float = 0.0
    first_token_seconds: float | None = None
    # with logprobs requested: per generated token {"id", "token", "logprob", "top": [{"id", "token", "logprob"}]}
    logprobs: list | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["completion_tokens"] = self.completion_tokens
        return d


@dataclass
class Classification:
    """One text's answer. ``needs_review`` is set when ``score`` is under the adapter's
    review threshold: the decision should go to a person, not be acted on automatically."""

    label: str
    score: float
    probabilities: dict
    needs_review: bool
    threshold: float
    adapter: str | None
    adapter_version: int | None
    request_id: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Embeddings:
    """Vectors of an :meth:`Engine.embed` request: ``vectors`` is float32 [texts, width]; ``adapter`` and
    ``adapter_version`` are lists (one entry per text) when the request named an adapter per text."""

    vectors: object
    tokens: int
    adapter: str | list | None
    adapter_version: int | list | None
    request_id: str = ""

    def tolist(self) -> list:
        return self.vectors.tolist()


class Stream:
    """Iterate to receive text pieces as tokens arrive; ``result`` is set once the stream ends.

    Closing the stream early (``close()``, or leaving a ``for`` loop and dropping it) stops
    generation and frees the request's adapter. ``request_id`` is known before the first
    piece (streamed chunks carry it) and is the result's and the audit log's id.

    ``pieces``: the text pieces (or given later with :meth:`attach`, when what makes them records
    its result on this stream); ``sampler``: the request's sampler, whose ``records`` hold the
    log-probabilities; ``token_text``: a token id's text, for those records.
    """

    def __init__(self, pieces: Iterator[str] | None = None, *, request_id: str = "", sampler: object = None,
                 token_text: Callable[[int], str] | None = None):
        self.result: GenerationResult | None = None
        self.request_id = request_id
        self._pieces: Iterator[str] = iter(()) if pieces is None else pieces
        self._sampler, self._token_text, self._given = sampler, token_text, 0

    def attach(self, pieces: Iterator[str]) -> None:
        """Give the stream its pieces (once, before the first is read)."""
        self._pieces = pieces

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def logprobs_of(self, token_ids, start: int = 0) -> list:
        """The log-probability records of ``token_ids`` (the first tokens generated; from ``start``), as dicts."""
        records = getattr(self._sampler, "records", [])[start: len(token_ids)]
        name = self._token_text or str
        return [{"id": t, "token": name(t), "logprob": lp,
                 "top": [{"id": i, "token": name(i), "logprob": v} for i, v in top]} for t, lp, top in records]

    def new_logprobs(self) -> list:
        """Log-probability records of the tokens picked since the last call (streaming with logprobs);
        the token that ended the answer (end of text) is never included."""
        records = getattr(self._sampler, "records", [])
        end = len(records) if self.result is None else min(len(records), self.result.completion_tokens)
        out = self.logprobs_of(range(end), self._given) if end > self._given else []
        self._given = max(self._given, end)
        return out

    def text(self) -> str:
        """Consume the rest of the stream and return the full text."""
        for _ in self:
            pass
        return self.result.text if self.result else ""
