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
from .names import sha256_file
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


def _trusted(trusted_keys: Iterable[KeyLike]) -> dict:
    keys = [load_public_key(k) for k in trusted_keys]
    if not keys:
        raise SignatureError("no trusted public key was given, so nothing can be verified",
                             hint="pass --trusted-key with the .pub file from `edgepeft keygen`")
    return {key_id(k): k for k in keys}


def verify_detached(message: bytes, signatures: list, trusted_keys: Iterable[KeyLike], source: str) -> str:
    """Check that one of ``signatures`` (``{"algorithm": "ed25519", "key_id", "value"}`` dicts) is a
    valid signature of ``message`` by a trusted key; return that key's id.

    Several signatures let a fleet rotate keys (sign with the old and the new one). Raises
    :class:`SignatureError` when none is by a trusted key, or a trusted key's signature does not match.
    """
    from cryptography.exceptions import InvalidSignature

    by_id = _trusted(trusted_keys)
    seen = []
    for sig in signatures:
        if not isinstance(sig, dict) or sig.get("algorithm") != "ed25519":
            continue
        kid = sig.get("key_id")
        seen.append(repr(kid))
        key = by_id.get(kid) if isinstance(kid, str) else None
        if key is None:
            continue
        try:
            value = base64.b64decode(sig.get("value", ""), validate=True)
            key.verify(value, message)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise SignatureError(f"{source}: the signature is not valid base64",
                                 hint="recreate it; it was corrupted") from exc
        except InvalidSignature as exc:
            raise SignatureError(f"{source}: the signature does not match its content (tampered or corrupted)",
                                 hint="fetch it again from its source") from exc
        return kid
    if not seen:
        raise SignatureError(f"{source} is not signed with ed25519",
                             hint="sign it with a key from `edgepeft keygen`")
    raise SignatureError(f"{source} was signed by key {', '.join(seen)}, which this device does not trust",
                         hint=f"trusted key ids: {', '.join(by_id)}")


def verify_signature(data: dict, trusted_keys: Iterable[KeyLike], source: str = MANIFEST_NAME) -> str:
    """Check ``data['signature']`` (a bundle manifest's) against the trusted keys; return the key id.

    Raises :class:`SignatureError` when the signature is missing, malformed, made
    by an untrusted key, or does not match the content.
    """
    sig = data.get("signature")
    if not isinstance(sig, dict) or sig.get("algorithm") != "ed25519":
        _trusted(trusted_keys)
        raise SignatureError(f"{source} is not signed with ed25519",
                             hint="rebuild it with `edgepeft build --key KEY`")
    try:
        message = canonical_bytes(data)
    except (TypeError, ValueError) as exc:
        raise SignatureError(f"{source} cannot be put in its canonical signed form: {exc}",
                             hint="fetch the bundle or update again from its source") from exc
    return verify_detached(message, [sig], trusted_keys, source)


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


def read_verified(root: Path, entry, *, source: str | None = None) -> bytes:
    """Read one bundle file once and check those very bytes against its manifest entry.

    What is returned is what was hashed, so a write to the file after this check cannot change
    what the caller loads. Symbolic links and non-regular files are refused. Raises
    :class:`IntegrityError` (missing, a link, wrong size or hash).
    """
    import stat

    p = Path(root) / entry.path
    label = source or entry.path
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise IntegrityError(f"{label} is missing from {root}", hint="copy or unpack the whole bundle again") from exc
    except OSError as exc:
        raise IntegrityError(f"{label} cannot be opened ({exc.strerror}); links are not allowed in bundles",
                             hint="copy the bundle again as plain files") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{label} is not a regular file", hint="copy the bundle again as plain files")
        if st.st_size != entry.size:
            raise IntegrityError(f"{label} is {st.st_size} bytes, the manifest says {entry.size}",
                                 hint="the file is truncated or replaced; copy the bundle again")
        data = fh.read(entry.size + 1)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IntegrityError(f"{label} does not match its SHA-256 in the manifest (tampered or corrupted)",
                             hint="copy the bundle again from a trusted source")
    return data


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
