"""Audit log: which base and adapter version answered each request.

Append-only JSON lines (one object per request), rotated by size: ``audit.jsonl``
becomes ``audit.jsonl.1`` (older ones shift up, the oldest beyond ``backups`` is
dropped). People who oversee decisions made with an adapter can trace any answer
to the exact adapter version and its file hash.

Prompts are not logged, only a keyed digest of them: HMAC-SHA-256 with a secret
of this device (``<log>.key`` beside the log, created mode 0600 on first use). A
plain hash of a short prompt ("yes", a card number) could be recovered by trying
candidates; without the device's key it cannot. Whoever holds the key (the
device's operator) can still find a known prompt's entries: :meth:`AuditLog.digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path

from ..errors import EngineError
from ..fsio import write_atomic

KEY_BYTES = 32


def text_digest(text: str, key: bytes) -> str:
    """A keyed fingerprint of request text (never the text itself): HMAC-SHA-256 under ``key``."""
    return "hmac-sha256:" + hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


def load_key(path: Path) -> bytes:
    """The device's audit key from ``path``, created (32 random bytes, mode 0600) when missing.
    Raises :class:`EngineError` for an unreadable or malformed key file."""
    path = Path(path)
    if not path.exists():
        write_atomic(path, secrets.token_hex(KEY_BYTES) + "\n", mode=0o600, keep_existing=True)  # of two starts, one key wins
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError) as exc:
        raise EngineError(f"the audit key {path} is unreadable: {exc}",
                          hint="restore it from a backup, or move the log aside and let a new key be made") from exc
    if len(key) < 16:
        raise EngineError(f"the audit key {path} is too short", hint="use at least 16 random bytes (hex)")
    return key


class AuditLog:
    """Thread-safe JSON-lines writer with size-based rotation.

    ``key`` (bytes) or ``key_file`` (default ``<path>.key``) is the secret of the prompt digests.

    Raises :class:`EngineError` when the log folder cannot be created or written;
    an engine configured with an audit log refuses to answer without recording.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = 1 << 20, backups: int = 3, key: bytes | None = None,
                 key_file: str | Path | None = None):
        if max_bytes < 256 or backups < 1:
            raise EngineError("audit log needs max_bytes >= 256 and backups >= 1",
                              hint="e.g. AuditLog(path, max_bytes=1_048_576, backups=3)")
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"cannot create the audit log folder {self.path.parent}: {exc}",
                              hint="pass an audit path on writable storage") from exc
        self.key_file = Path(key_file) if key_file else self.path.with_name(self.path.name + ".key")
        self._key = key if key is not None else load_key(self.key_file)
        self.key_id = hashlib.sha256(b"edgepeft-audit-key" + self._key).hexdigest()[:16]

    def digest(self, text: str) -> str:
        """The digest this log records for ``text`` (to find a known prompt's entries)."""
        return text_digest(text, self._key)

    def record(self, **fields) -> dict:
        """Append one entry (``ts`` added); returns what was written."""
        entry = {"ts": round(time.time(), 3), **fields, "key_id": self.key_id}
        line = (json.dumps(entry, sort_keys=True, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            try:
                if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                    self._rotate()
                with open(self.path, "ab") as fh:
                    fh.write(line)
                    fh.flush()
            except OSError as exc:
                raise EngineError(f"cannot write the audit log {self.path}: {exc}",
                                  hint="free space on the device or move the audit log") from exc
        return entry

    def _rotate(self) -> None:
        oldest = self.path.with_name(f"{self.path.name}.{self.backups}")
        if oldest.exists():
            os.unlink(oldest)
        for i in range(self.backups - 1, 0, -1):
            p = self.path.with_name(f"{self.path.name}.{i}")
            if p.exists():
                os.replace(p, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def entries(self, include_rotated: bool = True) -> list[dict]:
        """All entries, oldest first (for tests and inspection)."""
        files = [self.path.with_name(f"{self.path.name}.{i}") for i in range(self.backups, 0, -1)]
        files = [p for p in files if include_rotated and p.exists()] + [self.path]
        out = []
        with self._lock:
            for p in files:
                if p.exists():
                    out += [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
        return out
