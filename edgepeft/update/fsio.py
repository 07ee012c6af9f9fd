"""The small file-I/O layer every adapter-store write goes through.

Why a layer: a power cut can strike between any two writes. Routing every
write, fsync, rename and unlink through one object lets a test replace it with
:class:`FaultyIO`, which "cuts the power" at the N-th operation and drops any
data that was written but not yet fsynced, so the store can be proven to hold
exactly the old or the new state for every N.
"""

from __future__ import annotations

import os
from pathlib import Path


class FileIO:
    """Real, durable file operations (the default)."""

    def write_file(self, path: Path, data: bytes) -> None:
        """Create/overwrite ``path`` with ``data`` (not yet durable: call :meth:`fsync_file`)."""
        with open(path, "wb") as fh:
            fh.write(data)

    def copy_file(self, src: Path, dst: Path, chunk: int = 1 << 20) -> None:
        """Copy ``src`` to ``dst`` in chunks (not yet durable: call :meth:`fsync_file`)."""
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while True:
                block = fin.read(chunk)
                if not block:
                    break
                fout.write(block)

    def fsync_file(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        """Make renames/creates inside ``path`` durable (a no-op where directories cannot be opened)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        """Atomically rename ``src`` over ``dst``."""
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def mkdir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def append_line(self, path: Path, line: bytes) -> None:
        """Append one line (used by the audit log), flushed to the OS."""
        with open(path, "ab") as fh:
            fh.write(line)


def write_atomic(io: FileIO, path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one.

    Order: write a temporary sibling, fsync it, rename it over ``path``, fsync the directory.
    """
    tmp = path.with_name(path.name + ".tmp")
    io.write_file(tmp, data)
    io.fsync_file(tmp)
    io.replace(tmp, path)
    io.fsync_dir(path.parent)


class PowerCut(Exception):
    """Raised by :class:`FaultyIO` at the chosen operation; never raised in production."""


class FaultyIO(FileIO):
    """A test double: performs real operations until the ``cut_at``-th one, then "loses power".

    At the cut, every file written since its last fsync is truncated to half its
    length (unsynced data is not on disk), and :class:`PowerCut` is raised. With
    ``cut_at=None`` it only counts operations (``self.ops``).
    """

    def __init__(self, cut_at: int | None = None):
        self.cut_at = cut_at
        self.ops: list[str] = []
        self._dirty: set[Path] = set()

    def _op(self, what: str) -> None:
        self.ops.append(what)
        if self.cut_at is not None and len(self.ops) >= self.cut_at:
            for p in self._dirty:
                if p.exists():
                    size = p.stat().st_size
                    with open(p, "r+b") as fh:
                        fh.truncate(size // 2)
            self._dirty.clear()
            raise PowerCut(f"power cut at operation {len(self.ops)} ({what})")

    def write_file(self, path, data):
        self._op(f"write {Path(path).name}")
        super().write_file(path, data)
        self._dirty.add(Path(path))

    def copy_file(self, src, dst, chunk=1 << 20):
        self._op(f"copy {Path(dst).name}")
        super().copy_file(src, dst, chunk)
        self._dirty.add(Path(dst))

    def fsync_file(self, path):
        self._op(f"fsync {Path(path).name}")
        super().fsync_file(path)
        self._dirty.discard(Path(path))

    def fsync_dir(self, path):
        self._op(f"fsync-dir {Path(path).name}")
        super().fsync_dir(path)

    def replace(self, src, dst):
        self._op(f"rename {Path(src).name} -> {Path(dst).name}")
        super().replace(src, dst)
        if Path(src) in self._dirty:
            self._dirty.discard(Path(src))
            self._dirty.add(Path(dst))

    def unlink(self, path):
        self._op(f"unlink {Path(path).name}")
        super().unlink(path)

    def mkdir(self, path):
        self._op(f"mkdir {Path(path).name}")
        super().mkdir(path)
