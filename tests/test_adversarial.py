"""The adversarial suite (issue 23): every attack as one row of a table, run against real processes.

Processes (tests/adversarial_support.py, :class:`Lab`): an ``edgepeft agent`` on 127.0.0.1 with HTTP, a serial
line on a pseudo-terminal pair and MQTT through mosquitto; a second agent that pulls from a TUF repository
through a static server the attacker controls. Both serve ``alpha`` v2 (floor 2) before the first row.

After EVERY row the harness checks that nothing was lost: the served version and floor of every adapter
(the agent's status API), the store on disk (every package file's SHA-256 and every pointer file's
current/previous/floor), and that no upload was left behind; and, measured, that another client holding
the token got a completion answered while the attack ran (its served version unchanged).

Add a case in a few lines::

    ROWS.append(Row("http-my-case", "http", "network", "what is sent, in words",
                    lambda lab: http_outcome(*_http(lab.main, "GET", "/v1/device", token=False)),
                    expect=r"^401"))

- ``attack(lab)`` does the attack and returns an :class:`Outcome` (``refused``, a status, a reason text);
  helpers: ``lab.push_http(agent, bytes)``, ``lab.push_serial(bytes)``, ``lab.serial_raw(frames)``,
  ``lab.pull_round(agent, mutate)``, ``lab.mqtt_job(job_id, message)``, ``lab.pkg(...)`` (a package forged
  from the genuine one and signed: fleet key by default, ``key=lab.stranger`` for another key).
- ``expect``: a regex the outcome's reason must match (the outcome must be a refusal), or a predicate.
- ``transport`` picks the agent (``pull`` -> the pulling agent, anything else -> the main agent).
- A row for a weakness not fixed yet gets ``xfail="issue 23 item N: fixed on branch X"`` (strict: it must
  fail now) or ``xfail="new: ..."``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shutil
import time

import pytest
from adversarial_support import (
    Lab,
    Outcome,
    Row,
    _http,
    flip,
    http_outcome,
    package_id,
    publish_raw,
    regions,
    rss_kib,
    rss_peak_kib,
    slow_socket,
)
from fleet_support import find_mosquitto
from test_runtime_support import cached_bundle, require_fixtures

require_fixtures()

PULL = "sec-pull-serial"
STORE = "sec-http-store"
MQTT = "sec-mqtt"
RUNTIME = "l22-runtime"


# Items whose fix has landed: their rows must pass (an xfail mark would hide a regression).
LANDED = {PULL: {1, 2, 3, 4, 12, 16, 17}, STORE: {5, 6, 7, 8, 9, 13}, MQTT: {10, 11}, RUNTIME: {14, 15}}


def item(n: int, branch: str) -> str | None:
    """The strict-xfail reason for a row whose fix is still on ``branch``; None once it has landed."""
    return None if n in LANDED[branch] else f"issue 23 item {n}: fixed on branch {branch}"


ROWS: list[Row] = []


def row(*a, **kw) -> None:
    ROWS.append(Row(*a, **kw))


# =============================================================================================
# 1. tampered bytes: every region of a package x first/middle/last byte x every link
# =============================================================================================
REGION_WHY = {"magic": r"not an edgepeft update package|magic",
              "lengths": r"format|version|length|large|announces|metadata|signature|JSON|short",
              "metadata": r"signature does not match|not JSON|metadata|UTF-8",
              "signatures": r"signature|JSON|trust|base64|ed25519",
              "payload": r"SHA-256|payload|does not match"}


def _tampered(lab, region: str, where: str) -> bytes:
    data = lab.pkg()
    a, b = regions(data)[region]
    at = {"first": a, "middle": (a + b) // 2, "last": b - 1}[where]
    return flip(data, at, 0x01 if region != "lengths" else 0x40)


for _region in REGION_WHY:
    for _where in ("first", "middle", "last"):
        row(f"http-tamper-{_region}-{_where}", "http", "token-holder", f"a fresh package, {_where} byte of its "
            f"{_region} flipped", lambda lab, r=_region, w=_where: http_outcome(
                *lab.push_http(lab.main, _tampered(lab, r, w))), REGION_WHY[_region] + "|announces|more bytes")
        row(f"serial-tamper-{_region}-{_where}", "serial", "line", f"over serial: {_where} byte of the {_region} "
            "flipped", lambda lab, r=_region, w=_where: lab.push_serial(_tampered(lab, r, w)),
            REGION_WHY[_region] + "|announces|more bytes")


def _mirror_tamper(lab, region: str, where: str) -> Outcome:
    data = lab.pkg()
    p = lab.write_pkg(data, f"t-{region}-{where}.epu")

    def mutate():
        lab.publish(p)
        f = max(lab.repo.glob("targets/edgepeft/adapters/alpha/*.epu"), key=lambda x: x.stat().st_mtime)
        a, b = regions(data)[region]
        at = {"first": a, "middle": (a + b) // 2, "last": b - 1}[where]
        f.write_bytes(flip(data, at))
    return lab.pull_round(lab.puller, mutate, restore=False, about=f"/v{lab.last_version}.epu")


for _region in REGION_WHY:
    for _where in ("first", "middle", "last"):
        row(f"pull-mirror-tamper-{_region}-{_where}", "pull", "mirror", f"the mirror serves a listed package with "
            f"the {_where} byte of its {_region} flipped (arbitrary package)",
            lambda lab, r=_region, w=_where: _mirror_tamper(lab, r, w), r"download of .* failed|hash|length")


# =============================================================================================
# 2. truncations
# =============================================================================================
def _cut(lab, where: str) -> bytes:
    data = lab.pkg()
    r = regions(data)
    n = r["payload"][0]
    at = {"in-header": 10, "after-header": r["lengths"][1], "mid-metadata": sum(r["metadata"]) // 2,
          "mid-signatures": sum(r["signatures"]) // 2, "envelope-only": n, "envelope+1": n + 1,
          "one-short": len(data) - 1}[where]
    return data[:at]


CUT_WHY = r"announces|short|more bytes|signed metadata|not an edgepeft|truncated|incomplete"
for _where in ("in-header", "after-header", "mid-metadata", "mid-signatures", "envelope-only", "envelope+1",
               "one-short"):
    _x = None  # (an announced length that ends inside the envelope is refused at once: it can never complete)
    row(f"http-truncated-{_where}", "http", "token-holder", f"a package cut {_where}, Upload-Length = what is sent",
        lambda lab, w=_where: http_outcome(*lab.push_http(lab.main, _cut(lab, w))), CUT_WHY, xfail=_x)
    row(f"serial-truncated-{_where}", "serial", "line", f"over serial, a package cut {_where}",
        lambda lab, w=_where: lab.push_serial(_cut(lab, w)), CUT_WHY, xfail=_x)

for _what, _f in (("empty", lambda d: b""), ("half", lambda d: d[:len(d) // 2]), ("one-short", lambda d: d[:-1]),
                  ("one-long", lambda d: d + b"\0"), ("doubled", lambda d: d + d)):
    def _mirror_cut(lab, f=_f):
        data = lab.pkg()
        p = lab.write_pkg(data, "cut.epu")

        def mutate():
            lab.publish(p)
            t = max(lab.repo.glob("targets/edgepeft/adapters/alpha/*.epu"), key=lambda x: x.stat().st_mtime)
            t.write_bytes(f(data))
        return lab.pull_round(lab.puller, mutate, restore=False, about=f"/v{lab.last_version}.epu")
    row(f"pull-mirror-{_what}", "pull", "mirror", f"the mirror serves a listed package {_what} (endless data / "
        "truncation)", _mirror_cut, r"download of .* failed|length|hash")


# =============================================================================================
# 3. signed, but wrong: forged with the fleet key (the device's own rules refuse) or with another key
# =============================================================================================
def _expired(m):
    m["expires"] = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _base(m):
    m["base_fingerprint"] = m["adapter"]["base_fingerprint"] = "ab" * 32


def _name(n):
    def f(m):
        m["adapter"]["name"] = n
    return f


def _failing_check(m):
    m["health_checks"] = [{"input": "hi", "expect": {"equals": "never this"}, "max_new_tokens": 2}]


def _unsigned(lab) -> bytes:
    from update_support import unpack_package

    from edgepeft.contracts.update import encode_envelope, metadata_bytes

    meta, _, payload = unpack_package(lab.pkg())
    return encode_envelope(metadata_bytes(meta), []) + payload


def _signed_meta(lab, body: bytes, payload: bytes = b"x" * 64) -> bytes:
    from edgepeft.contracts.signing import load_private_key, sign_bytes
    from edgepeft.contracts.update import encode_envelope

    return encode_envelope(body, [sign_bytes(body, load_private_key(lab.key))]) + payload


def _deep_sigs(lab) -> bytes:
    """An envelope whose signature block is 30,000 nested JSON arrays (parsed before any signature check)."""
    from update_support import unpack_package

    from edgepeft.contracts.update import FORMAT_VERSION, HEADER, MAGIC

    data = lab.pkg()
    meta_len = HEADER.unpack_from(data, 0)[2]
    meta = data[HEADER.size:HEADER.size + meta_len]
    sigs = b"[" * 30000 + b"]" * 30000
    _, _, payload = unpack_package(data)
    return HEADER.pack(MAGIC, FORMAT_VERSION, len(meta), len(sigs)) + meta + sigs + payload


SIGNED = [
    # (id, attacker, what, make(lab) -> bytes, why, xfail)
    ("stranger-key", "stranger-key", "a newer package signed by a key the device does not trust",
     lambda lab: lab.pkg(key=lab.stranger), r"does not trust", None),
    ("unsigned", "network", "a newer package with no signature", _unsigned, r"not signed|unsigned|ed25519", None),
    ("replayed-older", "token-holder", "a captured older version (v1, fleet-signed)",
     lambda lab: lab.pkg(version=1), r"older than", None),
    ("same-version-other-bytes", "token-holder", "another package under the serving version (v2)",
     lambda lab: lab.pkg(version=2, mutate=lambda m: m.__setitem__("expires", "2099-01-01T00:00:00Z")),
     r"same version", None),
    ("expired", "token-holder", "an expired package", lambda lab: lab.pkg(mutate=_expired), r"expired", None),
    ("wrong-base", "token-holder", "a package built for another base", lambda lab: lab.pkg(mutate=_base),
     r"built for base", None),
    ("health-check-fails", "repo-key", "a signed package whose own health check fails (rollback)",
     lambda lab: lab.pkg(mutate=_failing_check), r"health check|check #0", None),
    ("name-dotdot", "repo-key", "adapter name ../../etc/evil", lambda lab: lab.pkg(mutate=_name("../../etc/evil")),
     r"not a valid name|name", None),
    ("name-slash", "repo-key", "adapter name a/b", lambda lab: lab.pkg(mutate=_name("alpha/x")),
     r"not a valid name|name", None),
    ("name-nul", "repo-key", "adapter name with NUL", lambda lab: lab.pkg(mutate=_name("alp\x00ha")),
     r"not a valid name|name", None),
    ("name-unicode", "repo-key", "adapter name with a Cyrillic a", lambda lab: lab.pkg(mutate=_name("alph\u0430")),
     r"not a valid name|name", None),
    ("name-newline", "repo-key", "adapter name 'alpha\\n' (the $ rule)", lambda lab: lab.pkg(mutate=_name("alpha\n")),
     r"not a valid name|name", item(17, PULL)),
    ("payload-size-lies", "repo-key", "signed payload size one byte larger than the payload",
     lambda lab: lab.pkg(mutate=lambda m: m["payload"].__setitem__("size", m["payload"]["size"] + 1)),
     r"announces|more bytes|size|SHA-256|short", None),
    ("signed-garbage-payload", "repo-key", "a correctly signed package whose payload is garbage",
     lambda lab: lab.pkg(payload=os.urandom(4096)), r"adapter|payload|format|not|invalid|failed", None),
    ("version-zero", "repo-key", "version 0", lambda lab: lab.pkg(version=0), r"version|at least|older", None),
    ("metadata-not-json", "repo-key", "signed metadata that is not JSON",
     lambda lab: _signed_meta(lab, b"\xff\xfe not json"), r"JSON|UTF-8|metadata", None),
    ("metadata-a-list", "repo-key", "signed metadata that is a JSON list",
     lambda lab: _signed_meta(lab, b"[1,2,3]"), r"metadata|object|table|must", None),
    ("signatures-deeply-nested", "network", "a signature block of 30,000 nested arrays", _deep_sigs,
     r"signature|JSON|nested|deep|too|not", None),
]
for _id, _who, _what, _make, _why, _x in SIGNED:
    row(f"http-{_id}", "http", _who, _what, lambda lab, mk=_make: http_outcome(*lab.push_http(lab.main, mk(lab))),
        _why, xfail=_x)
    row(f"serial-{_id}", "serial", "line" if _who == "network" else _who, _what,
        lambda lab, mk=_make: lab.push_serial(mk(lab)), _why, xfail=_x)


def _pull_listed(make, why_entry=None):
    def attack(lab):
        data = make(lab)
        path = f"edgepeft/adapters/alpha/v{lab.next_version()}.epu"

        def mutate():
            publish_raw(lab, data, path=path, entry=why_entry)
        return lab.pull_round(lab.puller, mutate, restore=False, polls=2, about=path)
    return attack


PULL_SIGNED = {"stranger-key": r"does not trust", "unsigned": r"unsigned|not signed|ed25519", "replayed-older": r"ignored",
               "same-version-other-bytes": r"ignored", "expired": r"expired", "wrong-base": r"ignored",
               "health-check-fails": r"rolled-back|health check", "name-dotdot": r"ignored|name",
               "signed-garbage-payload": r"rejected", "payload-size-lies": r"rejected|SHA|size",
               "metadata-not-json": r"rejected|JSON|ignored", "signatures-deeply-nested": r"rejected|signature|ignored"}
for _id, _who, _what, _make, _why, _x in SIGNED:
    if _id in PULL_SIGNED:
        row(f"pull-{_id}", "pull", "repo-key" if _id not in ("stranger-key", "unsigned") else "mirror",
            f"listed in valid TUF metadata: {_what}", _pull_listed(_make), PULL_SIGNED[_id])


# =============================================================================================
# 4. HTTP: tokens, headers, bodies, routes, the upload protocol
# =============================================================================================
def _get(path, token=True, headers=None, method="GET", body=None):
    return lambda lab: http_outcome(*_http(lab.main, method, path, body, headers, token=token))


def _raw(data: bytes, read=True):
    def attack(lab):
        s = slow_socket(lab.main, data)
        try:
            s.settimeout(15)
            got = s.recv(4096) if read else b""
        except OSError as exc:
            got = f"closed: {exc}".encode()
        finally:
            s.close()
        line = got.split(b"\r\n", 1)[0].decode("latin-1")
        code = int(line.split()[1]) if line.startswith("HTTP/") and len(line.split()) > 1 else 0
        return Outcome(code >= 400 or code == 0, str(code), line or "closed")
    return attack


_ID = "ab" * 32
HTTP_ROWS = [
    ("no-token-device", "network", "GET /v1/device without a token", _get("/v1/device", token=False), r"^401"),
    ("wrong-token-device", "network", "a wrong token",
     _get("/v1/device", False, {"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"}), r"^401"),
    ("token-prefix", "network", "the first half of the real token",
     lambda lab: http_outcome(*_http(lab.main, "GET", "/v1/device", None,
                                     {"Authorization": f"Bearer {lab.main.token[:20]}"}, token=False)), r"^401"),
    ("token-basic-scheme", "network", "the token as Basic credentials",
     lambda lab: http_outcome(*_http(lab.main, "GET", "/v1/device", None,
                                     {"Authorization": f"Basic {lab.main.token}"}, token=False)), r"^401"),
    ("token-in-query", "network", "the token in the query string",
     lambda lab: http_outcome(*_http(lab.main, "GET", f"/v1/device?token={lab.main.token}", token=False)),
     r"^(401|404)"),
    ("no-token-put", "network", "PUT an update without a token",
     lambda lab: http_outcome(*_http(lab.main, "PUT", f"/v1/updates/{package_id(lab.good())}", lab.good(),
                                     {"Upload-Offset": "0"}, token=False)), r"^401"),
    ("no-token-rollback", "network", "POST rollback without a token", _get("/v1/adapters/alpha/rollback", False,
                                                                          method="POST"), r"^401"),
    ("no-token-unload", "network", "POST unload without a token", _get("/v1/adapters/alpha/unload", False,
                                                                      method="POST"), r"^401"),
    ("no-token-chat", "network", "a completion without a token", _get(
        "/v1/chat/completions", False, {"Content-Type": "application/json"}, "POST",
        json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x"}]}).encode()), r"^401"),
    ("host-rebinding", "network", "a Host header naming another host (DNS rebinding)",
     _get("/v1/device", headers={"Host": "evil.example:80"}), r"^403"),
    ("origin-browser", "network", "a browser Origin not allowed", _get("/v1/device", headers={"Origin": "http://evil.example"}),
     r"^403"),
    ("origin-null", "network", "Origin: null (sandboxed iframe)", _get("/v1/device", headers={"Origin": "null"}), r"^403"),
    ("header-100k", "network", "one 100 KiB header", _raw(b"GET /v1/device HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: "
                                                          + b"a" * 100_000 + b"\r\n\r\n"), r"\b4\d\d\b|closed"),
    ("headers-500", "network", "500 headers", _raw(b"GET /v1/device HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                  + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n"),
     r"^HTTP/1.[01] 4\d\d|closed"),
    ("request-line-64k", "network", "a 64 KiB request line", _raw(b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\n\r\n"),
     r"4\d\d|closed"),
    ("http09", "network", "an HTTP/0.9 request", _raw(b"GET /v1/device\r\n"), r"4\d\d|closed"),
    ("garbage-request", "network", "binary garbage", _raw(os.urandom(2048)), r"4\d\d|closed"),
    ("method-trace", "network", "TRACE", _get("/v1/device", method="TRACE"), r"^(400|401|405|501)"),
    ("chunked-smuggling", "token-holder", "Content-Length and Transfer-Encoding: chunked together",
     lambda lab: _raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                      + lab.main.token.encode() + b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"0\r\n\r\nGET /v1/device HTTP/1.1\r\n\r\n")(lab), r"^HTTP/1.[01] 4\d\d|closed"),
    ("content-length-huge", "token-holder", "a completion announcing 10 GiB",
     lambda lab: _raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                      + lab.main.token.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 10737418240"
                      b"\r\n\r\n{")(lab), r"^HTTP/1.[01] 413|4\d\d"),
    ("content-length-negative", "token-holder", "Content-Length: -1",
     lambda lab: _raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                      + lab.main.token.encode() + b"\r\nContent-Length: -1\r\n\r\n{}")(lab), r"4\d\d"),
    ("bad-json", "token-holder", "a completion body that is not JSON", _get(
        "/v1/chat/completions", True, {"Content-Type": "application/json"}, "POST", b"{not json"), r"^400"),
    ("json-deep", "token-holder", "a completion body of 100,000 nested arrays", _get(
        "/v1/chat/completions", True, {"Content-Type": "application/json"}, "POST", b"[" * 100000 + b"]" * 100000),
     r"^4\d\d"),
    ("json-huge-number", "token-holder", "max_tokens = 10^5000", _get(
        "/v1/chat/completions", True, {"Content-Type": "application/json"}, "POST",
        b'{"model":"alpha","max_tokens":1' + b"0" * 5000 + b',"messages":[{"role":"user","content":"x"}]}'),
     r"^4\d\d"),
    ("json-duplicate-model", "token-holder", "model given twice, the second unknown", _get(
        "/v1/chat/completions", True, {"Content-Type": "application/json"}, "POST",
        b'{"model":"alpha","model":"nope","messages":[{"role":"user","content":"x"}]}'), r"^4\d\d"),
    ("lone-surrogate", "token-holder", "a message holding a lone surrogate (\\ud800)", _get(
        "/v1/chat/completions", True, {"Content-Type": "application/json"}, "POST",
        b'{"model":"alpha","max_tokens":2,"messages":[{"role":"user","content":"a\\ud800b"}]}'), r"^400"),
    ("route-dotdot", "token-holder", "GET /v1/updates/../../etc/passwd", _get("/v1/updates/../../etc/passwd"),
     r"^(400|404)"),
    ("route-encoded-dotdot", "token-holder", "%2e%2e in an update id", _get("/v1/updates/%2e%2e%2f%2e%2e%2fx"),
     r"^(400|404)"),
    ("route-uppercase-id", "token-holder", "an id in upper case hex", _get("/v1/updates/" + "AB" * 32), r"^(400|404)"),
    ("route-id-newline", "token-holder", "an id followed by %0a", _get(f"/v1/updates/{_ID}%0a"), r"^(400|404)"),
    ("rollback-unknown", "token-holder", "roll back an adapter the device does not have",
     _get("/v1/adapters/nope/rollback", method="POST"), r"^4\d\d"),
    ("rollback-dotdot", "token-holder", "roll back '..'", _get("/v1/adapters/../rollback", method="POST"), r"^4\d\d"),
    ("unload-unknown", "token-holder", "unload an adapter the device does not have",
     _get("/v1/adapters/nope/unload", method="POST"), r"^4\d\d"),
    ("offset-not-number", "token-holder", "Upload-Offset: abc", _get(f"/v1/updates/{_ID}", True,
                                                                    {"Upload-Offset": "abc"}, "PUT", b"x"), r"^400"),
    ("offset-negative", "token-holder", "Upload-Offset: -5", _get(f"/v1/updates/{_ID}", True,
                                                                 {"Upload-Offset": "-5"}, "PUT", b"x"), r"^400"),
    ("offset-ahead", "token-holder", "a first chunk at offset 2^40", _get(
        f"/v1/updates/{_ID}", True, {"Upload-Offset": str(1 << 40)}, "PUT", b"x"), r"^409"),
    ("length-2-64", "token-holder", "Upload-Length 2^64", _get(
        f"/v1/updates/{'cd' * 32}", True, {"Upload-Offset": "0", "Upload-Length": str(1 << 64)}, "PUT", b"EPUPDATE"),
     r"announces|^4\d\d"),
    ("id-not-envelope", "token-holder", "a genuine newer package under another id",
     lambda lab: http_outcome(*lab.push_http(lab.main, lab.pkg(), id="ef" * 32)), r"hashes to|not the id"),
    ("garbage-elf", "token-holder", "4 KiB of an ELF file", lambda lab: http_outcome(
        *lab.push_http(lab.main, b"\x7fELF" + b"\0" * 4092)), r"not an edgepeft update package"),
    ("chunk-too-large", "token-holder", "one chunk larger than the device takes", _get(
        f"/v1/updates/{'de' * 32}", True, {"Upload-Offset": "0"}, "PUT", b"E" * (5 << 20)), r"^4\d\d|closed"),
]
for _id, _who, _what, _attack, _why in HTTP_ROWS:
    row(f"http-{_id}", "http", _who, _what, _attack, _why,
        xfail=item(15, RUNTIME) if _id == "lone-surrogate" else None)


def _few_slow(n: int, with_token: bool = False):
    def attack(lab):
        held = []
        for _ in range(n):
            first = b"GET /v1/device HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            if with_token:
                first += f"Authorization: Bearer {lab.main.token}\r\n".encode()
            held.append(slow_socket(lab.main, first + b"X-Slow: "))
        return Outcome(True, "held", f"{n} half-sent requests held open while the probe runs", held=held)
    return attack


row("http-slowloris-4", "http", "network", "4 half-sent requests held open", _few_slow(4), r"held")
row("http-slowloris-16", "http", "network", "16 half-sent requests held open (the whole pool)", _few_slow(16),
    r"held", xfail=item(14, RUNTIME))
row("http-slow-body", "http", "token-holder", "a completion whose body never arrives",
    lambda lab: Outcome(True, "held", "held", held=[slow_socket(lab.main, (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + lab.main.token
        + "\r\nContent-Length: 1000\r\n\r\n{").encode())]), r"held")


def _victim(lab) -> bytes:
    """A genuine, fleet-signed package the device will take in and then roll back (its health check fails):
    it proves a live upload was processed without changing what serves."""
    return lab.pkg(mutate=_failing_check)


def _victim_ok(out_of_attack: Outcome, lab, victim: bytes) -> Outcome:
    code, st = lab.push_http(lab.main, victim)
    done = st.get("status") if isinstance(st, dict) else None
    return Outcome(done == "rolled-back", f"attack: {out_of_attack.reason}; victim {done}",
                   f"attack: {out_of_attack.reason} | the genuine upload afterwards: {code} {done}: "
                   f"{st.get('reason') if isinstance(st, dict) else st}")


def _delete_live(lab, via: str):
    victim = _victim(lab)
    vid = package_id(victim)
    n = regions(victim)["payload"][0]
    code, st = _http(lab.main, "PUT", f"/v1/updates/{vid}", victim[:n],
                     {"Upload-Offset": "0", "Upload-Length": str(len(victim))})
    assert code == 200 and st.get("status") == "receiving", st
    if via == "http":
        out = http_outcome(*_http(lab.main, "PUT", f"/v1/updates/{vid}", b"", {"Upload-Offset": str(n),
                                                                                "Upload-Length": "0"}))
    else:
        from edgepeft.transport import serial_proto as sp
        from edgepeft.transport.framing import encode_frame

        lab.serial_raw(encode_frame(sp.QUERY, sp.QUERY_BODY.pack(bytes.fromhex(vid), 1 << 63))
                       + encode_frame(sp.DATA, sp.data(bytes.fromhex(vid)[:8], n, b"x")), wait=1.0)
        out = Outcome(True, "sent", "QUERY total 2^63 + DATA")
    code, st = _http(lab.main, "GET", f"/v1/updates/{vid}")
    # the genuine sender resumes from where the device says it is
    offset = int(st.get("offset") or 0) if code == 200 and st.get("status") == "receiving" else 0
    code, st = _http(lab.main, "PUT", f"/v1/updates/{vid}", victim[offset:],
                     {"Upload-Offset": str(offset), "Upload-Length": str(len(victim))})
    deadline = time.monotonic() + 60
    while st.get("status") in ("received", "verified", "installed") and time.monotonic() < deadline:
        time.sleep(0.05)
        code, st = _http(lab.main, "GET", f"/v1/updates/{vid}")
    return Outcome(st.get("status") == "rolled-back", st.get("status"),
                   f"attack: {out.reason} | genuine upload afterwards: {st.get('status')}: {st.get('reason')}")


row("http-length-zero-on-live-upload", "http", "token-holder", "Upload-Length: 0 sent to another client's upload",
    lambda lab: _delete_live(lab, "http"), r"genuine upload afterwards: rolled-back", xfail=item(7, STORE))
row("serial-total-2-63-on-live-upload", "serial", "line", "a serial QUERY with total 2^63 for an upload in progress",
    lambda lab: _delete_live(lab, "serial"), r"genuine upload afterwards: rolled-back", xfail=item(7, STORE))


def _poison(lab, via: str):
    victim = _victim(lab)
    vid = package_id(victim)
    junk = os.urandom(64)
    if via == "http":
        out = http_outcome(*lab.push_http(lab.main, junk, id=vid))
    else:
        out = lab.push_serial(junk, id=vid)
    return _victim_ok(out, lab, victim)


row("http-id-poisoning", "http", "token-holder", "64 garbage bytes under the id of a genuine package not sent yet",
    lambda lab: _poison(lab, "http"), r"victim rolled-back|afterwards: 200 rolled-back", xfail=item(6, STORE))
row("serial-id-poisoning", "serial", "line", "over serial (no token): garbage under a genuine package's id",
    lambda lab: _poison(lab, "serial"), r"victim rolled-back|afterwards: 200 rolled-back", xfail=item(6, STORE))


def _idle_slots(lab):
    for _ in range(4):
        _http(lab.main, "PUT", f"/v1/updates/{os.urandom(32).hex()}", b"EPUPDATE", {"Upload-Offset": "0"})
    return _victim_ok(Outcome(True, "", "4 idle 8-byte uploads"), lab, _victim(lab))


row("http-idle-slots", "http", "token-holder", "four 8-byte partial uploads, then a genuine push", _idle_slots,
    r"afterwards: 200 rolled-back", xfail=item(9, STORE), leaves_attacker_parts=True)


def _huge_signed(lab, announce: bool):
    data = lab.pkg(mutate=lambda m: m["payload"].__setitem__("size", 100 << 30), fix_payload_fields=False)
    n = regions(data)["payload"][0]
    code, st = lab.push_http(lab.main, data[:n], total=None if not announce else len(data))
    return Outcome(isinstance(st, dict) and st.get("status") == "rejected", str(st.get("status")),
                   f"{code} {st.get('status')}: {st.get('reason')}")


row("http-signed-size-100g-announced", "http", "repo-key", "a signed payload size of 100 GiB, Upload-Length true",
    lambda lab: _huge_signed(lab, True), r"announces|larger|at most|free")
row("http-signed-size-100g-unannounced", "http", "repo-key", "a signed payload size of 100 GiB, no Upload-Length",
    lambda lab: _huge_signed(lab, False), r"larger|at most|free|space", xfail=item(8, STORE))


# =============================================================================================
# 5. the serial line (no token on it: anyone at the cable)
# =============================================================================================
def _frames(*frames):
    from edgepeft.transport.framing import encode_frame

    return b"".join(encode_frame(k, b) for k, b in frames)


def _still_answers(lab, sent: str) -> Outcome:
    info = lab.serial_info()
    ok = info is not None and any(a["name"] == "alpha" for a in info.get("adapters", []))
    return Outcome(ok, "answers" if ok else "silent", f"{sent}; the next INFO is {'answered' if ok else 'NOT answered'}")


def _serial(name: str, make, why=r"answered", x=None, who="line"):
    def attack(lab):
        lab.serial_raw(make(lab), wait=0.5)
        return _still_answers(lab, name)
    row(f"serial-{name}", "serial", who, name.replace("-", " "), attack, why, xfail=x)


def _sp():
    from edgepeft.transport import serial_proto as sp
    return sp


_serial("noise-4k", lambda lab: random.Random(1).randbytes(4096))
for _seed in (2, 3):
    _serial(f"noise-64k-seed{_seed}", lambda lab, s=_seed: random.Random(s).randbytes(65536))
_serial("no-delimiter-40k", lambda lab: b"\x01" * 40000)
_serial("bad-crc-info", lambda lab: (lambda f: f[:-3] + bytes([f[-3] ^ 0xFF]) + f[-2:])(_frames((_sp().INFO, b""))))
_serial("bad-cobs", lambda lab: b"\x05\x01\x02\x00")
_serial("unknown-frame-type", lambda lab: _frames((ord("Z"), b"hello")))
_serial("empty-frames", lambda lab: b"\x00" * 1000)
_serial("data-without-query", lambda lab: _frames((_sp().DATA, _sp().data(b"\x01" * 8, 0, b"EPUPDATE"))))
_serial("data-short-head", lambda lab: _frames((_sp().DATA, b"\x01\x02")))
_serial("query-short-body", lambda lab: _frames((_sp().QUERY, b"\x01" * 5)))
_serial("data-far-offset", lambda lab: _frames((_sp().QUERY, _sp().query("12" * 32, 100)),
                                               (_sp().DATA, _sp().data(bytes.fromhex("12" * 8), 1 << 31, b"x"))))
_serial("rollback-bad-utf8", lambda lab: _frames((_sp().ROLLBACK, b"\xff\xfe")))
_serial("rollback-dotdot", lambda lab: _frames((_sp().ROLLBACK, b"../../adapters/alpha")))
_serial("rollback-unknown", lambda lab: _frames((_sp().ROLLBACK, b"nope")))
_serial("info-flood-300", lambda lab: _frames(*[(_sp().INFO, b"")] * 300))
ROWS[-1].cleanup = lambda lab: lab.dirty.add("main")  # its answers drain for a while: the next row starts afresh
_serial("half-frame-then-info", lambda lab: _frames((_sp().DATA, b"x" * 3000))[:1500])
_serial("max-frame-plus-one", lambda lab: _frames((_sp().DATA, b"\x01" * ((16 << 10) + 1))))


def _query_total(lab):
    sp = _sp()
    rid = os.urandom(32)
    frames = lab.serial_raw(_frames((sp.QUERY, sp.QUERY_BODY.pack(rid, 1 << 63)),
                                    (sp.DATA, sp.data(rid[:8], 0, b"EPUPDATE" + b"\0" * 12))), sp.ACK, 2.0)
    replies = [json.loads(b[1:]) for k, b in frames if k == sp.REPLY and b[:1] == bytes([sp.QUERY])]
    refused = any(isinstance(r, dict) and "error" in r for r in replies)
    states = [sp.ACK_BODY.unpack(b)[2] for k, b in frames if k in (sp.ACK, sp.NAK) and len(b) == sp.ACK_BODY.size]
    taken = any(s not in (sp.STATE["receiving"], sp.STATE["rejected"]) for s in states)  # data never accepted
    return Outcome(refused and not taken, str(states), f"query answered {replies[:1]}, data states {states}: "
                   + ("rejected" if refused and not taken else "taken"))


row("serial-total-2-63", "serial", "line", "a QUERY announcing 2^63 bytes, then data", _query_total, r"rejected")


def _serial_rollback(lab):
    sp = _sp()
    frames = lab.serial_raw(_frames((sp.ROLLBACK, b"alpha")), sp.REPLY, 3.0)
    answer = next((json.loads(b[1:]) for k, b in frames if k == sp.REPLY and b[:1] == bytes([sp.ROLLBACK])), {})
    return Outcome("error" in answer, "answer", json.dumps(answer)[:300])


row("serial-rollback-without-token", "serial", "line", "ROLLBACK alpha with no credential", _serial_rollback,
    r"error", xfail=item(12, PULL))


def _query_flood(lab):
    sp = _sp()
    rng = random.Random(7)
    pid = lab.main.proc.pid
    before = rss_kib(pid)
    for _ in range(4):
        lab.serial_raw(b"".join(_frames((sp.QUERY, sp.QUERY_BODY.pack(rng.randbytes(32), 0))) for _ in range(5000)),
                       wait=0.2)
    lab.serial_info()
    grown = rss_kib(pid) - before
    return Outcome(grown < 2048, f"{grown} KiB", f"20,000 QUERYs with random ids: the agent grew by {grown} KiB")


row("serial-query-flood", "serial", "line", "20,000 QUERY frames with random ids (session state)", _query_flood,
    r"grew")


# =============================================================================================
# 6. TUF pull: the specification's attacks, by a mirror, the network, or a holder of repository keys
# =============================================================================================
def _meta(lab, name):
    return (lab.repo / "metadata" / name)


def _latest(lab, role):
    return max(lab.repo.glob(f"metadata/*.{role}.json"), key=lambda p: int(p.name.split(".")[0]))


def _pull(name, attacker, what, mutate_of, why, restore=True, x=None, polls=2, release=None):
    def attack(lab):
        return lab.pull_round(lab.puller, lambda: mutate_of(lab), restore=restore, polls=polls,
                              release=(lambda: release(lab)) if release else None)
    row(f"pull-{name}", "pull", attacker, what, attack, why, xfail=x)
    METADATA_FIRST.add(f"pull-{name}")


METADATA_FIRST: set = set()


def _resign(lab, path, key):
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata

    from edgepeft.contracts.signing import load_private_key

    md = Metadata.from_file(str(path))
    md.signatures.clear()
    md.sign(CryptoSigner(load_private_key(key)))
    from tuf.api.serialization.json import JSONSerializer
    path.write_bytes(md.to_bytes(JSONSerializer(compact=False)))


def _older_timestamp(lab):
    old = lab.repo.parent / "old-timestamp.json"
    if not old.exists():
        raise AssertionError("no older timestamp kept")
    _meta(lab, "timestamp.json").write_bytes(old.read_bytes())


def _keep_timestamp(lab):
    shutil.copy(_meta(lab, "timestamp.json"), lab.repo.parent / "old-timestamp.json")


def _rollback_ts(lab):
    _keep_timestamp(lab)
    lab.repo_obj().refresh()
    mark = len(lab.mirror.hits)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and lab.mirror.polls_since(mark) < 3:  # a whole poll saw the newer one
        time.sleep(0.05)
    lab.newest_timestamp = _meta(lab, "timestamp.json").read_bytes()
    _older_timestamp(lab)


_pull("rollback-timestamp", "mirror", "an older timestamp after the device saw a newer one (rollback attack)",
      _rollback_ts, r"BadVersionNumber|version|ExpiredMetadata", restore=False,
      release=lambda lab: _meta(lab, "timestamp.json").write_bytes(lab.newest_timestamp))
_pull("freeze-expired-timestamp", "repo-key", "a timestamp that expired (indefinite freeze)",
      lambda lab: lab.repo_obj(expiry_days={"timestamp": -1}).refresh(), r"Expired")
_pull("freeze-expired-snapshot", "repo-key", "a snapshot that expired",
      lambda lab: lab.repo_obj(expiry_days={"snapshot": -1}).refresh(), r"Expired")


def _mix(lab, role):
    """A new release is published; the mirror answers its {role} with the previous release's file."""
    old = _latest(lab, role).read_bytes()
    if role == "targets":
        publish_raw(lab, lab.good(), path="edgepeft/adapters/alpha/v2.epu")
    else:
        lab.repo_obj().refresh()
    lab.mirror.rules["/" + _latest(lab, role).name] = old


