"""The controller's side of the MQTT control plane (paho-mqtt): signed jobs out, execution updates in.

Topics (:mod:`edgepeft.contracts.job`) follow AWS IoT Jobs: a job document per device
(retained, so a device that connects later still finds it), execution updates
from the device (retained, so a controller that restarts reads each device's
last word), device state and connection (Last Will ``offline``). Packages
never travel through the broker: jobs name them in the TUF repository.
"""

from __future__ import annotations

import json
import queue
import threading
import time

from ..contracts.job import connection_topic, job_topic, job_update_topic, state_topic
from ..errors import RolloutError


class ControlPlane:
    """One connection to the broker for a rollout. ``updates`` yields (device_id, payload dict)."""

    def __init__(self, url: str, rollout_id: str, *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, client_id: str | None = None, timeout: float = 20.0):
        from .mqtt import mqtt_client

        self.rid = rollout_id
        self.client = mqtt_client(url, client_id or f"edgepeft-controller-{rollout_id}"[:64], ca=ca, cert=cert,
                                  key=key)
        self.client.max_inflight_messages_set(2000)
        self.client.max_queued_messages_set(0)
        self.updates: queue.Queue = queue.Queue()
        self.online: dict[str, bool] = {}
        self.state: dict[str, dict] = {}
        self.messages_in = 0
        self.messages_out = 0
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        ud = self.client.user_data_get()
        try:
            self.client.connect(ud["host"], ud["port"], keepalive=30)
        except OSError as exc:
            raise RolloutError(f"cannot reach the MQTT broker at {url}: {exc}",
                               hint="check [mqtt] url in the inventory and that the broker runs") from exc
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise RolloutError(f"the MQTT broker at {url} did not accept the connection", hint="check its credentials")

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            return
        client.subscribe([(job_update_topic("+", self.rid), 1), (state_topic("+"), 1), (connection_topic("+"), 1)])
        self._connected.set()

    def _on_message(self, client, userdata, msg):
        self.messages_in += 1
        parts = msg.topic.split("/")
        if len(parts) < 4:
            return
        device = parts[2]
        if parts[3] == "connection":
            self.online[device] = msg.payload == b"online"
            return
        try:
            payload = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return
        if parts[3] == "state" and isinstance(payload, dict):
            self.state[device] = payload
        elif parts[3] == "jobs" and len(parts) == 6 and parts[5] == "update" and isinstance(payload, dict):
            self.updates.put((device, payload))

    def send_job(self, device_id: str, message: bytes, job_id: str | None = None) -> None:
        """Publish a signed job for ``device_id`` (retained) under ``job_id`` (default: the rollout's id)."""
        self.messages_out += 1
        self.client.publish(job_topic(device_id, job_id or self.rid), message, qos=1, retain=True)

    def clear_job(self, device_id: str) -> None:
        """Remove the retained job (the rollout is over for this device)."""
        self.messages_out += 1
        self.client.publish(job_topic(device_id, self.rid), b"", qos=1, retain=True)

    def drain(self) -> list[tuple[str, dict]]:
        out = []
        while True:
            try:
                out.append(self.updates.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        deadline = time.time() + 5
        while self.client.want_write() and time.time() < deadline:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()
