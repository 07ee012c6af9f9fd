"""The MQTT control plane over TLS with a certificate per device and per-device topics (a real mosquitto):
an agent and the controller connect with their own client certificates; the broker's ACL lets a device
read and write only its own topics, so one device's credentials cannot fake another device's results; and
an unsigned job a broker-side attacker publishes is refused by the device."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import threading
import time

import pytest
from agent_support import AgentProcess
from fleet_support import Mosquitto, find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None,
                                reason="MOSQUITTO IS NOT INSTALLED: `make test` installs it (apt-get install mosquitto)")


def _pki(d):
    """A CA, a server certificate for 127.0.0.1, and client certificates named by their common name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def write(name, key, cert):
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgepeft test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)

    def issue(name, server=False):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1)))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        write(name, key, b.sign(ca_key, hashes.SHA256()))

    issue("server", server=True)
    for name in ("controller", "dev1", "dev2"):
        issue(name)


def test_mqtt_over_tls_with_a_certificate_and_topics_per_device(built, tmp_path):
    from edgepeft.contracts.job import job_topic, job_update_topic, new_job, sign_job
    from edgepeft.transport.mqtt import mqtt_client

    pki = tmp_path / "pki"
    pki.mkdir()
    _pki(pki)
    (pki / "acl").write_text("user controller\ntopic readwrite edgepeft/#\n\n"
                             "pattern readwrite edgepeft/things/%u/#\n")
    for p in pki.iterdir():
        p.chmod(0o644)
    tmp_path.chmod(0o755)
    pki.chmod(0o755)
    broker = Mosquitto(tmp_path / "broker", extra=(
        f"user root\n"
        f"listener {{tls_port}} 127.0.0.1\ncafile {pki}/ca.pem\ncertfile {pki}/server.pem\nkeyfile {pki}/server.key\n"
        f"require_certificate true\nuse_identity_as_username true\nacl_file {pki}/acl\n"), tls=True)
    url = f"mqtts://127.0.0.1:{broker.tls_port}"
    agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "dev1", "--mqtt", url, "--device-id", "dev1",
                         "--mqtt-ca", pki / "ca.pem", "--mqtt-cert", pki / "dev1.pem", "--mqtt-key", pki / "dev1.key")
    seen: list = []
    try:
        ctl = mqtt_client(url, "controller-test", ca=str(pki / "ca.pem"), cert=str(pki / "controller.pem"),
                          key=str(pki / "controller.key"))
        subscribed, sentinel = threading.Event(), threading.Event()
        sentinel_topic = job_update_topic("dev2", "sentinel")  # dev2's own topic: the ACL lets it through

        def on_message(c, u, msg):  # the device's signed reports, read as their fields
            body = json.loads(msg.payload) if msg.payload else None
            seen.append((msg.topic, json.loads(body["report"]) if body and "report" in body else body))
            if msg.topic == sentinel_topic:
                sentinel.set()
        ctl.on_message = on_message
        ctl.on_connect = lambda c, *a: c.subscribe(job_update_topic("+", "+"), qos=1)
        ctl.on_subscribe = lambda *a: subscribed.set()
        ud = ctl.user_data_get()
        ctl.connect(ud["host"], ud["port"])
        ctl.loop_start()
        assert subscribed.wait(30), "the broker never acknowledged the controller's subscription"
        # another device's certificate cannot publish dev1's results (the broker's ACL drops it)
        rogue = mqtt_client(url, "rogue", ca=str(pki / "ca.pem"), cert=str(pki / "dev2.pem"), key=str(pki / "dev2.key"))
        ud = rogue.user_data_get()
        rogue.connect(ud["host"], ud["port"])
        rogue.loop_start()
        rogue.publish(job_update_topic("dev1", "fake"), json.dumps({"status": "SUCCEEDED"}), qos=1).wait_for_publish(5)
        # nor send dev1 a job; and an unsigned job published with the controller's own rights is refused by dev1
        rogue.publish(job_topic("dev1", "rogue-job"), b'{"document": "{}", "signatures": []}', qos=1).wait_for_publish(5)
        # then a message the ACL allows, on the same connection and QoS: the broker forwards one client's
        # messages in order, so once it arrives a forwarded fake would have arrived before it
        rogue.publish(sentinel_topic, json.dumps({"status": "QUEUED"}), qos=1).wait_for_publish(5)
        assert sentinel.wait(30), "the rogue's allowed message never arrived: the check below would prove nothing"
        assert not any("fake" in t for t, _ in seen), seen
        ctl.publish(job_topic("dev1", "unsigned"), json.dumps({"document": json.dumps(
            {"job_id": "unsigned", "device_id": "dev1", "operation": "rollback", "name": "alpha", "from_version": 1,
             "issued": "2026-01-01T00:00:00Z", "expires": "2099-01-01T00:00:00Z"}), "signatures": []}),
                    qos=1, retain=True).wait_for_publish(5)
        deadline = time.time() + 30
        while time.time() < deadline and not any(t.endswith("unsigned/update") for t, _ in seen):
            time.sleep(0.1)
        refused = [p for t, p in seen if t.endswith("unsigned/update")]
        assert refused and refused[-1]["status"] == "REJECTED" and "not signed" in refused[-1]["reason"]
        # dev1 answers its jobs in order, and the broker had taken rogue-job before the unsigned one was sent:
        # had rogue-job reached dev1, its answer would have come before this one
        assert not any("rogue-job" in t for t, _ in seen), seen
        # a signed install job over TLS: dev1 fetches... from a repository it cannot reach: a transient FAILED,
        # which proves the signed job got through and was acted on
        job = new_job(job_id="j1", device_id="dev1", operation="install", repository="http://127.0.0.1:9/",
                      package={"path": "edgepeft/adapters/alpha/v2.epu", "id": "0" * 64, "name": "alpha",
                               "version": 2, "type": "adapter"})
        from edgepeft.contracts.signing import load_private_key

        ctl.publish(job_topic("dev1", "j1"), sign_job(job, load_private_key(built["private_key"])), qos=1,
                    retain=True).wait_for_publish(5)
        deadline = time.time() + 60
        while time.time() < deadline and not any(t.endswith("j1/update") and p and p["status"] != "IN_PROGRESS"
                                                 for t, p in seen):
            time.sleep(0.1)
        final = [p for t, p in seen if t.endswith("j1/update")]
        assert [p["status"] for p in final][:1] == ["IN_PROGRESS"] and final[-1]["status"] == "FAILED"
        assert final[-1]["transient"] is True
        rogue.loop_stop()
        ctl.loop_stop()
    finally:
        agent.stop()
        broker.stop()
