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

A job this device already finished is answered from its ledger
(``STATE/jobs.json``), never run twice. Topics: :mod:`edgepeft.contracts.job`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

from ..contracts.job import connection_topic, job_topic, job_update_topic, state_topic, verify_job
from ..errors import EdgePeftError
from ..fsio import write_atomic
from .mqtt import mqtt_client

STATUS = {"healthy": "SUCCEEDED", "rolled-back": "FAILED", "rejected": "REJECTED"}


class MqttAgent:
    """Jobs over MQTT for ``device`` (an :class:`~edgepeft.update.device.Device`)."""

    def __init__(self, device, url: str, device_id: str, *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, log=lambda msg: None):
        self.device, self.id, self.log = device, device_id, log
        self.client = mqtt_client(url, f"edgepeft-{device_id}", ca=ca, cert=cert, key=key)
        self.client.will_set(connection_topic(device_id), b"offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._jobs: queue.Queue = queue.Queue()
        self._ledger_path = Path(device.state_dir) / "jobs.json"
        self._stop = threading.Event()

    # -- connection ----------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        ud = self.client.user_data_get()
        self.client.connect_async(ud["host"], ud["port"], keepalive=30)
        self.client.loop_start()
        t = threading.Thread(target=self._work, name="edgepeft-agent-mqtt", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)
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
        if msg.payload:  # an empty retained message clears a job: nothing to do
            self._jobs.put((msg.topic, bytes(msg.payload)))

    def _publish_state(self) -> None:
        try:
            st = self.device.status()
            state = {"base": st["base"], "bundle": st["bundle"]["version"],
                     "adapters": {a["name"]: a["version"] for a in st["adapters"]}, "at": time.time()}
            self.client.publish(state_topic(self.id), json.dumps(state).encode(), qos=1, retain=True)
        except (EdgePeftError, OSError, RuntimeError) as exc:
            self.log(f"mqtt: state not published: {exc}")

    def _report(self, job_id: str, status: str, **extra) -> dict:
        body = {"job_id": job_id, "status": status, "at": time.time(), **extra}
        self.client.publish(job_update_topic(self.id, job_id), json.dumps(body).encode(), qos=1, retain=True)
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
            item = self._jobs.get()
            if item is None:
                return
            topic, payload = item
            job_id = topic.rsplit("/", 1)[-1]
            try:
                self._run(job_id, payload)
            except Exception as exc:  # a broken job must not stop the agent
                self._report(job_id, "FAILED", reason=f"{type(exc).__name__}: {exc}", transient=True)

    def _run(self, job_id: str, payload: bytes) -> None:
        done = self._ledger().get(job_id)
        if done is not None:
            self._report(job_id, done["status"], **{k: v for k, v in done.items() if k not in ("status", "job_id", "at")})
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
        self._report(job_id, "IN_PROGRESS", step="downloading" if job.operation == "install" else "rolling back")
        if job.operation == "install":
            final = self._install(job)
        else:
            final = self._rollback(job)
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
