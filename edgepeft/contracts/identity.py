"""A device's own identity: an Ed25519 key pair created on its first start, in its state folder.

Why: a broker relays whatever anyone who can publish to it sends, so a controller must not take a
device's word from the broker unless the device itself signed it. The private key never leaves the
state folder; its public key is enrolled in the fleet inventory (``public_key = "ed25519:<base64>"``),
and a controller counts a device only on reports signed with it (:mod:`.report`).

Files in the state folder: ``identity.key`` (PKCS#8 PEM, mode 0600, created whole and linked into
place, never replaced), ``identity.pub`` (the same key as ``ed25519:<base64>``, for people and
scripts), ``identity.seq`` (report sequence numbers reserved so far, so they keep growing across
restarts).
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
from pathlib import Path

from ..errors import SignatureError
from ..fsio import FileIO, write_atomic

IDENTITY_KEY = "identity.key"
IDENTITY_PUB = "identity.pub"
IDENTITY_SEQ = "identity.seq"
PREFIX = "ed25519:"
SEQ_BLOCK = 1000  # sequence numbers reserved per write of identity.seq


def public_key_text(public_key) -> str:
    """``ed25519:<base64 of the 32 raw bytes>``: the one-line form the inventory enrolls."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PREFIX + base64.b64encode(raw).decode("ascii")


def load_public_key_text(text: str, source: str = "public key"):
    """An Ed25519 public key from ``ed25519:<base64>`` or PEM text. Raises :class:`SignatureError`."""
    from .verify import load_public_key

    if not isinstance(text, str):
        raise SignatureError(f"{source} is not text", hint='enroll it as public_key = "ed25519:<base64>"')
    text = text.strip()
    if text.startswith(PREFIX):
        try:
            raw = base64.b64decode(text[len(PREFIX):], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SignatureError(f"{source} is not valid base64", hint="copy it again from `edgepeft identity`") \
                from exc
        if len(raw) != 32:
            raise SignatureError(f"{source} holds {len(raw)} bytes, not the 32 of an Ed25519 key",
                                 hint="copy it again from `edgepeft identity`")
        return load_public_key(raw)
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        return load_public_key(text.encode("ascii", "replace"))
    raise SignatureError(f"{source} is neither ed25519:<base64> nor a PEM public key",
                         hint="`edgepeft identity --state STATE` prints it on the device")


class DeviceIdentity:
    """The device's signing key and its report sequence. Build with :meth:`load_or_create`."""

    def __init__(self, private_key, state_dir: str | os.PathLike, io: FileIO | None = None):
        from .verify import key_id

        self.private_key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)
        self.text = public_key_text(self.public_key)
        self.notes: list[str] = []
        self._seq_path = Path(state_dir) / IDENTITY_SEQ
        self._io = io or FileIO()
        self._lock = threading.Lock()
        self._next = max(self._stored_seq(), int(time.time() * 1000)) + 1
        self._reserved = self._next - 1

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike) -> DeviceIdentity:
        """The identity in ``state_dir``, created on first use. An unreadable key file is moved aside
        (``identity.key.unreadable``) and a new identity made, which must be enrolled again (a note says
        so): the device keeps working, and a controller refuses its reports until then. Raises OSError
        when the state folder cannot be written."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        state = Path(state_dir)
        path = state / IDENTITY_KEY
        notes = []
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
                if not isinstance(key, Ed25519PrivateKey):
                    raise ValueError("not an Ed25519 key")
            except (OSError, ValueError, TypeError) as exc:
                os.replace(path, path.with_name(IDENTITY_KEY + ".unreadable"))
                notes.append(f"the device identity {path} was unreadable ({exc}); a new one was created: "
                             "enroll its public key again (edgepeft identity)")
        if not path.exists():
            fresh = Ed25519PrivateKey.generate()
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, fresh.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), mode=0o600, keep_existing=True)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)  # whoever created it won
        ident = cls(key, state)
        ident.notes = notes
        pub = state / IDENTITY_PUB
        try:
            current = pub.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            current = None
        if current != ident.text:
            try:
                write_atomic(pub, (ident.text + "\n").encode("ascii"), io=ident._io)
            except OSError as exc:  # a convenience copy: the key itself is in place
                ident.notes.append(f"{pub} not written: {exc}")
        return ident

    def sign(self, message: bytes) -> dict:
        """A signature of ``message`` in the ``{"algorithm", "key_id", "value"}`` form."""
        from .signing import sign_bytes

        return sign_bytes(message, self.private_key)

    def next_seq(self) -> int:
        """A number larger than every one this device handed out before, restarts included."""
        with self._lock:
            n = self._next
            self._next += 1
            if n > self._reserved:
                self._reserved = n + SEQ_BLOCK - 1
                try:
                    write_atomic(self._seq_path, str(self._reserved).encode("ascii"), io=self._io)
                except OSError:
                    pass  # the clock still moves the next start past these numbers
            return n

    def _stored_seq(self) -> int:
        try:
            value = int(self._seq_path.read_text(encoding="ascii").strip())
        except (OSError, ValueError, UnicodeDecodeError):
            return 0
        return value if value > 0 else 0


def read_identity(state_dir: str | os.PathLike) -> dict | None:
    """``{"public_key", "key_id"}`` of the identity in ``state_dir`` without creating one (None if absent)."""
    from .verify import key_id

    try:
        text = (Path(state_dir) / IDENTITY_PUB).read_text(encoding="utf-8").strip()
        return {"public_key": text, "key_id": key_id(load_public_key_text(text))}
    except (OSError, UnicodeDecodeError, SignatureError):
        return None