def _new_then(role, then):
    """A new release is published (so the device fetches this role's new file), then ``then(lab, file)``."""
    def mutate(lab):
        if role == "targets":
            publish_raw(lab, lab.good(), path="edgepeft/adapters/alpha/v2.epu")
        else:
            lab.repo_obj().refresh()
        then(lab, _latest(lab, role))
    return mutate


def _repair(lab):
    lab.repo_obj().refresh()


_pull("mix-and-match-snapshot", "mirror", "a new release whose snapshot is answered with the previous one",
      lambda lab: _mix(lab, "snapshot"), r"version|hash|length|Bad|mismatch", restore=False, release=_repair)
_pull("mix-and-match-targets", "mirror", "a new release whose targets are answered with the previous ones",
      lambda lab: _mix(lab, "targets"), r"version|hash|length|Bad|mismatch", restore=False, release=_repair)
_pull("wrong-key-timestamp", "mirror", "a timestamp re-signed by a stranger", lambda lab: _resign(
    lab, _meta(lab, "timestamp.json"), lab.stranger), r"threshold|signature|Unsigned")
_pull("wrong-key-snapshot", "mirror", "a new release whose snapshot a stranger re-signed", _new_then(
    "snapshot", lambda lab, f: _resign(lab, f, lab.stranger)), r"threshold|signature|Unsigned",
      restore=False, release=_repair)
