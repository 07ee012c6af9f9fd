"""Writing release artifacts atomically: a temporary sibling, fsync, then one rename (readable 0644).

A package or repository file that a crash left half-written must never be served, so every file the
release side writes (update packages, TUF metadata and targets) goes through :func:`write_atomic`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, *parts) -> None:
    """Write ``parts`` (bytes, or paths of files to copy in) to ``path`` so readers see the old file or the
    whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                if isinstance(part, (bytes, bytearray, memoryview)):
                    fh.write(part)
                    continue
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
