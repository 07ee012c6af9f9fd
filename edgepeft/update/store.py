"""On-device adapter store: versions side by side, an atomic switch, one-step rollback.

Layout (one folder per adapter name)::

    <root>/<name>/v-<version>.onnx_adapter   the adapter file, never modified once renamed in
    <root>/<name>/v-<version>.json           its metadata (sha256, size, base fingerprint, ...)
    <root>/<name>/state.json                 {"current": v, "previous": v_prev, "rejected": ...}

Why it survives a power cut: a new version's files are written under temporary
names, fsynced, and renamed in *before* ``state.json`` mentions them; the switch
itself is one atomic rename of ``state.json``. So the store holds the old state
until that rename and the new one after it. :meth:`AdapterStore.open` cleans up
leftovers (temporary files, versions no state refers to) and falls back to the
previous version if the current file fails its hash.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import StoreError
from .fsio import FileIO, write_atomic

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADAPTER_SUFFIX = ".onnx_adapter"


def version_key(version: str) -> tuple:
    """Order versions: dotted numbers compare numerically (``1.10`` > ``1.9``), text parts as text."""
    parts = re.split(r"[.\-+]", str(version))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_name(kind: str, value: str) -> str:
    """Names and versions become file names: allow only a safe alphabet (no paths)."""
    value = str(value)
    if not _NAME_RE.match(value):
        raise StoreError(f"invalid adapter {kind} {value!r}",
                         hint="use letters, digits, '.', '_' or '-' (at most 64 characters)")
    return value


@dataclass(frozen=True)
class StoredAdapter:
    """One installed adapter version: its file and the metadata it was installed with."""

    name: str
    version: str
    path: Path
    sha256: str
    size: int
    meta: dict = field(default_factory=dict, compare=False)


class AdapterStore:
    """Adapter versions on disk. Thread-safe; every write goes through ``io`` (see :mod:`.fsio`).

    Raises :class:`StoreError` for an invalid name/version, a version that does not go up,
    a file whose hash differs from the one given, or a failed health check (after rolling back).
    """

    def __init__(self, root: str | Path, io: FileIO | None = None):
        self.root = Path(root)
        self.io = io or FileIO()
        self._lock = threading.RLock()
        self.io.mkdir(self.root)
        self.recovered: list[str] = []
        for d in sorted(self.root.glob(".expand-*")):  # scratch of an install cut short
            shutil.rmtree(d, ignore_errors=True)
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and _NAME_RE.match(d.name):
                self._recover(d.name)

    # -- reading -----------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.root / check_name("name", name)

    def _state(self, name: str) -> dict:
        p = self._dir(name) / "state.json"
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"current": None, "previous": None}
        except (OSError, ValueError) as exc:
            raise StoreError(f"adapter store state for {name!r} is unreadable: {exc}",
                             hint=f"remove {p} to reset this adapter, then reinstall it") from exc
        return data if isinstance(data, dict) else {"current": None, "previous": None}

    def _load(self, name: str, version: str | None, verify: bool = False) -> StoredAdapter | None:
        if version is None:
            return None
        d = self._dir(name)
        path = d / f"v-{version}{ADAPTER_SUFFIX}"
        try:
            meta = json.loads((d / f"v-{version}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not path.is_file() or path.stat().st_size != meta.get("size"):
            return None
        if verify and sha256_file(path) != meta.get("sha256"):
            return None
        return StoredAdapter(name, str(version), path, meta["sha256"], meta["size"], meta.get("meta", {}))

    def names(self) -> list[str]:
        """Names with a current version, sorted."""
        with self._lock:
            return [d.name for d in sorted(self.root.iterdir())
                    if d.is_dir() and _NAME_RE.match(d.name) and self._state(d.name).get("current")]

    def current(self, name: str) -> StoredAdapter | None:
        with self._lock:
            return self._load(name, self._state(name).get("current"))

    def previous(self, name: str) -> StoredAdapter | None:
        with self._lock:
            return self._load(name, self._state(name).get("previous"))

    def state(self, name: str) -> dict:
        """The raw state (current, previous, last rejected version and why)."""
        with self._lock:
            return dict(self._state(name))

    def list(self) -> list[StoredAdapter]:
        return [a for a in (self.current(n) for n in self.names()) if a is not None]

    # -- writing -----------------------------------------------------------------------------
    def _write_state(self, name: str, state: dict) -> None:
        write_atomic(self.io, self._dir(name) / "state.json",
                     json.dumps(state, sort_keys=True).encode("utf-8"))

    def install(self, name: str, version: str, src: str | Path, *, meta: dict | None = None,
                sha256: str | None = None, health_check: Callable[[StoredAdapter], None] | None = None,
                allow_same_or_older: bool = False) -> StoredAdapter:
        """Install ``src`` as ``name`` version ``version`` and switch to it.

        ``sha256`` (``"sha256:<hex>"``), when given, is checked before anything is written.
        After the switch, ``health_check(stored)`` runs; if it raises, the store switches back
        to the previous version, removes the new one and raises :class:`StoreError` saying why.
        """
        version = check_name("version", version)
        src = Path(src)
        if not src.is_file():
            raise StoreError(f"adapter file {src} does not exist", hint="check the update's path")
        digest = sha256_file(src)
        if sha256 is not None and digest != sha256:
            raise StoreError(f"adapter file {src.name} has sha256 {digest}, expected {sha256}",
                             hint="the file was corrupted or tampered with in transit; fetch it again")
        size = src.stat().st_size
        with self._lock:
            d = self._dir(name)
            self.io.mkdir(d)
            state = self._state(name)
            old = state.get("current")
            if old is not None and not allow_same_or_older and version_key(version) <= version_key(old):
                raise StoreError(f"adapter {name!r} version {version} is not newer than installed {old}",
                                 hint="versions only go up; a replayed or older update is refused")
            final = d / f"v-{version}{ADAPTER_SUFFIX}"
            tmp = final.with_name(final.name + ".tmp")
            self.io.copy_file(src, tmp)
            self.io.fsync_file(tmp)
            if sha256_file(tmp) != digest:
                self.io.unlink(tmp)
                raise StoreError(f"adapter {name!r} {version}: the copy does not match its source",
                                 hint="the storage may be failing or full; check free space")
            self.io.replace(tmp, final)
            write_atomic(self.io, d / f"v-{version}.json", json.dumps(
                {"name": name, "version": version, "sha256": digest, "size": size, "meta": meta or {}},
                sort_keys=True).encode("utf-8"))
            # The switch: one atomic rename. Before it the old state stands, after it the new.
            self._write_state(name, {"current": version, "previous": old,
                                     "rejected": state.get("rejected")})
            self._prune(name, keep={version, old})
            stored = self._load(name, version)
        if health_check is not None:
            try:
                health_check(stored)
            except Exception as exc:  # any failure of the check means: roll back
                reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                self._reject(name, version, old, reason)
                raise StoreError(f"adapter {name!r} {version} failed its health check and was rolled back"
                                 f" to {old or 'nothing'}: {reason}",
                                 hint="fix the adapter or its health-check set and publish a newer version") from exc
        return stored

    def _reject(self, name: str, bad: str, back_to: str | None, reason: str) -> None:
        with self._lock:
            # install() kept only {bad, back_to}; after this, back_to stands alone.
            self._write_state(name, {"current": back_to, "previous": None,
                                     "rejected": {"version": bad, "reason": reason}})
            self._prune(name, keep={back_to})

    def rollback(self, name: str, reason: str = "requested") -> StoredAdapter:
        """Switch ``name`` back to its previous version; the newer one is removed."""
        with self._lock:
            state = self._state(name)
            cur, prev = state.get("current"), state.get("previous")
            if prev is None or self._load(name, prev, verify=True) is None:
                raise StoreError(f"adapter {name!r} has no previous version to roll back to",
                                 hint="install a known-good version instead")
            self._write_state(name, {"current": prev, "previous": None,
                                     "rejected": {"version": cur, "reason": reason}})
            self._prune(name, keep={prev})
            return self._load(name, prev)

    def remove(self, name: str) -> None:
        """Forget ``name``: state first (atomically), then its files."""
        with self._lock:
            self._write_state(name, {"current": None, "previous": None})
            self._prune(name, keep=set())

    def _prune(self, name: str, keep: set) -> None:
        d = self._dir(name)
        keep_files = set()
        for v in keep:
            if v is not None:
                keep_files |= {f"v-{v}{ADAPTER_SUFFIX}", f"v-{v}.json"}
        for p in sorted(d.iterdir()):
            if p.name.startswith("v-") and p.name not in keep_files:
                self.io.unlink(p)

    def _recover(self, name: str) -> None:
        """After a crash: drop temporaries and unreferenced versions; repair a broken current."""
        d = self._dir(name)
        for p in d.glob("*.tmp"):
            self.io.unlink(p)
        state = self._state(name)
        cur, prev = state.get("current"), state.get("previous")
        if cur is not None and self._load(name, cur, verify=True) is None:
            ok_prev = prev is not None and self._load(name, prev, verify=True) is not None
            self.recovered.append(f"{name}: version {cur} is damaged; "
                                  + (f"back to {prev}" if ok_prev else "no usable version left"))
            self._write_state(name, {"current": prev if ok_prev else None, "previous": None,
                                     "rejected": {"version": cur, "reason": "damaged on disk"}})
            cur, prev = (prev if ok_prev else None), None
        self._prune(name, keep={cur, prev})