_pull("wrong-key-targets", "mirror", "a new release whose targets a stranger re-signed", _new_then(
    "targets", lambda lab, f: _resign(lab, f, lab.stranger)), r"threshold|signature|Unsigned",
      restore=False, release=_repair)


def _stranger_root(lab, extra_fleet: bool):
    from securesystemslib.signer import CryptoSigner, SSlibKey
    from tuf.api.metadata import Metadata
    from tuf.api.serialization.json import JSONSerializer

    from edgepeft.contracts.signing import load_private_key

    md = Metadata.from_file(str(lab.repo / "metadata" / "1.root.json"))
    root = md.signed
    sk = load_private_key(lab.stranger)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(SSlibKey.from_crypto(sk.public_key()), role)
        if not extra_fleet:
            for kid in list(root.roles[role].keyids):
                if kid != SSlibKey.from_crypto(sk.public_key()).keyid:
                    root.revoke_key(kid, role)
    root.version = 2
    md.signatures.clear()
    md.sign(CryptoSigner(sk))
    lab.mirror.rules["/2.root.json"] = md.to_bytes(JSONSerializer(compact=False))


_pull("malicious-root-rotation", "mirror", "a 2.root.json naming the stranger, signed only by the stranger",
      lambda lab: _stranger_root(lab, False), r"threshold|signature|Unsigned")
