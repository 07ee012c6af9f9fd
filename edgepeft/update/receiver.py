"""Resumable reception of update packages, the same for every link (HTTP, serial).

A package is identified by its id (the SHA-256 of its envelope, which the
sender computes from the file's first bytes). A sender writes bytes at the
offset the device already holds, so after a dropped connection or an unplugged
cable it asks for the offset and goes on from there; partial files survive a
restart of the agent, and a part that was complete when the agent stopped is
verified and installed (or discarded) when it starts again.

The device refuses as early as it can: after 20 bytes for garbage, after the
envelope (a few KiB) for a bad signature, an untrusted key, an expired package,
a replayed version, another base or a signed size beyond this device's limit or
its free storage, so a hostile sender cannot make it store a large payload it
would refuse anyway. When the last byte arrives, the complete package goes to
the install worker (one install at a time).

What a peer cannot do (issue 23): a request never destroys state it did not
create. A request that contradicts an upload in progress (another length, more
bytes than signed) is refused and the upload stays. A final result is recorded
only under an id whose envelope verified and hashes to that id, so garbage sent
under the id of a genuine package leaves a short-lived, retryable note, never a
verdict. Upload slots are bounded; a part that never showed a verified envelope,
or one idle for long, gives its slot to a new upload.
"""

from __future__ import annotations

import os
import queue
import shutil
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..contracts.names import is_id
from ..contracts.update import Envelope, envelope_length, verify_envelope
from ..errors import EdgePeftError, TransportError
from ..fsio import FileIO
from ..transport.link import MAX_CHUNK, Busy, Conflict
from .installer import TERMINAL, InstallResult

# a part without a verified envelope may be evicted for a new upload at once, and expires after this
UNVERIFIED_IDLE = 60.0
# a verified part idle this long gives its slot to a new upload when the table is full
VERIFIED_IDLE = 15 * 60.0
# a part idle this long is dropped (a long unplugged cable still resumes within it)
EXPIRE = 24 * 3600.0
# refusals of unverified uploads kept in memory (answer status queries; never block a later upload)
MAX_NOTES = 64
# storage kept free beside an upload: the staged copy of the package plus this margin
DISK_MARGIN = 64 << 20


@dataclass
class Upload:
    id: str
    path: Path
    offset: int = 0
    total: int | None = None
    envelope: Envelope | None = None  # set only once verified and hashing to ``id``
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

    def lookup(self, id: str) -> dict | None: ...  # a finished, verified result from the history

    def refused(self, result: dict) -> None: ...  # a refusal kept out of the history: say it (the event log)


