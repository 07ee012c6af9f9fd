"""Ed25519 keys and manifest signing (server side; the device only verifies, in ``spec.verify``)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from ..errors import SignatureError, UsageError
from ..fsio import write_atomic
from .manifest import canonical_bytes
from .verify import key_id


def generate_keypair(stem: str | os.PathLike, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``STEM.key`` (PKCS#8 PEM, mode 0600) and ``STEM.pub`` (SubjectPublicKeyInfo PEM).

    Refuses to overwrite an existing key unless ``force``: losing a signing key
    strands every device that trusts it. Raises :class:`UsageError`.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stem = Path(stem)
    if stem.suffix in (".key", ".pub"):
        stem = stem.with_suffix("")
    priv_path, pub_path = stem.with_suffix(".key"), stem.with_suffix(".pub")
    if not force and (priv_path.exists() or pub_path.exists()):
        raise UsageError(f"{priv_path} or {pub_path} already exists",
                         hint="choose another name, or pass --force to replace the key (devices trusting it will refuse new bundles)")
    stem.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomic(priv_path, priv, mode=0o600)
    write_atomic(pub_path, pub, mode=0o644)
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike):
    """Load an Ed25519 private key from PEM; raises :class:`SignatureError` naming the fix."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    if not p.is_file():
        raise SignatureError(f"signing key {p} does not exist", hint="create one with `edgepeft keygen --out KEYNAME`")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{p} is not an unencrypted PEM private key",
                             hint="pass the .key file written by `edgepeft keygen` (not the .pub)") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{p} is not an Ed25519 key", hint="create one with `edgepeft keygen`")
    return key


def sign_manifest(data: dict, private_key) -> dict:
    """Return ``data`` with a ``signature`` over its canonical bytes (the input is not modified)."""
    signed = {k: v for k, v in data.items() if k != "signature"}
    value = private_key.sign(canonical_bytes(signed))
    signed["signature"] = {"algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
                           "value": base64.b64encode(value).decode("ascii")}
    return signed


def sign_bytes(message: bytes, private_key) -> dict:
    """An Ed25519 signature of ``message`` exactly as given, in the form update packages carry."""
    return {"algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
            "value": base64.b64encode(private_key.sign(message)).decode("ascii")}