_pull("malicious-root-rotation-keeps-fleet", "mirror", "a 2.root.json adding the stranger beside the fleet key, "
      "signed only by the stranger", lambda lab: _stranger_root(lab, True), r"threshold|signature|Unsigned")
_pull("endless-timestamp", "mirror", "an endless timestamp.json (endless data)",
      lambda lab: lab.mirror.rules.__setitem__("timestamp.json", "endless"), r"length|exceed|Download|Deserial")
_pull("endless-root", "mirror", "an endless 2.root.json (endless data)",
      lambda lab: lab.mirror.rules.__setitem__("/2.root.json", "endless"), r"length|exceed|Download|Deserial")
_pull("endless-snapshot", "mirror", "a new release whose snapshot is endless (endless data)", _new_then(
    "snapshot", lambda lab, f: lab.mirror.rules.__setitem__("/" + f.name, "endless")),
      r"length|exceed|Download|Deserial|hash", restore=False, release=_repair)
_pull("garbage-timestamp", "mirror", "timestamp.json of random bytes",
      lambda lab: lab.mirror.rules.__setitem__("timestamp.json", os.urandom(300)), r"Deserializ|JSON|Repository")
_pull("json-bomb-timestamp", "mirror", "timestamp.json of 8,000 nested arrays",
      lambda lab: lab.mirror.rules.__setitem__("timestamp.json", b"[" * 8000 + b"]" * 8000),
      r"Deserializ|JSON|Repository|Recursion")