class Receiver:
    """Takes package bytes from any link and hands complete packages to the device's installer.

    Raises :class:`Conflict` (wrong offset), :class:`Busy` (every slot busy, no space) and
    :class:`TransportError` (a malformed request, or one that contradicts the upload in
    progress); a refused package is not an error: its status says "rejected" and why.
    ``io`` is the device's file layer: its checkpoints let a test stop the process at a step.
    """

    def __init__(self, incoming_dir: str | Path, device: Installer, *, max_bytes: int = 2 << 30,
                 max_uploads: int = 4, io: FileIO | None = None):
        self.dir = Path(incoming_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.device = device
        self.io = io or FileIO()
        self.max_bytes, self.max_uploads = max_bytes, max_uploads
        self._uploads: dict[str, Upload] = {}
        self._notes: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self.notes: list[str] = []  # what the start found (for the device's status)
        self._resume_parts()
        self._worker = threading.Thread(target=self._work, name="edgepeft-install", daemon=True)
        self._worker.start()

    def _resume_parts(self) -> None:
        """Partial uploads survive a restart; a complete one (the agent stopped after its last byte) is
        verified and queued for install, one that fails verification is discarded."""
        now = time.time()
        for p in sorted(self.dir.iterdir()):
            id = p.name[:-5] if p.name.endswith(".part") else ""
            try:
                st = p.lstat()
            except OSError:
                continue
            if not is_id(id) or not stat.S_ISREG(st.st_mode) or now - st.st_mtime > EXPIRE:
                try:
                    self.io.unlink(p)
                except OSError:  # a folder planted here: left alone, never read
                    self.notes.append(f"{p} is not an upload part and cannot be removed; ignored")
                continue
            up = Upload(id, p, offset=st.st_size, updated=st.st_mtime)
            self._uploads[id] = up
            failure = self._try_envelope(up, None)
            if failure is not None:
                self.notes.append(f"partial upload {id[:12]} discarded on start: {failure.get('reason')}")
                self._discard(up)
            elif up.envelope is not None and up.offset == up.total:
                self.notes.append(f"upload {id[:12]} was complete when the agent stopped: installing it now")
                self._received(up)

    # -- queries -------------------------------------------------------------------------------
    def status(self, id: str) -> dict | None:
        """The status of upload ``id`` (receiving, received, ..., healthy / rejected / rolled-back),
        from memory or the device's history; None if the device never heard of it."""
        self._check_id(id)
        with self._lock:
            up = self._uploads.get(id)
            note = self._notes.get(id)
        if up is not None:
            return up.status()
        done = self.device.lookup(id)
        return done if done is not None else note

    def active(self) -> list[dict]:
        with self._lock:
            return [u.status() for u in self._uploads.values()]

    def check_total(self, id: str, total: int | None) -> None:
        """Refuse an announced size that this device never takes, or that contradicts the signed size
        of the upload in progress; changes nothing. Raises :class:`TransportError`."""
        self._check_id(id)
        if total is None:
            return
        if isinstance(total, bool) or not isinstance(total, int) or not 0 < total <= self.max_bytes:
            raise TransportError(f"the announced size {str(total)[:30]} is not between 1 and {self.max_bytes} "
                                 "bytes (this device's limit); nothing was changed",
                                 hint="announce the package's real size")
        with self._lock:
            up = self._uploads.get(id)
        if up is not None and up.total is not None and total != up.total:
            raise TransportError(f"the announced size {total} differs from the {up.total} bytes this package's "
                                 "signed metadata says; the upload in progress is kept",
                                 hint="announce the package's real size")

    # -- writes --------------------------------------------------------------------------------
    @staticmethod
    def _check_id(id: str) -> None:
        if not is_id(id):
            raise TransportError(f"update id {str(id)[:80]!r} is not 64 lowercase hex digits",
                                 hint="the id is the SHA-256 of the package's envelope")

    def write(self, id: str, offset: int, data: bytes, total: int | None = None) -> dict:
        """Append ``data`` at ``offset`` to upload ``id``; returns its status.

        A request that contradicts an upload in progress raises :class:`TransportError` and
        changes nothing; a package refused by this request alone is answered "rejected"."""
        self._check_id(id)
        if len(data) > MAX_CHUNK:
            raise TransportError(f"a chunk of {len(data)} bytes is larger than {MAX_CHUNK}", hint="send smaller chunks")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise TransportError(f"offset {offset!r} is not a whole number >= 0", hint="send at the device's offset")
        with self._lock:
            live = id in self._uploads
        try:
            self.check_total(id, total)
        except TransportError as exc:
            if live:
                raise
            return self._note(id, exc.message)
        up, fresh = self._get_or_start(id, offset, total)
        if up.result is not None and up.result.status != "receiving":
            return up.status()  # received or finished: nothing more to write
        with up.lock:
            if up.result is not None and up.result.status != "receiving":
                return up.status()
            if self._uploads.get(id) is not up:  # evicted or discarded meanwhile: start again
                raise Conflict(0)
            if offset != up.offset:
                raise Conflict(up.offset)
            if up.total is not None and up.offset + len(data) > up.total:
                raise TransportError(f"{len(data)} bytes at offset {offset} run past the {up.total} bytes this "
                                     "package's signed metadata says; the upload in progress is kept",
                                     hint="send the package's own bytes")
            if up.total is not None and total is not None and total != up.total:
                raise TransportError(f"the announced size {total} differs from the signed {up.total} bytes; "
                                     "the upload in progress is kept", hint="announce the package's real size")
            self._append(up, data)
            if up.envelope is None:
                failure = self._try_envelope(up, total)
                if failure is not None:
                    self._discard(up)  # never verified: nobody's work is lost
                    return failure
                if up.envelope is not None:
                    self.io.checkpoint("envelope verified")
            if up.envelope is not None and up.offset == up.total:
                self.io.checkpoint("received")
                self._received(up)
            return up.status()

    def _append(self, up: Upload, data: bytes) -> None:
        with open(up.path, "r+b" if up.path.exists() else "wb") as fh:
            fh.seek(up.offset)
            fh.write(data)
            fh.flush()
            end = up.offset + len(data)
            if up.envelope is None or end == up.total or (up.offset >> 20) != (end >> 20):
                os.fsync(fh.fileno())  # durable offsets at least every MiB, and at the end
        up.offset += len(data)
        up.updated = time.time()

    def _received(self, up: Upload) -> None:
        up.result = InstallResult(id=up.id, name=up.envelope.meta.name, version=up.envelope.meta.version,
                                  status="received", type=up.envelope.meta.type,
                                  steps=[("received", time.time())], verified=True)
        self._queue.put(up)

    def _get_or_start(self, id: str, offset: int, total: int | None) -> tuple[Upload, bool]:
        """The upload ``id`` and whether this request started it; a new one takes a free slot, or the
        slot of an idle part (see :meth:`_evict`). Raises :class:`Conflict` or :class:`Busy`."""
        with self._lock:
            up = self._uploads.get(id)
            if up is not None:
                return up, False
            done = self.device.lookup(id)
            if done is not None and done.get("status") in TERMINAL and not done.get("retryable"):
                return _Finished(done), False
            if offset != 0:
                raise Conflict(0)
            self._expire()
            if len(self._uploads) >= self.max_uploads and not self._evict():
                raise Busy(f"the device is receiving {len(self._uploads)} updates already",
                           hint="retry when one has finished")
            need = 2 * (total or 0) + DISK_MARGIN
            free = shutil.disk_usage(self.dir).free
            if free < need:
                raise Busy(f"the device has {free >> 20} MiB free; this update needs about {need >> 20} MiB",
                           hint="free storage on the device, or send a smaller update")
            self._notes.pop(id, None)
            up = Upload(id, self.dir / f"{id}.part")
            self._uploads[id] = up
            return up, True

    def _idle(self, up: Upload, now: float) -> float:
        return now - up.updated if up.result is None and not up.lock.locked() else -1.0

    def _expire(self) -> None:
        """Drop parts idle past their limit (under ``self._lock``)."""
        now = time.time()
        for up in list(self._uploads.values()):
            limit = EXPIRE if up.envelope is not None else UNVERIFIED_IDLE
            if self._idle(up, now) > limit:
                self._drop(up)

    def _evict(self) -> bool:
        """Give the slot of the oldest part without a verified envelope, else of the oldest verified
        part idle for VERIFIED_IDLE, to a new upload (under ``self._lock``); False when none may go."""
        now = time.time()
        idle = [(up.envelope is not None, up.updated, up) for up in self._uploads.values() if self._idle(up, now) >= 0]
        idle = [x for x in idle if not x[0] or now - x[1] > VERIFIED_IDLE]
        if not idle:
            return False
        self._drop(min(idle, key=lambda x: (x[0], x[1]))[2])
        return True

    def _drop(self, up: Upload) -> None:
        self.io.unlink(up.path)
        self._uploads.pop(up.id, None)

    def _discard(self, up: Upload) -> None:
        with self._lock:
            if self._uploads.get(up.id) is up:
                self._drop(up)

    def _try_envelope(self, up: Upload, total: int | None) -> dict | None:
        """Verify the envelope once all of it has arrived; returns the refusal, if any. A refusal of a
        verified envelope is final (recorded under its id); any other is a note that blocks nothing."""
        with open(up.path, "rb") as fh:
            head = fh.read(20)
            try:
                n = envelope_length(head, f"update {up.id[:12]}")
            except EdgePeftError as exc:
                return self._note(up.id, exc.message)
            if total is not None and total < (n if n is not None else 20):
                # it can never complete: refused now instead of holding a slot and a file until it goes stale
                return self._note(up.id, f"the sender announces {total} bytes, fewer than the package's envelope "
                                         f"({n if n is not None else 'its 20-byte header'})")
            if n is None or up.offset < n:
                return None
            fh.seek(0)
            raw = fh.read(n)
        try:
            envelope = verify_envelope(raw, self.device.trusted_keys, source=f"update {up.id[:12]}")
        except EdgePeftError as exc:
            return self._note(up.id, exc.message)
        if envelope.id != up.id:
            return self._note(up.id, f"the package's envelope hashes to {envelope.id[:12]}..., not the id "
                                     f"{up.id[:12]}... it was sent under")
        size = envelope.total_size
        if size > self.max_bytes:
            return self._final(up, envelope, f"the package's signed size is {size} bytes; this device takes at "
                                              f"most {self.max_bytes}")
        free = shutil.disk_usage(self.dir).free + up.offset
        if free < 2 * size + DISK_MARGIN:
            return self._final(up, envelope, f"the package's signed size is {size} bytes; the device has "
                                              f"{free >> 20} MiB free, too little to stage it",
                               retryable=True)
        try:
            self.device.check(envelope)
        except EdgePeftError as exc:
            return self._final(up, envelope, exc.message)
        if total is not None and total != size:
            return self._note(up.id, f"the sender announces {total} bytes; the signed metadata says {size}")
        if up.offset > size:
            return self._note(up.id, f"the sender sent more bytes than the {size} its signed metadata announces")
        up.envelope, up.total = envelope, size  # verified: its name and version may be reported from here on
        return None

    def _note(self, id: str, reason: str) -> dict:
        """A refusal that proves nothing about the package under ``id`` (garbage, another package, a bad
        request): answered to status queries for a while, retryable, never recorded in the history."""
        st = InstallResult(id=id, name="?", version=None, status="rejected", reason=reason,
                           steps=[("rejected", time.time())], retryable=True).to_dict() | {"offset": 0, "size": None}
        with self._lock:
            self._notes[id] = st
            self._notes.move_to_end(id)
            while len(self._notes) > MAX_NOTES:
                self._notes.popitem(last=False)
        self.device.refused(st)
        return st

    def _final(self, up: Upload, envelope: Envelope, reason: str, retryable: bool = False) -> dict:
        """A verified package refused by this device: recorded under its id (which it hashes to)."""
        self.io.unlink(up.path)
        up.result = InstallResult(id=up.id, name=envelope.meta.name, version=envelope.meta.version,
                                  type=envelope.meta.type, status="rejected", reason=reason,
                                  steps=[("rejected", time.time())], retryable=retryable, verified=True)
        self._finish(up)
        return up.status()

    def _finish(self, up: Upload) -> None:
        """Put a finished result in the device's history and forget the upload."""
        self.device.record(up.result)
        with self._lock:
            if self._uploads.get(up.id) is up:
                del self._uploads[up.id]

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
                up.result.retryable = True
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
