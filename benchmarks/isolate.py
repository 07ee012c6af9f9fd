"""Run a benchmark system in its own long-lived process, so that a peer that crashes or hangs costs only itself.

A peer is native code the benchmark does not control: llama.cpp built with AMX
kernels died with SIGSEGV while loading SmolLM2 and took every other figure of
the run with it (issue 17). So each peer lives in a :class:`Worker` for the whole
run: it is opened there and probed once (a few tokens) under a timeout, then
gets one call per repetition, so repetitions stay interleaved across systems.
A signal, an unexpected exit or a hang, at any point, becomes
:class:`PeerFailed` (a :class:`Skip` naming what happened); the run goes on.

Timing stays honest: every timed call measures itself inside the worker
(``time.perf_counter`` around the work) and returns the numbers; pickling and
the pipe lie outside every timed span. The parent only waits.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from pathlib import Path

from .harness import Skip


class PeerFailed(Skip):
    """A worker died or stopped answering. ``kind`` is "crashed", "exited" or "hung"; ``phase`` what it was doing."""

    def __init__(self, label: str, kind: str, phase: str, detail: str, log: Path | None = None) -> None:
        self.label, self.kind, self.phase, self.detail = label, kind, phase, detail
        where = f"; its stderr: {_shown(log)}" if log else ""
        super().__init__(f"{kind} while {phase}: {detail}{where}")


def exit_text(code: int | None) -> str:
    """How a process ended, in words: 'killed by SIGSEGV (signal 11)' or 'exited with status 3'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (signal {-code})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _serve(conn, factory: Callable[..., object], kwargs: dict, log_path: str) -> None:
    """The worker's main loop: build the system, then answer (method, args) calls until told to stop."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)  # native libraries write to fd 2; keep it for the parent's failure report
    os.close(fd)
    faulthandler.enable()  # a fatal signal leaves the Python stack in that log
    try:
        obj = factory(**kwargs)
    except BaseException as exc:  # report any failure to open, then exit
        conn.send(("error", isinstance(exc, Skip), f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        method, args = msg
        try:
            result = getattr(obj, method)(*args)
        except Exception as exc:  # the call failed but the process is fine: say so and keep serving
            conn.send(("error", isinstance(exc, Skip), f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("ok", result))


class Worker:
    """One system living in its own process for the whole run.

    ``factory(**kwargs)`` runs in the worker (it must be importable by name:
    a top-level function of a module); ``probe`` = (method, args) is called
    once right after, as the open check. Both together must answer within
    ``open_timeout`` seconds, every later call within ``call_timeout``.
    Raises :class:`PeerFailed` when the worker dies or hangs (it is then
    stopped and every later call raises the same), :class:`Skip` when the
    system itself reports it cannot run, RuntimeError when a call raised.
    """

    def __init__(self, label: str, factory: Callable[..., object], kwargs: dict | None = None, *,
                 probe: tuple[str, tuple] | None = None, open_timeout: float = 300.0,
                 call_timeout: float = 900.0, log_dir: Path) -> None:
        self.label, self.call_timeout = label, call_timeout
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / (_file_name(label) + ".stderr.log")
        self.failed: PeerFailed | None = None
        spawn = mp.get_context("spawn")  # a fresh interpreter: nothing inherited from the parent's libraries
        self._conn, child = spawn.Pipe()
        self._proc = spawn.Process(target=_serve, args=(child, factory, kwargs or {}, str(self.log)),
                                   name=f"bench worker: {label}", daemon=True)
        self._proc.start()
        child.close()
        try:
            self._answer("opening", open_timeout)
            if probe is not None:
                self.call(probe[0], *probe[1], timeout=open_timeout, phase=f"probing ({probe[0]} once)")
        except BaseException:
            self.close()
            raise

    def call(self, method: str, *args, timeout: float | None = None, phase: str | None = None):
        """``method(*args)`` on the system in the worker; its return value (pickled back)."""
        if self.failed is not None:
            raise self.failed
        try:
            self._conn.send((method, args))
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; _answer reports how it ended
        return self._answer(phase or f"running {method}", self.call_timeout if timeout is None else timeout)

    def _answer(self, phase: str, timeout: float):
        if not self._conn.poll(timeout):  # poll also returns at end-of-file, i.e. when the worker died
            self._stop()
            raise self._fail("hung", phase, f"no answer within {timeout:g} s; stopped it")
        try:
            status, *rest = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(10)
            code = self._proc.exitcode
            raise self._fail("crashed" if code is None or code < 0 else "exited", phase, exit_text(code)) from None
        if status == "ok":
            return rest[0]
        is_skip, text = rest
        if phase == "opening":  # the factory failed: the worker has exited, nothing more to ask it
            self._proc.join(10)
        raise (Skip(text) if is_skip else RuntimeError(f"{self.label}: {text}"))

    def _fail(self, kind: str, phase: str, detail: str) -> PeerFailed:
        tail = _tail(self.log)
        self.failed = PeerFailed(self.label, kind, phase, detail + (f"; last stderr: {tail}" if tail else ""),
                                 self.log)
        return self.failed

    def _stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def close(self) -> None:
        """Ask the worker to exit; stop it if it does not within a few seconds. Idempotent."""
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(5)
        self._stop()
        self._conn.close()


def _file_name(label: str) -> str:
    """A file name from a system label ('llama.cpp Q4_1' -> 'llama.cpp_Q4_1')."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter in the table)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _tail(path: Path, limit: int = 240) -> str:
    """The last lines of a worker's stderr before any Python stack dump, squeezed onto one line."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = []
    for line in text.splitlines():
        if line.startswith(("Fatal Python error", "Current thread", "Thread 0x", "Stack (most recent")):
            break  # faulthandler's dump follows; the signal is already named
        if line.strip():
            lines.append(line.strip())
    return " | ".join(lines)[-limit:]
