"""The harness of the adversarial suite (tests/test_adversarial.py); no tests here.

A :class:`Lab` holds real processes, started once per module and restarted only when a case
killed or dirtied them:

- ``main``: an ``edgepeft agent`` on 127.0.0.1 with HTTP, a serial line (one end of a pseudo-terminal
  null modem, :class:`~edgepeft.transport.linesim.NullModem`) and MQTT (a real mosquitto), serving the
  fixture bundle with ``alpha`` v2 installed (floor 2) before the first case;
- ``puller``: a second agent that polls a TUF repository (``edgepeft publish``) through
  :class:`Mirror`, a static file server on 127.0.0.1 the attacker controls (it can replace, drip or
  stream files), also serving ``alpha`` v2 pulled from it.

:meth:`Lab.run` runs one :class:`Row`: it snapshots what must not change (served version, floor and
store on disk, read through the agent's API and its state folder), starts a :class:`Probe` (a second,
legitimate client with the token asking for a one-token completion in a loop), runs the attack,
requires at least one probe answer that started after the attack began and finished while the
attack still held its resources, checks the refusal the row expects, then the snapshot again.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent_support import AgentProcess

Q = "hi"
TERMINAL = ("healthy", "rejected", "rolled-back")


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
SHIPPED_VERSION = 1  # alpha's version inside the shipped bundle


@dataclass
class Outcome:
    """What the attacker saw: ``refused`` (the device said no, or ignored it), a status, and the reason text
    a row's ``expect`` pattern is matched against. ``held``: sockets/objects the attack keeps open until the
    probe has been answered (closed by the harness)."""

    refused: bool
    status: str = ""
    reason: str = ""
    held: list = field(default_factory=list)

    def release(self) -> None:
        for h in self.held:
            try:
                h.close()
            except OSError:
                pass
        self.held.clear()


@dataclass
class Row:
    """One case. ``attack(lab)`` returns an :class:`Outcome`; ``expect`` is a regex the outcome's reason
    must match (and ``refused`` must be true), or a callable(outcome) -> bool."""

    id: str
    transport: str  # http | serial | pull | mqtt | state
    attacker: str  # network | token-holder | line | broker | mirror | repo-key | local-user | stranger-key
    what: str
    attack: Callable
    expect: object = ""
    xfail: str | None = None  # "issue 23 item N: fixed on branch X" or "new: ..."
    cleanup: Callable | None = None
    probe_after: bool = False  # the attack stops the agent itself: the probe runs on the restarted one
    # the attacker's own unverified parts may stay (they give their slot to the next upload and expire)
    leaves_attacker_parts: bool = False
    # a quarantined state file: the device falls back to the shipped bundle's version (floor kept), by design
    falls_back_to_shipped: bool = False


def refused(outcome: Outcome, expect) -> bool:
    if callable(expect):
        return bool(expect(outcome))
    return outcome.refused and re.search(expect, outcome.reason or "", re.S | re.I) is not None


# ---------------------------------------------------------------------------------------------
# packages
# ---------------------------------------------------------------------------------------------
def package_id(data: bytes) -> str:
    """The id a sender would use: the SHA-256 of the envelope (of what there is, for broken bytes)."""
    from edgepeft.contracts.update import envelope_length
    from edgepeft.errors import EdgePeftError

    try:
        n = envelope_length(data[:20]) if len(data) >= 20 else None
    except EdgePeftError:
        n = None
    return hashlib.sha256(data[:n] if n and n <= len(data) else data).hexdigest()


def regions(data: bytes) -> dict:
    """Byte ranges (start, end) of a package: magic, header lengths, metadata, signatures, payload."""
    from edgepeft.contracts.update import HEADER, envelope_length

    n = envelope_length(data)
    m = HEADER.unpack_from(data, 0)[2]
    return {"magic": (0, 8), "lengths": (8, HEADER.size), "metadata": (HEADER.size, HEADER.size + m),
            "signatures": (HEADER.size + m, n), "payload": (n, len(data))}


def flip(data: bytes, at: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


# ---------------------------------------------------------------------------------------------
# the mirror: a static server the attacker controls
# ---------------------------------------------------------------------------------------------
class Mirror:
    """Serves ``root`` on 127.0.0.1 like any static host or CDN. ``rules`` maps a path suffix to
    ``bytes`` (served instead), ``"endless"`` (an endless body), or ``("drip", seconds)`` (one byte per
    interval until :meth:`clear`). ``hits`` counts requests per path."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.rules: dict = {}
        self.hits: list[str] = []
        self._release = threading.Event()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                mirror.hits.append(path)
                rule = next((v for k, v in list(mirror.rules.items()) if path.endswith(k)), None)
                try:
                    if rule == "endless":
                        self.send_response(200)
                        self.send_header("Content-Type", "application/octet-stream")
                        self.end_headers()
                        for _ in range(4096):  # 64 MiB at most, then the connection ends
                            if mirror._release.is_set():
                                break
                            self.wfile.write(b"{" * 16384)
                        return
                    if isinstance(rule, tuple) and rule[0] == "drip":
                        self.send_response(200)
                        self.send_header("Content-Length", "100000")
                        self.end_headers()
                        for _ in range(1000):
                            if mirror._release.wait(rule[1]):
                                break
                            self.wfile.write(b" ")
                            self.wfile.flush()
                        return
                    if isinstance(rule, bytes):
                        body = rule
                    else:
                        f = (mirror.root / path.lstrip("/")).resolve()
                        if mirror.root.resolve() not in f.parents or not f.is_file():
                            self.send_error(404)
                            return
                        body = f.read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def clear(self) -> None:
        self._release.set()
        self.rules.clear()
        time.sleep(0.05)
        self._release = threading.Event()

    def polls_since(self, mark: int) -> int:
        """Refreshes begun since ``mark`` (each one starts by asking for the next root version)."""
        return sum(1 for p in self.hits[mark:] if p.endswith(".root.json"))

    def stop(self) -> None:
        self.clear()
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# the probe: another, legitimate client, measured during each attack
# ---------------------------------------------------------------------------------------------
class Probe:
    """A thread asking ``agent`` for a one-token completion of ``adapter`` over and over (bounded).
    ``answered_during()``: answers that started after the attack began (:meth:`start`)."""

    def __init__(self, agent: AgentProcess, adapter: str = "alpha"):
        self.agent, self.adapter = agent, adapter
        self.answers: list[tuple[float, float, int]] = []  # (started, finished, adapter_version)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Probe:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def _loop(self):
        body = json.dumps({"model": self.adapter, "max_tokens": 1,
                           "messages": [{"role": "user", "content": Q}]}).encode()
        for _ in range(2000):
            if self._stop.is_set():
                return
            t = time.monotonic()
            try:
                req = urllib.request.Request(self.agent.url + "/v1/chat/completions", body,
                                             {"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.agent.token}"})
                with urllib.request.urlopen(req, timeout=20) as r:
                    v = json.load(r).get("adapter_version")
                self.answers.append((t, time.monotonic(), v))
            except (OSError, ValueError, http.client.HTTPException) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.2)
            self._stop.wait(0.05)

    def wait_answer(self, since: float | None = None, timeout: float = 20.0) -> bool:
        """True once an answer that started at or after ``since`` came back (bounded wait)."""
        since = self.t0 if since is None else since
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(t >= since for t, _, _ in self.answers):
                return True
            time.sleep(0.02)
        return any(t >= since for t, _, _ in self.answers)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


