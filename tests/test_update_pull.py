"""Pull from static hosting: `edgepeft publish` writes a TUF repository, a plain `python -m http.server`
on 127.0.0.1 serves it, and devices poll it with python-tuf's ngclient. Tampered files, stale or
rolled-back metadata and a repository signed by a stranger are refused; the device keeps serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from agent_support import AgentProcess, run_cli
from test_runtime_support import require_fixtures
from update_support import version_of

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.errors import TransportError  # noqa: E402
from edgepeft.transport.tuf_pull import Puller  # noqa: E402
from edgepeft.update.device import Device  # noqa: E402

Q = "héllo ☃"


class StaticServer:
    """``python -m http.server`` on 127.0.0.1 (any static host or CDN would do)."""

    def __init__(self, root):
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                                      "--directory", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        self.url = f"http://127.0.0.1:{line.split(' port ')[1].split()[0]}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture()
def served(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    srv = StaticServer(repo)
    yield repo, srv.url
    srv.stop()


def _version(device):
    return device.engine.generate(Q, adapter="alpha", max_new_tokens=4).adapter_version


def test_publish_then_pull_installs_the_newest_version_for_this_base(built, served, tmp_path):
    repo, url = served
    v2, v3 = built["package"], version_of(built, tmp_path / "alpha-3.epu", 3)
    r = run_cli("publish", v2, "--repo", repo, "--key", built["private_key"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["published"][0]["path"] == "edgepeft/adapters/alpha/v2.epu"
    device = Device(built["bundle"], [built["public_key"]], tmp_path / "state")
    pull = Puller(device, url)
    res = pull.poll()
    assert [(x["name"], x["version"], x["status"]) for x in res] == [("alpha", 2, "healthy")]
    assert _version(device) == 2 and pull.poll() == []  # nothing newer: nothing fetched
    assert run_cli("publish", v3, "--repo", repo, "--key", built["private_key"]).returncode == 0
    assert [x["version"] for x in pull.poll()] == [3] and _version(device) == 3
    assert (tmp_path / "state/tuf/anchor.json").is_file()  # the root, accepted because the fleet key signed it


def test_tampered_stale_and_rolled_back_repositories_are_refused(built, served, tmp_path):
    repo, url = served
    key = built["private_key"]
    assert run_cli("publish", built["package"], "--repo", repo, "--key", key).returncode == 0
    device = Device(built["bundle"], [built["public_key"]], tmp_path / "state")
    pull = Puller(device, url)
    assert pull.poll()[0]["status"] == "healthy"
    old_ts = (repo / "metadata/timestamp.json").read_bytes()
    snapshot_files = sorted((repo / "metadata").glob("*.json"))
    # a newer package whose file is swapped on the server for other bytes: TUF's hash check refuses it
    v4 = version_of(built, tmp_path / "alpha-4.epu", 4)
    assert run_cli("publish", v4, "--repo", repo, "--key", key).returncode == 0
    target = next(p for p in (repo / "targets/edgepeft/adapters/alpha").iterdir() if p.name.endswith("v4.epu"))
    good = target.read_bytes()
    target.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(TransportError, match="download of edgepeft/adapters/alpha/v4.epu failed"):
        pull.poll()
    assert _version(device) == 2
    target.write_bytes(good)
    # metadata rolled back to an older timestamp: python-tuf refuses it (version rollback)
    new_ts = (repo / "metadata/timestamp.json").read_bytes()
    (repo / "metadata/timestamp.json").write_bytes(old_ts)
    with pytest.raises(TransportError, match="BadVersionNumberError|version"):
        pull.poll()
    assert _version(device) == 2
    (repo / "metadata/timestamp.json").write_bytes(new_ts)
    assert [x["version"] for x in pull.poll()] == [4]
    assert snapshot_files  # (the repository kept every version file, as consistent snapshots do)
    # stale metadata (a freeze attack): a timestamp that has expired is refused
    from edgepeft.contracts.signing import load_private_key
    from edgepeft.release.tuf_repo import ROLES, TufRepository

    TufRepository(repo, {r: load_private_key(key) for r in ROLES}, expiry_days={"timestamp": -1}).refresh()
    with pytest.raises(TransportError, match="ExpiredMetadataError"):
        pull.poll()
    assert _version(device) == 4


def test_a_repository_signed_by_a_stranger_is_not_trusted(built, served, tmp_path):
    from edgepeft.contracts.signing import generate_keypair

    repo, url = served
    stranger, _ = generate_keypair(tmp_path / "stranger")
    assert run_cli("publish", built["package"], "--repo", repo, "--key", stranger).returncode != 0  # not our package
    from edgepeft.contracts.signing import load_private_key
    from edgepeft.release.tuf_repo import ROLES, TufRepository

    TufRepository(repo, {r: load_private_key(stranger) for r in ROLES}).publish(
        [built["package"]], trusted_keys=[built["public_key"]])
    device = Device(built["bundle"], [built["public_key"]], tmp_path / "state")
    with pytest.raises(TransportError, match="not signed by a key this device trusts"):
        Puller(device, url).poll()
    assert _version(device) == 1


def test_agent_process_pulls_on_its_own(built, served, tmp_path):
    repo, url = served
    assert run_cli("publish", built["package"], "--repo", repo, "--key", built["private_key"]).returncode == 0
    agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "state", "--pull", url, "--interval", "0.5")
    try:
        deadline = time.time() + 60
        while time.time() < deadline and agent.chat("alpha", Q)["adapter_version"] != 2:
            time.sleep(0.3)
        assert agent.chat("alpha", Q)["adapter_version"] == 2
        # a rollout then pushes the very package it pulled: healthy (the pull's result), not a replay refusal
        r = run_cli("push", built["package"], "--to", agent.url, "--token", agent.token, "--json")
        st = json.loads(r.stdout)
        assert r.returncode == 0 and (st["status"], st["version"]) == ("healthy", 2), r.stdout
    finally:
        agent.stop()
    shutil.rmtree(tmp_path / "state", ignore_errors=True)


def test_roles_can_have_their_own_keys(built, served, tmp_path):
    """An online timestamp key apart from the fleet key (which keeps root, targets and snapshot): devices still
    anchor on the fleet key, and python-tuf checks each role against the keys root names for it."""
    from edgepeft.contracts.signing import generate_keypair

    repo, url = served
    online, _ = generate_keypair(tmp_path / "online")
    r = run_cli("publish", built["package"], "--repo", repo, "--key", built["private_key"],
                "--role-key", f"timestamp={online}")
    assert r.returncode == 0, r.stderr
    root = json.loads((repo / "metadata/1.root.json").read_text())["signed"]
    assert root["roles"]["timestamp"]["keyids"] != root["roles"]["root"]["keyids"]
    device = Device(built["bundle"], [built["public_key"]], tmp_path / "state")
    assert [x["status"] for x in Puller(device, url).poll()] == ["healthy"]
    # republishing without the online key is refused: the repository's timestamp role is not the fleet key's
    r = run_cli("publish", "--refresh", "--repo", repo, "--key", built["private_key"])
    assert r.returncode != 0 and "timestamp key given is not a timestamp key" in r.stderr
