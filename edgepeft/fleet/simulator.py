"""Simulated devices on the MQTT control plane, many per process, for load tests of a controller.

``python -m edgepeft.fleet.simulator --broker mqtt://127.0.0.1:1883 --prefix sim- --count 5000 --shard 0/2``
answers every job for devices ``sim-00000``... (those of its shard) the way an agent does, on the same
topics: IN_PROGRESS, then SUCCEEDED (or FAILED for ``--fail-rate`` of them), retained, QoS 1. It does not
install anything: it measures the controller and the broker, not devices. ``--verify KEY.pub`` makes it
check each job's signature as a device would (costs CPU in the simulator, not in the controller).
Prints ``ready`` once subscribed, then runs until SIGTERM or Ctrl-C, and prints ``answered N``.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import signal
import threading
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgepeft.fleet.simulator", description=__doc__.splitlines()[0])
    ap.add_argument("--broker", required=True)
    ap.add_argument("--prefix", default="sim-")
    ap.add_argument("--count", type=int, required=True, help="devices in the whole fleet")
    ap.add_argument("--shard", default="0/1", help="k/K: this process answers devices with index %% K == k")
    ap.add_argument("--fail-rate", type=float, default=0.0)
    ap.add_argument("--verify", default=None, help="a trusted public key: verify job signatures")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from ..contracts.job import job_topic, job_update_topic
    from ..transport.mqtt import mqtt_client

    k, n = (int(x) for x in args.shard.split("/"))
    width = len(str(max(args.count - 1, 1)))
    mine = {f"{args.prefix}{i:0{width}d}" for i in range(args.count) if i % n == k}
    rng = random.Random(args.seed + k)
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
            if device not in mine:
                continue
            if keys is not None:
                from ..contracts.job import verify_job

                try:
                    verify_job(payload, keys, device_id=device)
                except Exception as exc:  # noqa: BLE001 - report any refusal as the device would
                    client.publish(job_update_topic(device, job_id), json.dumps(
                        {"job_id": job_id, "status": "REJECTED", "reason": str(exc)}).encode(), qos=1, retain=True)
                    continue
            client.publish(job_update_topic(device, job_id), json.dumps(
                {"job_id": job_id, "status": "IN_PROGRESS", "at": time.time()}).encode(), qos=1, retain=True)
            final = "FAILED" if rng.random() < args.fail_rate else "SUCCEEDED"
            client.publish(job_update_topic(device, job_id), json.dumps(
                {"job_id": job_id, "status": final, "at": time.time(),
                 "reason": "simulated failure" if final == "FAILED" else None}).encode(), qos=1, retain=True)
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
