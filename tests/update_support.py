"""Helpers for update tests (no tests here): make real update packages, and forge hostile ones.

Forging re-signs edited metadata with a key the device trusts, so a test can prove the device's
own rules (base, floor, slots, sizes) and not only the signature check refuse a package.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.spec.names import sha256_bytes
from edgepeft.spec.update import HEADER, encode_envelope, envelope_length, metadata_bytes


def unpack_package(data: bytes) -> tuple[dict, list, bytes]:
    """(metadata dict, signatures, payload) of a package, trusting nothing."""
    n = envelope_length(data)
    m = HEADER.unpack_from(data, 0)[2]
    meta = json.loads(data[HEADER.size:HEADER.size + m])
    sigs = json.loads(data[HEADER.size + m:n])["signatures"]
    return meta, sigs, data[n:]


def sign_package(meta: dict, payload: bytes, key_path) -> bytes:
    from edgepeft.bundle.signing import load_private_key, sign_bytes

    body = metadata_bytes(meta)
    return encode_envelope(body, [sign_bytes(body, load_private_key(key_path))]) + payload


def forge(data: bytes, key_path, *, mutate=None, payload: bytes | None = None, fix_payload_fields: bool = True) -> bytes:
    """Edit a valid package's metadata and/or payload, then sign it again with ``key_path``."""
    meta, _, old_payload = unpack_package(data)
    payload = old_payload if payload is None else payload
    if fix_payload_fields:
        meta["payload"]["size"], meta["payload"]["sha256"] = len(payload), sha256_bytes(payload)
    if mutate is not None:
        mutate(meta)
    return sign_package(meta, payload, key_path)


def adapter_update(built: dict, out: Path, *, version: int, peft: str = "peft-gamma", name: str = "alpha",
                   **kw) -> Path:
    """A real package made by ``edgepeft update create``'s library function."""
    from edgepeft.release.package import create_adapter_update

    out = Path(out)
    create_adapter_update(bundle=built["bundle"], name=name, adapter=built["root"] / peft, version=version,
                          key=built["private_key"], out=out, **kw)
    return out
