"""A device's update state: the bundle it runs, its adapter updates, and what happened to each package.

``Device(bundle, trusted_keys, state_dir)`` is what the agent runs: it opens
the engine on the current bundle, serves the adapter versions committed in the
store, receives packages from any link (:class:`Receiver`) and installs them,
one at a time, with the same transaction whatever the link.

State folder (private to the device user)::

    STATE/adapters/<name>/...   the signed adapter store (see :mod:`.store`)
    STATE/bundles/<slot>/       bundles installed by bundle updates (unpacked, verified on open)
    STATE/bundle.json           {"current", "previous", "floor", "trial", "failed"} for bundle updates
    STATE/incoming/<id>.part    partial uploads (resumable)
    STATE/history.json          the last results, for status queries
    STATE/unloaded.json         adapters taken out of service (`edgepeft adapters unload`)
    STATE/checked.json          bundles whose own health checks passed on this device (run on first open)
    STATE/.lock                 held by the one process that owns the state (the agent)
    STATE/device.json           {"bundle": the path of the bundle the device was shipped}
    STATE/device.key            the secret that seals bundle.json and every state.json (see :mod:`.seal`)

A state file that cannot be read or fails its seal never stops the device: it is moved
aside as ``<name>.bad-<time>`` and reported in :meth:`Device.status` ("notes"); the
device serves what still verifies (the shipped bundle at worst).

A bundle update (a new base) is installed beside the running one: unpacked,
opened and verified by a second engine, health-checked with the new bundle's
own signed checks, then committed with one atomic rename and swapped in;
requests in flight finish on the old engine. Adapters installed for the old
base are kept but not served by the new one (they are for another base).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from ..contracts.identity import read_identity
from ..contracts.update import Envelope, read_update
from ..errors import EdgePeftError, IntegrityError, StoreError, UsageError
from ..fsio import FileIO, quarantine, write_atomic
from .installer import InstallResult, Rejected, Updater
from .receiver import Receiver
from .seal import Seal
from .store import AdapterState

HISTORY = 100


class Device:
    """Engine + updater + receiver over one state folder. Thread-safe.

    ``bundle`` is the bundle the device was shipped (a directory, or its ``.epb`` read in place), used
    until a bundle update replaces it. ``engine_options`` go to every
    :class:`~edgepeft.runtime.Engine` it opens (threads, providers, audit ...).
    Raises :class:`BundleError` when no bundle verifies (not even the shipped one), :class:`StoreError`
    for a state folder another process (a running agent) holds. An unreadable or tampered state file
    is not an error: it is quarantined and reported in :meth:`status` ("notes").
    """

    def __init__(self, bundle: str | os.PathLike, trusted_keys, state_dir: str | os.PathLike, *,
                 engine_options: dict | None = None, io: FileIO | None = None, max_update_bytes: int = 2 << 30,
                 local_checks=(), events=None):
        from ..contracts.verify import load_public_key

        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.trusted_keys = [load_public_key(k) for k in trusted_keys]
        self.io = io or FileIO()
        self.engine_options = dict(engine_options or {})
        self._check_bundles = bool(self.engine_options.pop("health_checks", True))
        self.local_checks = list(local_checks)  # this device's own checks, on top of every signed set
        self.events = events  # an edgepeft.update.events.EventLog: one line per install, rollback, request
        self.notes: list[str] = []
        self.links: dict = {}  # link name -> a callable giving that link's own state (serial sessions, last pull)
        self._lock = threading.RLock()
        self._hist_lock = threading.Lock()
        self._owner = _lock_state(self.state_dir)
        try:
            self.seal = Seal(self.state_dir)
            self._check_history()
            self.factory = self._factory_dir(Path(bundle))
            if shipped_bundle(self.state_dir) != str(Path(bundle).resolve()):
                write_atomic(self.state_dir / "device.json",
                             json.dumps({"bundle": str(Path(bundle).resolve())}).encode("utf-8"), io=self.io)
            self.engine, self.bundle_dir = self._open_current()
            self.updater = self._new_updater(self.engine)
            self.receiver = Receiver(self.state_dir / "incoming", self, max_bytes=max_update_bytes, io=self.io)
            self.notes += self.receiver.notes
        except BaseException:
            self._owner.close()
            raise

    # -- bundles -------------------------------------------------------------------------------
    @property
    def _bundles(self) -> Path:
        return self.state_dir / "bundles"

    def _factory_dir(self, bundle: Path) -> Path:
        """The shipped bundle: a directory, or its .epb read in place (no unpacked copy on the device)."""
        if bundle.is_dir() or bundle.is_file():
            return bundle
        raise UsageError(f"bundle {bundle} does not exist", hint="pass the bundle directory or its .epb archive")

    def _bundle_state(self) -> AdapterState:
        """``bundle.json``; one that is unreadable or fails its seal is quarantined and replaced by a
        state that serves the shipped bundle, its floor the highest installed bundle that verifies."""
        p = self.state_dir / "bundle.json"
        with self._lock:
            try:
                return AdapterState.from_dict(self.seal.open(p, json.loads(self.io.read_file(p).decode("utf-8"))))
            except FileNotFoundError:
                return AdapterState()
            except (OSError, ValueError, RecursionError) as exc:
                moved = quarantine(self.io, p)
                floor = max((v for v in self._slot_versions() if self._slot_verifies(v)), default=0)
                state = AdapterState(floor=floor)
                self._write_bundle_state(state)
                self.notes.append(f"bundle.json was unreadable or tampered ({str(exc)[:120]}); moved to {moved.name}; "
                                  f"the shipped bundle serves, bundle floor v{floor}")
                return state

    def _slot_versions(self) -> list[int]:
        if not self._bundles.is_dir():
            return []
        return sorted(int(d.name[1:]) for d in self._bundles.iterdir() if d.name[:1] == "v" and d.name[1:].isdigit())

    def _slot_verifies(self, version: int) -> bool:
        from ..contracts.verify import verify_bundle

        try:
            verify_bundle(self._slot(version), self.trusted_keys, check_files=False)
            return True
        except EdgePeftError:
            return False

    def _check_history(self) -> None:
        """An unreadable history is moved aside and reported (results are kept for status queries only)."""
        p = self.state_dir / "history.json"
        try:
            data = json.loads(self.io.read_file(p).decode("utf-8"))
            if isinstance(data, list):
                return
            why = "not a list"
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:
            why = str(exc)[:120]
        moved = quarantine(self.io, p)
        self.notes.append(f"history.json was unreadable ({why}); moved to {moved.name}")

    def _slot(self, version: int | None) -> Path | None:
        return None if version is None else self._bundles / f"v{int(version)}"

    def _write_bundle_state(self, state: AdapterState) -> None:
        p = self.state_dir / "bundle.json"
        write_atomic(p, json.dumps(self.seal.seal(p, state.to_dict()), sort_keys=True).encode(), io=self.io)

    def _open_engine(self, bundle_dir: Path, *, checks: bool = True):
        """An engine on ``bundle_dir``; the bundle's own health checks run the first time this device
        opens that bundle (then remembered by its signature), unless turned off."""
        from ..runtime.engine import Engine

        sig = _signature_of(bundle_dir)
        first = checks and self._check_bundles and sig is not None and sig not in self._checked()
        engine = Engine(bundle_dir, self.trusted_keys, **self.engine_options, health_checks=first)
        engine.on_request = self.events.request if self.events is not None else None
        if first:
            self._mark_checked(sig)
        return engine

    def _checked(self) -> list:
        try:
            data = json.loads((self.state_dir / "checked.json").read_text(encoding="utf-8"))
            return [x for x in data if isinstance(x, str)] if isinstance(data, list) else []
        except (OSError, ValueError):
            return []

    def _mark_checked(self, sig: str) -> None:
        items = [x for x in self._checked() if x != sig][-19:] + [sig]
        write_atomic(self.state_dir / "checked.json", json.dumps(items).encode("utf-8"), io=self.io)

    def _new_updater(self, engine) -> Updater:
        """The updater for ``engine``: serves the store's versions, then takes unloaded adapters out."""
        updater = Updater(engine, self.state_dir, io=self.io, local_checks=self.local_checks, seal=self.seal)
        for name in self._unloaded():
            if engine.registry.peek(name) is not None:
                engine.unload_adapter(name)
        return updater

    def _unloaded(self) -> list[str]:
        try:
            data = json.loads((self.state_dir / "unloaded.json").read_text(encoding="utf-8"))
            return sorted(x for x in data if isinstance(x, str)) if isinstance(data, list) else []
        except (OSError, ValueError):
            return []

    def _set_unloaded(self, names) -> None:
        write_atomic(self.state_dir / "unloaded.json", json.dumps(sorted(set(names))).encode("utf-8"), io=self.io)

    def _open_current(self):
        """The committed bundle if it verifies, else the previous one, else the shipped one."""
        state = self._bundle_state()
        if state.trial is not None:  # stopped during a bundle's health check: not committed
            reason = "the device stopped during its health check (power cut or crash); not committed"
            self.notes.append(f"bundle v{state.trial}: {reason}")
            state = replace(state.with_failed(state.trial, reason), trial=None)
            self._write_bundle_state(state)
            self._prune_bundles(state)
        for v in (state.current, state.previous):
            if v is None:
                continue
            try:
                return self._open_engine(self._slot(v)), self._slot(v)
            except EdgePeftError as exc:
                self.notes.append(f"bundle v{v} not opened: {exc.message}")
        return self._open_engine(self.factory), self.factory

    def _prune_bundles(self, state: AdapterState) -> None:
        import shutil

        keep = {f"v{v}" for v in (state.current, state.previous, state.trial) if v is not None}
        if self._bundles.is_dir():
            for d in self._bundles.iterdir():
                if d.name not in keep and not d.name.startswith("factory-"):
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)

    # -- what a receiver needs -----------------------------------------------------------------
    def check(self, envelope: Envelope) -> None:
        """Refuse early what this device would refuse at install (raises :class:`Rejected`)."""
        meta = envelope.meta
        if meta.type == "adapter":
            with self._lock:
                return self.updater.check(envelope)
        state = self._bundle_state()
        if meta.version <= state.floor:
            what = "the same version as" if meta.version == state.floor else "older than"
            raise Rejected(f"bundle update v{meta.version} is {what} v{state.floor}, which this device already "
                           "accepted (replayed or out of date)", hint=f"publish bundle v{state.floor + 1} or later")
        if meta.version in state.failed:
            raise Rejected(f"bundle update v{meta.version} failed on this device before ({state.failed[meta.version]})",
                           hint=f"fix it and publish bundle v{meta.version + 1}")

    def install(self, data: bytes, result: InstallResult | None = None) -> InstallResult:
        """Install one complete package (adapter or bundle); never raises for a bad package:
        the result says "healthy", "rejected" or "rolled-back" and why."""
        result = result or InstallResult(id="", name="?", version=None, status="received",
                                         steps=[("received", time.time())])
        with self._lock:
            try:
                envelope, _ = read_update(data, self.trusted_keys, source="update")
            except EdgePeftError as exc:
                result.status, result.reason = "rejected", exc.message
                result.retryable = isinstance(exc, IntegrityError)
                result.steps.append(("rejected", time.time()))
                return result
            result.type = envelope.meta.type
            if envelope.meta.type == "adapter":
                res = self.updater.install(data, result=result)
                if res.status == "healthy" and res.name in self._unloaded():  # installing serves it again
                    self._set_unloaded(set(self._unloaded()) - {res.name})
                return res
            return self._install_bundle(data, envelope, result)

    def install_file(self, path: str | os.PathLike) -> InstallResult:
        """Install a package from a local file (a USB stick, a copied file) and record the result."""
        res = self.install(Path(path).read_bytes())
        self.record(res)
        return res

    def record(self, result: InstallResult) -> None:
        """Append a finished result to the history (the newest one for an id answers status queries)."""
        if self.events is not None:
            self.events.installed(result)
        with self._hist_lock:
            items = self._history()
            items.append(result.to_dict() | {"finished": round(time.time(), 3)})
            write_atomic(self.state_dir / "history.json",
                         json.dumps(items[-HISTORY:], sort_keys=True).encode("utf-8"))

    def refused(self, result: dict) -> None:
        """A refusal kept out of the history (nothing about the package under its id was proven): the event
        log still says it."""
        if self.events is not None:
            self.events.installed(result)

    def _history(self) -> list[dict]:
        try:
            data = json.loads((self.state_dir / "history.json").read_text(encoding="utf-8"))
            return [h for h in data if isinstance(h, dict)] if isinstance(data, list) else []
        except (OSError, ValueError, RecursionError):
            return []

    def lookup(self, id: str) -> dict | None:
        """The newest result recorded under ``id`` whose envelope verified and hashes to ``id``: only such
        a result may answer for that id (garbage sent under a genuine id proves nothing about it)."""
        return next((h for h in reversed(self._history()) if h.get("id") == id and h.get("verified") is True), None)

    # -- bundle updates ------------------------------------------------------------------------
    def _install_bundle(self, data: bytes, envelope: Envelope, result: InstallResult) -> InstallResult:
        import shutil
        import tempfile

        from ..contracts.archive import unpack_bundle

        meta = envelope.meta
        result.name, result.version, result.id = "bundle", meta.version, envelope.id
        result.verified = True

        def step(status, reason=None):
            result.status, result.reason = status, reason
            result.steps.append((status, time.time()))

        t0 = time.time()
        try:
            self.check(envelope)
        except EdgePeftError as exc:
            step("rejected", exc.message)
            return result
        step("verified")
        before = self._bundle_state()
        slot = self._slot(meta.version)
        self._bundles.mkdir(parents=True, exist_ok=True)
        try:
            if slot.exists():
                shutil.rmtree(slot)
            with tempfile.NamedTemporaryFile(dir=self._bundles, prefix=".incoming-", suffix=".epb") as fh:
                fh.write(memoryview(data)[len(envelope.raw):])  # the payload, verified with the envelope
                fh.flush()
                unpack_bundle(fh.name, slot)
            _fsync_tree(slot)
            self._write_bundle_state(replace(before, trial=meta.version))
        except (EdgePeftError, OSError) as exc:
            shutil.rmtree(slot, ignore_errors=True)
            step("rejected", f"the bundle could not be staged: {getattr(exc, 'message', None) or exc}")
            return result
        step("installed")
        self.io.checkpoint("bundle health check")
        failures, engine = [], None
        try:
            engine = self._open_engine(slot, checks=False)  # its own checks run below, with the update's
            if engine.base_fingerprint != meta.base_fingerprint:
                failures.append(f"the bundle's base is {engine.base_fingerprint[:19]}..., its update says "
                                f"{meta.base_fingerprint[:19]}...")
            else:
                from ..runtime.health import run_bundle_checks

                checks = list(engine.manifest.health_checks) + list(meta.health_checks) + self.local_checks
                failures += run_bundle_checks(engine, checks)
        except EdgePeftError as exc:
            failures.append(f"the new bundle does not open: {exc.message}")
        if failures:
            reason = "; ".join(failures)
            state = replace(before.with_failed(meta.version, reason), trial=None)
            self._write_bundle_state(state)
            self._prune_bundles(state)
            step("rolled-back", f"health check failed, the running bundle keeps serving: {reason}")
            return result
        committed = AdapterState(current=meta.version, previous=before.current, floor=meta.version,
                                 failed={k: v for k, v in before.failed.items() if k > meta.version})
        self._write_bundle_state(committed)  # the commit point
        sig = _signature_of(slot)
        if sig is not None:
            self._mark_checked(sig)
        self.engine, self.bundle_dir = engine, slot
        self.updater = self._new_updater(engine)
        self.notes += self.updater.notes
        self._prune_bundles(committed)
        result.seconds = time.time() - t0
        step("healthy")
        return result

    # -- operations ----------------------------------------------------------------------------
    def rollback(self, name: str, reason: str = "requested") -> dict:
        """Roll adapter ``name`` (or ``"bundle"``) back to its previous version. Raises :class:`StoreError`."""
        out = self._rollback(name, reason)
        if self.events is not None:
            self.events.rolled_back(out, reason)
        return out

    def _rollback(self, name: str, reason: str) -> dict:
        with self._lock:
            if name != "bundle":
                out = self.updater.rollback(name, reason)
                if name in self._unloaded():  # rolling back serves that version
                    self._set_unloaded(set(self._unloaded()) - {name})
                return out
            state = self._bundle_state()
            if state.current is None:
                raise StoreError("the device runs the bundle it was shipped; there is no bundle update to roll back",
                                 hint="install a newer bundle instead")
            target = self._slot(state.previous) if state.previous is not None else self.factory
            engine = self._open_engine(target)
            new = replace(state, current=state.previous, previous=None)
            self._write_bundle_state(new)
            self.engine, self.bundle_dir = engine, target
            self.updater = self._new_updater(engine)
            self._prune_bundles(new)
            return {"name": "bundle", "version": state.previous, "rolled_back_from": state.current}

    def status(self) -> dict:
        """What this device runs and what happened to its recent updates (for `edgepeft status`)."""
        from .. import __version__

        with self._lock:
            eng, bstate = self.engine, self._bundle_state()
            return {"edgepeft_version": __version__, "base": eng.manifest.base, "task": eng.task,
                    "bundle": {"version": bstate.current or 0, "floor": bstate.floor,
                               "source": "update" if bstate.current else "shipped", "path": str(self.bundle_dir),
                               "failed": {str(k): v for k, v in bstate.failed.items()}},
                    "adapters": self.updater.installed(), "unloaded": self._unloaded(),
                    "uploads": self.receiver.active(), "recent": self._history()[-10:],
                    "identity": read_identity(self.state_dir),
                    "links": {name: describe() for name, describe in self.links.items()},
                    "notes": _unique(self.notes + self.updater.notes + self.updater.store.notes + eng.warnings)}

    def unload(self, name: str) -> dict:
        """Stop serving adapter ``name`` and remember it across restarts (installing or rolling back
        a version of it, or :meth:`load`, serves it again). Raises :class:`AdapterError` (unknown,
        or in use by a running request)."""
        with self._lock:
            self.engine.unload_adapter(name)
            self._set_unloaded(set(self._unloaded()) | {name})
            return {"name": name, "status": "unloaded"}

    def load(self, name: str) -> dict:
        """Serve an unloaded adapter again (its committed version, else the bundle's).
        Raises :class:`StoreError` when it was not unloaded or this device has no version of it."""
        with self._lock:
            if name not in self._unloaded():
                raise StoreError(f"adapter {name!r} was not unloaded on this device",
                                 hint="`edgepeft adapters list` shows what is served")
            served = self.updater.serve(name)
            self._set_unloaded(set(self._unloaded()) - {name})
            return served | {"status": "serving"}

    def adapters(self) -> dict:
        """What `edgepeft adapters list` shows: each adapter's served version, source, floor and
        failed versions, the unloaded ones, and the engine's warnings."""
        with self._lock:
            return {"adapters": self.updater.installed(), "unloaded": self._unloaded(),
                    "warnings": _unique(self.updater.notes + self.engine.warnings)}

    def close(self) -> None:
        """Stop receiving, close the engine (waiting a little for running requests) and give the state
        folder back (another process may open it then)."""
        self.receiver.close()
        try:
            self.engine.close(timeout=10.0)
        except EdgePeftError:
            pass  # a request still runs: the process is ending anyway
        self._owner.close()