_pull("timestamp-404", "mirror", "the timestamp is gone (404)", lambda lab: _meta(lab, "timestamp.json").unlink(),
      r"404|Download|fetch|Status")
_pull("slow-retrieval", "mirror", "timestamp.json dripped one byte a second",
      lambda lab: lab.mirror.rules.__setitem__("timestamp.json", ("drip", 1.0)), lambda o: o.refused, polls=0)


def _extraneous(lab):
    """An index (signed by the targets key) listing a package that the targets metadata does not list."""
    from update_support import unpack_package

    data = lab.pkg()
    m, _, _ = unpack_package(data)
    v = m["adapter"]["version"]
    idx = json.dumps({"schema_version": 1, "packages": [
        {"path": f"edgepeft/adapters/alpha/not-listed-v{v}.epu", "type": "adapter", "name": "alpha", "version": v,
         "base_fingerprint": m["base_fingerprint"], "id": package_id(data)}]}).encode()
    publish_raw(lab, lab.good(), path="edgepeft/adapters/alpha/v2.epu", index_body=idx)


_pull("extraneous-index-entry", "repo-key", "the index names a package the signed targets do not list",
      _extraneous, r"ignored|not listed|failed", restore=False)


def _bad_index(body):
    def mutate(lab):
        publish_raw(lab, lab.good(), path="edgepeft/adapters/alpha/v2.epu", index_body=body(lab))
    return mutate


