"""Attacks on pull updates, through a real `edgepeft agent --pull` polling a static HTTP server on 127.0.0.1:
a forged first root, index ids that are paths, malformed indexes, refused packages that hid older good
ones. Each is refused; the device keeps serving what it served, nothing outside its folders changes, and
the poller goes on (and says what it met in `links.pull` of the device's status)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from agent_support import AgentProcess, run_cli
from attack_support import LoggingStaticServer, index_of, sign_targets, store_snapshot, wait_for
from test_runtime_support import require_fixtures
from update_support import forge, version_of

require_fixtures()  # built here (server side) or prebuilt for a device run

Q = "héllo ☃"
INDEX = "edgepeft/index.json"



@pytest.fixture()
def served(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    srv = LoggingStaticServer(repo, tmp_path / "static.log")
    yield repo, srv
    srv.stop()


def _agent(built, tmp_path, url, *extra):
    return AgentProcess(built["bundle"], built["public_key"], tmp_path / "state", "--pull", url, "--interval", "0.3",
                        *extra)


def _serving(agent) -> int:
    return agent.chat("alpha", Q)["adapter_version"]


def _publish(repo, key, *packages):
    r = run_cli("publish", *packages, "--repo", repo, "--key", key)
    assert r.returncode == 0, r.stderr


def _polls_after(srv, n: int, timeout: float = 60.0) -> bool:
    """True once the device asked for timestamp.json ``n`` more times (``n`` more polls came)."""
    start = srv.fetches("timestamp.json")
    return bool(wait_for(lambda: srv.fetches("timestamp.json") >= start + n, timeout))


def _forged_root(repo: Path, built, attacker_priv, *, steal_keyid: bool) -> None:
    """A 1.root.json that names the fleet key but is signed only by the attacker: either it lists the fleet
    key beside the attacker's, or it claims the fleet key's id for the attacker's key material."""
    from securesystemslib.signer import CryptoSigner, SSlibKey
    from tuf.api.metadata import Metadata, Root
    from tuf.api.serialization.json import JSONSerializer

    from edgepeft.contracts.signing import load_private_key
    from edgepeft.contracts.verify import load_public_key

    fleet = SSlibKey.from_crypto(load_public_key(built["public_key"]))
    priv = load_private_key(attacker_priv)
    attacker = SSlibKey.from_crypto(priv.public_key())
    if steal_keyid:
        attacker = SSlibKey(fleet.keyid, attacker.keytype, attacker.scheme, attacker.keyval)
    root = Root(consistent_snapshot=True)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(attacker, role)
    if not steal_keyid:
        root.add_key(fleet, "root")
    md = Metadata(root)
    md.sign(CryptoSigner(priv, attacker))
    (repo / "metadata").mkdir(parents=True, exist_ok=True)
    (repo / "metadata/1.root.json").write_bytes(md.to_bytes(JSONSerializer(compact=False)))


@pytest.mark.parametrize("steal_keyid", [False, True], ids=["lists-fleet-key", "fleet-keyid-other-key"])
def test_a_forged_first_root_is_refused_and_leaves_no_trace(built, served, tmp_path, steal_keyid):
    from edgepeft.contracts.signing import generate_keypair

    repo, srv = served
    attacker, _ = generate_keypair(tmp_path / "attacker")
    _forged_root(repo, built, attacker, steal_keyid=steal_keyid)
    agent = _agent(built, tmp_path, srv.url)
    try:
        assert wait_for(lambda: srv.fetches("1.root.json") >= 3, timeout=60)  # asked, refused, asked again
        tuf = agent.state / "tuf"
        assert not (tuf / "anchor.json").exists()
        assert not tuf.exists() or not any(p.is_file() for p in tuf.rglob("*")), sorted(tuf.rglob("*"))
        # the genuine repository at the same address: trusted (the fleet key signed its root), pulled
        shutil.rmtree(repo / "metadata")
        _publish(repo, built["private_key"], built["package"])
        assert wait_for(lambda: _serving(agent) == 2, timeout=60), agent.logtext()[-2000:]

        # a poll records its outcome just after the install it made starts serving; later polls find nothing new
        assert wait_for(lambda: agent.device()["links"]["pull"]["error"] is None, timeout=60), \
            agent.device()["links"]["pull"]
        assert "not signed by a key this device trusts" in agent.logtext()
    finally:
        agent.stop()


@pytest.mark.parametrize("hostile_id", ["../../../victim", "../../adapters/alpha/v-2"])
def test_index_ids_never_become_paths(built, served, tmp_path, hostile_id):
    """Fleet-signed index entries whose id is a path wrote and deleted files outside the device's folders
    (and the serving version's own package); an id is 64 hex digits or the entry is skipped."""
    repo, srv = served
    _publish(repo, built["private_key"], built["package"])
    victim = tmp_path / "victim.epu"
    victim.write_bytes(b"precious")
    agent = _agent(built, tmp_path, srv.url)
    try:
        assert wait_for(lambda: _serving(agent) == 2, timeout=60)
        before = store_snapshot(agent.state)
        v3 = version_of(built, tmp_path / "alpha-3.epu", 3)
        index = index_of(repo)
        entry = dict(index["packages"][0], path="edgepeft/adapters/alpha/v3.epu", version=3, id=hostile_id)
        index["packages"].append(entry)
        sign_targets(repo, built["private_key"], {entry["path"]: v3.read_bytes(),
                                                  INDEX: json.dumps(index).encode()})
        assert _polls_after(srv, 3)
        assert victim.read_bytes() == b"precious"
        assert store_snapshot(agent.state) == before and _serving(agent) == 2
        pull = agent.device()["links"]["pull"]
        assert any("id" in s and "hex" in s for s in pull["skipped"]), pull
    finally:
        agent.stop()
    agent = _agent(built, tmp_path, srv.url)  # a restart serves the same version with the same floor
    try:
        assert _serving(agent) == 2
        alpha = next(a for a in agent.device()["adapters"] if a["name"] == "alpha")
        assert alpha["floor"] == 2
    finally:
        agent.stop()


