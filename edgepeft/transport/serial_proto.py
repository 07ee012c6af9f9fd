"""The update protocol on a serial line, shared by the sender and the device (see :mod:`.framing`).

Messages (frame type byte, then body; integers big-endian)::

    sender -> device
      'S' QUERY    id (32 bytes) | total u64            status of a package; opens its session
      'D' DATA     id8 (first 8 bytes of id) | offset u32 | bytes    a piece of the package
      'I' INFO     (empty)                              what the device runs (JSON)
      'C' CHALLENGE (empty)                             a fresh nonce for one command: {"nonce": hex}
      'R' ROLLBACK nonce (16) | mac (32) | adapter name (UTF-8)    roll an adapter back (JSON answer)
    device -> sender
      'A' ACK      id8 | offset u32 | state u8          all bytes below offset are held (cumulative)
      'N' NAK      id8 | offset u32 | state u8          a gap: send again from offset
      'J' JSON     request type u8 | UTF-8 JSON         the answer to S, I, C or R

Flow: the sender streams DATA frames without waiting while at most ``window`` bytes are
unacknowledged, so the line never idles for a turnaround; the device acknowledges every
frame. A corrupted frame is dropped by its CRC; the next one arrives out of order and the
device answers NAK with the offset it needs, once per gap. When acknowledgements stop
(a lost last frame, an unplugged cable), the sender goes back to the last acknowledged
offset. After a disconnect the sender asks with QUERY and resumes where the device is.

Who may do what: uploads (QUERY, DATA) carry signed packages, verified by the device
like any other link's, so they need no credential; INFO only reads. A command that
changes what serves without a signed package (ROLLBACK) needs the device token,
the same one the HTTP API takes (``STATE/token``, or the agent's ``--token-file``):
the host asks for a challenge and sends ``HMAC-SHA256(token, ROLLBACK_CONTEXT |
nonce | name)``, so the token itself never crosses the line, a captured request
cannot be replayed (each nonce is good for one command, and only the last
``MAX_NONCES`` for ``NONCE_SECONDS``) nor pointed at another adapter. A resend of
the same request (its answer was lost) gets the same answer and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

QUERY, DATA, INFO, ROLLBACK, CHALLENGE = ord("S"), ord("D"), ord("I"), ord("R"), ord("C")
ACK, NAK, REPLY = ord("A"), ord("N"), ord("J")
STATE = {"receiving": 0, "received": 1, "verified": 2, "installed": 3, "healthy": 4, "rejected": 5,
         "rolled-back": 6}
STATE_NAMES = {v: k for k, v in STATE.items()}
QUERY_BODY = struct.Struct(">32sQ")
DATA_HEAD = struct.Struct(">8sI")
ACK_BODY = struct.Struct(">8sIB")
MAX_REPLY = 12 << 10
NONCE_BYTES, MAC_BYTES = 16, 32
MAX_NONCES = 4  # challenges a device remembers at once (older ones are forgotten)
NONCE_SECONDS = 120.0
ROLLBACK_CONTEXT = b"edgepeft serial rollback v1\x00"


def query(id_hex: str, total: int) -> bytes:
    return QUERY_BODY.pack(bytes.fromhex(id_hex), total)


def data(id8: bytes, offset: int, chunk: bytes) -> bytes:
    return DATA_HEAD.pack(id8, offset) + chunk


def ack(id8: bytes, offset: int, state: str) -> bytes:
    return ACK_BODY.pack(id8, offset, STATE.get(state, 0))


def rollback_mac(token: str, nonce: bytes, name: bytes) -> bytes:
    """The proof that the sender of a ROLLBACK for ``name`` holds the device token."""
    return hmac.new(token.encode("utf-8"), ROLLBACK_CONTEXT + nonce + name, hashlib.sha256).digest()


def rollback_request(nonce: bytes, name: str, token: str) -> bytes:
    """A ROLLBACK body: the device's nonce, the MAC made with the token, the adapter name."""
    raw = name.encode("utf-8")
    return nonce + rollback_mac(token, nonce, raw) + raw


def parse_rollback(body: bytes) -> tuple[bytes, bytes, bytes]:
    """(nonce, mac, name bytes) of a ROLLBACK body; raises ValueError when it cannot be one."""
    head = NONCE_BYTES + MAC_BYTES
    if len(body) <= head:
        raise ValueError("a ROLLBACK carries a nonce, a MAC and a name")
    return body[:NONCE_BYTES], body[NONCE_BYTES:head], body[head:]


def reply(kind: int, obj) -> bytes:
    """A JSON answer, trimmed to fit a frame (long histories lose their oldest entries)."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    while len(body) > MAX_REPLY and isinstance(obj, dict) and obj.get("recent"):
        obj = dict(obj, recent=obj["recent"][1:])
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_REPLY:
        body = json.dumps({"error": "answer too large for a serial frame"}).encode()
    return bytes([kind]) + body
