"""The device agent as a real process on 127.0.0.1: push over HTTP, every bad input refused with a
reason while the device keeps serving, resume after a dropped connection and after an agent restart."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import urllib.error
import urllib.request

import pytest
from agent_support import AgentProcess, run_cli
from test_runtime_support import require_fixtures
from update_support import forge, unpack_package, version_of

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.transport.http import HttpLink  # noqa: E402
from edgepeft.transport.link import Package, push  # noqa: E402

Q = "héllo ☃"


@pytest.fixture(scope="module")
def agent(built, tmp_path_factory):
    state = tmp_path_factory.mktemp("agent") / "state"
    a = AgentProcess(built["bundle"], built["public_key"], state)
    yield a
    a.stop()


def _push_bytes(agent, data: bytes, tmp_path, name="u.epu", **kw):
    """Push as `edgepeft push` does, minus its local check of the file (so damaged bytes reach the device)."""
    from edgepeft.contracts.names import sha256_bytes
    from edgepeft.contracts.update import envelope_length

    p = tmp_path / name
    p.write_bytes(data)
    n = envelope_length(data)
    link = HttpLink(agent.url, agent.token)
    try:
        return push(Package(p, data, sha256_bytes(data[:n]), n), link, timeout=60, **kw)
    finally:
        link.close()


def _version(agent) -> int:
    return agent.chat("alpha", Q)["adapter_version"]


def test_push_over_http_installs_and_serves_the_new_version(agent, built, tmp_path):
    assert _version(agent) == 1
    r = run_cli("push", built["package"], "--to", agent.url, "--token", agent.token, "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    st = json.loads(r.stdout)
    assert st["status"] == "healthy" and st["version"] == 2
    assert [s["status"] for s in st["steps"]] == ["received", "verified", "installed", "healthy"]
    assert _version(agent) == 2
    # status says what runs and what happened
    r = run_cli("status", "--device", agent.url, "--token", agent.token, "--json")
    dev = json.loads(r.stdout)
    alpha = next(a for a in dev["adapters"] if a["name"] == "alpha")
    assert (alpha["version"], alpha["source"], alpha["floor"]) == (2, "store", 2)
    assert dev["recent"][-1]["status"] == "healthy"
    # the same package again: the device answers with its finished result, nothing changes
    r = run_cli("push", built["package"], "--to", agent.url, "--token", agent.token)
    assert r.returncode == 0 and "healthy" in r.stdout


def _expired(m):
    m["expires"] = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version_to(v):
    def f(m):
        m["adapter"]["version"] = v
    return f


def _other_base(m):
    m["base_fingerprint"] = m["adapter"]["base_fingerprint"] = "ab" * 32


def _escape_name(m):
    m["adapter"]["name"] = "../../etc/evil"


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def test_bad_packages_are_refused_with_a_reason_and_the_device_keeps_serving(agent, built, tmp_path):
    if _version(agent) != 2:  # order independence: make v2 current first
        assert _push_bytes(agent, built["package"].read_bytes(), tmp_path)["status"] == "healthy"
    from edgepeft.contracts.signing import generate_keypair

    stranger, _ = generate_keypair(tmp_path / "stranger")
    good = built["package"].read_bytes()
    key = built["private_key"]
    meta, _, payload = unpack_package(good)
    env_len = len(good) - len(payload)
    newer = forge(good, key, mutate=_version_to(9))
    unsigned_meta = json.loads(json.dumps(meta))
    cases = {
        "bad signature": (_flip(newer, env_len - 10), "signature|base64"),
        "unknown key": (forge(good, stranger, mutate=_version_to(9)), "does not trust"),
        "unsigned": (_unsigned(unsigned_meta, payload), "unsigned"),
        "replayed older": (forge(good, key, mutate=_version_to(1)), "older than v2"),
        "same version": (good, None),  # finished before: answered from the history, not installed again
        "expired": (forge(good, key, mutate=lambda m: (_version_to(9)(m), _expired(m))), "expired"),
        "wrong base": (forge(good, key, mutate=lambda m: (_version_to(9)(m), _other_base(m))), "built for base"),
        "truncated": (newer[:-100], "announces|more bytes|signed metadata"),
        "oversized": (newer + b"\0" * 64, "announces|more bytes"),
        "flipped payload byte": (_flip(newer, len(newer) - 3), "SHA-256"),
        "flipped envelope byte": (_flip(newer, 40), "signature does not match|not JSON|metadata"),
        "path outside the store": (forge(good, key, mutate=lambda m: (_version_to(9)(m), _escape_name(m))),
                                   "not a valid name"),
    }
    for what, (data, why) in cases.items():
        st = _push_bytes(agent, data, tmp_path, name=f"{what.replace(' ', '-')}.epu")
        if why is None:
            assert st["status"] == "healthy", (what, st)  # the earlier result, not a second install
        else:
            assert st["status"] == "rejected", (what, st)
            import re

            assert re.search(why, st["reason"]), (what, st["reason"])
        assert _version(agent) == 2, what
    # garbage sent straight to the device (edgepeft push itself refuses to send it)
    import hashlib

    link = HttpLink(agent.url, agent.token)
    junk = b"\x7fELF" + b"\x00" * 4092
    st = link.send(hashlib.sha256(junk).hexdigest(), junk, 0, lambda n: None)
    link.close()
    assert st["status"] == "rejected" and "not an edgepeft update package" in st["reason"]
    assert _version(agent) == 2
    assert not list((agent.state / "adapters").rglob("v-9*")) and not (agent.state / "etc").exists()
    assert not list((agent.state / "incoming").iterdir())


def _unsigned(meta, payload):
    from edgepeft.contracts.update import encode_envelope, metadata_bytes

    meta["adapter"]["version"] = 9
    return encode_envelope(metadata_bytes(meta), []) + payload


def test_token_host_and_origin_are_checked(agent, built):
    def req(path, headers):
        r = urllib.request.Request(agent.url + path, headers=headers)
        try:
            with urllib.request.urlopen(r, timeout=10) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    assert req("/v1/device", {})[0] == 401
    code, body = req("/v1/device", {"Authorization": "Bearer wrong-token-xxxxxxxx"})
    assert code == 401 and body["error"]["hint"]
    ok = {"Authorization": f"Bearer {agent.token}"}
    assert req("/v1/device", ok)[0] == 200
    assert req("/v1/device", ok | {"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    assert req("/v1/device", ok | {"Origin": "http://evil.example"})[0] == 403
    r = run_cli("push", built["package"], "--to", agent.url, "--token", "not-the-token-at-all")
    assert r.returncode != 0 and "token" in r.stderr
    # a file damaged on the sender's machine is caught before it is sent
    damaged = built["root"] / "damaged.epu"
    data = bytearray(built["package"].read_bytes())
    data[-100] ^= 1
    damaged.write_bytes(bytes(data))
    r = run_cli("push", damaged, "--to", agent.url, "--token", agent.token)
    assert r.returncode != 0 and "is damaged" in r.stderr


def test_half_sent_requests_without_a_token_do_not_starve_the_agent(agent):
    """Issue 23 item 14 through a real agent: 32 half-sent requests without a token (twice its connection
    slots) held open while the token holder asks for status and a completion; both are answered."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(agent.url)
    socks = []
    try:
        for _ in range(32):
            s = socket.create_connection((u.hostname, u.port), timeout=30)
            s.sendall(b"PUT /v1/updates/" + b"0" * 64 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks.append(s)
        assert agent.device()["adapters"]  # before: 429 Too Many Requests
        assert agent.chat("alpha", Q)["choices"][0]["message"]["content"] is not None
    finally:
        for s in socks:
            s.close()


def test_a_dropped_connection_and_an_agent_restart_resume_from_the_device_offset(built, tmp_path):
    state = tmp_path / "state"
    agent = AgentProcess(built["bundle"], built["public_key"], state)
    try:
        pkg = Package.read(version_of(built, tmp_path / "alpha-5.epu", 5))
        # send the envelope and part of the payload, then drop the connection mid-chunk
        host, port = agent.url.split("//")[1].split(":")
        sent = pkg.envelope_bytes + 1000
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request("PUT", f"/v1/updates/{pkg.id}", body=pkg.data[:pkg.envelope_bytes],
                  headers={"Authorization": f"Bearer {agent.token}", "Upload-Offset": "0",
                           "Upload-Length": str(pkg.size)})
        assert c.getresponse().read() and True
        c.putrequest("PUT", f"/v1/updates/{pkg.id}")
        for k, v in {"Authorization": f"Bearer {agent.token}", "Upload-Offset": str(pkg.envelope_bytes),
                     "Content-Length": str(pkg.size - pkg.envelope_bytes)}.items():
            c.putheader(k, v)
        c.endheaders()
        c.send(pkg.data[pkg.envelope_bytes:sent])
        c.close()  # the cable is pulled mid-chunk
        link = HttpLink(agent.url, agent.token)
        st = link.status(pkg.id)
        assert st["status"] == "receiving" and st["offset"] == pkg.envelope_bytes
        link.close()
        # a partial upload survives a killed agent (a power cut for the process)
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request("PUT", f"/v1/updates/{pkg.id}", body=pkg.data[pkg.envelope_bytes:sent],
                  headers={"Authorization": f"Bearer {agent.token}", "Upload-Offset": str(pkg.envelope_bytes),
                           "Upload-Length": str(pkg.size)})
        assert json.loads(c.getresponse().read())["offset"] == sent
        c.close()
        agent.kill()
        agent = AgentProcess(built["bundle"], built["public_key"], state)
        events = []
        link = HttpLink(agent.url, agent.token)
        st = push(pkg, link, timeout=60, on_event=events.append)
        link.close()
        assert st["status"] == "healthy" and st["version"] == 5, st
        assert any(f"resuming at byte {sent}" in e for e in events), events
        assert agent.chat("alpha", Q)["adapter_version"] == 5
    finally:
        agent.stop()
