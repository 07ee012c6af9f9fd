"""Shared state of one benchmark run: settings, built artifacts, systems opened once, processes to stop.

Systems are opened lazily and kept for the whole run, so a section that needs
``genai int4`` after another already opened it reuses the same instance. A
system that cannot be opened is remembered as skipped (with its reason) and
not tried again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .fixtures import Models
from .harness import Skip


@dataclass
class Settings:
    """Run parameters; ``smoke`` shrinks everything to seconds."""

    reps: int = 7
    warmup: int = 1
    new_tokens: int = 64
    prompt_tokens: int = 128
    switch_reps: int = 200
    ppl_tokens: int = 3072
    ppl_window: int = 256
    classify_batch: list[int] = field(default_factory=lambda: [1, 16])
    memory_reps: int = 3
    open_timeout_s: float = 300.0  # a peer's worker must open and produce its first tokens within this
    call_timeout_s: float = 900.0  # and answer every later call within this, or it counts as hung
    systems: list[str] | None = None  # restrict to these system names (None = all)
    examples_out: str | None = None  # where the trained example adapters are (default examples/out)
    concurrency_clients: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    concurrency_new_tokens: int = 48
    concurrency_max_concurrent: int = 8  # the server's --max-concurrent (at least the most clients)
    concurrency_1b: bool = False  # also the 1B-class row (builds a 1B bundle once)
    concurrency_before: str | None = None  # results JSON of a run before the change, for its two goals

    @classmethod
    def smoke(cls) -> Settings:
        return cls(reps=3, warmup=1, new_tokens=12, prompt_tokens=24, switch_reps=20, ppl_tokens=96,
                   ppl_window=48, classify_batch=[1, 4], memory_reps=1, concurrency_clients=[1, 2],
                   concurrency_new_tokens=12)


class Context:
    """What sections share: models, settings, work dir, opened systems, skip notes."""

    def __init__(self, models: Models, settings: Settings, work: Path, log: Callable[[str], None] | None = None):
        self.models, self.settings, self.work = models, settings, work
        self.smoke = models.smoke
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.skipped: list[dict] = []
        self._cache: dict[str, object] = {}
        self._closers: list[Callable[[], None]] = []
        self.t0 = time.perf_counter()

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the run ends (stops the peers' worker processes)."""
        self._closers.append(fn)

    def close(self) -> None:
        """Stop everything the run started, last started first."""
        while self._closers:
            self._closers.pop()()

    def skip(self, what: str, why: str, kind: str = "skipped") -> None:
        """Record that ``what`` was not measured, and why (goes to the JSON and the README).

        ``kind`` is "skipped" (cannot run here), or "crashed", "exited", "hung" for a peer
        whose worker process died or stopped answering (benchmarks.isolate.PeerFailed).
        """
        for s in self.skipped:
            if s["what"] == what or what in s["what"].split(", "):
                return
            if s["why"] == why:  # one cause, several casualties: one line
                s["what"] += f", {what}"
                return
        self.skipped.append({"what": what, "why": why, "kind": kind})
        self.log(f"  {kind} {what}: {why}")

    def wanted(self, system: str) -> bool:
        sel = self.settings.systems
        return sel is None or any(s.lower() in system.lower() for s in sel)

    def get(self, key: str, factory: Callable[[], object]):
        """The cached object ``key``, created by ``factory`` once; raises :class:`Skip` if it could not be."""
        if key in self._cache:
            val = self._cache[key]
            if isinstance(val, Skip):
                raise val
            return val
        try:
            val = factory()
        except Skip as exc:
            self._cache[key] = exc
            self.skip(key, str(exc), getattr(exc, "kind", "skipped"))
            raise
        except Exception as exc:  # a crash in a peer or in edgepeft: keep going, say why
            skip = Skip(f"{type(exc).__name__}: {str(exc)[:300]}")
            self._cache[key] = skip
            self.skip(key, str(skip))
            raise skip from exc
        self._cache[key] = val
        return val

    def try_get(self, key: str, factory: Callable[[], object]):
        """Like :meth:`get` but returns None instead of raising :class:`Skip`."""
        if not self.wanted(key):
            return None
        try:
            return self.get(key, factory)
        except Skip:
            return None
