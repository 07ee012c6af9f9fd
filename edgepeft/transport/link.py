"""What every link offers the push driver, and the push driver itself.

A link moves bytes of one package to one device and asks for its status; the
driver (:func:`push`) does the rest the same way for HTTP and serial: it asks
where the device is, sends from there, resumes from the device's last good
offset after a dropped connection or an unplugged cable, and waits for the
health check. Only the device decides what is good: the driver never assumes
bytes arrived until the device says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..contracts.names import sha256_bytes
from ..contracts.update import envelope_length
from ..errors import EdgePeftError, TransportError

TERMINAL = ("healthy", "rejected", "rolled-back")


class LinkDown(TransportError):
    """The connection dropped or timed out; the push may resume."""


class Conflict(TransportError):
    """The device holds a different offset than the one sent at; go on from ``offset``."""

    def __init__(self, offset: int, message: str = ""):
        super().__init__(message or f"the device holds {offset} bytes of this update", hint=f"resume from offset {offset}")
        self.offset = offset


class Busy(TransportError):
    """The device has too many uploads at once, or not enough storage; try again later."""


# The largest chunk a device accepts in one request (both ends of every link).
MAX_CHUNK = 4 << 20


class Link(Protocol):
    def status(self, id: str) -> dict | None: ...

    def send(self, id: str, data: bytes, offset: int, progress: Callable[[int], None]) -> dict: ...

    def device(self) -> dict: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Package:
    """A package file as a sender sees it (nothing trusted: the device verifies)."""

    path: Path
    data: bytes
    id: str
    envelope_bytes: int

    @classmethod
    def read(cls, path) -> Package:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TransportError(f"cannot read {path}: {exc.strerror or exc}", hint="check the path") from exc
        n = envelope_length(data, str(path))
        if n is None or len(data) < n:
            raise TransportError(f"{path} is too short to be an update package", hint="recreate it")
        _check_local_copy(path, data, n)
        return cls(path, data, sha256_bytes(data[:n]), n)

    @property
    def size(self) -> int:
        return len(self.data)


def _check_local_copy(path, data: bytes, n: int) -> None:
    """A courtesy before sending: the payload must match the size and SHA-256 in the file's own metadata.

    Nothing here is trusted (the device verifies the signature and everything else); it only catches a
    file damaged on this machine before its bytes cross a slow link. Raises :class:`TransportError`.
    """
    from ..contracts.update import read_metadata_unverified

    try:
        meta = read_metadata_unverified(data[:n], str(path))
    except EdgePeftError:
        return  # unreadable metadata: let the device say what is wrong with it
    size, digest = meta.payload_size, meta.payload_sha256
    if len(data) - n != size or sha256_bytes(data[n:]) != digest:
        raise TransportError(f"{path} is damaged: its payload does not match the size and SHA-256 its metadata "
                             "announces", hint="copy the package again from where it was created")


def push(package: Package, link: Link, *, progress: Callable[[int, int], None] = lambda done, total: None,
         wait: bool = True, timeout: float = 600.0, resume_for: float = 120.0,
         on_event: Callable[[str], None] = lambda msg: None) -> dict:
    """Send ``package`` over ``link`` and return the device's final status for it.

    After a drop it resumes from the offset the device reports, giving up only after
    ``resume_for`` seconds without progress; with ``wait`` it then polls until the device
    reports healthy, rejected or rolled-back (or ``timeout``). Raises :class:`TransportError`
    when the device stays unreachable or does not finish in time.
    """
    deadline = time.monotonic() + timeout
    best, stalled_since, delay, st = -1, None, 0.2, None
    while True:
        try:
            st = link.status(package.id)
            if (st or {}).get("retryable") and st.get("status") == "rejected":
                st = None  # refused for damage in transit earlier: this copy may be whole
            state = (st or {}).get("status", "receiving")
            if state in TERMINAL or (state != "receiving" and not wait):
                return st
            if state != "receiving":
                break  # received: the device is verifying or installing
            offset = int((st or {}).get("offset") or 0)
            if offset > best:
                best, stalled_since, delay = offset, None, 0.2
            if offset:
                on_event(f"resuming at byte {offset} of {package.size}")
            progress(offset, package.size)
            st = link.send(package.id, package.data, offset, lambda done: progress(done, package.size))
            break
        except Conflict as exc:
            on_event(f"the device holds {exc.offset} bytes; going on from there")
        except LinkDown as exc:
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > resume_for or now > deadline:
                raise TransportError(f"the device stopped answering: {exc.message}",
                                     hint="check the cable or network and run the same push again: it resumes") from exc
            on_event(f"link down ({exc.message}); retrying in {delay:.1f} s")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    while (st or {}).get("status") not in TERMINAL and wait:
        if time.monotonic() > deadline:
            raise TransportError(f"the device did not finish installing within {timeout:.0f} s "
                                 f"(last status: {(st or {}).get('status')})", hint="ask it later with `edgepeft status`")
        time.sleep(0.1)
        try:
            st = link.status(package.id) or st
        except LinkDown:
            pass
    return st