def _path_id_index(lab):
    from update_support import unpack_package

    data = lab.pkg()
    path = f"edgepeft/adapters/alpha/v{lab.next_version()}.epu"
    publish_raw(lab, data, path=path)
    m, _, _ = unpack_package(data)
    fp = None
    return json.dumps({"schema_version": 1, "packages": [
        {"path": path, "type": "adapter", "name": "alpha", "version": m["adapter"]["version"],
         "base_fingerprint": fp or m["base_fingerprint"], "id": "../../../victim"}]}).encode()


_pull("index-a-list", "repo-key", "a signed index that is a JSON list (kills the poller thread)",
      _bad_index(lambda lab: b"[1, 2]"), r"index|shape|list|object", restore=False, x=item(3, PULL))


def _index_then_alive(body_of, x):
    """A malformed signed index, then a genuine refusal the poller must still report (it survived)."""
    def attack(lab):
        out1 = lab.pull_round(lab.puller, lambda: _bad_index(body_of)(lab), restore=False)
        out2 = lab.pull_round(lab.puller, lambda: lab.mirror.rules.__setitem__("timestamp.json", b"x"),
                              restore=False)
        return Outcome(out2.refused and "Deserial" in out2.reason or "JSON" in out2.reason,
                       "", f"index: {out1.reason} || afterwards: {out2.reason}")
    return attack


row("pull-index-packages-a-string", "pull", "repo-key", "an index whose packages field is a string, then a poll",
    _index_then_alive(lambda lab: b'{"packages": "x"}', None), r"afterwards: .*(Deserial|JSON)")
row("pull-index-number", "pull", "repo-key", "an index that is a number, then a poll",
    _index_then_alive(lambda lab: b"42", item(3, PULL)), r"afterwards: .*(Deserial|JSON)", xfail=item(3, PULL))


def _index_path_ids(lab):
    return lab.pull_round(lab.puller, lambda: publish_raw(
        lab, lab.good(), path="edgepeft/adapters/alpha/v2.epu", index_body=_path_id_index(lab)), restore=False)


def _dotdot(lab):
    sentinel = lab.puller.state.parent / "victim.epu"  # a file outside the state folder
    sentinel.write_bytes(b"precious")
    out = _index_path_ids(lab)
    intact = sentinel.is_file() and sentinel.read_bytes() == b"precious"
    return Outcome(out.refused and intact, out.status, f"outside file {'intact' if intact else 'DESTROYED'}; "
                   + out.reason)


row("pull-index-id-dotdot", "pull", "repo-key", "an index entry whose id is ../../../victim", _dotdot,
    r"outside file intact", xfail=item(2, PULL))