# ---------------------------------------------------------------------------------------------
# the lab
# ---------------------------------------------------------------------------------------------
def _http(agent, method, path, body=None, headers=None, token=True, timeout=30):
    h = {"Authorization": f"Bearer {agent.token}"} if token else {}
    h |= headers or {}
    host, port = agent.url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
    except (ConnectionError, http.client.HTTPException) as exc:  # the server closed it on us: a refusal too
        try:
            r = c.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException):
            return 0, {"error": {"message": f"closed: {type(exc).__name__}"}}
    finally:
        c.close()
    try:
        payload = json.loads(data or b"{}")
    except ValueError:
        payload = {"raw": data[:300].decode("utf-8", "replace")}
    return r.status, payload


def http_outcome(code: int, payload) -> Outcome:
    err = payload.get("error") if isinstance(payload, dict) else None
    msg = err.get("message", "") if isinstance(err, dict) else json.dumps(payload)[:300]
    if isinstance(payload, dict) and payload.get("status") in TERMINAL + ("receiving",):
        st = payload["status"]
        return Outcome(st in ("rejected", "rolled-back"), st, f"{code} {st}: {payload.get('reason')}")
    return Outcome(code >= 400 or code == 0, str(code), f"{code} {msg}")


class Lab:
    """Real processes for the adversarial suite (see the module docstring)."""

    def __init__(self, built: dict, root: Path):
        from fleet_support import Mosquitto

        from edgepeft.contracts.signing import generate_keypair
        from edgepeft.transport.linesim import NullModem

        self.built, self.root = built, Path(root)
        self.key = built["private_key"]
        self.stranger, self.stranger_pub = generate_keypair(self.root / "stranger")
        self.baud = 921600
        self.line = NullModem(self.baud).start()
        self.broker = Mosquitto(self.root / "mqtt")
        self.repo = self.root / "repo"
        self.repo.mkdir()
        self.mirror = Mirror(self.repo)
        self.publish(self.built["package"])
        self.device_id = "dev-1"
        self._n = 0
        self._version = 100
        self.main: AgentProcess | None = None
        self.puller: AgentProcess | None = None
        self.dirty: set[str] = set()
        self._pkgs: dict = {}
        self._mqtt = None

    # -- packages --------------------------------------------------------------------------------
    def next_version(self) -> int:
        self._version += 1
        return self._version

    def good(self) -> bytes:
        """The genuine v2 package (what both agents run)."""
        return self.built["package"].read_bytes()

    def pkg(self, version: int | None = None, key=None, mutate=None, payload: bytes | None = None,
            fix_payload_fields: bool = True) -> bytes:
        """A package made from the genuine one, at ``version`` (default: a fresh one above the floor),
        signed with ``key`` (default: the fleet key) after ``mutate(meta)``."""
        from update_support import forge

        v = self.next_version() if version is None else version
        self.last_version = v

        def m(meta):
            meta["adapter"]["version"] = v
            meta["adapter"]["file"] = f"adapters/{meta['adapter']['name']}-{v}.onnx_adapter"
            if mutate is not None:
                mutate(meta)
        return forge(self.good(), key or self.key, mutate=m, payload=payload, fix_payload_fields=fix_payload_fields)

    # -- processes -------------------------------------------------------------------------------
    def _start_main(self) -> AgentProcess:
        self._n += 1
        a = AgentProcess(self.built["bundle"], self.built["public_key"], self.root / f"main{self._n}" / "state",
                         "--serial", self.line.b, "--baud", self.baud, "--mqtt", self.broker.url,
                         "--device-id", self.device_id)
        code, st = self.push_http(a, self.good())
        assert st.get("status") == "healthy", st
        return a

    def push_http(self, agent, data: bytes, *, id: str | None = None, total: int | None = -1,
                  wait: float = 60.0) -> tuple[int, dict]:
        """PUT ``data`` as one upload (no local checks: damaged bytes reach the device), then follow its
        status until it is final or stops moving."""
        id = id or package_id(data)
        headers = {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        if total is not None:
            headers["Upload-Length"] = str(len(data) if total == -1 else total)
        code, st = _http(agent, "PUT", f"/v1/updates/{id}", data, headers)
        deadline = time.monotonic() + wait
        while isinstance(st, dict) and st.get("status") in ("received", "verified", "installed") \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            code2, st2 = _http(agent, "GET", f"/v1/updates/{id}")
            if code2 == 200:
                st = st2
        return code, st

    def ensure_main(self) -> AgentProcess:
        if self.main is not None and ("main" in self.dirty or self.main.proc.poll() is not None):
            self.main.kill() if self.main.proc.poll() is None else self.main.stop()
            self.main = None
        if self.main is None:
            self.dirty.discard("main")
            self.main = self._start_main()
        return self.main

    def ensure_puller(self) -> AgentProcess:
        if self.puller is not None and ("puller" in self.dirty or self.puller.proc.poll() is not None):
            self.puller.kill()
            self.puller = None
        if self.puller is None:
            self.dirty.discard("puller")
            self.mirror.clear()
            shutil.rmtree(self.repo)
            self.repo.mkdir()
            self.publish(self.built["package"])
            self._n += 1
            self.puller = AgentProcess(self.built["bundle"], self.built["public_key"],
                                       self.root / f"pull{self._n}" / "state", "--pull", self.mirror.url,
                                       "--interval", "0.3")
            deadline = time.time() + 60
            while time.time() < deadline and self.puller.chat("alpha", Q, 1)["adapter_version"] != 2:
                time.sleep(0.2)
            assert self.puller.chat("alpha", Q, 1)["adapter_version"] == 2, self.puller.logtext()[-2000:]
        return self.puller

    def agent_for(self, transport: str) -> AgentProcess:
        return self.ensure_puller() if transport == "pull" else self.ensure_main()

    def close(self) -> None:
        for a in (self.main, self.puller):
            if a is not None:
                a.stop()
        if self._mqtt is not None:
            self._mqtt.loop_stop()
            self._mqtt.disconnect()
        self.mirror.stop()
        self.broker.stop()
        self.line.close()

    # -- the repository --------------------------------------------------------------------------
    def repo_obj(self, **kw):
        from edgepeft.contracts.signing import load_private_key
        from edgepeft.release.tuf_repo import ROLES, TufRepository

        return TufRepository(self.repo, {r: load_private_key(self.key) for r in ROLES}, **kw)

    def publish(self, *paths, **kw) -> None:
        self.repo_obj(**kw).publish([Path(p) for p in paths])

    def write_pkg(self, data: bytes, name: str) -> Path:
        p = self.root / "pkgs" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        return p

    def target_file(self, version: int) -> Path:
        return next(self.repo.glob(f"targets/edgepeft/adapters/alpha/*.v{version}.epu"))

    def pull_round(self, agent: AgentProcess, mutate: Callable, *, restore: bool = True, polls: int = 2,
                   wait: float = 20.0, release=None, about: str | None = None) -> Outcome:
        """Apply ``mutate()`` to the repository or the mirror, wait until the device has polled ``polls``
        times since, and report what its log said about it (a refusal, or nothing: ignored)."""
        saved = self.root / "repo-saved"
        if restore:
            shutil.rmtree(saved, ignore_errors=True)
            shutil.copytree(self.repo, saved)
        log0 = len(agent.logtext())
        try:
            mutate()
            mark = len(self.mirror.hits)  # polls that begin once the mutation is in place
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.mirror.polls_since(mark) < polls + 1:
                time.sleep(0.05)
            polled = self.mirror.polls_since(mark)
            # lines about this case: its package's path, else the poller's own errors (an older refused target
            # is fetched again on every poll and logged; that is not this case)
            lines = [ln for ln in agent.logtext()[log0:].splitlines()
                     if (about in ln if about else (ln.startswith("pull:") or "Traceback" in ln
                                                    or "Exception in thread" in ln))]
        finally:
            if release is not None:
                release()
            self.mirror.clear()
            if restore:
                shutil.rmtree(self.repo)
                shutil.copytree(saved, self.repo)
        text = "\n".join(dict.fromkeys(lines))
        installed = [ln for ln in lines if re.search(r": (healthy)\b", ln)]
        return Outcome(not installed, "polled" if polled else "stalled",
                       f"{polled} polls; " + (text or "ignored: nothing logged"))

    # -- serial ----------------------------------------------------------------------------------
    def serial_link(self):
        from edgepeft.transport.serial_link import SerialLink

        return SerialLink(self.line.a, self.baud, reply_timeout=1.0)

    def push_serial(self, data: bytes, *, id: str | None = None, wait: float = 60.0) -> Outcome:
        from edgepeft.errors import TransportError

        id = id or package_id(data)
        link = self.serial_link()
        try:
            try:
                st = link.send(id, data, 0, lambda n: None)
                deadline = time.monotonic() + wait
                while st.get("status") in ("received", "verified", "installed") and time.monotonic() < deadline:
                    time.sleep(0.05)
                    st = link.status(id) or st
            except TransportError as exc:
                return Outcome(True, "error", f"link: {exc.message}")
        finally:
            link.close()
        s = st.get("status")
        return Outcome(s in ("rejected", "rolled-back"), str(s), f"{s}: {st.get('reason')}")

    def serial_raw(self, data: bytes, answer_kind: int | None = None, wait: float = 2.0) -> list:
        """Write raw bytes on the line; return the frames that came back within ``wait`` s."""
        import serial

        from edgepeft.transport.framing import FrameDecoder

        ser = serial.Serial(self.line.a, self.baud, timeout=0.05, write_timeout=30)
        try:
            ser.reset_input_buffer()
            ser.write(data)
            dec, out = FrameDecoder(), []
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                out += list(dec.feed(ser.read(max(1, ser.in_waiting))))
                if answer_kind is not None and any(k == answer_kind for k, _ in out):
                    break
            return out
        finally:
            ser.close()

    def serial_info(self) -> dict | None:
        """An INFO request over the line; None if the device does not answer."""
        from edgepeft.transport import serial_proto as sp
        from edgepeft.transport.framing import encode_frame

        for _ in range(3):
            for k, b in self.serial_raw(encode_frame(sp.INFO), sp.REPLY, 3.0):
                if k == sp.REPLY and b[:1] == bytes([sp.INFO]):
                    return json.loads(b[1:])
        return None

    # -- MQTT ------------------------------------------------------------------------------------
    def mqtt(self):
        if self._mqtt is None:
            from edgepeft.transport.mqtt import mqtt_client

            self._updates: dict[str, list] = {}
            c = mqtt_client(self.broker.url, "adversary")
            c.on_message = lambda cl, ud, msg: self._updates.setdefault(msg.topic, []).append(msg.payload)
            ud = c.user_data_get()
            c.connect(ud["host"], ud["port"], keepalive=30)
            c.loop_start()
            c.subscribe("edgepeft/things/+/jobs/+/update", qos=1)
            self._mqtt = c
        return self._mqtt

    def mqtt_job(self, job_id: str, payload: bytes, *, device: str | None = None, wait: float = 30.0,
                 topic: str | None = None) -> Outcome:
        """Publish ``payload`` as job ``job_id`` to this device and wait for its final execution update."""
        from edgepeft.contracts.job import job_topic, job_update_topic

        c = self.mqtt()
        dev = device or self.device_id
        up = job_update_topic(self.device_id, job_id)
        self._updates.pop(up, None)
        c.publish(topic or job_topic(dev, job_id), payload, qos=1).wait_for_publish(10)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for raw in self._updates.get(up, []):
                msg = json.loads(raw)
                if isinstance(msg, dict) and "report" in msg:  # a signed report: its fields are inside
                    msg = json.loads(msg["report"])
                if msg.get("status") not in ("IN_PROGRESS", "QUEUED"):
                    st = msg["status"]
                    return Outcome(st in ("REJECTED", "FAILED"), st, f"{st}: {msg.get('reason')}")
            time.sleep(0.05)
        return Outcome(True, "no answer", "ignored: no execution update")

    def job(self, job_id: str, key=None, **fields) -> bytes:
        from edgepeft.contracts.job import Job, new_job, sign_job
        from edgepeft.contracts.signing import load_private_key

        base = {"job_id": job_id, "device_id": self.device_id, "operation": "install",
                "package": {"path": "edgepeft/adapters/alpha/v2.epu", "id": package_id(self.good()),
                            "name": "alpha", "version": 2, "type": "adapter"},
                "repository": self.mirror.url}
        base |= fields
        hours = base.pop("valid_hours", 24)
        if hours < 0:
            import datetime as dt

            from edgepeft.contracts.update import format_time, utc_now
            now = utc_now()
            job = Job(issued=format_time(now - dt.timedelta(hours=2)),
                      expires=format_time(now + dt.timedelta(hours=hours)), **base)
        else:
            job = new_job(valid_hours=hours, **base)
        return sign_job(job, load_private_key(key or self.key))

    # -- the invariant ---------------------------------------------------------------------------
    def snapshot(self, agent: AgentProcess) -> dict:
        """What must not change: served versions and floors (through the API) and the store on disk."""
        dev = agent.device()
        adapters = {a["name"]: (a["version"], a["floor"], a.get("source")) for a in dev["adapters"]}
        files = {}
        for sub in ("adapters", "bundles"):
            d = agent.state / sub
            if d.is_dir():
                for p in sorted(d.rglob("*")):
                    if p.is_file() and p.name != "state.json":
                        files[str(p.relative_to(agent.state))] = hashlib.sha256(p.read_bytes()).hexdigest()
        pointers = {}
        for p in list((agent.state / "adapters").glob("*/state.json")) + [agent.state / "bundle.json"]:
            if p.is_file():
                s = json.loads(p.read_text())
                pointers[str(p.relative_to(agent.state))] = (s.get("current"), s.get("previous"), s.get("floor"))
        return {"adapters": adapters, "bundle": (dev["bundle"]["version"], dev["bundle"]["floor"]),
                "files": files, "pointers": pointers,
                # partial uploads held (one whose install just finished may still be listed for a moment)
                "uploads": sum(1 for u in dev.get("uploads") or [] if u.get("status") == "receiving")}

    def _check_fallback(self, row: Row, before: dict, after: dict) -> None:
        """After a quarantined state file: alpha serves the shipped version with its floor kept, the bad file
        is kept aside as evidence, and nothing else changed. The package the bad file pointed to is no longer
        referenced and is pruned (its version stays refused by the floor; a newer one restores service)."""
        served, floor, _ = after["adapters"]["alpha"]
        assert served == SHIPPED_VERSION and floor >= before["adapters"]["alpha"][1], f"{row.id}: {after}"
        kept = {f: h for f, h in after["files"].items() if ".bad-" not in f}
        assert set(kept) <= set(before["files"]) and after["bundle"] == before["bundle"], f"{row.id}: {after}"
        assert any(".bad-" in f for f in after["files"]), f"{row.id}: the bad state file was not kept aside"

    def run(self, row: Row) -> None:
        agent = self.agent_for(row.transport)
        before = self.snapshot(agent)
        ok = False
        try:
            probe = None if row.probe_after else Probe(agent).start()
            out = None
            try:
                out = row.attack(self)
                if probe is not None:
                    # an attack that holds resources (sockets): only answers that started once they were held count
                    answered = probe.wait_answer(since=time.monotonic() if out.held else probe.t0)
            finally:
                if out is not None:
                    out.release()
                if probe is not None:
                    probe.stop()
                if row.cleanup is not None:
                    row.cleanup(self)
            agent = self.agent_for(row.transport) if row.probe_after else agent
            if row.probe_after:
                probe = Probe(agent).start()
                answered = probe.wait_answer()
                probe.stop()
            assert answered, f"{row.id}: no other client was answered during the attack: {probe.errors[-3:]}"
            served = {before["adapters"]["alpha"][0]} | ({SHIPPED_VERSION} if row.falls_back_to_shipped else set())
            assert all(v in served for _, _, v in probe.answers), \
                f"{row.id}: served versions during the attack {[v for *_, v in probe.answers]}"
            assert refused(out, row.expect), f"{row.id}: not refused as expected ({row.expect!r}): {out}"
            after = self.snapshot(agent)
            if row.leaves_attacker_parts:
                after["uploads"] = before["uploads"]
                self.dirty.add("main")
            if row.falls_back_to_shipped:
                self.dirty.add("main")  # later rows start again from the verified v2
                self._check_fallback(row, before, after)
                ok = True
                return
            if row.transport == "serial" and after["uploads"] > before["uploads"]:
                # DATA frames still in flight when a package is refused at install can open a new partial
                # upload of the same id (a retryable refusal): not a loss, but restart before the next row
                self.dirty.add("main")
                after["uploads"] = before["uploads"]
            assert after == before, f"{row.id}: something changed:\nbefore {before}\nafter  {after}"
            ok = True
        finally:
            if not ok:
                self.dirty.add("puller" if row.transport == "pull" else "main")


def slow_socket(agent: AgentProcess, first: bytes) -> socket.socket:
    host, port = agent.url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    if first:
        s.sendall(first)
    return s


def rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


__all__ = ["Lab", "Row", "Outcome", "Probe", "Mirror", "flip", "regions", "package_id", "http_outcome", "_http",
           "slow_socket", "rss_peak_kib", "rss_kib", "os"]


def publish_raw(lab, data: bytes, *, path: str | None = None, entry: dict | None = None, index_body: bytes | None = None,
                key=None) -> str:
    """List ``data`` in the repository with valid TUF metadata signed by ``key`` (default the fleet key) without
    the edgepeft check `edgepeft publish` makes: what a holder of the repository's targets key (or a broken
    publishing pipeline) can do. ``entry`` overrides index fields; ``index_body`` replaces the whole index."""
    from tuf.api.metadata import TargetFile
    from update_support import unpack_package

    from edgepeft.contracts.signing import load_private_key
    from edgepeft.release.tuf_repo import INDEX, ROLES, TufRepository

    repo = TufRepository(lab.repo, {r: load_private_key(key or lab.key) for r in ROLES})
    repo._root()
    try:
        meta, _, _ = unpack_package(data)
        name, version = meta["adapter"]["name"], meta["adapter"]["version"]
        base = meta["base_fingerprint"]
    except Exception:  # noqa: BLE001 - garbage is published as it is
        name, version, base = "alpha", lab.next_version(), None
    path = path or f"edgepeft/adapters/alpha/v{version}.epu"
    md = repo._load("targets")
    tf = TargetFile.from_data(path, data, ["sha256"])
    repo._store_target(path, tf, data)
    md.signed.targets[path] = tf
    index = repo._index()
    e = {"path": path, "type": "adapter", "name": name, "version": version, "base_fingerprint": base,
         "id": package_id(data), "expires": None} | (entry or {})
    index = [x for x in index if x.get("path") != path] + [e]
    body = index_body if index_body is not None else \
        json.dumps({"schema_version": 1, "packages": index}, indent=1, sort_keys=True).encode()
    itf = TargetFile.from_data(INDEX, body, ["sha256"])
    repo._store_target(INDEX, itf, body)
    md.signed.targets[INDEX] = itf
    repo._bump(md, "targets")
    repo.refresh(targets_version=md.signed.version)
    return path
