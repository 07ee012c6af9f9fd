"""A serial line without hardware: two pseudo-terminals joined like a null-modem cable at a fixed rate.

Pseudo-terminals are infinitely fast, so a test or benchmark of a serial protocol
on a bare pty pair measures nothing. ``NullModem(115200)`` relays bytes between
two pty pairs at the line's byte rate (8N1: 10 bits on the wire per byte), in
each direction independently, like a UART. It can also unplug the cable (bytes
are lost meanwhile), put noise on the line, or flip bits, so tests can prove
the protocol recovers. Open ``a`` and ``b`` (device paths) with pyserial.

Linux/macOS only (``os.openpty``). Used by the tests, the benchmark and the demo.
"""

from __future__ import annotations

import os
import random
import select
import threading
import time
import tty


class NullModem:
    """Start with ``with NullModem(baud) as line:``; ``line.a`` and ``line.b`` are the two ends."""

    def __init__(self, baud: int, *, bits_per_byte: int = 10, bit_error_rate: float = 0.0, seed: int = 0):
        self.rate = baud / bits_per_byte  # bytes per second on the wire
        self.ber = bit_error_rate
        self._rng = random.Random(seed)
        self._ends = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)  # no echo, no line discipline: a raw byte pipe
            os.set_blocking(master, False)
            self._ends.append((master, slave, os.ttyname(slave)))
        self.a, self.b = self._ends[0][2], self._ends[1][2]
        self._stop = threading.Event()
        self._plugged = threading.Event()
        self._plugged.set()
        self._inject = {0: bytearray(), 1: bytearray()}
        self._lock = threading.Lock()
        self.carried = [0, 0]  # bytes delivered a->b and b->a
        self._threads = [threading.Thread(target=self._relay, args=(i,), daemon=True, name=f"linesim-{i}")
                         for i in (0, 1)]

    def start(self) -> NullModem:
        for t in self._threads:
            t.start()
        return self

    def __enter__(self) -> NullModem:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for master, slave, _ in self._ends:
            for fd in (master, slave):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def unplug(self, seconds: float | None = None) -> None:
        """Pull the cable: bytes sent meanwhile are lost. With ``seconds``, plug it back after that."""
        self._plugged.clear()
        if seconds is not None:
            threading.Timer(seconds, self._plugged.set).start()

    def plug(self) -> None:
        self._plugged.set()

    def noise(self, data: bytes, toward: str = "b") -> None:
        """Put ``data`` on the line toward end ``a`` or ``b`` (garbage, half-frames)."""
        with self._lock:
            self._inject[0 if toward == "b" else 1] += data

    def _relay(self, direction: int) -> None:
        """Move bytes written at one end to the other end, no faster than the line rate."""
        src = self._ends[direction][0]
        dst = self._ends[1 - direction][0]
        free_at = time.monotonic()  # when the line has sent everything it was given
        chunk = max(1, int(self.rate * 0.004))  # about 4 ms of line time per write
        pending, arrived = b"", 0.0
        while not self._stop.is_set():
            if not pending:
                r, _, _ = select.select([src], [], [], 0.02)
                if r:
                    try:
                        pending = os.read(src, 4096)
                    except (BlockingIOError, OSError):
                        pending = b""
                with self._lock:
                    if self._inject[direction]:
                        pending = bytes(self._inject[direction]) + pending
                        self._inject[direction].clear()
                if not pending:
                    continue
                arrived = time.monotonic()
            piece, pending = pending[:chunk], pending[chunk:]
            # the line idles only while nothing is queued: a late wake-up of this thread is caught
            # up, not counted as idle line time
            free_at = max(free_at, arrived) + len(piece) / self.rate
            delay = free_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not self._plugged.is_set():
                continue  # the cable is out: these bytes are lost
            if self.ber:
                piece = self._flip(piece)
            self._write_all(dst, piece)
            self.carried[direction] += len(piece)

    def _flip(self, piece: bytes) -> bytes:
        out = bytearray(piece)
        for i in range(len(out)):
            if self._rng.random() < self.ber * 8:
                out[i] ^= 1 << self._rng.randrange(8)
        return bytes(out)

    def _write_all(self, fd: int, data: bytes) -> None:
        while data and not self._stop.is_set():
            try:
                n = os.write(fd, data)
                data = data[n:]
            except BlockingIOError:
                select.select([], [fd], [], 0.02)
            except OSError:
                return


def main(argv=None) -> int:
    """``python -m edgepeft.transport.linesim BAUD``: print the two ends, relay until SIGTERM or Ctrl-C,
    then print ``carried A_TO_B B_TO_A`` (bytes the line delivered each way)."""
    import signal
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    baud = int(args[0]) if args else 115200
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    with NullModem(baud) as line:
        print(line.a, line.b, flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass
        print(f"carried {line.carried[0]} {line.carried[1]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