def _refetched(lab):
    data = lab.pkg(key=lab.stranger)
    path = f"edgepeft/adapters/alpha/v{lab.next_version()}.epu"
    mark = len(lab.mirror.hits)
    out = lab.pull_round(lab.puller, lambda: publish_raw(lab, data, path=path), restore=False, polls=4)
    fetched = sum(1 for h in lab.mirror.hits[mark:] if h.endswith(".epu") and f"/v{path.split('/v')[-1]}" in h)
    return Outcome(fetched <= 1, f"{fetched} downloads", f"a refused target downloaded {fetched} times in 4 polls; "
                   + out.reason)


row("pull-refused-target-refetched", "pull", "repo-key", "a refused newest target, over four polls", _refetched,
    r"downloaded [01] times", xfail=item(4, PULL))


def _tofu(lab):
    """A fresh device whose first root comes from a mirror: it lists the fleet key but only the stranger signed it."""
    from agent_support import AgentProcess
    from securesystemslib.signer import CryptoSigner, SSlibKey
    from tuf.api.metadata import Metadata
    from tuf.api.serialization.json import JSONSerializer

    from edgepeft.contracts.signing import load_private_key

    md = Metadata.from_file(str(lab.repo / "metadata" / "1.root.json"))
    sk = load_private_key(lab.stranger)
    md.signed.add_key(SSlibKey.from_crypto(sk.public_key()), "root")
    md.signatures.clear()
    md.sign(CryptoSigner(sk))
    from adversarial_support import Mirror

    evil_root = lab.root / "evil-repo"
    shutil.rmtree(evil_root, ignore_errors=True)
    shutil.copytree(lab.repo, evil_root)
    (evil_root / "metadata" / "1.root.json").write_bytes(md.to_bytes(JSONSerializer(compact=False)))
    m = Mirror(evil_root)
    state = lab.root / f"tofu{time.monotonic_ns()}" / "state"
    a = AgentProcess(lab.built["bundle"], lab.built["public_key"], state, "--pull", m.url, "--interval", "0.3")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and m.polls_since(0) < 2 and "pull:" not in a.logtext():
            time.sleep(0.1)
        kept = (state / "tuf" / "anchor.json").exists()
        return Outcome(not kept, "kept" if kept else "refused",
                       ("the attacker's root was KEPT as the anchor" if kept else "refused: ") + a.logtext()[-300:])
    finally:
        a.stop()
        m.stop()


row("pull-tofu-attacker-root", "pull", "mirror", "first contact: a root listing the fleet key, signed only by the "
    "stranger", _tofu, r"refused", xfail=item(1, PULL))


def _anchor_lost(lab):
    """The power went while the first root was being kept: STATE/tuf/anchor.json is written in place, without
    fsync, so after the cut it can be empty (delayed allocation). The device must still pull."""
    from agent_support import AgentProcess

    a = lab.puller
    a.stop()
    anchor = a.state / "tuf" / "anchor.json"
    anchor.write_bytes(b"")
    lab.puller = AgentProcess(lab.built["bundle"], lab.built["public_key"], a.state, "--pull", lab.mirror.url,
                              "--interval", "0.3")
    return lab.pull_round(lab.puller, lambda: None, restore=False, polls=2)


row("pull-anchor-empty-after-power-loss", "pull", "power-loss", "an empty anchor.json after a power cut, then polls",
    _anchor_lost, r"ignored|root|first contact|fetched again", probe_after=True)


# =============================================================================================
# 7. MQTT: anyone who can publish to the broker
# =============================================================================================
def _mq(name, what, make, why, x=None, who="broker", device=None):
    def attack(lab):
        jid = f"{name}-{time.monotonic_ns()}"
        return lab.mqtt_job(jid, make(lab, jid), device=device)
    row(f"mqtt-{name}", "mqtt", who, what, attack, why, xfail=x)


def _unsigned_job(lab, jid):
    msg = json.loads(lab.job(jid))
    msg["signatures"] = []
    return json.dumps(msg).encode()


def _edited_job(lab, jid):
    msg = json.loads(lab.job(jid))
    doc = json.loads(msg["document"])
    doc["package"]["version"] = 99
    msg["document"] = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return json.dumps(msg).encode()


_mq("unsigned", "a job with no signature", _unsigned_job, r"REJECTED: .*(not signed|ed25519)")
_mq("stranger-key", "a job signed by a stranger", lambda lab, j: lab.job(j, key=lab.stranger),
    r"REJECTED: .*does not trust")
_mq("edited-document", "a signed job whose document was edited", _edited_job, r"REJECTED: .*does not match")
_mq("other-device", "a job addressed to another device", lambda lab, j: lab.job(j, device_id="dev-2"),
    r"REJECTED: .*addressed to")
_mq("expired", "an expired job", lambda lab, j: lab.job(j, valid_hours=-1), r"REJECTED: .*expired")
_mq("job-id-mismatch", "a genuine job published under another job id", lambda lab, j: lab.job("other-job"),
    r"REJECTED: .*is job")
_mq("not-json", "random bytes", lambda lab, j: os.urandom(200), r"REJECTED: .*not a job message")
_mq("json-list", "a JSON list", lambda lab, j: b"[1,2,3]", r"REJECTED|FAILED")
_mq("json-deep", "20,000 nested arrays", lambda lab, j: b"[" * 20000 + b"]" * 20000, r"REJECTED|FAILED")
_mq("unknown-field", "a signed job with an unknown field",
    lambda lab, j: (lambda m: m)(__import__("json").dumps({"document": __import__("json").dumps(
        {"job_id": j, "device_id": lab.device_id, "operation": "install", "x": 1}), "signatures": []}).encode()),
    r"REJECTED")
_mq("rollback-wrong-version", "a fleet-signed rollback from a version the device does not serve",
    lambda lab, j: lab.job(j, operation="rollback", package=None, repository=None, name="alpha", from_version=7),
    r"REJECTED: .*nothing to roll back", who="repo-key")
_mq("rollback-stranger", "a rollback signed by a stranger",
    lambda lab, j: lab.job(j, key=lab.stranger, operation="rollback", package=None, repository=None, name="alpha",
                           from_version=2), r"REJECTED: .*does not trust")
_mq("install-not-listed", "a fleet-signed job naming a package the repository does not list",
    lambda lab, j: lab.job(j, package={"path": "edgepeft/adapters/alpha/v77.epu", "id": "00" * 32, "name": "alpha",
                                       "version": 77, "type": "adapter"}), r"FAILED: .*not listed", who="repo-key")


def _replay(lab):
    jid = f"replay-{time.monotonic_ns()}"
    msg = lab.job(jid)
    first = lab.mqtt_job(jid, msg)
    log0 = len(lab.main.logtext())
    again = lab.mqtt_job(jid, msg)
    return Outcome(first.status == again.status, again.status, f"first {first.reason} / replay {again.reason}; "
                   f"log {lab.main.logtext()[log0:][-200:]!r}")


row("mqtt-replayed-job", "mqtt", "broker", "a finished job's message published again (answered from the ledger)",
    _replay, lambda o: o.refused and "SUCCEEDED" in o.status or o.status.startswith("SUCC"))


def _mqtt_big(lab):
    c = lab.mqtt()
    from edgepeft.contracts.job import job_topic
    pid = lab.main.proc.pid
    peak0 = rss_peak_kib(pid)
    for i in range(6):
        c.publish(job_topic(lab.device_id, f"big-{i}-{time.monotonic_ns()}"), b"{" * (24 << 20), qos=1)\
            .wait_for_publish(60)
    time.sleep(0.5)
    lab.main.device()
    grown = rss_peak_kib(pid) - peak0
    return Outcome(grown < 48 << 10, f"{grown >> 10} MiB", f"six 24 MiB messages: peak RSS grew {grown >> 10} MiB")


