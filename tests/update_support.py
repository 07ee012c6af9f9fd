"""Helpers for update tests (no tests here): make real update packages, and forge hostile ones.

Forging re-signs edited metadata with a key the device trusts, so a test can prove the device's
own rules (base, floor, slots, sizes) and not only the signature check refuse a package.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.contracts.names import sha256_bytes
from edgepeft.contracts.update import HEADER, encode_envelope, envelope_length, metadata_bytes


def unpack_package(data: bytes) -> tuple[dict, list, bytes]:
    """(metadata dict, signatures, payload) of a package, trusting nothing."""
    n = envelope_length(data)
    m = HEADER.unpack_from(data, 0)[2]
    meta = json.loads(data[HEADER.size:HEADER.size + m])
    sigs = json.loads(data[HEADER.size + m:n])["signatures"]
    return meta, sigs, data[n:]


def sign_package(meta: dict, payload: bytes, key_path) -> bytes:
    from edgepeft.contracts.signing import load_private_key, sign_bytes

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


def version_of(built: dict, out: Path, version: int, source: str = "package") -> Path:
    """The fixture's real package (made by ``edgepeft update create``) under another version number,
    signed again with the fleet key: what a server publishes as the next version, without needing
    the server side (torch) where the test runs."""
    def bump(m):
        m["adapter"]["version"] = version
        m["adapter"]["file"] = f"adapters/{m['adapter']['name']}-{version}.onnx_adapter"
    out = Path(out)
    out.write_bytes(forge(Path(built[source]).read_bytes(), built["private_key"], mutate=bump))
    return out