def shipped_bundle(state_dir: Path) -> str | None:
    """The bundle a device's agent was last started with (recorded in ``STATE/device.json``)."""
    try:
        value = json.loads((Path(state_dir) / "device.json").read_text(encoding="utf-8")).get("bundle")
        return value if isinstance(value, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


def _signature_of(bundle_dir: Path) -> str | None:
    """The manifest's signature value: identifies one signed bundle (unverified here; the engine verifies)."""
    try:
        sig = json.loads((Path(bundle_dir) / "manifest.json").read_text(encoding="utf-8")).get("signature")
        return sig.get("value") if isinstance(sig, dict) and isinstance(sig.get("value"), str) else None
    except (OSError, ValueError, AttributeError):
        return None


class _StateLock:
    """An exclusive lock on ``STATE/.lock`` (fcntl; where it is missing, nothing is locked)."""

    def __init__(self, fh):
        self._fh = fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the lock
            self._fh = None


def _lock_state(state_dir: Path) -> _StateLock:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return _StateLock(None)
    fh = open(state_dir / ".lock", "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.close()
        raise StoreError(f"the device state {state_dir} is in use by another process (a running agent?)",
                         hint="talk to that agent with --device http://HOST:PORT, or stop it first") from exc
    return _StateLock(fh)


def _fsync_tree(root: Path) -> None:
    """Make an unpacked bundle durable before the state file points at it."""
    for p in sorted(root.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    FileIO().fsync_dir(root)
    FileIO().fsync_dir(root.parent)


__all__ = ["Device"]
