"""Hypothesis fuzzing of what a peer or a local user controls (issue 23): the HTTP upload protocol of a
real agent (random sequences of requests with random methods, ids, offsets, lengths, headers and
bodies) and the device's state files (state.json, bundle.json, history.json). Properties: only typed
errors come out (4xx, or 503 "busy"; never a 500), the agent keeps answering, and what it serves, its
floor and its store stay intact (nothing but genuine, accepted packages in the store).

Bounded for the default suite (a few seconds each); ``-m slow`` runs many more examples.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil

import pytest
from agent_support import AgentProcess  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_runtime_support import require_fixtures  # noqa: E402
from update_support import forge, version_of  # noqa: E402

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.transport.link import Package  # noqa: E402

Q = "héllo ☃"
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
LONG = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
TRIED: dict[str, int] = {}



@pytest.fixture(scope="module")
def world(built, tmp_path_factory):
    """One agent, shared by every example, and the packages the fuzzer sends pieces of: a genuine
    next version (may install), one below the floor, one for another base (refused)."""
    root = tmp_path_factory.mktemp("fuzz")
    good = Package.read(version_of(built, root / "alpha-5.epu", 5))
    old = Package.read(version_of(built, root / "alpha-1.epu", 1))

    def other_base(m):
        m["adapter"]["version"] = 9
        m["base_fingerprint"] = m["adapter"]["base_fingerprint"] = "ab" * 32
    (root / "other.epu").write_bytes(forge(built["package"].read_bytes(), built["private_key"], mutate=other_base))
    pkgs = [good, old, Package.read(root / "other.epu")]
    agent = AgentProcess(built["bundle"], built["public_key"], root / "state")
    yield agent, pkgs
    agent.stop()


_IDS = st.sampled_from(["pkg0", "pkg1", "pkg2"]) | st.text("0123456789abcdef", min_size=64, max_size=64) | \
    st.sampled_from(["A" * 64, "0" * 63, "0" * 65, "..%2F..%2Fetc", "%00" * 3, ""])
_NUMS = st.none() | st.integers(-2, 30000).map(str) | st.sampled_from(
    ["-1", "0", str(2 ** 63), str(2 ** 64), "1e3", " 7", "0x10", "", "+5", "nan", "1_0"])
_REQ = st.fixed_dictionaries({
    "method": st.sampled_from(["PUT", "PUT", "PUT", "GET", "HEAD", "PATCH", "POST", "DELETE"]),
    "id": _IDS,
    "offset": _NUMS,
    "length": _NUMS,
    "body": st.tuples(st.sampled_from([0, 1, 2]), st.integers(0, 30000), st.integers(0, 3000)) | st.binary(max_size=64),
    "extra": st.dictionaries(st.sampled_from(["Content-Type", "Upload-Metadata", "Tus-Resumable", "Expect",
                                              "X-HTTP-Method-Override"]),
                             st.text("abc/-_+ 01", max_size=12), max_size=2),
})


def _request(agent, pkgs, r) -> int:
    id = r["id"]
    if id in ("pkg0", "pkg1", "pkg2"):
        id = pkgs[int(id[-1])].id
    body = r["body"]
    if isinstance(body, tuple):
        which, start, n = body
        body = pkgs[which].data[start:start + n]
    headers = {"Authorization": f"Bearer {agent.token}", **r["extra"]}
    for k, v in (("Upload-Offset", r["offset"]), ("Upload-Length", r["length"])):
        if v is not None:
            headers[k] = v
    host, port = agent.url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request(r["method"], f"/v1/updates/{id}", body=body if r["method"] != "GET" else None, headers=headers)
        resp = c.getresponse()
        data = resp.read()
    finally:
        c.close()
    if r["method"] != "HEAD" and data:
        answer = json.loads(data)  # always JSON
        assert resp.status < 400 or isinstance(answer.get("error"), dict) or answer.get("status") == "rejected", answer
    assert resp.status < 500 or (resp.status == 503 and b'"busy"' in data), (r, resp.status, data[:300])
    return resp.status


def _intact(agent, pkgs) -> None:
    """The agent answers; alpha serves a committed version with its floor; the store holds only genuine
    packages the device accepted (the bundle's v1 or the genuine v5)."""
    alpha = next(a for a in agent.device()["adapters"] if a["name"] == "alpha")
    assert (alpha["version"], alpha["floor"]) in ((1, 1), (5, 5)), alpha
    assert agent.chat("alpha", Q)["adapter_version"] == alpha["version"]
    stored = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (agent.state / "adapters").rglob("*.epu")}
    assert set(stored.values()) <= {hashlib.sha256(pkgs[0].data).hexdigest()}, stored


