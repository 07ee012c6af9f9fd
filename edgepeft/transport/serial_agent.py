"""The device end of the serial update link (pyserial): frames in, the shared receiver, ACKs out.

Protocol: :mod:`edgepeft.transport.serial_proto`. The port is reopened when it
goes away (a USB-serial adapter unplugged), and partial packages stay with the
receiver, so a sender that comes back resumes from the device's offset.
"""

from __future__ import annotations

import struct
import threading
import time

from ..errors import EdgePeftError, TransportError
from . import serial_proto as sp
from .framing import FrameDecoder, encode_frame

NAK_INTERVAL = 0.5  # seconds before the same gap is reported again


class SerialAgent:
    """Serve one serial port for ``device`` until :meth:`stop`."""

    def __init__(self, device, port: str, baud: int = 115200, *, open_port=None):
        self.device, self.port, self.baud = device, port, int(baud)
        self._open_port = open_port or self._pyserial
        self._stop = threading.Event()
        self._sessions: dict[bytes, dict] = {}
        self.errors = 0  # frames dropped for bad CRC or framing (noise on the line)
        self._ser = None

    def _pyserial(self):
        import serial

        return serial.Serial(self.port, self.baud, timeout=0.05, write_timeout=10)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, name="edgepeft-agent-serial", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._ser = self._open_port()
            except (OSError, ValueError) as exc:  # serial.SerialException is an OSError
                self._wait(1.0, f"cannot open {self.port}: {exc}")
                continue
            try:
                self._serve(self._ser)
            except (OSError, ValueError) as exc:
                self._wait(0.5, f"{self.port} went away: {exc}")
            finally:
                try:
                    self._ser.close()
                except OSError:
                    pass

    def _wait(self, seconds: float, why: str) -> None:
        self.last_problem = why
        self._stop.wait(seconds)

    def _serve(self, ser) -> None:
        dec = FrameDecoder()
        while not self._stop.is_set():
            chunk = ser.read(max(1, getattr(ser, "in_waiting", 0) or 1))
            if not chunk:
                continue
            out = []
            for kind, body in dec.feed(chunk):
                out += self._handle(kind, body)
            self.errors = dec.dropped
            if out:
                ser.write(b"".join(out))

    # -- messages ------------------------------------------------------------------------------
    def _handle(self, kind: int, body: bytes) -> list[bytes]:
        try:
            if kind == sp.DATA:
                return self._data(body)
            if kind == sp.QUERY:
                return [self._query(body)]
            if kind == sp.INFO:
                return [encode_frame(sp.REPLY, sp.reply(sp.INFO, self.device.status()))]
            if kind == sp.ROLLBACK:
                try:
                    answer = self.device.rollback(body.decode("utf-8"), "requested over the serial link")
                except EdgePeftError as exc:
                    answer = {"error": {"message": exc.message, "hint": exc.hint}}
                return [encode_frame(sp.REPLY, sp.reply(sp.ROLLBACK, answer))]
        except (ValueError, UnicodeDecodeError, struct.error):
            pass  # a well-framed but malformed message: ignore it like noise
        return []

    def _query(self, body: bytes) -> bytes:
        raw_id, total = sp.QUERY_BODY.unpack(body)
        id = raw_id.hex()
        try:
            self.device.receiver.check_total(id, total or None)  # a size no upload may take: the session stays
            st = self.device.receiver.status(id)
        except TransportError as exc:
            return encode_frame(sp.REPLY, sp.reply(sp.QUERY, {"error": {"message": exc.message, "hint": exc.hint}}))
        offset = int((st or {}).get("offset") or 0) if (st or {}).get("status", "receiving") == "receiving" else 0
        self._sessions[raw_id[:8]] = {"id": id, "total": total or None, "expected": offset, "nak_at": 0.0,
                                      "state": (st or {}).get("status") or "receiving"}
        return encode_frame(sp.REPLY, sp.reply(sp.QUERY, st or {"id": id, "status": None, "offset": 0}))

    def _data(self, body: bytes) -> list[bytes]:
        if len(body) < sp.DATA_HEAD.size:
            return []
        id8, offset = sp.DATA_HEAD.unpack_from(body)
        s = self._sessions.get(id8)
        if s is None:  # no QUERY yet (the device restarted): make the sender ask
            return [encode_frame(sp.NAK, sp.ack(id8, 0, "receiving"))]
        chunk = body[sp.DATA_HEAD.size:]
        if offset == s["expected"]:
            from .link import Busy, Conflict

            try:
                st = self.device.receiver.write(s["id"], offset, chunk, s["total"])
            except Conflict as exc:
                s["expected"] = exc.offset
                return [encode_frame(sp.NAK, sp.ack(id8, exc.offset, "receiving"))]
            except (Busy, TransportError):
                return [encode_frame(sp.ACK, sp.ack(id8, s["expected"], "rejected"))]
            s["expected"] = int(st.get("offset") or 0)
            s["nak_at"], s["state"] = 0.0, st.get("status") or "receiving"
            return [encode_frame(sp.ACK, sp.ack(id8, s["expected"], s["state"]))]
        if offset > s["expected"]:  # a frame was lost: ask for the gap, once per NAK_INTERVAL
            now = time.monotonic()
            if now - s["nak_at"] > NAK_INTERVAL:
                s["nak_at"] = now
                return [encode_frame(sp.NAK, sp.ack(id8, s["expected"], "receiving"))]
            return []
        return [encode_frame(sp.ACK, sp.ack(id8, s["expected"], s["state"]))]  # a duplicate
