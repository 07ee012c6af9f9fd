"""Simulated devices on the MQTT control plane, many per process, for load tests of a controller.

``python -m edgepeft.fleet.simulator --broker mqtt://127.0.0.1:1883 --prefix sim- --count 5000 --shard 0/2``
answers every job for devices ``sim-00000``... (those of its shard) the way an agent does, on the same
topics: IN_PROGRESS, then SUCCEEDED (or FAILED for ``--fail-rate`` of them), retained, QoS 1. It does not
install anything: it measures the controller and the broker, not devices. ``--verify KEY.pub`` makes it
check each job's signature as a device would (costs CPU in the simulator, not in the controller).

Each simulated device has its own Ed25519 key pair, made at start and kept in memory, and signs its
execution updates as an agent does (:mod:`edgepeft.contracts.report`); ``--enroll FILE`` writes the
inventory's ``[[device]]`` entries of this shard with their ``public_key``, for the controller to enroll.
Prints ``ready`` once subscribed (and enrolled), then runs until SIGTERM or Ctrl-C, and prints ``answered N``.
"""

from __future__ import annotations

import argparse
import queue
import random
import signal
import threading
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgepeft.fleet.simulator", description=__doc__.splitlines()[0])
    ap.add_argument("--broker", required=True)
    ap.add_argument("--prefix", default="sim-")
    ap.add_argument("--count", type=int, required=True, help="devices in the whole fleet")
    ap.add_argument("--shard", default="0/1", help="k/K: this process answers devices with index %% K == k")
    ap.add_argument("--fail-rate", type=float, default=0.0)
    ap.add_argument("--verify", default=None, help="a trusted public key: verify job signatures")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--enroll", default=None, help="write this shard's [[device]] entries with public keys here")
    args = ap.parse_args(argv)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ..contracts.identity import public_key_text
    from ..contracts.job import job_topic, job_update_topic
    from ..contracts.names import is_name
    from ..contracts.report import sign_report
    from ..fsio import write_atomic
    from ..transport.mqtt import mqtt_client

    k, n = (int(x) for x in args.shard.split("/"))
    width = len(str(max(args.count - 1, 1)))
    mine = {f"{args.prefix}{i:0{width}d}": Ed25519PrivateKey.generate() for i in range(args.count) if i % n == k}
    if args.enroll:
        write_atomic(Path(args.enroll), "".join(
            f'[[device]]\nid = "{d}"\naddress = "mqtt"\npublic_key = "{public_key_text(key.public_key())}"\n\n'
            for d, key in mine.items()).encode("ascii"))
    seq = dict.fromkeys(mine, int(time.time() * 1000))
    rng = random.Random(args.seed + k)

    def report(device: str, job_id: str, status: str, reason: str | None = None, *, rollout: str | None) -> bytes:
        seq[device] += 1  # like an agent: a refusal of an unverified job names no rollout
        return sign_report({"device_id": device, "job_id": job_id, "status": status, "reason": reason,
                            "rollout": rollout, "seq": seq[device]}, mine[device])
    keys = None
    if args.verify:
        from ..contracts.verify import load_public_key

        keys = [load_public_key(args.verify)]
    client = mqtt_client(args.broker, f"edgepeft-sim-{k}-of-{n}")
    client.max_inflight_messages_set(2000)
    client.max_queued_messages_set(0)
    jobs: queue.Queue = queue.Queue()
    ready = threading.Event()
    answered = [0]

    def on_connect(c, userdata, flags, rc, props=None):
        c.subscribe(job_topic("+"), qos=1)
        ready.set()

    def on_message(c, userdata, msg):
        if msg.payload:
            jobs.put((msg.topic, bytes(msg.payload)))

    client.on_connect, client.on_message = on_connect, on_message
    ud = client.user_data_get()
    client.connect(ud["host"], ud["port"], keepalive=60)
    client.loop_start()
    ready.wait(30)
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    try:
        while not stop.is_set():
            try:
                topic, payload = jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            parts = topic.split("/")
            device, job_id = parts[2], parts[4]
            if device not in mine or not is_name(job_id):
                continue
            rollout = job_id.removesuffix("-rollback")
            if keys is not None:
                from ..contracts.job import verify_job

                try:
                    job = verify_job(payload, keys, device_id=device)
                    rollout = job.rollout or job.job_id
                except Exception as exc:  # noqa: BLE001 - report any refusal as the device would
                    message = report(device, job_id, "REJECTED", str(exc)[:500], rollout=None)
                    client.publish(job_update_topic(device, job_id), message, qos=1, retain=True)
                    continue
            topic = job_update_topic(device, job_id)
            client.publish(topic, report(device, job_id, "IN_PROGRESS", rollout=rollout), qos=1, retain=True)
            final = "FAILED" if rng.random() < args.fail_rate else "SUCCEEDED"
            reason = "simulated failure" if final == "FAILED" else None
            client.publish(topic, report(device, job_id, final, reason, rollout=rollout), qos=1, retain=True)
            answered[0] += 1
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
        print(f"answered {answered[0]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