def _fuzz_http(world, reqs):
    agent, pkgs = world
    TRIED["http requests"] = TRIED.get("http requests", 0) + len(reqs)
    for r in reqs:
        _request(agent, pkgs, r)
    _intact(agent, pkgs)


@QUICK
@given(reqs=st.lists(_REQ, min_size=1, max_size=6))
def test_http_upload_protocol_fuzz(world, reqs):
    _fuzz_http(world, reqs)


@pytest.mark.slow
@LONG
@given(reqs=st.lists(_REQ, min_size=1, max_size=12))
def test_http_upload_protocol_fuzz_long(world, reqs):
    _fuzz_http(world, reqs)


# -- state files --------------------------------------------------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(
                         st.sampled_from(["current", "previous", "floor", "trial", "failed", "mac", "x", "1"]), c,
                         max_size=4), max_leaves=12)
_CONTENT = st.binary(max_size=200) | _JSON.map(lambda v: json.dumps(v).encode()) | \
    st.sampled_from([b"", b"[" * 5000, b"{\"current\": 2, \"floor\": 0}", b"\xef\xbb\xbf{}"])
_FILES = st.sampled_from(["adapters/alpha/state.json", "bundle.json", "history.json"])


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    """A state folder with alpha v2 installed (agent stopped)."""
    from edgepeft.transport.http import HttpLink
    from edgepeft.transport.link import push

    root = tmp_path_factory.mktemp("statefuzz")
    agent = AgentProcess(built["bundle"], built["public_key"], root / "state")
    try:
        link = HttpLink(agent.url, agent.token)
        assert push(Package.read(version_of(built, root / "alpha-2.epu", 2)), link, timeout=60)["status"] == "healthy"
        link.close()
    finally:
        agent.stop()
    return root / "state"


def _fuzz_state(built, installed, tmp_path_factory, files):
    TRIED["state files"] = TRIED.get("state files", 0) + 1
    state = tmp_path_factory.mktemp("s") / "state"
    shutil.copytree(installed, state)
    for rel, content in files.items():
        (state / rel).write_bytes(content)
    agent = AgentProcess(built["bundle"], built["public_key"], state)
    try:
        alpha = next(a for a in agent.device()["adapters"] if a["name"] == "alpha")
        assert alpha["version"] in (1, 2) and alpha["floor"] >= 2, alpha  # verified; the floor never drops
        assert agent.chat("alpha", Q)["adapter_version"] == alpha["version"]
    finally:
        agent.stop()
    shutil.rmtree(state.parent, ignore_errors=True)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(files=st.dictionaries(_FILES, _CONTENT, min_size=1, max_size=3))
def test_state_files_fuzz_the_agent_always_comes_up(built, installed, tmp_path_factory, files):
    _fuzz_state(built, installed, tmp_path_factory, files)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(files=st.dictionaries(_FILES, _CONTENT, min_size=1, max_size=3))
def test_state_files_fuzz_the_agent_always_comes_up_long(built, installed, tmp_path_factory, files):
    _fuzz_state(built, installed, tmp_path_factory, files)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(content=_CONTENT, sealed=st.booleans())
def test_store_state_reader_quarantines_anything_it_cannot_trust(tmp_path_factory, content, sealed):
    """In process, many more inputs: the store's reader returns a valid state or quarantines the file
    (kept beside it, reported); it never raises and never returns a state it did not verify."""
    from edgepeft.update.seal import Seal
    from edgepeft.update.store import AdapterState, AdapterStore

    TRIED["store reader"] = TRIED.get("store reader", 0) + 1
    root = tmp_path_factory.mktemp("st")
    seal = Seal(root) if sealed else None
    if seal is not None:
        seal.adopt = False
    store = AdapterStore(root / "adapters", [], base_fingerprint="x", seal=seal)
    (root / "adapters" / "alpha").mkdir(parents=True)
    p = root / "adapters" / "alpha" / "state.json"
    p.write_bytes(content)
    state = store.state("alpha")
    assert isinstance(state, AdapterState)
    if store.notes:
        assert list(p.parent.glob("state.json.bad-*")) and state == AdapterState()
    elif sealed:
        pytest.fail(f"an unsealed file was trusted: {content[:80]!r}")


def test_report_how_many_inputs_were_tried():
    print("\nhypothesis inputs tried:", json.dumps(TRIED))
    assert TRIED.get("http requests", 0) >= 30 and TRIED.get("store reader", 0) >= 100, TRIED
