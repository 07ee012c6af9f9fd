"""The sender end of the serial update link (pyserial): windowed DATA frames, ACK/NAK, go-back on loss.

Protocol and flow: :mod:`.serial_proto`. ``SerialLink(port, baud)`` implements the
link interface of :mod:`.link`, so ``edgepeft push --to serial:///dev/ttyUSB0?baud=115200``
resumes, waits and reports exactly like an HTTP push. Pushing needs no credential
(the device verifies every package's signature); a rollback needs the device token
(``token``), proven over a fresh challenge without sending it (see :mod:`.serial_proto`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..contracts.jsontext import loads_untrusted
from ..errors import TransportError, UsageError
from . import serial_proto as sp
from .framing import FrameDecoder, encode_frame
from .link import Conflict, LinkDown


class SerialLink:
    """A serial port to one device. ``frame``: payload bytes per DATA frame; ``window``: bytes
    in flight before an acknowledgement is needed. Raises :class:`LinkDown` when the device
    stops answering (the push resumes), :class:`TransportError` when the port cannot be opened."""

    def __init__(self, port: str, baud: int = 115200, *, frame: int = 1024, window: int = 16 << 10,
                 reply_timeout: float = 2.0, serial_factory=None, token: str | None = None):
        self.port, self.baud, self.frame, self.window = port, int(baud), int(frame), int(window)
        self.reply_timeout, self.token = reply_timeout, token
        try:
            if serial_factory is not None:
                self.ser = serial_factory()
            else:
                import serial

                self.ser = serial.Serial(port, self.baud, timeout=0.01, write_timeout=30)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot open serial port {port}: {exc}",
                                 hint="check the port name and that no other program holds it") from exc
        self.dec = FrameDecoder()
        self._pending: list[tuple[int, bytes]] = []

    # seconds a full window takes on this line, the base of every timeout
    @property
    def _window_time(self) -> float:
        return (self.window + 8192) * 10 / self.baud

    def _frames(self, wait: float) -> list[tuple[int, bytes]]:
        """Frames that arrived within ``wait`` seconds (at least one read)."""
        out, self._pending = self._pending, []
        deadline = time.monotonic() + wait
        while True:
            try:
                data = self.ser.read(max(1, self.ser.in_waiting))
            except OSError as exc:
                raise LinkDown(f"{self.port}: {exc}") from exc
            out += list(self.dec.feed(data))
            if out or time.monotonic() >= deadline:
                return out

    def _write(self, data: bytes) -> None:
        try:
            self.ser.write(data)
        except OSError as exc:  # includes serial's write timeout: nothing drains the line
            raise LinkDown(f"{self.port}: {exc}") from exc

    def _ask(self, kind: int, body: bytes, tries: int = 4) -> dict:
        """Send a request and return its JSON answer; resend after a silence; LinkDown after ``tries``."""
        for _ in range(tries):
            self._write(encode_frame(kind, body))
            deadline = time.monotonic() + self.reply_timeout + self._window_time
            while time.monotonic() < deadline:
                for k, b in self._frames(0.05):
                    if k == sp.REPLY and b and b[0] == kind:
                        try:
                            answer = loads_untrusted(b[1:].decode("utf-8"))
                        except ValueError:  # also too deep a nesting
                            continue
                        if isinstance(answer, dict):
                            return answer
        raise LinkDown(f"no answer from the device on {self.port}")

    def status(self, id: str) -> dict | None:
        st = self._ask(sp.QUERY, sp.query(id, 0))
        if isinstance(st.get("error"), dict):
            raise TransportError(f"the device refused the query: {st['error'].get('message')}")
        return None if st.get("status") is None else st

    def send(self, id: str, data: bytes, offset: int, progress: Callable[[int], None]) -> dict:
        total = len(data)
        st = self._ask(sp.QUERY, sp.query(id, total))
        if isinstance(st.get("error"), dict):
            raise TransportError(f"the device refused the upload: {st['error'].get('message')}",
                                 hint=st["error"].get("hint"))
        if st.get("status") == "rejected" and st.get("retryable"):
            st = {"status": None, "offset": 0}  # refused for damage, or garbage sent under this id: send it whole
        held = int(st.get("offset") or 0) if st.get("status") in (None, "receiving") else total
        if st.get("status") not in (None, "receiving"):
            return st
        if held != offset:
            raise Conflict(held)
        id8 = bytes.fromhex(id)[:8]
        acked = sent = offset
        last_progress = time.monotonic()
        ignore_nak = (None, 0.0)  # (offset, until): NAKs provoked by frames sent before a rewind
        silences = 0
        state = "receiving"
        while acked < total and state == "receiving":
            while sent < total and sent - acked < self.window:
                chunk = data[sent:sent + self.frame]
                self._write(encode_frame(sp.DATA, sp.data(id8, sent, chunk)))
                sent += len(chunk)
            for kind, body in self._frames(0.02):
                if kind not in (sp.ACK, sp.NAK) or len(body) != sp.ACK_BODY.size:
                    if kind == sp.REPLY:
                        self._pending.append((kind, body))
                    continue
                rid, off, code = sp.ACK_BODY.unpack(body)
                if rid != id8:
                    continue
                state = sp.STATE_NAMES.get(code, "receiving")
                if off > acked:
                    acked, last_progress, silences = off, time.monotonic(), 0
                    progress(acked)
                if kind == sp.NAK:
                    if off < acked:
                        raise Conflict(off)  # the device restarted and lost this session: ask where it is
                    now = time.monotonic()
                    if not (off == ignore_nak[0] and now < ignore_nak[1]):
                        sent = off
                        ignore_nak = (off, now + (self.window + 4096) * 10 / self.baud + 0.3)
                if state != "receiving":
                    break
            if time.monotonic() - last_progress > self._window_time + 1.0:
                silences += 1
                if silences > 3:
                    raise LinkDown(f"the device stopped acknowledging on {self.port}")
                sent, last_progress = acked, time.monotonic()  # go back to what the device holds
        return self._ask(sp.QUERY, sp.query(id, total))

    def device(self) -> dict:
        return self._ask(sp.INFO, b"")

    def rollback(self, name: str) -> dict:
        """Roll adapter ``name`` back, proving the device token over a fresh challenge.
        Raises :class:`UsageError` without a token, :class:`TransportError` when the device refuses."""
        if not self.token:
            raise UsageError("a rollback over a serial line needs the device's token",
                             hint="pass --token-file FILE (the device's STATE/token) or --token T")
        challenge = self._ask(sp.CHALLENGE, b"")
        try:
            nonce = bytes.fromhex(str(challenge.get("nonce")))
        except ValueError:
            nonce = b""
        if len(nonce) != sp.NONCE_BYTES:
            raise TransportError(f"the device on {self.port} did not give a usable challenge",
                                 hint="upgrade edgepeft on the device: its serial rollback predates challenges")
        answer = self._ask(sp.ROLLBACK, sp.rollback_request(nonce, name, self.token))
        if isinstance(answer.get("error"), dict):
            raise TransportError(answer["error"].get("message", "rollback refused"), hint=answer["error"].get("hint"))
        return answer

    def adapter_action(self, name: str, action: str) -> dict:
        """What `edgepeft adapters` asks a link for; over serial only ``rollback``."""
        if action != "rollback":
            raise UsageError(f"{action} is not available over a serial line", hint="use --device http://HOST:PORT")
        return self.rollback(name)

    def close(self) -> None:
        try:
            self.ser.close()
        except OSError:
            pass
