"""The device end of the serial update link (pyserial): frames in, the shared receiver, ACKs out.

Protocol: :mod:`edgepeft.transport.serial_proto`. The port is reopened when it
goes away (a USB-serial adapter unplugged), and partial packages stay with the
receiver, so a sender that comes back resumes from the device's offset.

Anyone on the line is a stranger: the state kept per sender is bounded (the
last ``MAX_SESSIONS`` upload sessions, the last ``MAX_NONCES`` challenges), a
ROLLBACK needs the device token (see :mod:`.serial_proto`), and no input, nor
any error of the device behind it, stops the listener.

Reading never waits on writing: answers go through a bounded queue to a writer
thread, so a host that floods the line without reading its answers (a pseudo-terminal
or a USB CDC link pushes back where a UART drops bytes) cannot stall the reader; the
answers that do not fit are dropped and counted (``unsent`` in the link's status).
"""

from __future__ import annotations

import hmac
import queue
import secrets
import struct
import sys
import threading
import time
from collections import OrderedDict

from ..errors import EdgePeftError, TransportError
from . import serial_proto as sp
from .framing import FrameDecoder, encode_frame

NAK_INTERVAL = 0.5  # seconds before the same gap is reported again
MAX_SESSIONS = 8  # upload sessions kept (least recently used go first; a sender that lost its own asks again)
MAX_PENDING = 64  # answer frames queued for a host that reads them slowly; more are dropped (it asks again)


