"""The controller's check of what devices report over MQTT: only a report signed by the device's enrolled
key, for this rollout's job, and newer than the last one heard, is taken.

Why: the broker relays whatever anyone who can publish to it sends (and the broker's operator can write
anything). A rollout counts a device SUCCEEDED only on that device's own word; everything else is
dropped, counted by reason (:attr:`ReportGate.refused`, in the rollout's report) and logged (the first
few of each reason). Format: :mod:`edgepeft.contracts.report`.
"""

from __future__ import annotations

import collections

from ..contracts.report import MAX_MESSAGE, Report, decode_report, open_report
from ..errors import SignatureError, SpecError

LOGGED_PER_REASON = 5


class ReportGate:
    """Verifies :class:`~edgepeft.transport.mqtt_plane.Incoming` messages for rollout ``rollout_id``.

    ``keys``: device id -> enrolled Ed25519 public key (a device without one is never heard)."""

    def __init__(self, rollout_id: str, keys: dict, *, log=lambda msg: None):
        self.rid = rollout_id
        self.keys = dict(keys)
        self.log = log
        self.refused: collections.Counter = collections.Counter()
        self.state: dict[str, dict] = {}  # device -> its last verified state (base, bundle, adapters)
        self._last: dict[tuple, int] = {}  # (device, job id or "state") -> highest seq taken

    def check(self, msg) -> Report | None:
        """The verified report in ``msg``, or None (refused: counted and logged). Never raises."""
        try:
            return self._check(msg)
        except Exception as exc:  # noqa: BLE001 - a peer's bytes must never stop a rollout (a bug if seen)
            return self._refuse("error", msg, f"{type(exc).__name__}: {exc}")

    def _check(self, msg) -> Report | None:
        from ..contracts.verify import verify_detached

        key = self.keys.get(msg.device_id)
        if key is None:
            return self._refuse("not enrolled", msg, "no public_key is enrolled for this device")
        if len(msg.payload) > MAX_MESSAGE:
            return self._refuse("oversized", msg, f"{len(msg.payload)} bytes")
        where = f"{msg.kind} of {msg.device_id}" + (f" for job {msg.job_id}" if msg.job_id else "")
        try:
            text, sigs = open_report(msg.payload, where)
        except SignatureError as exc:
            return self._refuse("unsigned", msg, exc.message)
        except SpecError as exc:
            return self._refuse("malformed", msg, exc.message)
        try:
            verify_detached(text.encode("utf-8", "surrogatepass"), sigs, [key], where)
        except SignatureError as exc:
            return self._refuse("bad signature", msg, exc.message)
        try:
            rep = decode_report(text, where)
        except SpecError as exc:
            return self._refuse("malformed", msg, exc.message)
        if rep.device_id != msg.device_id:
            return self._refuse("another device", msg, f"signed as {rep.device_id}")
        want = "state" if msg.kind == "state" else "execution-update"
        if rep.type != want:
            return self._refuse("malformed", msg, f"a {rep.type} report where a {want} belongs")
        if msg.kind == "update" and rep.rollout is None:
            return self._refuse("unverified job", msg, f"the device answered {rep.status} to a message it could not "
                                                      f"verify as a job: {rep.reason or ''}")
        if msg.kind == "update" and (rep.job_id != msg.job_id or rep.rollout != self.rid
                                     or rep.job_id not in (self.rid, f"{self.rid}-rollback")):
            return self._refuse("another job", msg, f"signed for job {rep.job_id} of rollout {rep.rollout}")
        stream = (msg.device_id, rep.job_id or "state")
        if rep.seq <= self._last.get(stream, 0):
            return self._refuse("replayed", msg, f"sequence {rep.seq}, already heard {self._last[stream]}")
        self._last[stream] = rep.seq
        if rep.type == "state":
            self.state[msg.device_id] = rep.state
        return rep

    def _refuse(self, reason: str, msg, detail: str) -> None:
        self.refused[reason] += 1
        if self.refused[reason] <= LOGGED_PER_REASON:
            self.log(f"ignored a {msg.kind} message on {msg.device_id}'s topic ({reason}): {detail[:200]}"
                     + (" (further ones are only counted)" if self.refused[reason] == LOGGED_PER_REASON else ""))
        return None
