"""Signed job documents: what a fleet controller asks a device to do over MQTT.

A broker is a relay, not a trust anchor: anyone who can publish to it could
send a device a job. So every job document is signed with the fleet key, like
an update package, and a device verifies it before acting. A job names a
package in the TUF repository (which carries its own signature and is checked
again) or asks for a rollback from a named version; it expires, so an old
rollback job replayed later does nothing.

Message (JSON): ``{"document": "<UTF-8 JSON, signed as is>", "signatures": [{"algorithm": "ed25519",
"key_id", "value"}]}``. Document fields: ``job_id``, ``device_id``, ``operation`` ("install" |
"rollback"), ``issued`` and ``expires`` (UTC), optionally ``rollout`` (the device binds its signed
reports to it, :mod:`.report`), and for install ``package`` {path, id, name,
version, type} and ``repository`` (URL); for rollback ``name`` and ``from_version``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import BundleError, SpecError
from .fields import Fields
from .jsontext import loads_untrusted
from .names import check_name
from .update import format_time, parse_time, utc_now

OPERATIONS = ("install", "rollback")
TOPIC_ROOT = "edgepeft/things"


def job_topic(device_id: str, job_id: str = "+") -> str:
    """Where the controller publishes a device's job (retained, QoS 1)."""
    return f"{TOPIC_ROOT}/{device_id}/jobs/{job_id}"


def job_update_topic(device_id: str = "+", job_id: str = "+") -> str:
    """Where the device reports a job's execution status (retained, QoS 1)."""
    return f"{TOPIC_ROOT}/{device_id}/jobs/{job_id}/update"


def state_topic(device_id: str = "+") -> str:
    """The device's state: base, adapters and versions (retained)."""
    return f"{TOPIC_ROOT}/{device_id}/state"


def connection_topic(device_id: str = "+") -> str:
    """``online`` / ``offline`` (retained; ``offline`` is the device's Last Will)."""
    return f"{TOPIC_ROOT}/{device_id}/connection"


@dataclass(frozen=True)
class Job:
    job_id: str
    device_id: str
    operation: str
    issued: str
    expires: str
    package: dict | None = None
    repository: str | None = None
    name: str | None = None
    from_version: int | None = None
    rollout: str | None = None  # the rollout this job belongs to; its reports are bound to it

    @classmethod
    def from_dict(cls, data, source: str = "job") -> Job:
        f = Fields(data, source)
        op = f.str("operation", choices=OPERATIONS)
        job = cls(job_id=check_name(f.str("job_id"), source, "job_id"),
                  device_id=check_name(f.str("device_id"), source, "device_id"), operation=op,
                  issued=f.str("issued"), expires=f.str("expires"))
        rollout = f.str("rollout", None)
        if rollout is not None:
            job = cls(**{**job.__dict__, "rollout": check_name(rollout, source, "rollout")})
        parse_time(job.issued, source, "issued")
        parse_time(job.expires, source, "expires")
        if op == "install":
            p = f.table("package")
            pkg = {"path": p.str("path"), "id": p.str("id"), "name": p.str("name"), "version": p.int("version", min=1),
                   "type": p.str("type", choices=("adapter", "bundle"))}
            p.reject_unknown()
            job = cls(**{**job.__dict__, "package": pkg, "repository": f.str("repository")})
        else:
            job = cls(**{**job.__dict__, "name": f.str("name"), "from_version": f.int("from_version", min=1)})
        f.reject_unknown()
        return job

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def sign_job(job: Job, private_key) -> bytes:
    """The message a controller publishes (server side)."""
    from .signing import sign_bytes

    doc = json.dumps(job.to_dict(), sort_keys=True, separators=(",", ":"))
    return json.dumps({"document": doc, "signatures": [sign_bytes(doc.encode("utf-8"), private_key)]}).encode("utf-8")


def verify_job(message: bytes, trusted_keys, *, device_id: str, source: str = "job") -> Job:
    """A device's check of a job message: signature over the document as sent, schema, addressee,
    expiry. A message over :data:`~.report.MAX_MESSAGE` is refused unread. Raises :class:`SignatureError`,
    :class:`SpecError` or :class:`BundleError`."""
    from .report import MAX_MESSAGE
    from .verify import verify_detached

    if not isinstance(message, (bytes, bytearray)):
        raise SpecError(source, "", "is not bytes")
    if len(message) > MAX_MESSAGE:
        raise SpecError(source, "", f"is {len(message)} bytes, over the {MAX_MESSAGE // 1024} KiB limit",
                        hint="a job document is small: this one is not from a controller")
    try:
        outer = loads_untrusted(message)
        doc, sigs = outer["document"], outer["signatures"]
        if not isinstance(doc, str) or not isinstance(sigs, list):
            raise TypeError("document must be a string and signatures a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError(source, "", f"is not a job message: {exc}") from exc
    verify_detached(doc.encode("utf-8", "surrogatepass"), sigs, trusted_keys, source)
    try:
        data = loads_untrusted(doc)
    except ValueError as exc:
        raise SpecError(source, "document", f"is not JSON: {exc}") from exc
    job = Job.from_dict(data, source)
    if job.device_id != device_id:
        raise BundleError(f"{source} is addressed to {job.device_id!r}, not this device ({device_id!r})",
                          hint="a job for another device was sent here")
    if utc_now() >= parse_time(job.expires, source, "expires"):
        raise BundleError(f"{source} {job.job_id} expired at {job.expires}", hint="the controller must send a fresh job")
    return job


def new_job(**fields) -> Job:
    """A job issued now, valid for ``valid_hours`` (default 24)."""
    import datetime as dt

    hours = fields.pop("valid_hours", 24)
    now = utc_now()
    return Job(issued=format_time(now), expires=format_time(now + dt.timedelta(hours=hours)), **fields)
