"""On-device adapter store: each installed version kept as its signed update package.

Layout (one folder per adapter name)::

    <root>/<name>/v-<N>.epu     the update package exactly as received and verified (envelope + payload)
    <root>/<name>/state.json    {"current": N, "previous": M, "floor": F, "trial": T, "failed": {"K": why}}

Trust: the store keeps no metadata of its own beside a file. Every time a version
is read (:meth:`AdapterStore.read`) its envelope is verified again with the
device's trusted keys, its payload against the signed size and SHA-256, and
its name, version and base against what the state expects; a version that
fails is reported and never served. So a file planted in the folder (a "v999")
is ignored, and an older package copied in is refused by the persisted floor.

``state.json`` is a pointer file, replaced atomically. ``floor`` is the highest
version ever committed (installs must go above it, so a replay fails even
after a restart); ``failed`` holds versions whose health check failed (never
installed again); ``trial`` is set while a staged version is being
health-checked (MCUboot's "test"): if the device restarts with it still set,
the trial is treated as failed and the previous version stays current.

Every write goes through ``io`` (:mod:`.fsio`), so a test can cut the power at
each one.

With a :class:`~.seal.Seal`, each state file carries an HMAC under the device's own
key. A state file that cannot be read, does not parse, or fails its seal is never
fatal: it is moved aside (``state.json.bad-<time>``, kept as evidence), reported in
:attr:`AdapterStore.notes`, and replaced by a state that serves the bundle's version
with the floor at the highest version whose package in the folder still verifies.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..contracts.names import is_name
from ..contracts.update import SUFFIX, Envelope, read_update
from ..errors import EdgePeftError, StoreError
from ..fsio import FileIO, quarantine, write_atomic

# versions whose failure is remembered; older ones are below the floor anyway
MAX_FAILED = 64


@dataclass(frozen=True)
class AdapterState:
    """The pointer file of one adapter name."""

    current: int | None = None
    previous: int | None = None
    floor: int = 0
    trial: int | None = None
    failed: dict = field(default_factory=dict)  # version (int) -> reason

    @classmethod
    def from_dict(cls, data) -> AdapterState:
        """Parse a state file; anything malformed raises ValueError."""
        if not isinstance(data, dict):
            raise ValueError("not an object")

        def opt_int(v):
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"bad version {v!r}")
            return v

        failed = data.get("failed") or {}
        if not isinstance(failed, dict):
            raise ValueError("failed is not an object")
        floor = data.get("floor", 0)
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise ValueError(f"bad floor {floor!r}")
        return cls(current=opt_int(data.get("current")), previous=opt_int(data.get("previous")), floor=floor,
                   trial=opt_int(data.get("trial")),
                   failed={int(k): str(v) for k, v in failed.items() if str(k).isdigit()})

    def to_dict(self) -> dict:
        return {"current": self.current, "previous": self.previous, "floor": self.floor, "trial": self.trial,
                "failed": {str(k): v for k, v in sorted(self.failed.items())}}

    def with_failed(self, version: int, reason: str) -> AdapterState:
        failed = dict(self.failed)
        failed[int(version)] = reason[:500]
        for k in sorted(failed)[:-MAX_FAILED]:
            del failed[k]
        return replace(self, failed=failed)


class AdapterStore:
    """Signed adapter versions on disk. Thread-safe.

    ``trusted_keys`` verify every package read back; ``base_fingerprint`` is the base
    the device runs (a stored version for another base is not served). Raises
    :class:`StoreError` for unreadable state and for files that fail verification.
    """

    def __init__(self, root: str | Path, trusted_keys, *, base_fingerprint: str, io: FileIO | None = None,
                 seal=None, writable: bool = True):
        self.root = Path(root)
        self.seal, self.writable = seal, writable
        self.notes: list[str] = []  # state files quarantined, for the device's status
        self.trusted_keys = list(trusted_keys)
        self.base_fingerprint = base_fingerprint
        self.io = io or FileIO()
        self._lock = threading.RLock()
        if not self.root.is_dir():
            self.io.mkdir(self.root)

    # -- reading -----------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        if not is_name(name):
            raise StoreError(f"invalid adapter name {name!r}",
                             hint="use letters, digits, '.', '_' or '-' (at most 64 characters)")
        return self.root / name

    def path(self, name: str, version: int) -> Path:
        return self._dir(name) / f"v-{int(version)}{SUFFIX}"

    def names(self) -> list[str]:
        """Adapter names with a folder in the store (whatever their state), sorted."""
        with self._lock:
            if not self.root.is_dir():
                return []
            return sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.is_symlink() and is_name(d.name))

    def state(self, name: str) -> AdapterState:
        """The pointer file of ``name``; one that is unreadable or fails its seal is quarantined and
        replaced (see the module's docstring). Read-only, it raises :class:`StoreError` instead."""
        p = self._dir(name) / "state.json"
        with self._lock:
            try:
                raw = json.loads(self.io.read_file(p).decode("utf-8"))
                if self.seal is not None:
                    raw = self.seal.open(p, raw)
                return AdapterState.from_dict(raw)
            except FileNotFoundError:
                return AdapterState()
            except (OSError, ValueError, RecursionError) as exc:
                if not self.writable:
                    raise StoreError(f"adapter store state for {name!r} is unreadable: {exc}",
                                     hint="start the agent: it quarantines the file and reports it") from exc
                return self._quarantine(name, p, exc)

    def _quarantine(self, name: str, p: Path, exc: Exception) -> AdapterState:
        moved = quarantine(self.io, p)
        floor = 0
        d = self._dir(name)
        for f in sorted(d.glob(f"v-*{SUFFIX}")):
            v = f.name[2:-len(SUFFIX)]
            if v.isdigit() and int(v) > floor:
                try:
                    self.read(name, int(v))
                    floor = int(v)
                except StoreError:
                    continue
        state = AdapterState(floor=floor)
        self.write_state(name, state)
        self.notes.append(f"{name}: state file {p.name} was unreadable or tampered ({str(exc)[:120]}); moved to "
                          f"{moved.name}; the bundle's version serves, floor v{floor} (highest stored package "
                          "that verifies)")
        return state

    def read(self, name: str, version: int) -> tuple[Envelope, memoryview]:
        """Read one stored version and verify it as if it had just arrived: signature, payload hash,
        name, version and base. Expiry is not checked here: it bounds when a package may be
        installed, and an installed version keeps serving after its package expires (an offline
        device must not stop working). Raises :class:`StoreError` saying what failed."""
        p = self.path(name, version)
        try:
            data = self.io.read_file(p)
        except FileNotFoundError as exc:
            raise StoreError(f"adapter {name!r} v{version} is missing from the store", hint="reinstall it") from exc
        except OSError as exc:
            raise StoreError(f"adapter {name!r} v{version} cannot be read: {exc.strerror or exc}",
                             hint="check the storage; reinstall the version") from exc
        try:
            envelope, payload = read_update(data, self.trusted_keys, source=f"stored {name} v{version}",
                                            check_expiry=False)
        except EdgePeftError as exc:
            raise StoreError(f"stored adapter {name!r} v{version} fails verification: {exc.message}",
                             hint="it was damaged or planted; it is not served") from exc
        meta = envelope.meta
        if meta.type != "adapter" or meta.name != name or meta.version != int(version):
            raise StoreError(f"stored file for {name!r} v{version} holds {meta.type} {meta.name!r} v{meta.version}",
                             hint="it was renamed or planted; it is not served")
        if meta.base_fingerprint != self.base_fingerprint:
            raise StoreError(f"stored adapter {name!r} v{version} is for base {meta.base_fingerprint[:19]}..., "
                             f"this device runs {self.base_fingerprint[:19]}...",
                             hint="install a version built for the current base")
        return envelope, payload

    # -- writing -----------------------------------------------------------------------------
    def write_state(self, name: str, state: AdapterState) -> None:
        """Replace the pointer file atomically (the commit point of every change)."""
        with self._lock:
            d = self._dir(name)
            self.io.mkdir(d)
            body = state.to_dict()
            if self.seal is not None:
                body = self.seal.seal(d / "state.json", body)
            write_atomic(d / "state.json", json.dumps(body, sort_keys=True).encode("utf-8"), io=self.io)

    def stage(self, name: str, version: int, data: bytes) -> Path:
        """Write a verified package beside the current version (temp file, fsync, rename, fsync dir).
        Nothing refers to it until a state change does."""
        with self._lock:
            d = self._dir(name)
            self.io.mkdir(d)
            final = self.path(name, version)
            write_atomic(final, data, io=self.io)
            return final

    def prune(self, name: str, keep: set) -> None:
        """Remove versions not in ``keep`` and any leftover temporaries (quarantined state files stay)."""
        with self._lock:
            d = self._dir(name)
            if not d.is_dir():
                return
            keep_files = {f"v-{int(v)}{SUFFIX}" for v in keep if v is not None} | {"state.json"}
            for p in sorted(d.iterdir()):
                if p.name not in keep_files and ".bad-" not in p.name:  # quarantined files are evidence
                    self.io.unlink(p)

    def recover(self, name: str) -> list[str]:
        """After a restart: a trial still set means the device stopped during a health check (power
        cut or crash): the trial counts as failed, the previous version stays current. Drops
        temporaries and unreferenced files. Returns what it did, for the device's report."""
        with self._lock:
            notes = []
            state = self.state(name)
            if state.trial is not None:
                reason = "the device stopped during its health check (power cut or crash); not committed"
                notes.append(f"{name}: v{state.trial} {reason}")
                state = replace(state.with_failed(state.trial, reason), trial=None)
                self.write_state(name, state)
            self.prune(name, {state.current, state.previous})
            return notes

