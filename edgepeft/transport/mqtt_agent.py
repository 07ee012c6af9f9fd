"""The device end of the MQTT control plane (paho-mqtt 2.x), for devices behind NAT.

The agent connects out to a broker, receives job documents on
``edgepeft/things/<id>/jobs/<job>``, verifies their fleet signature, fetches
the named package from the TUF repository (never through the broker), installs
it with the same transaction as every other link, and reports each step on
``.../jobs/<job>/update`` (retained, QoS 1): IN_PROGRESS, then SUCCEEDED
(healthy), FAILED (health check failed, or a transient error to retry) or
REJECTED (the device refuses the package). Its state (base, adapters and
versions) is retained on ``.../state``; ``.../connection`` says ``online``, and
the broker publishes the Last Will ``offline`` when it vanishes.

Every report and state message is signed with the device's own key
(:mod:`edgepeft.contracts.identity`, created on first start in the state
folder) in the format of :mod:`edgepeft.contracts.report`, so a controller
counts only what this device said. A message over 64 KiB is refused before it
is parsed (and answered REJECTED), and at most :data:`MAX_PENDING` messages
wait: beyond that the oldest is dropped (a job stays retained on the broker,
so a genuine one comes back when the agent reconnects).

A job this device already finished is answered from its ledger
(``STATE/jobs.json``), never run twice. Topics: :mod:`edgepeft.contracts.job`.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

from ..contracts.identity import DeviceIdentity
from ..contracts.job import connection_topic, job_topic, job_update_topic, state_topic, verify_job
from ..contracts.names import is_name
from ..contracts.report import MAX_MESSAGE, sign_report
from ..errors import EdgePeftError
from ..fsio import write_atomic
from .mqtt import connect_async, mqtt_client

STATUS = {"healthy": "SUCCEEDED", "rolled-back": "FAILED", "rejected": "REJECTED"}
MAX_PENDING = 32  # messages waiting for the worker; each at most MAX_MESSAGE bytes


class MqttAgent:
    """Jobs over MQTT for ``device`` (an :class:`~edgepeft.update.device.Device`)."""

    def __init__(self, device, url: str, device_id: str, *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, identity: DeviceIdentity | None = None, log=lambda msg: None):
        """``identity``: the device's signing key (default: the one in its state folder, created if
        missing). Raises :class:`UsageError` for a bad URL, OSError when the state folder is not writable."""
        self.device, self.id, self.log = device, device_id, log
        self.identity = identity or DeviceIdentity.load_or_create(device.state_dir)
        self.dropped = 0
        self.client = mqtt_client(url, f"edgepeft-{device_id}", ca=ca, cert=cert, key=key,
                                  max_packet=MAX_MESSAGE + 4096)  # the broker drops larger ones unsent
        self.client.will_set(connection_topic(device_id), b"offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._jobs: queue.Queue = queue.Queue(MAX_PENDING)
        self._ledger_path = Path(device.state_dir) / "jobs.json"
        self._stop = threading.Event()

    # -- connection ----------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        connect_async(self.client)
        self.client.loop_start()
        t = threading.Thread(target=self._work, name="edgepeft-agent-mqtt", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
        self._enqueue(None)
        try:
            self.client.publish(connection_topic(self.id), b"offline", qos=1, retain=True).wait_for_publish(2)
        except (RuntimeError, ValueError, OSError):
            pass
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            self.log(f"mqtt: the broker refused the connection: {reason_code}")
            return
        client.subscribe(job_topic(self.id), qos=1)
        client.publish(connection_topic(self.id), b"online", qos=1, retain=True)
        self._publish_state()

    def _on_message(self, client, userdata, msg):
        if not msg.payload:  # an empty retained message clears a job: nothing to do
            return
        job_id = msg.topic.rsplit("/", 1)[-1]
        if not is_name(job_id):
            self.log(f"mqtt: ignored a message on {msg.topic[:200]!r}: not a job id")
            return
        if len(msg.payload) > MAX_MESSAGE:  # refused before a byte of it is parsed or copied
            self._enqueue((job_id, len(msg.payload)))
            return
        self._enqueue((job_id, bytes(msg.payload)))

    def _enqueue(self, item) -> None:
        """Queue ``item``; when :data:`MAX_PENDING` wait already, drop the oldest (and say so)."""
        while True:
            try:
                self._jobs.put_nowait(item)
                return
            except queue.Full:
                try:
                    old = self._jobs.get_nowait()
                except queue.Empty:
                    continue
                if old is None:  # never drop the stop signal
                    self._jobs.put_nowait(None)
                    return
                self.dropped += 1
                self.log(f"mqtt: more than {MAX_PENDING} messages waiting: dropped the oldest (job {old[0]}; "
                         f"{self.dropped} dropped so far)")

    def _publish_state(self) -> None:
        try:
            st = self.device.status()
            state = {"device_id": self.id, "seq": self.identity.next_seq(), "type": "state",
                     "base": st["base"], "bundle": st["bundle"]["version"],
                     "adapters": {a["name"]: a["version"] for a in st["adapters"]}}
            self.client.publish(state_topic(self.id), sign_report(state, self.identity), qos=1, retain=True)
        except (EdgePeftError, OSError, RuntimeError) as exc:
            self.log(f"mqtt: state not published: {exc}")

    def _report(self, job_id: str, status: str, *, rollout: str | None = None, **extra) -> dict:
        """Sign and publish an execution update for ``job_id``; ``rollout`` only for a job whose signed
        document this device verified (an answer to anything else must not count for a rollout)."""
        body = {"device_id": self.id, "job_id": job_id, "rollout": rollout, "status": status,
                "seq": self.identity.next_seq(), "reason": extra.pop("reason", None), **extra}
        if isinstance(body["reason"], str):
            body["reason"] = body["reason"][:2000]
        try:
            message = sign_report(body, self.identity)
        except EdgePeftError:  # a result too large to report whole: its status and reason still go out
            body.pop("result", None)
            message = sign_report(body, self.identity)
        self.client.publish(job_update_topic(self.id, job_id), message, qos=1, retain=True)
        return body

    # -- jobs ----------------------------------------------------------------------------------
    def _ledger(self) -> dict:
        try:
            data = json.loads(self._ledger_path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remember(self, job_id: str, final: dict) -> None:
        ledger = self._ledger()
        ledger[job_id] = final
        for old in list(ledger)[:-500]:
            del ledger[old]
        write_atomic(self._ledger_path, json.dumps(ledger).encode("utf-8"))

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._jobs.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is None:
                return
            job_id, payload = item
            try:
                if isinstance(payload, int):
                    self._report(job_id, "REJECTED", reason=f"a job message of {payload} bytes is over the "
                                                            f"{MAX_MESSAGE // 1024} KiB limit: refused unread")
                    self.log(f"mqtt: refused job {job_id}: {payload} bytes")
                    continue
                self._run(job_id, payload)
            except Exception as exc:  # a broken job must not stop the agent
                try:
                    self._report(job_id, "FAILED", reason=f"{type(exc).__name__}: {exc}", transient=True)
                except Exception as again:  # noqa: BLE001 - not even a report: say so, keep going
                    self.log(f"mqtt: job {job_id}: {exc}; no report: {again}")

    def _run(self, job_id: str, payload: bytes) -> None:
        done = self._ledger().get(job_id)
        if done is not None:
            self._report(job_id, done["status"], **{k: v for k, v in done.items()
                                                    if k in ("reason", "transient", "result", "rollout")})
            return
        try:
            job = verify_job(payload, self.device.trusted_keys, device_id=self.id, source=f"job {job_id}")
        except EdgePeftError as exc:
            self._report(job_id, "REJECTED", reason=exc.message)  # not remembered: a genuine job may follow
            self.log(f"mqtt: refused job {job_id}: {exc.message}")
            return
        if job.job_id != job_id:
            self._report(job_id, "REJECTED", reason=f"the document is job {job.job_id}, sent as {job_id}")
            return
        rollout = job.rollout or job.job_id
        self._report(job_id, "IN_PROGRESS", rollout=rollout,
                     step="downloading" if job.operation == "install" else "rolling back")
        if job.operation == "install":
            final = self._install(job)
        else:
            final = self._rollback(job)
        final["rollout"] = rollout
        if not final.get("transient"):
            self._remember(job_id, final)
        self._report(job_id, **final)
        self._publish_state()

    def _install(self, job) -> dict:
        from ..errors import TransportError
        from .tuf_pull import Puller

        try:
            data = Puller(self.device, job.repository).fetch(job.package["path"])
        except TransportError as exc:
            return {"status": "FAILED", "reason": exc.message, "transient": True}
        res = self.device.install(data)
        self.device.record(res)
        return {"status": STATUS.get(res.status, "FAILED"), "reason": res.reason, "result": res.to_dict(),
                "transient": bool(res.retryable)}

    def _rollback(self, job) -> dict:
        st = {a["name"]: a for a in self.device.status()["adapters"]}
        cur = st.get(job.name, {}).get("version")
        if cur != job.from_version:
            return {"status": "REJECTED", "reason": f"{job.name} serves v{cur}, not v{job.from_version}: "
                                                    "nothing to roll back"}
        try:
            info = self.device.rollback(job.name, f"rollback job {job.job_id}")
        except EdgePeftError as exc:
            return {"status": "FAILED", "reason": exc.message}
        return {"status": "SUCCEEDED", "result": info}
