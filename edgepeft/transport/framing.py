"""Frames on a byte stream (a serial line): COBS with a zero delimiter, a type byte, and a CRC-32.

On the wire: ``0x00 COBS(type | body | crc32(type | body)) 0x00``. COBS removes
every zero byte from the frame, so a zero always ends a frame. Every frame also
starts with a zero: whatever came before it on the line (noise, a half frame, a
long run without any zero) is closed off by that zero, so a receiver decodes the
next valid frame whatever preceded it (without it, the first frame after noise
was glued to the noise's last bytes and lost). Empty frames (two zeros in a row)
are skipped. A frame whose CRC fails is dropped (the protocol above
retransmits). Overhead: 1 type byte, 4 CRC bytes, at most 1 COBS byte per 254,
and the two delimiters.

Hand-written because it is twenty lines: the ``cobs`` package on PyPI is a C
extension without wheels for every device.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

MAX_FRAME = 16 << 10  # a decoded frame larger than this is noise
_CRC = struct.Struct(">I")


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: ``data`` without zero bytes (delimiter not included)."""
    out = bytearray()
    start = 0
    n = len(data)
    while True:
        end = data.find(b"\x00", start, min(n, start + 254))
        if end == -1:
            end = min(n, start + 254)
            out.append(end - start + 1)
            out += data[start:end]
            if end == n:
                break
            start = end
            continue
        out.append(end - start + 1)
        out += data[start:end]
        start = end + 1
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`; raises ValueError for input no encoder produced."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0 or i + code > n:
            raise ValueError("bad COBS code")
        out += data[i + 1:i + code]
        i += code
        if code < 255 and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(kind: int, body: bytes = b"") -> bytes:
    """One frame on the wire, both delimiters included (the leading one resynchronizes the receiver)."""
    raw = bytes([kind]) + body
    return b"\x00" + cobs_encode(raw + _CRC.pack(zlib.crc32(raw))) + b"\x00"


class FrameDecoder:
    """Feed it bytes as they arrive; iterate complete, CRC-checked frames as ``(type, body)``.

    Garbage, half-frames and corrupted frames are counted in ``dropped`` and skipped; the
    decoder never raises on input, and its memory stays below ``2 * max_frame`` bytes whatever
    arrives. After a run without any zero longer than that, it skips to the next zero, which
    (every frame starting with one) is the start of the next frame.
    """

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max = max_frame
        self._buf = bytearray()
        self._skipping = False
        self.dropped = 0
        self.frames = 0

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        start = 0
        while True:
            end = data.find(b"\x00", start)
            if end == -1:
                piece = data[start:]
                if self._skipping:
                    return
                self._buf += piece
                if len(self._buf) > 2 * self.max:  # no delimiter for too long: noise
                    self._buf.clear()
                    self._skipping = True
                    self.dropped += 1
                return
            piece = data[start:end]
            start = end + 1
            if self._skipping:
                self._skipping = False
                continue
            self._buf += piece
            raw, self._buf = bytes(self._buf), bytearray()
            if not raw:
                continue
            frame = self._check(raw)
            if frame is None:
                self.dropped += 1
            else:
                self.frames += 1
                yield frame

    def _check(self, raw: bytes):
        try:
            dec = cobs_decode(raw)
        except ValueError:
            return None
        if len(dec) < 5 or len(dec) > self.max + 5:
            return None
        body, crc = dec[:-4], _CRC.unpack(dec[-4:])[0]
        if zlib.crc32(body) != crc:
            return None
        return body[0], body[1:]