def test_a_malformed_index_does_not_stop_the_poller(built, served, tmp_path):
    """Valid JSON of the wrong shape (a list) killed the poll thread: no later update was ever pulled."""
    repo, srv = served
    _publish(repo, built["private_key"], built["package"])
    good = index_of(repo)
    entry = good["packages"][0]
    bad_indexes = [b"[]", b'{"packages": {}}', b"\xff\xfe not json", b'{"packages": [1, "x", null, []]}',
                   json.dumps({"packages": [dict(entry, name=["alpha"]), dict(entry, version="2"),
                                            dict(entry, version=True), dict(entry, type=None),
                                            dict(entry, path="../../x"), dict(entry, expires=7),
                                            dict(entry, name="alpha\n")]}).encode(),
                   b"[" * 100000 + b"]" * 100000]
    sign_targets(repo, built["private_key"], {INDEX: bad_indexes[0]})
    agent = _agent(built, tmp_path, srv.url)
    try:
        for bad in bad_indexes:
            sign_targets(repo, built["private_key"], {INDEX: bad})
            assert _polls_after(srv, 2), f"the poller stopped after {bad[:40]!r}: {agent.logtext()[-1500:]}"
            assert _serving(agent) == 1
            pull = agent.device()["links"]["pull"]
            assert pull.get("error") or pull.get("skipped"), pull
        # publishing again repairs the index (rebuilt from the signed targets): the device installs what it lists
        _publish(repo, built["private_key"], version_of(built, tmp_path / "alpha-3.epu", 3))
        assert {e["version"] for e in index_of(repo)["packages"]} == {2, 3}
        assert wait_for(lambda: _serving(agent) == 3, timeout=60), agent.logtext()[-2000:]
    finally:
        agent.stop()


def test_refused_packages_are_remembered_and_older_good_ones_install(built, served, tmp_path):
    """A newest version the device refuses (a stranger's signature, garbage) was fetched on every poll and hid
    the older good version behind it; an expired one was fetched too. Now: refused once, remembered by
    content hash across restarts, expired ones skipped unfetched, and the newest acceptable version serves."""
    from edgepeft.contracts.signing import generate_keypair, load_private_key
    from edgepeft.release.tuf_repo import ROLES, TufRepository

    repo, srv = served
    key = built["private_key"]
    _publish(repo, key, built["package"])  # v2: good
    stranger, stranger_pub = generate_keypair(tmp_path / "stranger")
    v3 = version_of(built, tmp_path / "alpha-3.epu", 3)
    v3.write_bytes(forge(v3.read_bytes(), stranger))  # v3: signed by a key the device does not trust
    TufRepository(repo, {r: load_private_key(key) for r in ROLES}).publish([v3], trusted_keys=[stranger_pub])

    def expired(m):
        m["adapter"]["version"], m["expires"] = 4, "2020-01-01T00:00:00Z"
    v4 = forge(Path(built["package"]).read_bytes(), key, mutate=expired)  # v4: expired
    garbage = bytes(range(256)) * 4096  # v5: 1 MiB that is no package at all
    index = index_of(repo)
    base = index["packages"][0]
    index["packages"] += [dict(base, path="edgepeft/adapters/alpha/v4.epu", version=4, expires="2020-01-01T00:00:00Z",
                               id=hashlib.sha256(v4[:64]).hexdigest()),
                          dict(base, path="edgepeft/adapters/alpha/v5.epu", version=5,
                               id=hashlib.sha256(garbage).hexdigest())]
    sign_targets(repo, key, {"edgepeft/adapters/alpha/v4.epu": v4, "edgepeft/adapters/alpha/v5.epu": garbage,
                             INDEX: json.dumps(index).encode()})
    agent = _agent(built, tmp_path, srv.url)
    try:
        assert wait_for(lambda: _serving(agent) == 2, timeout=60), agent.logtext()[-2000:]
        assert _polls_after(srv, 3)
        assert (srv.fetches("v5.epu"), srv.fetches("v3.epu"), srv.fetches("v4.epu")) == (1, 1, 0)
        assert agent.device()["links"]["pull"]["refused"] == 2
    finally:
        agent.stop()
    agent = _agent(built, tmp_path, srv.url)  # remembered across a restart
    try:
        assert _polls_after(srv, 3)
        assert (srv.fetches("v5.epu"), srv.fetches("v3.epu"), srv.fetches("v4.epu")) == (1, 1, 0)
        assert _serving(agent) == 2
    finally:
        agent.stop()


def test_a_kept_root_cut_short_by_a_power_loss_is_fetched_again(built, served, tmp_path):
    """An anchor.json left empty by a power cut made every later poll fail; the device applies first contact's
    rule again (the fleet key must have signed the root) and pulls."""
    repo, srv = served
    _publish(repo, built["private_key"], built["package"])
    agent = _agent(built, tmp_path, srv.url)
    try:
        assert wait_for(lambda: _serving(agent) == 2, timeout=60)
    finally:
        agent.stop()
    (agent.state / "tuf/anchor.json").write_bytes(b"")
    _publish(repo, built["private_key"], version_of(built, tmp_path / "alpha-3.epu", 3))
    agent = _agent(built, tmp_path, srv.url)
    try:
        assert wait_for(lambda: _serving(agent) == 3, timeout=60), agent.logtext()[-2000:]
        assert (agent.state / "tuf/anchor.json").read_bytes() == (repo / "metadata/1.root.json").read_bytes()
    finally:
        agent.stop()
