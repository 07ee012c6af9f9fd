"""The install transaction for adapter updates: received -> verified -> staged -> health-checked -> committed.

One path for every link (HTTP push, serial, TUF pull, a local file):

1. verified: the package's signature (a trusted key, over the metadata bytes as
   stored), its payload hash and size, its expiry and minimum runtime; then the
   device's own rules: the base it runs, the adapter's task and slots, a version
   above the persisted floor, never a version that failed its health check.
2. staged: written beside the current version (temp file, fsync, rename); the
   state file marks it as a trial. Live requests keep being served by the
   previous version throughout.
3. health-checked: the signed checks run on the prepared adapter itself, the
   same object that will serve.
4. committed: one atomic rename of the state file makes it current (and raises
   the floor); only then does it go into service. A failed check, or a restart
   before the commit, leaves the previous version current and marks this
   version failed (never installed again).

The engine is used only through its public interface (prepare, serve,
health-check); see :class:`edgepeft.runtime.Engine`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..contracts.update import Envelope, read_update
from ..errors import AdapterError, EdgePeftError, IntegrityError, StoreError
from ..fsio import FileIO
from .store import AdapterState, AdapterStore

# the statuses a device reports for one update, in order; or one of the two endings
STEPS = ("receiving", "received", "verified", "installed", "healthy")
FAILED = ("rejected", "rolled-back")
TERMINAL = ("healthy",) + FAILED


_ALREADY = "already installed: v{v} of {name} is serving from this very package"


@dataclass
class InstallResult:
    """What happened to one update package on this device."""

    id: str
    name: str
    version: int | None
    status: str
    reason: str | None = None
    type: str = "adapter"
    steps: list = field(default_factory=list)  # [(status, unix time)]
    seconds: float = 0.0
    retryable: bool = False  # refused for damage in transit (size, hash): the same package may be sent again
    verified: bool = False  # the envelope verified and hashes to ``id``: only then is the result kept under that id

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "version": self.version, "type": self.type,
                "status": self.status, "reason": self.reason, "retryable": self.retryable, "verified": self.verified,
                "seconds": round(self.seconds, 3),
                "steps": [{"status": s, "at": round(t, 3)} for s, t in self.steps]}


class Rejected(StoreError):
    """An update the device refuses before anything is written (the previous version keeps serving)."""


class Updater:
    """Adapter updates for one engine, with its signed store under ``state_dir/adapters``.

    Opening it recovers from an interrupted install and serves each adapter's committed
    version (when it verifies and is newer than the bundle's). With ``read_only`` it only
    serves (``edgepeft run --state`` beside a running agent) and writes nothing.
    Raises :class:`StoreError` for an unreadable store.
    """

    def __init__(self, engine, state_dir: str | Path, *, io: FileIO | None = None, read_only: bool = False,
                 local_checks: Sequence = (), seal=None):
        """``local_checks``: this device's own health checks (site acceptance tests), run after the package's
        signed ones on every install; they can only make an install stricter, never skip a signed check."""
        self.engine = engine
        self.local_checks = list(local_checks)
        self.state_dir = Path(state_dir)
        self.io = io or FileIO()
        self.store = AdapterStore(self.state_dir / "adapters", engine.trusted_keys,
                                  base_fingerprint=engine.base_fingerprint, io=self.io, seal=seal,
                                  writable=not read_only)
        self._lock = threading.RLock()
        self.read_only = read_only
        self.notes: list[str] = []
        for name in self.store.names():
            if not read_only:
                self.notes += self.store.recover(name)
            self._serve_committed(name)
        self.notes += self.store.notes
        for note in self.notes:
            engine.add_warning(note)

    # -- what is installed ---------------------------------------------------------------------
    def _bundle_version(self, name: str) -> int:
        return next((a.version for a in self.engine.manifest.adapters if a.name == name), 0)

    def floor(self, name: str) -> int:
        """The highest version of ``name`` this device has accepted (bundle or store)."""
        return max(self.store.state(name).floor, self._bundle_version(name))

    def _serve_committed(self, name: str) -> bool:
        state = self.store.state(name)
        for v in (state.current, state.previous):
            if v is None or v <= self._bundle_version(name):
                continue
            try:
                envelope, payload = self.store.read(name, v)
                self.engine.serve_adapter(self.engine.prepare_adapter(envelope, payload))
            except EdgePeftError as exc:
                self.notes.append(f"{name} v{v} not served: {exc.message}")
                continue
            if v != state.current and not self.read_only:  # the current one failed verification: the previous serves
                self.store.write_state(name, replace(state, current=v, previous=None))
            return True
        return False

    def serve(self, name: str) -> dict:
        """Put ``name``'s committed version into service again (else the bundle's); returns what
        serves. Raises :class:`StoreError` when this device has no version of it."""
        with self._lock:
            if self._serve_committed(name):
                return self.engine.registry.get(name).describe()
            try:
                loaded = self.engine.bundled_adapter(name)
            except AdapterError as exc:
                raise StoreError(f"this device has no version of adapter {name!r} to serve",
                                 hint="install one with `edgepeft adapters install PACKAGE`") from exc
            self.engine.serve_adapter(loaded)
            return loaded.describe()

    def installed(self) -> list[dict]:
        """Per adapter: the version serving, where it came from, the floor and failed versions."""
        out = []
        names = sorted(set(self.engine.registry.names()) | set(self.store.names()))
        for name in names:
            state = self.store.state(name)
            served = self.engine.registry.peek(name)
            source = None if served is None else "store" if served.version == state.current else "bundle"
            out.append({"name": name, "version": served.version if served else None, "source": source,
                        "previous": state.previous, "floor": self.floor(name),
                        "failed": {str(k): v for k, v in state.failed.items()}})
        return out

    # -- the checks that need no writes --------------------------------------------------------
    def check(self, envelope: Envelope) -> None:
        """The device's own rules for a verified envelope; raises :class:`Rejected` with the reason.
        The package that already serves passes (:meth:`install` answers it "already installed")."""
        meta = envelope.meta
        if self._already_serving(envelope):
            return
        if meta.type != "adapter":
            raise Rejected(f"{meta.type} updates are installed by the device agent, not the adapter updater",
                           hint="push it to `edgepeft agent`")
        fp = self.engine.base_fingerprint
        if meta.base_fingerprint != fp:
            raise Rejected(f"update {meta.name} v{meta.version} is built for base {meta.base_fingerprint[:19]}..., "
                           f"this device runs {fp[:19]}...",
                           hint="create the update against this device's bundle (edgepeft update create --bundle)")
        if meta.adapter.task != self.engine.task:
            raise Rejected(f"update {meta.name} is a {meta.adapter.task} adapter; this device runs a "
                           f"{self.engine.task} model", hint="send it to a device with a bundle of that task")
        floor = self.floor(meta.name)
        if meta.version <= floor:
            what = "the same version as" if meta.version == floor else "older than"
            raise Rejected(f"update {meta.name} v{meta.version} is {what} v{floor}, which this device already "
                           "accepted (replayed or out of date)", hint=f"versions only go up: publish v{floor + 1} or later")
        why = self.store.state(meta.name).failed.get(meta.version)
        if why is not None:
            raise Rejected(f"update {meta.name} v{meta.version} failed its health check on this device before "
                           f"({why})", hint=f"fix it and publish v{meta.version + 1}")

    # -- the transaction -----------------------------------------------------------------------
    def install(self, data: bytes, *, id: str | None = None,
                on_status: Callable[[str, str | None], None] = lambda status, reason: None,
                result: InstallResult | None = None) -> InstallResult:
        """Install one adapter update package held in ``data`` (its complete bytes).

        Returns an :class:`InstallResult` whose status is "healthy", "rejected" or
        "rolled-back" (with the reason); never raises for a bad package. What serves
        while this runs is the previous version, and it stays if anything fails.
        """
        t0 = time.time()
        res = result or InstallResult(id=id or "", name="?", version=None, status="received")
        if not res.steps:
            res.steps.append(("received", t0))

        def step(status: str, reason: str | None = None) -> None:
            res.status, res.reason = status, reason
            res.steps.append((status, time.time()))
            on_status(status, reason)

        try:
            envelope, payload = read_update(data, self.engine.trusted_keys, source=f"update {res.id[:12] or ''}".strip())
            res.name, res.version, res.id = envelope.meta.name, envelope.meta.version, envelope.id
            res.verified = True
            if self._already_serving(envelope):  # delivered twice (pulled, then pushed): nothing to do
                step("verified")
                step("healthy", _ALREADY.format(v=envelope.meta.version, name=envelope.meta.name))
                res.seconds = time.time() - t0
                return res
            self.check(envelope)
            loaded = self.engine.prepare_adapter(envelope, payload)
        except EdgePeftError as exc:
            res.retryable = isinstance(exc, IntegrityError)
            step("rejected", exc.message)
            res.seconds = time.time() - t0
            return res
        step("verified")
        meta = envelope.meta
        with self._lock:
            if self._already_serving(envelope):  # another link installed this very package meanwhile
                step("healthy", _ALREADY.format(v=meta.version, name=meta.name))
                res.seconds = time.time() - t0
                return res
            try:
                self.check(envelope)  # again, under the lock: another link may have installed meanwhile
                before = self.store.state(meta.name)
                self.store.stage(meta.name, meta.version, data)
                self.store.write_state(meta.name, replace(before, trial=meta.version))
            except EdgePeftError as exc:
                step("rejected", exc.message)
                res.seconds = time.time() - t0
                return res
            except OSError as exc:
                self.store.prune(meta.name, {before.current, before.previous})
                step("rejected", f"the device could not store the update: {exc.strerror or exc}")
                res.seconds = time.time() - t0
                return res
            step("installed")
            self.io.checkpoint("health check")
            from ..runtime.health import checks_for

            checks = list(meta.health_checks or self._bundle_checks(meta.name)) + \
                checks_for(self.local_checks, meta.name)
            failures = self.engine.health_check(checks, loaded)
            self.io.checkpoint("health checked")
            if failures:
                reason = "; ".join(failures)
                self.store.write_state(meta.name, replace(before.with_failed(meta.version, reason), trial=None))
                self.store.prune(meta.name, {before.current, before.previous})
                step("rolled-back", f"health check failed, v{self._serving(meta.name)} keeps serving: {reason}")
                res.seconds = time.time() - t0
                return res
            committed = AdapterState(current=meta.version, previous=before.current, floor=meta.version, trial=None,
                                     failed={k: v for k, v in before.failed.items() if k > meta.version})
            self.store.write_state(meta.name, committed)  # the commit point
            self.engine.serve_adapter(loaded)
            self.io.checkpoint("serving")
            self.store.prune(meta.name, {committed.current, committed.previous})
        step("healthy")
        res.seconds = time.time() - t0
        return res

    def _already_serving(self, envelope) -> bool:
        """True when this exact package (same signed envelope) is the current, serving version: a second
        delivery of it (a device that pulled it, then got it pushed by a rollout) is answered "healthy"
        instead of being refused as a replay. Any other version at or below the floor is still refused."""
        meta = envelope.meta
        if meta.type != "adapter" or self.store.state(meta.name).current != meta.version:
            return False
        serving = self.engine.registry.peek(meta.name)
        if serving is None or serving.version != meta.version:
            return False
        try:
            stored, _ = self.store.read(meta.name, meta.version)
        except EdgePeftError:
            return False
        return stored.id == envelope.id

    def _bundle_checks(self, name: str) -> list:
        from ..runtime.health import checks_for

        return checks_for(self.engine.manifest.health_checks, name)

    def _serving(self, name: str):
        a = self.engine.registry.peek(name)
        return a.version if a is not None else "none"

    def rollback(self, name: str, reason: str = "requested") -> dict:
        """Serve ``name``'s previous version again: the one kept in the store, or the bundle's.

        The version rolled back from stays counted in the floor (it cannot be installed again).
        Raises :class:`StoreError` when there is nothing to go back to.
        """
        with self._lock:
            state = self.store.state(name)
            if state.current is None:
                raise StoreError(f"adapter {name!r} has no installed update to roll back",
                                 hint="it serves the bundle's version (or is not installed)")
            if state.previous is not None:
                envelope, payload = self.store.read(name, state.previous)
                loaded = self.engine.prepare_adapter(envelope, payload)
                new = replace(state, current=state.previous, previous=None)
            else:
                try:
                    loaded = self.engine.bundled_adapter(name)
                except AdapterError as exc:
                    raise StoreError(f"adapter {name!r} has no previous version to roll back to",
                                     hint="install a known-good version (a newer version number)") from exc
                new = replace(state, current=None, previous=None)
            self.store.write_state(name, new)
            self.engine.serve_adapter(loaded)
            self.store.prune(name, {new.current})
            return loaded.describe() | {"rolled_back_from": state.current, "reason": reason}


__all__ = ["Updater", "InstallResult", "Rejected", "STEPS", "FAILED", "TERMINAL"]