row("mqtt-oversized-messages", "mqtt", "broker", "six 24 MiB job messages", _mqtt_big, r"grew",
    xfail=item(11, MQTT))


def _forged_execution(lab):
    """A rollout to a device whose agent is not running; the attacker answers its job with SUCCEEDED."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgepeft.contracts.identity import public_key_text
    from edgepeft.contracts.job import job_update_topic
    from edgepeft.fleet.controller import start_rollout

    d = lab.root / f"rollout-{time.monotonic_ns()}"
    d.mkdir()
    enrolled = public_key_text(Ed25519PrivateKey.generate().public_key())  # ghost's key: the attacker lacks it
    (d / "fleet.toml").write_text(f'[mqtt]\nurl = "{lab.broker.url}"\n\n[repository]\nurl = "{lab.mirror.url}"\n\n'
                                  f'[[device]]\nid = "ghost"\naddress = "mqtt"\ngroup = "g"\npublic_key = "{enrolled}"\n')
    (d / "plan.toml").write_text(f'name = "forged"\ninventory = "fleet.toml"\npackages = ["{lab.built["package"]}"]\n'
                                 f'key = "{lab.key}"\n[select]\ngroups = ["g"]\n'
                                 '[timeouts]\nin_progress_timeout_minutes = 0.1\n')
    c = lab.mqtt()
    forged = []

    def answer(cl, ud, msg):
        job = msg.topic.rsplit("/", 1)[-1]
        if msg.payload and not msg.topic.endswith("/update") and job not in forged:
            forged.append(job)
            cl.publish(job_update_topic("ghost", job), json.dumps({"job_id": job, "status": "SUCCEEDED"}).encode(),
                       qos=1, retain=True)
    c.message_callback_add("edgepeft/things/ghost/jobs/+", answer)
    c.subscribe("edgepeft/things/ghost/jobs/+", qos=1)
    try:
        rep = start_rollout(d / "plan.toml", d / "rollouts.sqlite", log=lambda m: None).run(timeout=90)
    finally:
        c.message_callback_remove("edgepeft/things/ghost/jobs/+")
        c.unsubscribe("edgepeft/things/ghost/jobs/+")
    got = {x["device"]: x["status"] for x in rep["devices"]}
    return Outcome(got.get("ghost") != "SUCCEEDED" and bool(forged), got.get("ghost", "?"),
                   f"forged {len(forged)} execution update(s); the rollout counted ghost as {got.get('ghost')}")


row("mqtt-forged-execution-update", "mqtt", "broker", "SUCCEEDED published for a device whose agent is not running",
    _forged_execution, r"counted ghost as (TIMED_OUT|FAILED|REJECTED)", xfail=item(10, MQTT))


# =============================================================================================
# 8. a local user who can write the state folder (holds no key)
# =============================================================================================
def _restart_with(edit, *, restore: bool = True):
    """Stop the main agent, ``edit`` its state folder, start it again. ``restore``: put the edited files
    back afterwards (atomically, as the agent may read them at any time); rows whose agent is restarted
    from fresh afterwards leave them, so that the snapshot sees the agent's own answer to the edit."""
    def attack(lab):
        from agent_support import AgentProcess

        a = lab.main
        a.stop()
        saved = edit(lab, a.state)
        try:
            lab.main = AgentProcess(lab.built["bundle"], lab.built["public_key"], a.state, "--serial", lab.line.b,
                                    "--baud", lab.baud, "--mqtt", lab.broker.url, "--device-id", lab.device_id)
            st = lab.main.device()
            alpha = next(x for x in st["adapters"] if x["name"] == "alpha")
            return Outcome(alpha["version"] in (1, 2) and alpha["floor"] >= 2, f"v{alpha['version']}",
                           f"serving v{alpha['version']} floor {alpha['floor']}; notes {st.get('notes')}")
        except RuntimeError as exc:
            lab.main = None
            return Outcome(False, "down", f"the agent did not come up: {str(exc)[-300:]}")
        finally:
            for p, data in (saved or {}).items() if restore else ():
                if data is None:
                    p.unlink(missing_ok=True)
                else:
                    tmp = p.with_name(p.name + ".restore")
                    tmp.write_bytes(data)
                    os.replace(tmp, p)
    return attack


def _plant(lab, state):
    p = state / "adapters" / "alpha" / "v-999.epu"
    p.write_bytes(lab.pkg(version=999, key=lab.stranger))
    return {p: None}


def _plant_and_point(lab, state):
    p = state / "adapters" / "alpha" / "v-999.epu"
    p.write_bytes(lab.pkg(version=999, key=lab.stranger))
    s = state / "adapters" / "alpha" / "state.json"
    old = s.read_bytes()
    d = json.loads(old)
    d.update(current=999, floor=999)
    s.write_text(json.dumps(d))
    return {p: None, s: old}


def _corrupt(name, content):
    def edit(lab, state):
        p = state / name
        old = p.read_bytes() if p.exists() else None
        p.write_bytes(content)
        return {p: old}
    return edit


def _floor_down(lab, state):
    s = state / "adapters" / "alpha" / "state.json"
    old = s.read_bytes()
    p1 = state / "adapters" / "alpha" / "v-1.epu"
    p1.write_bytes(lab.pkg(version=1))
    d = json.loads(old)
    d.update(current=1, previous=None, floor=1)
    s.write_text(json.dumps(d))
    return {s: old, p1: None}


# A state file edited without the device's key is quarantined: alpha then serves the shipped v1 with its
# floor kept at the highest stored version that verifies (v2), so no captured older package installs again.
for _id, _what, _edit, _fallback in (
        ("planted-stranger-version", "a v-999 package signed by a stranger dropped into the store", _plant, False),
        ("planted-and-pointed", "a stranger's v-999 planted and state.json pointed at it (floor 999)",
         _plant_and_point, True),
        ("truncated-state-json", "a truncated adapter state.json", _corrupt("adapters/alpha/state.json", b'{"curr'),
         True),
        ("state-json-bad-version", "state.json with a non-integer version",
         _corrupt("adapters/alpha/state.json", b'{"current": "x", "floor": 2}'), True),
        ("garbage-bundle-json", "garbage bundle.json", _corrupt("bundle.json", b"\x00\xff garbage"), False),
        ("garbage-history", "garbage history.json", _corrupt("history.json", b"\x00\xff"), False),
        ("floor-rolled-back", "an older genuine package and state.json's floor lowered to it (no key needed)",
         _floor_down, True)):
    row(f"state-{_id}", "state", "local-user", _what, _restart_with(_edit, restore=not _fallback), r"serving v[12]" if _fallback else
        r"serving v2", probe_after=True, falls_back_to_shipped=_fallback)


# =============================================================================================
# the test
# =============================================================================================
# the pulling agent's repository is rebuilt when it restarts: MQTT jobs (which fetch from it) and the state rows run
# before the pull rows
_ORDER = {"http": 0, "serial": 1, "mqtt": 2, "state": 3, "pull": 4}
# (the metadata attacks on the pulling agent first, before refused packages pile up in its repository)
ROWS.sort(key=lambda r: (_ORDER[r.transport], r.id not in METADATA_FIRST))

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto)")
    built = cached_bundle("decoder", tmp_path_factory)
    lab = Lab(built, tmp_path_factory.mktemp("adversarial"))
    try:
        yield lab
    finally:
        lab.close()


def _param(r: Row):
    marks = [pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else []
    return pytest.param(r, id=r.id, marks=marks)


@pytest.mark.parametrize("case", [_param(r) for r in ROWS])
def test_attack_is_refused_and_nothing_is_lost(lab, case):
    lab.run(case)


def test_the_table_is_large_and_its_ids_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert len(ROWS) >= 150
    assert {r.transport for r in ROWS} >= {"http", "serial", "pull", "mqtt", "state"}
