"""The controller's side of the MQTT control plane (paho-mqtt): signed jobs out, execution updates in.

Topics (:mod:`edgepeft.contracts.job`) follow AWS IoT Jobs: a job document per device
(retained, so a device that connects later still finds it), execution updates
from the device (retained, so a controller that restarts reads each device's
last word), device state and connection (Last Will ``offline``). Packages
never travel through the broker: jobs name them in the TUF repository.

The plane trusts nothing it receives: it drops messages over
:data:`~edgepeft.contracts.report.MAX_MESSAGE` and those about devices that are
not in the rollout, keeps at most ``max_pending_bytes`` waiting (the oldest
goes first), and hands the rest over as bytes; the controller verifies each
against the device's enrolled key (:mod:`edgepeft.fleet.reports`).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from ..contracts.job import connection_topic, job_topic, job_update_topic, state_topic
from ..contracts.report import MAX_MESSAGE
from ..errors import RolloutError


@dataclass(frozen=True)
class Incoming:
    """A message as the broker delivered it, not trusted yet: ``kind`` "update" or "state"."""

    kind: str
    device_id: str
    job_id: str | None
    payload: bytes


class ControlPlane:
    """One connection to the broker for a rollout; :meth:`drain` gives the :class:`Incoming` messages."""

    def __init__(self, url: str, rollout_id: str, *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, client_id: str | None = None, timeout: float = 20.0,
                 devices=None, max_pending_bytes: int = 64 << 20):
        """``devices``: the ids this rollout listens to (None: any). Raises :class:`RolloutError` when the
        broker cannot be reached or refuses the connection."""
        from .mqtt import mqtt_client

        self.rid = rollout_id
        self.devices = None if devices is None else frozenset(devices)
        self.max_pending_bytes = max_pending_bytes
        self.dropped: collections.Counter = collections.Counter()  # why -> messages dropped unread
        self._pending: collections.deque = collections.deque()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self.client = mqtt_client(url, client_id or f"edgepeft-controller-{rollout_id}"[:64], ca=ca, cert=cert,
                                  key=key)
        self.client.max_inflight_messages_set(2000)
        self.client.max_queued_messages_set(0)
        self.online: dict[str, bool] = {}
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
        client.subscribe([(job_update_topic("+", self.rid), 1), (job_update_topic("+", f"{self.rid}-rollback"), 1),
                          (state_topic("+"), 1), (connection_topic("+"), 1)])
        self._connected.set()

    def _on_message(self, client, userdata, msg):
        self.messages_in += 1
        parts = msg.topic.split("/")
        if len(parts) < 4:
            return
        device = parts[2]
        if self.devices is not None and device not in self.devices:
            self.dropped["not in this rollout"] += 1
            return
        if len(msg.payload) > MAX_MESSAGE:
            self.dropped["oversized"] += 1
            return
        if parts[3] == "connection" and len(parts) == 4:
            self.online[device] = msg.payload == b"online"
        elif parts[3] == "state" and len(parts) == 4 and msg.payload:
            self._keep(Incoming("state", device, None, bytes(msg.payload)))
        elif parts[3] == "jobs" and len(parts) == 6 and parts[5] == "update" and msg.payload:
            self._keep(Incoming("update", device, parts[4], bytes(msg.payload)))

    def _keep(self, item: Incoming) -> None:
        with self._lock:
            self._pending.append(item)
            self._pending_bytes += len(item.payload)
            while self._pending_bytes > self.max_pending_bytes and self._pending:
                old = self._pending.popleft()
                self._pending_bytes -= len(old.payload)
                self.dropped["queue full"] += 1

    def send_job(self, device_id: str, message: bytes, job_id: str | None = None) -> None:
        """Publish a signed job for ``device_id`` (retained) under ``job_id`` (default: the rollout's id)."""
        self.messages_out += 1
        self.client.publish(job_topic(device_id, job_id or self.rid), message, qos=1, retain=True)

    def clear_job(self, device_id: str) -> None:
        """Remove the retained job (the rollout is over for this device)."""
        self.messages_out += 1
        self.client.publish(job_topic(device_id, self.rid), b"", qos=1, retain=True)

    def drain(self) -> list[Incoming]:
        """Every message received since the last call, oldest first."""
        with self._lock:
            out, self._pending, self._pending_bytes = list(self._pending), collections.deque(), 0
        return out

    def close(self) -> None:
        deadline = time.time() + 5
        while self.client.want_write() and time.time() < deadline:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()
