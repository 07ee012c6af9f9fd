"""Device-side trust: Ed25519 signature over the canonical manifest, then size + SHA-256 of every file.

Lives in ``spec`` (not in the server's ``bundle`` package) so a device can
verify without any server code. Keys are PEM files (``edgepeft keygen`` writes
``NAME.key`` and ``NAME.pub``); a key id is the first 16 hex digits of the
SHA-256 of the raw public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Iterable, Union

from ..errors import IntegrityError, SignatureError
from .manifest import MANIFEST_NAME, Manifest, canonical_bytes, read_manifest_dict

KeyLike = Union[str, os.PathLike, bytes, "Ed25519PublicKey"]  # noqa: F821


def load_public_key(key: KeyLike):
    """An Ed25519 public key from a PEM file path, PEM bytes or raw 32 bytes.

    Raises :class:`SignatureError` if it is not an Ed25519 public key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    source = "public key"
    if isinstance(key, (str, os.PathLike)):
        source = str(key)
        try:
            key = Path(key).read_bytes()
        except OSError as exc:
            raise SignatureError(f"cannot read trusted key {source}: {exc.strerror or exc}",
                                 hint="pass the .pub file written by `edgepeft keygen`") from exc
    try:
        if len(key) == 32:
            return Ed25519PublicKey.from_public_bytes(key)
        loaded = serialization.load_pem_public_key(key)
    except ValueError as exc:
        raise SignatureError(f"{source} is not a PEM public key",
                             hint="pass the .pub file written by `edgepeft keygen`, not the private .key") from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise SignatureError(f"{source} is not an Ed25519 key", hint="create one with `edgepeft keygen`")
    return loaded


def key_id(public_key) -> str:
    """Short, stable identifier of a public key, recorded in signatures."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def verify_signature(data: dict, trusted_keys: Iterable[KeyLike], source: str = MANIFEST_NAME) -> str:
    """Check ``data['signature']`` against the trusted keys; return the signing key id.

    Raises :class:`SignatureError` when the signature is missing, malformed, made
    by an untrusted key, or does not match the content.
    """
    from cryptography.exceptions import InvalidSignature

    keys = [load_public_key(k) for k in trusted_keys]
    if not keys:
        raise SignatureError("no trusted public key was given, so nothing can be verified",
                             hint="pass --trusted-key with the .pub file from `edgepeft keygen`")
    sig = data.get("signature")
    if not isinstance(sig, dict) or sig.get("algorithm") != "ed25519":
        raise SignatureError(f"{source} is not signed with ed25519",
                             hint="rebuild it with `edgepeft build --key KEY`")
    try:
        value = base64.b64decode(sig.get("value", ""), validate=True)
    except (binascii.Error, TypeError) as exc:
        raise SignatureError(f"{source}: the signature is not valid base64") from exc
    by_id = {key_id(k): k for k in keys}
    key = by_id.get(sig.get("key_id"))
    if key is None:
        raise SignatureError(f"{source} was signed by key {sig.get('key_id')!r}, which this device does not trust",
                             hint=f"trusted key ids: {', '.join(by_id)}")
    try:
        signed = canonical_bytes(data)
    except ValueError as exc:  # NaN/Infinity, or a lone surrogate that UTF-8 cannot hold
        raise SignatureError(f"{source} cannot be put in its canonical signed form: {exc}",
                             hint="fetch the bundle or update again from its source") from exc
    try:
        key.verify(value, signed)
    except InvalidSignature as exc:
        raise SignatureError(f"{source}: the signature does not match its content (tampered or corrupted)",
                             hint="fetch the bundle or update again from its source") from exc
    return sig["key_id"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (bundles can be larger than memory on a device)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(root: Path, manifest: Manifest, paths: Iterable[str] | None = None) -> None:
    """Check size, then SHA-256, of each listed file (all by default); raises :class:`IntegrityError`."""
    root = Path(root)
    wanted = set(paths) if paths is not None else None
    for entry in manifest.files:
        if wanted is not None and entry.path not in wanted:
            continue
        p = root / entry.path
        try:
            size = p.stat().st_size
        except FileNotFoundError as exc:
            raise IntegrityError(f"{entry.path} is missing from {root}",
                                 hint="copy or unpack the whole bundle again") from exc
        if size != entry.size:
            raise IntegrityError(f"{entry.path} is {size} bytes, the manifest says {entry.size}",
                                 hint="the file is truncated or replaced; copy the bundle again")
        if sha256_file(p) != entry.sha256:
            raise IntegrityError(f"{entry.path} does not match its SHA-256 in the manifest (tampered or corrupted)",
                                 hint="copy the bundle again from a trusted source")


def verify_bundle(bundle_dir: str | os.PathLike, trusted_keys: Iterable[KeyLike], *,
                  check_files: bool = True) -> Manifest:
    """Open a bundle directory the way a device must: signature first, then schema, then files.

    Raises :class:`SignatureError`, :class:`~edgepeft.errors.SpecError` or
    :class:`IntegrityError`; returns the validated :class:`Manifest`.
    """
    root = Path(bundle_dir)
    path = root / MANIFEST_NAME
    data = read_manifest_dict(path)
    verify_signature(data, trusted_keys, str(path))
    manifest = Manifest.from_dict(data, str(path))
    if check_files:
        verify_files(root, manifest)
    return manifest
