"""The update package: one file, a signed envelope followed by its payload.

Layout (all integers big-endian; see docs/updates.md)::

    offset 0   8 bytes   magic b"EPUPDATE"
    offset 8   u32       format version (1)
    offset 12  u32       M: length of the metadata
    offset 16  u32       S: length of the signature block
    offset 20  M bytes   metadata: a UTF-8 JSON object        <- the bytes that are signed, as stored
    20+M       S bytes   signature block: {"signatures": [{"algorithm": "ed25519", "key_id", "value"}]}
    20+M+S     payload   exactly metadata.payload.size bytes (an .onnx_adapter file, or an .epb bundle archive)

Why this shape: a device (in any language) reads 20 bytes, then the metadata
and signatures, and verifies the signature over the metadata bytes exactly as
they arrived; nothing is re-serialized before it is checked. The metadata
carries the payload's size and SHA-256, so a device can refuse a package from
its first few kilobytes (bad signature, old version, wrong base) before it
takes the payload, and can verify the payload as it streams in.

Device-safe: stdlib plus ``cryptography`` (through :mod:`.verify`).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ..errors import BundleError, IntegrityError, SignatureError, SpecError
from .fields import Fields
from .jsontext import loads_untrusted
from .manifest import AdapterEntry, HealthCheck
from .names import sha256_bytes

MAGIC = b"EPUPDATE"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sIII")
MAX_METADATA = 1 << 20
MAX_SIGNATURES = 64 << 10
UPDATE_SCHEMA_VERSION = 1
KIND = "edgepeft-update"
PAYLOAD_FORMATS = {"adapter": "onnx_adapter", "bundle": "epb"}
SUFFIX = ".epu"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def format_time(t: _dt.datetime) -> str:
    return t.astimezone(_dt.UTC).strftime(TIME_FORMAT)


def parse_time(value: str, source: str, field_name: str) -> _dt.datetime:
    try:
        return _dt.datetime.strptime(value, TIME_FORMAT).replace(tzinfo=_dt.UTC)
    except (TypeError, ValueError) as exc:
        raise SpecError(source, field_name, f"{value!r} is not a UTC time like 2026-12-31T23:59:59Z") from exc


def version_tuple(text: str) -> tuple:
    """``"0.2.1rc1"`` -> ``(0, 2, 1)``: the numeric release parts, for minimum-runtime checks."""
    out = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(out)


@dataclass(frozen=True)
class UpdateMeta:
    """The validated metadata of an update package.

    ``type`` is "adapter" (one adapter version for an installed base) or "bundle" (a whole
    new bundle, i.e. a new base, delivered as an .epb archive).
    """

    type: str
    created: str
    expires: str | None
    min_runtime: str
    base_fingerprint: str
    payload_size: int
    payload_sha256: str
    payload_format: str
    health_checks: tuple[HealthCheck, ...] = ()
    adapter: AdapterEntry | None = None
    slots: tuple[str, ...] = ()
    bundle: dict | None = None
    schema_version: int = UPDATE_SCHEMA_VERSION

    @property
    def name(self) -> str:
        """The adapter's name, or "bundle"."""
        return self.adapter.name if self.adapter is not None else "bundle"

    @property
    def version(self) -> int:
        return self.adapter.version if self.adapter is not None else int(self.bundle["version"])

    @property
    def key(self) -> str:
        """What the version counts for: ``adapter:NAME`` or ``bundle``."""
        return f"adapter:{self.name}" if self.adapter is not None else "bundle"

    def expires_at(self) -> _dt.datetime | None:
        return None if self.expires is None else parse_time(self.expires, "update", "expires")

    @classmethod
    def from_dict(cls, data: dict, source: str = "update") -> UpdateMeta:
        """Validate metadata; raises :class:`SpecError` naming the field."""
        f = Fields(data, source)
        version = f.int("schema_version", min=1)
        if version > UPDATE_SCHEMA_VERSION:
            raise f.error("schema_version", f"{version} is newer than this edgepeft reads ({UPDATE_SCHEMA_VERSION})",
                          hint="upgrade edgepeft on the device first")
        f.str("kind", choices=(KIND,))
        kind = f.str("type", choices=tuple(PAYLOAD_FORMATS))
        created = f.str("created")
        parse_time(created, source, "created")
        expires = f.str("expires", None)
        if expires is not None:
            parse_time(expires, source, "expires")
        min_runtime = f.str("min_runtime")
        if not version_tuple(min_runtime):
            raise f.error("min_runtime", f"{min_runtime!r} is not a version like 0.2.0")
        base_fp = f.str("base_fingerprint")
        p = f.table("payload")
        size = p.int("size", min=1)
        digest = p.str("sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise p.error("sha256", "must be 64 lowercase hex digits")
        fmt = p.str("format", choices=(PAYLOAD_FORMATS[kind],))
        p.reject_unknown()
        checks = tuple(HealthCheck.from_fields(Fields(c, source, f"health_checks[{i}]"))
                       for i, c in enumerate(f.items("health_checks", [])))
        adapter, slots, bundle = None, (), None
        if kind == "adapter":
            adapter = AdapterEntry.from_fields(Fields(f.raw("adapter"), source, "adapter"))
            if adapter.base_fingerprint != base_fp:
                raise f.error("adapter.base_fingerprint", "differs from the update's base_fingerprint")
            slots = tuple(f.str_list("slots", [], nonempty=True))
            for i, c in enumerate(checks):
                if c.adapter not in (None, adapter.name):
                    raise f.error(f"health_checks[{i}].adapter", f"names {c.adapter!r}, not this update's adapter")
        else:
            b = f.table("bundle")
            bundle = {"name": b.str("name"), "version": b.int("version", min=1), "fingerprint": b.str("fingerprint")}
            b.reject_unknown()
            if bundle["fingerprint"] != base_fp:
                raise f.error("bundle.fingerprint", "differs from the update's base_fingerprint")
        meta = cls(type=kind, created=created, expires=expires, min_runtime=min_runtime, base_fingerprint=base_fp,
                   payload_size=size, payload_sha256=digest, payload_format=fmt, health_checks=checks,
                   adapter=adapter, slots=slots, bundle=bundle, schema_version=version)
        f.reject_unknown()
        return meta

    def to_dict(self) -> dict:
        d = {"schema_version": self.schema_version, "kind": KIND, "type": self.type, "created": self.created,
             "expires": self.expires, "min_runtime": self.min_runtime, "base_fingerprint": self.base_fingerprint,
             "payload": {"size": self.payload_size, "sha256": self.payload_sha256, "format": self.payload_format},
             "health_checks": [{k: v for k, v in asdict(c).items() if v is not None} for c in self.health_checks]}
        if self.adapter is not None:
            d["adapter"], d["slots"] = self.adapter.to_dict(), list(self.slots)
        if self.bundle is not None:
            d["bundle"] = dict(self.bundle)
        return {k: v for k, v in d.items() if v is not None}


def metadata_bytes(meta: dict) -> bytes:
    """Serialize metadata once, on the server (compact JSON, sorted keys). Devices never re-serialize:
    they verify the bytes as stored."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def encode_envelope(meta_bytes: bytes, signatures: list[dict]) -> bytes:
    """Header + metadata + signature block (the server side of :func:`parse_envelope`)."""
    sig_bytes = json.dumps({"signatures": signatures}, sort_keys=True, separators=(",", ":")).encode("ascii")
    if len(meta_bytes) > MAX_METADATA or len(sig_bytes) > MAX_SIGNATURES:
        raise BundleError("update metadata or signatures are too large",
                          hint=f"keep metadata under {MAX_METADATA} bytes (fewer health checks or metrics)")
    return HEADER.pack(MAGIC, FORMAT_VERSION, len(meta_bytes), len(sig_bytes)) + meta_bytes + sig_bytes


def envelope_length(prefix: bytes, source: str = "update") -> int | None:
    """The envelope's total length from the first 20 bytes (None if fewer have arrived).

    Raises :class:`BundleError` for a wrong magic, an unknown format version or
    lengths beyond the limits, so a device refuses garbage after 20 bytes.
    """
    if len(prefix) < HEADER.size:
        return None
    magic, fmt, m, s = HEADER.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise BundleError(f"{source} is not an edgepeft update package (bad magic)",
                          hint="send a .epu file made by `edgepeft update create`")
    if fmt != FORMAT_VERSION:
        raise BundleError(f"{source} uses update format {fmt}; this device reads format {FORMAT_VERSION}",
                          hint="upgrade edgepeft on the device, or create the update with a matching edgepeft")
    if not 0 < m <= MAX_METADATA or not 0 < s <= MAX_SIGNATURES:
        raise BundleError(f"{source} announces metadata of {m} bytes and signatures of {s} bytes (limits "
                          f"{MAX_METADATA} and {MAX_SIGNATURES})", hint="the file is corrupt or hostile; recreate it")
    return HEADER.size + m + s


@dataclass(frozen=True)
class Envelope:
    """A verified envelope: the exact bytes received, the parsed metadata, and who signed it."""

    raw: bytes
    meta: UpdateMeta
    key_id: str

    @property
    def id(self) -> str:
        """Identifies this package on every link (hex SHA-256 of the envelope bytes)."""
        return sha256_bytes(self.raw)

    @property
    def total_size(self) -> int:
        return len(self.raw) + self.meta.payload_size


def split_envelope(raw: bytes, source: str = "update") -> tuple[bytes, list]:
    """``(metadata bytes, signature list)`` of a complete envelope; nothing is trusted yet."""
    n = envelope_length(raw, source)
    if n is None or len(raw) < n:
        raise BundleError(f"{source} is truncated inside its envelope", hint="send the whole file again")
    m = HEADER.unpack_from(raw, 0)[2]
    meta_bytes, sig_bytes = raw[HEADER.size:HEADER.size + m], raw[HEADER.size + m:n]
    try:
        block = loads_untrusted(sig_bytes.decode("utf-8"))
    except ValueError as exc:  # also too deep a nesting: a peer's bytes must not become a crash
        raise SignatureError(f"{source}: the signature block is not JSON ({exc})", hint="recreate the update") from exc
    sigs = block.get("signatures") if isinstance(block, dict) else None
    if not isinstance(sigs, list) or not sigs or not all(isinstance(s, dict) for s in sigs):
        raise SignatureError(f"{source} is unsigned", hint="sign it: `edgepeft update create --key KEY`")
    return meta_bytes, sigs


def _parse_metadata(meta_bytes: bytes, source: str) -> UpdateMeta:
    try:
        data = loads_untrusted(meta_bytes.decode("utf-8"))
    except ValueError as exc:  # also UnicodeDecodeError and too deep a nesting
        raise SpecError(source, "", f"metadata is not JSON: {exc}") from exc
    return UpdateMeta.from_dict(data, source)


def read_metadata_unverified(raw: bytes, source: str = "update") -> UpdateMeta:
    """The metadata of a package, NOT verified: for tools that describe or route a package (``update
    inspect`` without a key, a rollout's plan and eval gate, the push's check of a local copy); a device
    verifies with :func:`verify_envelope`. Raises :class:`BundleError` (framing), :class:`SignatureError`
    (no signature block) or :class:`SpecError` (metadata)."""
    meta_bytes, _ = split_envelope(raw, source)
    return _parse_metadata(meta_bytes, source)


def verify_envelope(raw: bytes, trusted_keys: Iterable, *, source: str = "update",
                    now: _dt.datetime | None = None, runtime_version: str | None = None,
                    check_expiry: bool = True) -> Envelope:
    """Verify an envelope the way a device must: signature over the stored bytes first, then schema,
    expiry and the minimum runtime version.

    Raises :class:`SignatureError` (unsigned, untrusted key, bad signature), :class:`SpecError`
    (malformed metadata) or :class:`BundleError` (expired, needs a newer runtime, bad framing).
    """
    from .verify import verify_detached

    n = envelope_length(raw, source)
    if n is None or len(raw) < n:
        raise BundleError(f"{source} is truncated inside its envelope", hint="send the whole file again")
    raw = bytes(raw[:n])
    meta_bytes, sigs = split_envelope(raw, source)
    key = verify_detached(meta_bytes, sigs, trusted_keys, source)
    meta = _parse_metadata(meta_bytes, source)
    check_fresh(meta, source, now=now, runtime_version=runtime_version, check_expiry=check_expiry)
    return Envelope(raw=raw, meta=meta, key_id=key)


def repository_path(package) -> str:
    """Where a package lives in a TUF repository, from its ``type``, ``name`` and ``version`` (an
    :class:`UpdateMeta`, or the controller's view of one): where ``edgepeft publish`` puts it and the path a
    rollout's job names."""
    if package.type == "adapter":
        return f"edgepeft/adapters/{package.name}/v{package.version}.epu"
    return f"edgepeft/bundles/v{package.version}.epu"


def check_fresh(meta: UpdateMeta, source: str = "update", *, now: _dt.datetime | None = None,
                runtime_version: str | None = None, check_expiry: bool = True) -> None:
    """Refuse an expired package, or one that needs a newer edgepeft than this device runs."""
    from .. import __version__

    expires = meta.expires_at()
    now = now or utc_now()
    if check_expiry and expires is not None and now >= expires:
        raise BundleError(f"{source} ({meta.name} v{meta.version}) expired at {meta.expires}",
                          hint="create a fresh update (a newer version) with a later --expires")
    need, have = version_tuple(meta.min_runtime), version_tuple(runtime_version or __version__)
    if need > have:
        raise BundleError(f"{source} needs edgepeft {meta.min_runtime} or newer on the device; it runs "
                          f"{runtime_version or __version__}", hint="update the device's edgepeft first")


def verify_payload(envelope: Envelope, payload, source: str = "update") -> None:
    """Check the payload's size and SHA-256 against the signed metadata; raises :class:`IntegrityError`."""
    meta = envelope.meta
    if len(payload) != meta.payload_size:
        more = "more" if len(payload) > meta.payload_size else "fewer"
        raise IntegrityError(f"{source}: the payload is {len(payload)} bytes, {more} than the "
                             f"{meta.payload_size} its signed metadata announces",
                             hint="the file was truncated or extended in transit; send it again")
    if sha256_bytes(payload) != meta.payload_sha256:
        raise IntegrityError(f"{source}: the payload does not match its signed SHA-256 (tampered or corrupted)",
                             hint="send the update again from its source")


def read_update(data: bytes, trusted_keys: Iterable, *, source: str = "update",
                now: _dt.datetime | None = None, check_expiry: bool = True) -> tuple[Envelope, memoryview]:
    """Verify a whole package held in memory; returns the envelope and a view of the payload
    (a view of ``data``: what was hashed is what the caller loads)."""
    envelope = verify_envelope(data, trusted_keys, source=source, now=now, check_expiry=check_expiry)
    payload = memoryview(data)[len(envelope.raw):]
    verify_payload(envelope, payload, source)
    return envelope, payload

