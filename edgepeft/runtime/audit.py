"""Audit log: which base and adapter version answered each request.

Append-only JSON lines (one object per request), rotated by size: ``audit.jsonl``
becomes ``audit.jsonl.1`` (older ones shift up, the oldest beyond ``backups`` is
dropped). People who oversee decisions made with an adapter can trace any answer
to the exact adapter version and its file hash. Prompts are not logged, only their
SHA-256, so the log can be kept without holding user text.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from ..errors import EngineError


def text_digest(text: str) -> str:
    """A short, stable fingerprint of request text (never the text itself)."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class AuditLog:
    """Thread-safe JSON-lines writer with size-based rotation.

    Raises :class:`EngineError` when the log folder cannot be created or written;
    an engine configured with an audit log refuses to answer without recording.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = 1 << 20, backups: int = 3):
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

    def record(self, **fields) -> dict:
        """Append one entry (``ts`` added); returns what was written."""
        entry = {"ts": round(time.time(), 3), **fields}
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
