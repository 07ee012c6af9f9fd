"""The small file-I/O layer every write of the device's update state goes through.

Why a layer: a power cut can strike between any two writes. Routing every
write, fsync, rename and unlink through one object lets a test replace it with
:class:`FaultyIO`, which "cuts the power" at the N-th operation and then loses
what a real file system may lose: data written but not fsynced, and directory
entries (creates, renames, unlinks) made since the directory was last fsynced.
So the install transaction can be proven to leave exactly the old or the new
state for every N.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class FileIO:
    """Real, durable file operations (the default)."""

    def read_file(self, path: Path) -> bytes:
        """The whole content of a regular file; symbolic links are refused (OSError)."""
        import stat

        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise OSError(f"{path} is not a regular file")
            return fh.read()

    def checkpoint(self, what: str) -> None:
        """Mark a step that is not a write (e.g. a health check) where a test may cut the power."""

    def write_file(self, path: Path, data: bytes, mode: int | None = None) -> None:
        """Create/overwrite ``path`` with ``data`` (not yet durable: call :meth:`fsync_file`).
        A new file gets ``mode`` from its creation on (the umask's default when None)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
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


def write_atomic(path: str | os.PathLike, data: bytes | str, *, mode: int | None = None,
                 io: FileIO | None = None, keep_existing: bool = False) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` so a crash leaves the old file or the whole new one.

    The one atomic write of edgepeft (see :func:`atomic_path` for the steps). ``mode`` (e.g. 0o600 for
    keys) holds from the temporary file's creation on; ``io`` lets a test cut the power
    (:class:`FaultyIO`). Raises OSError when the folder cannot be written.
    """
    io = io or FileIO()
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path, mode=mode, io=io, keep_existing=keep_existing) as tmp:
        io.write_file(tmp, raw, mode=mode)


@contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None, io: FileIO | None = None,
                keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary name in ``path``'s folder for the caller to fill (for writers that want a
    file name: tarfile, torch.save, ONNX Runtime's adapter export); on a clean exit the file is given
    ``mode``, fsynced, renamed over ``path`` and the folder fsynced, so readers and a power cut see the
    old file or the whole new one. With ``keep_existing`` an existing ``path`` wins and the new file is
    dropped (of two processes creating a key at once, both end up using one). On an error the temporary
    file is removed and the error raised. Secrets: use :func:`write_atomic`, which creates the file with
    ``mode`` instead of setting it at the end.
    """
    io = io or FileIO()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)  # exactly ``mode``, past the umask
        io.fsync_file(tmp)
        if keep_existing:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            io.unlink(tmp)
        else:
            io.replace(tmp, path)
    except PowerCut:
        raise  # a simulated power cut leaves what a real one would
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    io.fsync_dir(path.parent)


class PowerCut(Exception):
    """Raised by :class:`FaultyIO` at the chosen operation; never raised in production."""


class FaultyIO(FileIO):
    """A test double: performs real operations until the ``cut_at``-th one, then "loses power".

    At the cut, every file written since its last fsync is truncated to half its length
    (unsynced data is not on disk), every directory change (create, rename, unlink) made since
    that directory's last fsync is undone, newest first, and :class:`PowerCut` is raised.
    With ``cut_at=None`` it only counts operations (``self.ops``).
    """

    def __init__(self, cut_at: int | None = None):
        self.cut_at = cut_at
        self.ops: list[str] = []
        self._dirty: set[Path] = set()
        self._journal: list[tuple] = []  # (dir, undo callable) since that dir's last fsync

    def _op(self, what: str) -> None:
        self.ops.append(what)
        if self.cut_at is not None and len(self.ops) >= self.cut_at:
            for p in self._dirty:
                if p.exists():
                    size = p.stat().st_size
                    with open(p, "r+b") as fh:
                        fh.truncate(size // 2)
            self._dirty.clear()
            for _, undo in reversed(self._journal):
                undo()
            self._journal.clear()
            raise PowerCut(f"power cut at operation {len(self.ops)} ({what})")

    def _log(self, path: Path, undo) -> None:
        self._journal.append((Path(path).parent, undo))

    @staticmethod
    def _snapshot(path: Path):
        return Path(path).read_bytes() if Path(path).is_file() else None

    @staticmethod
    def _restore(path: Path, data) -> None:
        path = Path(path)
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)

    def checkpoint(self, what):
        self._op(f"checkpoint {what}")

    def write_file(self, path, data, mode=None):
        self._op(f"write {Path(path).name}")
        if not Path(path).exists():
            self._log(path, lambda p=Path(path): p.unlink(missing_ok=True))
        super().write_file(path, data, mode)
        self._dirty.add(Path(path))

    def copy_file(self, src, dst, chunk=1 << 20):
        self._op(f"copy {Path(dst).name}")
        if not Path(dst).exists():
            self._log(dst, lambda p=Path(dst): p.unlink(missing_ok=True))
        super().copy_file(src, dst, chunk)
        self._dirty.add(Path(dst))

    def fsync_file(self, path):
        self._op(f"fsync {Path(path).name}")
        super().fsync_file(path)
        self._dirty.discard(Path(path))

    def fsync_dir(self, path):
        self._op(f"fsync-dir {Path(path).name}")
        super().fsync_dir(path)
        self._journal = [(d, u) for d, u in self._journal if d != Path(path)]

    def replace(self, src, dst):
        self._op(f"rename {Path(src).name} -> {Path(dst).name}")
        old_dst = self._snapshot(dst)
        super().replace(src, dst)

        def undo(src=Path(src), dst=Path(dst), old_dst=old_dst):
            if dst.exists():
                os.replace(dst, src)
            self._restore(dst, old_dst)

        self._log(dst, undo)
        if Path(src) in self._dirty:
            self._dirty.discard(Path(src))
            self._dirty.add(Path(dst))

    def unlink(self, path):
        self._op(f"unlink {Path(path).name}")
        old = self._snapshot(path)
        super().unlink(path)
        if old is not None:
            self._log(path, lambda p=Path(path), data=old: self._restore(p, data))

    def mkdir(self, path):
        self._op(f"mkdir {Path(path).name}")
        super().mkdir(path)


CRASH_ENV = "EDGEPEFT_TEST_CRASH_AT"


class CrashIO(FileIO):
    """Test only: real operations, but the process kills itself (SIGKILL, as a crash or an OOM kill
    would) at one named step, so a test can prove what a restart finds at each step of an install.

    ``point`` is ``[after:]TEXT[#N]``: the N-th operation (default 1) whose description contains TEXT
    (a checkpoint name such as ``received`` or ``health check``, or an operation such as
    ``-> state.json`` (a rename onto state.json)); with ``after:`` the operation happens first. Chosen only through
    ``$EDGEPEFT_TEST_CRASH_AT`` (see :func:`io_from_env`); nothing else creates one.
    """

    def __init__(self, point: str):
        self.after = point.startswith("after:")
        text = point[len("after:"):] if self.after else point
        text, _, n = text.partition("#")
        self.text, self.n, self.seen = text, int(n) if n.isdigit() else 1, 0

    def _at(self, what: str, op, *args):
        hit = self.text in what and (self.seen + 1 == self.n)
        if self.text in what:
            self.seen += 1
        if hit and not self.after:
            self._die()
        out = op(*args)
        if hit:
            self._die()
        return out

    @staticmethod
    def _die() -> None:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    def checkpoint(self, what):
        self._at(f"checkpoint {what}", lambda: None)

    def write_file(self, path, data, mode=None):
        self._at(f"write {Path(path).name}", super().write_file, path, data, mode)

    def fsync_file(self, path):
        self._at(f"fsync {Path(path).name}", super().fsync_file, path)

    def fsync_dir(self, path):
        self._at(f"fsync-dir {Path(path).name}", super().fsync_dir, path)

    def replace(self, src, dst):
        self._at(f"rename {Path(src).name} -> {Path(dst).name}", super().replace, src, dst)

    def unlink(self, path):
        self._at(f"unlink {Path(path).name}", super().unlink, path)


def io_from_env() -> FileIO:
    """The device's file layer: :class:`FileIO`, or a :class:`CrashIO` when the test-only variable
    ``$EDGEPEFT_TEST_CRASH_AT`` names a step (the agent says so loudly at start)."""
    point = os.environ.get(CRASH_ENV, "").strip()
    return CrashIO(point) if point else FileIO()


def quarantine(io: FileIO, path: Path) -> Path:
    """Move an unreadable or tampered state file aside (never deleted: it is evidence) and return
    where it went: ``<name>.bad-<UTC time>`` beside it."""
    import time

    dst = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 1
    while dst.exists():
        dst, n = dst.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{n}"), n + 1
    io.replace(path, dst)
    io.fsync_dir(path.parent)
    return dst
