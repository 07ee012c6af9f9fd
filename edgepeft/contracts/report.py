"""Signed device reports over MQTT: execution updates and state, byte for byte as both ends read them.

Why: a broker is a relay, and anyone who can publish to it could claim that a device installed a package.
So a device signs every report with its own key (:mod:`.identity`), binds it to its device id, the job
and the rollout, and numbers it; a controller checks it against the key enrolled for that device and
counts nothing else. A captured report cannot be replayed onto another job (the job and rollout are
signed) nor twice (the number must grow).

Message (JSON, at most :data:`MAX_MESSAGE` bytes, refused before parsing above that)::

    {"report": "<the report: canonical JSON text, signed exactly as sent>",
     "signatures": [{"algorithm": "ed25519", "key_id": "<16 hex>", "value": "<base64>"}]}

Report fields: ``type`` ("execution-update" | "state"), ``device_id``, ``seq`` (an integer that grows
with every report the device signs, restarts included), ``at`` (UNIX time, information only); an
execution update adds ``job_id``, ``rollout`` (only once the device verified the job: a refusal of
something unsigned carries none, and no controller counts it), ``status`` (IN_PROGRESS | SUCCEEDED | FAILED |
REJECTED), ``reason`` (text or null), ``transient`` (bool) and optionally ``step`` (text) and
``result`` (object); a state report adds ``base`` (object), ``bundle`` (integer) and ``adapters``
(name -> version). Canonical JSON: keys sorted, no spaces, ASCII only (``json.dumps(...,
sort_keys=True, separators=(",", ":"))``); a reader verifies the text as sent and never re-encodes it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ..errors import SignatureError, SpecError
from .fields import Fields
from .jsontext import loads_untrusted
from .names import check_name

MAX_MESSAGE = 64 * 1024  # a job document or a report; a real one is a few hundred bytes
TYPES = ("execution-update", "state")
STATUSES = ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED")


@dataclass(frozen=True)
class Report:
    """One report, as signed. ``state`` holds base/bundle/adapters for a state report."""

    type: str
    device_id: str
    seq: int
    at: float
    job_id: str | None = None
    rollout: str | None = None
    status: str | None = None
    reason: str | None = None
    transient: bool = False
    step: str | None = None
    result: dict | None = None
    state: dict | None = None

    @classmethod
    def from_dict(cls, data, source: str = "report") -> Report:
        """Check every field; raises :class:`SpecError` naming the first that is wrong."""
        f = Fields(data, source)
        kind = f.str("type", choices=TYPES)
        device = check_name(f.str("device_id"), source, "device_id")
        seq = f.int("seq", min=1, max=2 ** 63 - 1)
        at = f.float("at", 0.0)
        if kind == "state":
            base = f.raw("base", {})
            if not isinstance(base, dict):
                raise f.error("base", "must be an object")
            state = {"base": base, "bundle": f.int("bundle", 0, min=0),
                     "adapters": _versions(f.raw("adapters", {}), source)}
            f.reject_unknown()
            return cls(kind, device, seq, at, state=state)
        job = check_name(f.str("job_id"), source, "job_id")
        rollout = f.str("rollout", None)
        if rollout is not None:
            check_name(rollout, source, "rollout")
        status = f.str("status", choices=STATUSES)
        reason = f.raw("reason", None)
        if reason is not None and not isinstance(reason, str):
            raise f.error("reason", "must be text or null")
        transient = f.bool("transient", False)
        step = f.str("step", None)
        result = f.raw("result", None)
        if result is not None and not isinstance(result, dict):
            raise f.error("result", "must be an object or null")
        f.reject_unknown()
        return cls(kind, device, seq, at, job_id=job, rollout=rollout, status=status, reason=reason,
                   transient=transient, step=step, result=result)


def _versions(value, source: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(source, "adapters", "must map adapter names to versions")
    out = {}
    for name, version in value.items():
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise SpecError(source, f"adapters.{name}", "must be a version number")
        out[check_name(name, source, "adapters")] = version
    return out


def canonical(fields: dict) -> str:
    """The text a device signs (see the module docstring)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sign_report(fields: dict, signer) -> bytes:
    """The message a device publishes: ``fields`` (``type`` defaults from the presence of ``job_id``, ``at``
    to now), checked as a controller will check it, then signed by ``signer`` (a
    :class:`~.identity.DeviceIdentity` or an Ed25519 private key). Raises :class:`SpecError`."""
    from .signing import sign_bytes

    fields = {"type": "execution-update" if "job_id" in fields else "state", "at": time.time(), **fields}
    fields = {k: v for k, v in fields.items() if v is not None or k == "reason"}
    Report.from_dict(fields, "report to sign")
    text = canonical(fields)
    sig = signer.sign(text.encode("ascii")) if hasattr(signer, "next_seq") else sign_bytes(text.encode("ascii"), signer)
    message = json.dumps({"report": text, "signatures": [sig]}, separators=(",", ":")).encode("ascii")
    if len(message) > MAX_MESSAGE:
        raise SpecError("report to sign", "", f"is {len(message)} bytes, over the {MAX_MESSAGE // 1024} KiB limit",
                        hint="shorten its reason or result")
    return message


def open_report(message: bytes, source: str = "report") -> tuple[str, list]:
    """The report text and its signatures, before anything in them is trusted.

    Raises :class:`SpecError` when the message is over :data:`MAX_MESSAGE` or not that shape, and
    :class:`SignatureError` when it carries no Ed25519 signature at all (an unsigned report)."""
    if not isinstance(message, (bytes, bytearray)):
        raise SpecError(source, "", "is not bytes")
    if len(message) > MAX_MESSAGE:
        raise SpecError(source, "", f"is {len(message)} bytes, over the {MAX_MESSAGE // 1024} KiB limit",
                        hint="a report is a few hundred bytes: this one is not from an agent")
    try:
        outer = loads_untrusted(bytes(message))
    except ValueError as exc:
        raise SpecError(source, "", f"is not JSON: {exc}") from exc
    if not isinstance(outer, dict):
        raise SpecError(source, "", "is not a JSON object")
    text, sigs = outer.get("report"), outer.get("signatures")
    if not isinstance(text, str) or not isinstance(sigs, list) \
            or not any(isinstance(s, dict) and s.get("algorithm") == "ed25519" for s in sigs):
        raise SignatureError(f"{source} is not a signed report",
                             hint="only an agent's reports, signed with its enrolled key, count")
    return text, sigs


def decode_report(text: str, source: str = "report") -> Report:
    """The fields of a report text (after its signature was checked). Raises :class:`SpecError`."""
    try:
        data = loads_untrusted(text)
    except ValueError as exc:
        raise SpecError(source, "report", f"is not JSON: {exc}") from exc
    return Report.from_dict(data, source)


def parse_report(message: bytes, public_key, *, device_id: str, source: str = "report") -> Report:
    """Open, verify against ``public_key`` (the device's enrolled key) and decode a report sent as
    ``device_id``. Raises :class:`SpecError` or :class:`SignatureError` (also when it names another
    device)."""
    from .verify import verify_detached

    text, sigs = open_report(message, source)
    verify_detached(text.encode("utf-8", "surrogatepass"), sigs, [public_key], source)
    rep = decode_report(text, source)
    if rep.device_id != device_id:
        raise SignatureError(f"{source} is signed as device {rep.device_id!r}, not {device_id!r}",
                             hint="a device may only report for itself")
    return rep
