"""Resumable reception of update packages, the same for every link (HTTP, serial).

A package is identified by its id (the SHA-256 of its envelope, which the
sender computes from the file's first bytes). A sender writes bytes at the
offset the device already holds, so after a dropped connection or an unplugged
cable it asks for the offset and goes on from there; partial files survive a
restart of the agent.

The device refuses as early as it can: after 20 bytes for garbage, after the
envelope (a few KiB) for a bad signature, an untrusted key, an expired package,
a replayed version or another base, so a hostile sender cannot make it store a
large payload it would refuse anyway. A sender that sends more bytes than the
signed size is refused too. When the last byte arrives, the complete package
goes to the install worker (one install at a time).
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..contracts.names import is_id
from ..contracts.update import Envelope, envelope_length, verify_envelope
from ..errors import EdgePeftError, TransportError
from ..transport.link import MAX_CHUNK, Busy, Conflict
from .installer import TERMINAL, InstallResult


@dataclass
class Upload:
    id: str
    path: Path
    offset: int = 0
    total: int | None = None
    envelope: Envelope | None = None
    result: InstallResult = None
    updated: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def status(self) -> dict:
        r = self.result
        d = r.to_dict() if r is not None else {"id": self.id, "status": "receiving", "reason": None}
        return d | {"offset": self.offset, "size": self.total}


class Installer(Protocol):
    """What a receiver needs from the device (see :class:`edgepeft.update.device.Device`)."""

    trusted_keys: list

    def check(self, envelope: Envelope) -> None: ...  # the device's early refusal: raises with the reason

    def install(self, data: bytes, result: InstallResult) -> InstallResult: ...  # the transaction

    def record(self, result: InstallResult) -> None: ...  # keep a finished result in the history

    def lookup(self, id: str) -> dict | None: ...  # a finished result from the history


class Receiver:
    """Takes package bytes from any link and hands complete packages to the device's installer.

    Raises :class:`Conflict` (wrong offset), :class:`Busy` (too many uploads, no space) and
    :class:`TransportError` (a malformed request); a refused package is not an error:
    its status says "rejected" and why.
    """

    def __init__(self, incoming_dir: str | Path, device: Installer, *, max_bytes: int = 2 << 30,
                 max_uploads: int = 4, stale_seconds: float = 7 * 86400):
        self.dir = Path(incoming_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.device = device
        self.max_bytes, self.max_uploads, self.stale = max_bytes, max_uploads, stale_seconds
        self._uploads: dict[str, Upload] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        for p in sorted(self.dir.glob("*.part")):  # partial uploads survive a restart
            if is_id(p.stem) and time.time() - p.stat().st_mtime < self.stale:
                self._uploads[p.stem] = Upload(p.stem, p, offset=p.stat().st_size)
            else:
                p.unlink(missing_ok=True)
        self._worker = threading.Thread(target=self._work, name="edgepeft-install", daemon=True)
        self._worker.start()

    # -- queries -------------------------------------------------------------------------------
    def status(self, id: str) -> dict | None:
        """The status of upload ``id`` (receiving, received, ..., healthy / rejected / rolled-back),
        from memory or the device's history; None if the device never heard of it."""
        self._check_id(id)
        with self._lock:
            up = self._uploads.get(id)
        if up is not None:
            return up.status()
        return self.device.lookup(id)

    def active(self) -> list[dict]:
        with self._lock:
            return [u.status() for u in self._uploads.values()]

    # -- writes --------------------------------------------------------------------------------
    @staticmethod
    def _check_id(id: str) -> None:
        if not is_id(id):
            raise TransportError(f"update id {str(id)[:80]!r} is not 64 lowercase hex digits",
                                 hint="the id is the SHA-256 of the package's envelope")

    def write(self, id: str, offset: int, data: bytes, total: int | None = None) -> dict:
        """Append ``data`` at ``offset`` to upload ``id``; returns its status."""
        self._check_id(id)
        if len(data) > MAX_CHUNK:
            raise TransportError(f"a chunk of {len(data)} bytes is larger than {MAX_CHUNK}", hint="send smaller chunks")
        if total is not None and not 0 < total <= self.max_bytes:
            return self._refused(id, f"the package announces {total} bytes; this device takes at most {self.max_bytes}")
        up = self._get_or_start(id, offset, total)
        if up.result is not None and up.result.status != "receiving":
            return up.status()  # received or finished: nothing more to write
        with up.lock:
            if offset != up.offset:
                raise Conflict(up.offset)
            if up.total is not None and up.offset + len(data) > up.total:
                return self._fail(up, f"the sender sent more bytes than the {up.total} its signed metadata announces",
                                  retryable=True)
            if total is not None and up.total is not None and total != up.total:
                return self._fail(up, f"the sender announces {total} bytes; the signed metadata says {up.total}",
                                  retryable=True)
            if up.offset + len(data) > (up.total or self.max_bytes):
                return self._fail(up, f"the package is larger than {self.max_bytes} bytes")
            with open(up.path, "r+b" if up.path.exists() else "wb") as fh:
                fh.seek(up.offset)
                fh.write(data)
                fh.flush()
                if up.envelope is None or up.offset + len(data) == up.total or (up.offset >> 20) != ((up.offset + len(data)) >> 20):
                    os.fsync(fh.fileno())  # durable offsets at least every MiB, and at the end
            up.offset += len(data)
            up.updated = time.time()
            if up.envelope is None:
                failure = self._try_envelope(up, total)
                if failure is not None:
                    return failure
            if up.total is not None and up.offset == up.total:
                up.result = InstallResult(id=up.id, name=up.envelope.meta.name, version=up.envelope.meta.version,
                                          status="received", type=up.envelope.meta.type,
                                          steps=[("received", time.time())])
                self._queue.put(up)
            return up.status()

    def _get_or_start(self, id: str, offset: int, total: int | None) -> Upload:
        with self._lock:
            up = self._uploads.get(id)
            if up is not None:
                return up
            done = self.device.lookup(id)
            if done is not None and done.get("status") in TERMINAL and not done.get("retryable"):
                return _Finished(done)
            if offset != 0:
                raise Conflict(0)
            if len(self._uploads) >= self.max_uploads:
                self._drop_stale()
                if len(self._uploads) >= self.max_uploads:
                    raise Busy(f"the device is receiving {len(self._uploads)} updates already",
                               hint="retry when one has finished")
            need = 2 * (total or 0) + (64 << 20)
            free = shutil.disk_usage(self.dir).free
            if free < need:
                raise Busy(f"the device has {free >> 20} MiB free; this update needs about {need >> 20} MiB",
                           hint="free storage on the device, or send a smaller update")
            up = Upload(id, self.dir / f"{id}.part")
            self._uploads[id] = up
            return up

    def _drop_stale(self) -> None:
        now = time.time()
        for id, up in list(self._uploads.items()):
            if up.result is None and now - up.updated > 3600:
                up.path.unlink(missing_ok=True)
                del self._uploads[id]

    def _try_envelope(self, up: Upload, total: int | None) -> dict | None:
        """Verify the envelope once all of it has arrived; a refusal ends the upload."""
        with open(up.path, "rb") as fh:
            head = fh.read(20)
            try:
                n = envelope_length(head, f"update {up.id[:12]}")
            except EdgePeftError as exc:
                return self._fail(up, exc.message)
            if n is None or up.offset < n:
                return None
            fh.seek(0)
            raw = fh.read(n)
        try:
            envelope = verify_envelope(raw, self.device.trusted_keys, source=f"update {up.id[:12]}")
        except EdgePeftError as exc:
            return self._fail(up, exc.message)
        up.envelope = envelope  # verified: its name and version may be reported from here on
        if envelope.id != up.id:
            return self._fail(up, f"the package's envelope hashes to {envelope.id[:12]}..., not the id "
                                  f"{up.id[:12]}... it was sent under")
        try:
            self.device.check(envelope)
        except EdgePeftError as exc:
            return self._fail(up, exc.message)
        up.total = envelope.total_size
        if total is not None and total != up.total:
            return self._fail(up, f"the sender announces {total} bytes; the signed metadata says {up.total}",
                              retryable=True)
        if up.offset > up.total:
            return self._fail(up, f"the sender sent more bytes than the {up.total} its signed metadata announces",
                              retryable=True)
        return None

    def _fail(self, up: Upload, reason: str, retryable: bool = False) -> dict:
        up.path.unlink(missing_ok=True)
        up.result = InstallResult(id=up.id, name=up.envelope.meta.name if up.envelope else "?",
                                  version=up.envelope.meta.version if up.envelope else None, status="rejected",
                                  reason=reason, steps=[("rejected", time.time())], retryable=retryable)
        self._finish(up)
        return up.status()

    def _refused(self, id: str, reason: str) -> dict:
        up = Upload(id, self.dir / f"{id}.part")
        return self._fail(up, reason)

    def _finish(self, up: Upload) -> None:
        """Put a finished result in the device's history and forget the upload."""
        self.device.record(up.result)
        with self._lock:
            self._uploads.pop(up.id, None)

    # -- the install worker --------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            up = self._queue.get()
            if up is None:
                return
            try:
                self.device.install(up.path.read_bytes(), up.result)
            except Exception as exc:  # never let one package stop the worker
                up.result.status, up.result.reason = "rejected", f"install failed: {type(exc).__name__}: {exc}"
            finally:
                up.path.unlink(missing_ok=True)
                self._finish(up)

    def wait(self, id: str, timeout: float = 60.0) -> dict | None:
        """Block until upload ``id`` reaches a final status (for local callers and tests)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.status(id)
            if st is not None and st.get("status") in TERMINAL:
                return st
            time.sleep(0.02)
        return self.status(id)

    def close(self) -> None:
        self._queue.put(None)


class _Finished(Upload):
    """A package this device already finished (from its history): writes change nothing."""

    def __init__(self, done: dict):
        super().__init__(done["id"], Path(os.devnull), offset=done.get("size") or 0, total=done.get("size"))
        self._done = done
        self.result = InstallResult(id=done["id"], name=done.get("name", "?"), version=done.get("version"),
                                    status=done["status"], reason=done.get("reason"))

    def status(self) -> dict:
        return dict(self._done)