class SerialAgent:
    """Serve one serial port for ``device`` until :meth:`stop`."""

    def __init__(self, device, port: str, baud: int = 115200, *, token: str | None = None, open_port=None,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True)):
        """``token``: the device token a ROLLBACK must prove (None: no rollback over this line)."""
        self.device, self.port, self.baud = device, port, int(baud)
        self.token, self.log = token, log
        self._open_port = open_port or self._pyserial
        self._stop = threading.Event()
        self._sessions: OrderedDict[bytes, dict] = OrderedDict()
        self._nonces: OrderedDict[bytes, dict] = OrderedDict()
        self.errors = 0  # frames dropped for bad CRC or framing (noise on the line)
        self.failures = 0  # messages whose handling failed inside the device (logged, never fatal)
        self.unsent = 0  # answer frames dropped: the host was not reading them
        self.last_problem = None
        self._ser = None

    def describe(self) -> dict:
        """This link's own state, for the device's status (INFO, GET /v1/device)."""
        return {"port": self.port, "sessions": len(self._sessions), "max_sessions": MAX_SESSIONS,
                "dropped_frames": self.errors, "failures": self.failures, "unsent_answers": self.unsent,
                "problem": self.last_problem}

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
            except Exception as exc:  # a bug must not end the listener: report it and serve on
                self.log(f"serial {self.port}: {type(exc).__name__}: {exc}")
                self._wait(0.5, f"{self.port}: {type(exc).__name__}: {exc}")
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
        answers: queue.Queue = queue.Queue(MAX_PENDING)
        done = threading.Event()
        writer = threading.Thread(target=self._write_answers, args=(ser, answers, done), daemon=True,
                                  name=f"serial-writer {self.port}")
        writer.start()
        try:
            while not self._stop.is_set() and writer.is_alive():
                chunk = ser.read(max(1, getattr(ser, "in_waiting", 0) or 1))
                if not chunk:
                    continue
                for kind, body in dec.feed(chunk):
                    for frame in self.handle(kind, body):
                        try:
                            answers.put_nowait(frame)
                        except queue.Full:
                            self.unsent += 1
                self.errors = dec.dropped
            if not self._stop.is_set():
                raise OSError(self.last_problem or "the serial writer stopped")
        finally:
            done.set()
            writer.join(0.5)  # a write blocked on a host that does not read ends when the port closes

    def _write_answers(self, ser, answers: queue.Queue, done: threading.Event) -> None:
        """Write queued answer frames until ``done``. A write that times out (the host stopped reading)
        drops that frame; any other error ends the writer, and with it this turn of :meth:`_serve`."""
        import serial

        while not done.is_set():
            try:
                frame = answers.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                ser.write(frame)
            except serial.SerialTimeoutException:
                self.unsent += 1
            except (OSError, ValueError) as exc:
                self.last_problem = f"{self.port}: writing failed: {exc}"
                return

    # -- messages ------------------------------------------------------------------------------
    def handle(self, kind: int, body: bytes) -> list[bytes]:
        """The answer frames to one message. Never raises: a malformed message is ignored like
        noise, and a failure inside the device is counted and logged."""
        try:
            if kind == sp.DATA:
                return self._data(body)
            if kind == sp.QUERY:
                return [self._query(body)]
            if kind == sp.INFO:
                return [encode_frame(sp.REPLY, sp.reply(sp.INFO, self.device.status()))]
            if kind == sp.CHALLENGE:
                return [encode_frame(sp.REPLY, sp.reply(sp.CHALLENGE, self._challenge()))]
            if kind == sp.ROLLBACK:
                return [encode_frame(sp.REPLY, sp.reply(sp.ROLLBACK, self._rollback(body)))]
        except (ValueError, UnicodeDecodeError, struct.error):
            pass  # a well-framed but malformed message: ignore it like noise
        except Exception as exc:  # the device failed on it: the line stays up
            self.failures += 1
            self.log(f"serial {self.port}: message {kind:#04x} failed: {type(exc).__name__}: {exc}")
        return []

    def _challenge(self) -> dict:
        nonce = secrets.token_bytes(sp.NONCE_BYTES)
        self._nonces[nonce] = {"at": time.monotonic(), "body": None, "answer": None}
        while len(self._nonces) > sp.MAX_NONCES:
            self._nonces.popitem(last=False)
        return {"nonce": nonce.hex(), "seconds": sp.NONCE_SECONDS}

    def _rollback(self, body: bytes) -> dict:
        """Roll back only for a sender that proves the device token over a fresh nonce."""
        hint = "`edgepeft adapters rollback NAME --device serial://PORT --token-file FILE` (the device's token)"
        if self.token is None:
            return _refusal("rollback is not available over this serial line (the agent has no token)", hint)
        try:
            nonce, mac, raw = sp.parse_rollback(body)
        except ValueError:
            return _refusal("a rollback over the serial link needs the device token (a MAC over a challenge)", hint)
        entry = self._nonces.get(nonce)
        if entry is None or time.monotonic() - entry["at"] > sp.NONCE_SECONDS:
            self._nonces.pop(nonce, None)
            return _refusal("the rollback's challenge is unknown, used or expired", "ask for a new challenge")
        if entry["answer"] is not None:  # the same request again (its answer was lost): answer it again
            return entry["answer"] if hmac.compare_digest(entry["body"], body) else \
                _refusal("the rollback's challenge is unknown, used or expired", "ask for a new challenge")
        if not hmac.compare_digest(mac, sp.rollback_mac(self.token, nonce, raw)):
            del self._nonces[nonce]
            return _refusal("the rollback request is not signed with this device's token", hint)
        try:
            answer = self.device.rollback(raw.decode("utf-8"), "requested over the serial link")
        except EdgePeftError as exc:
            answer = {"error": {"message": exc.message, "hint": exc.hint}}
        entry["body"], entry["answer"] = body, answer
        return answer

    def _query(self, body: bytes) -> bytes:
        raw_id, total = sp.QUERY_BODY.unpack(body)
        id = raw_id.hex()
        try:
            self.device.receiver.check_total(id, total or None)  # a size no upload may take: the session stays
            st = self.device.receiver.status(id)
        except TransportError as exc:
            return encode_frame(sp.REPLY, sp.reply(sp.QUERY, {"error": {"message": exc.message, "hint": exc.hint}}))
        offset = int((st or {}).get("offset") or 0) if (st or {}).get("status", "receiving") == "receiving" else 0
        self._sessions.pop(raw_id[:8], None)
        self._sessions[raw_id[:8]] = {"id": id, "total": total or None, "expected": offset, "nak_at": 0.0,
                                      "state": (st or {}).get("status") or "receiving"}
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return encode_frame(sp.REPLY, sp.reply(sp.QUERY, st or {"id": id, "status": None, "offset": 0}))

    def _data(self, body: bytes) -> list[bytes]:
        if len(body) < sp.DATA_HEAD.size:
            return []
        id8, offset = sp.DATA_HEAD.unpack_from(body)
        s = self._sessions.get(id8)
        if s is None:  # no QUERY yet, or forgotten (the device restarted, or many senders): make the sender ask
            return [encode_frame(sp.NAK, sp.ack(id8, 0, "receiving"))]
        self._sessions.move_to_end(id8)
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


def _refusal(message: str, hint: str) -> dict:
    return {"error": {"message": message, "hint": hint}}
