"""Key rotation and revocation of a leaked fleet key, through real `edgepeft agent` processes on 127.0.0.1.

(a) TUF root rotation: the repository's root v2 names a new key for every role and is signed by the old AND the
    new root key; a device pulling from a static server follows it, installs what the new key signs, and from then
    on refuses metadata signed only by the revoked key, even when the mirror hides root v2 again.
(b) The update-signing keys a device trusts (``--trusted-key``, repeatable): a package may carry several
    signatures, so during a rotation the fleet signs with the old and the new key; a device whose trusted set was
    replaced by the new key alone refuses what the leaked key signs, and keeps serving. What it holds signed only
    by the revoked key (the shipped bundle, stored versions) stops verifying: the runbook in docs/threat-model.md
    re-signs those first.
"""

from __future__ import annotations

import json
import shutil
import time

from adversarial_support import Mirror  # noqa: E402
from agent_support import AgentProcess  # noqa: E402
from test_runtime_support import require_fixtures  # noqa: E402
from update_support import unpack_package, version_of  # noqa: E402

require_fixtures()

Q = "hi"



def _serving(agent) -> int:
    return agent.chat("alpha", Q, 1)["adapter_version"]


def _until(pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def _signed_by(data: bytes, *keys) -> bytes:
    """The same package, its metadata signed by each of ``keys`` (a package in a key rotation)."""
    from edgepeft.contracts.signing import load_private_key, sign_bytes
    from edgepeft.contracts.update import encode_envelope, metadata_bytes

    meta, _, payload = unpack_package(data)
    body = metadata_bytes(meta)
    return encode_envelope(body, [sign_bytes(body, load_private_key(k)) for k in keys]) + payload


def _bundle_signed_by(built, out, key):
    """The fixture bundle with its manifest signed by ``key`` (what a re-signed bundle update carries)."""
    from edgepeft.contracts.signing import load_private_key, sign_manifest

    shutil.copytree(built["bundle"], out)
    data = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    data.pop("signature", None)
    (out / "manifest.json").write_text(json.dumps(sign_manifest(data, load_private_key(key)), indent=2,
                                                  ensure_ascii=False), encoding="utf-8")
    return out


def _push(agent, data: bytes) -> dict:
    from adversarial_support import _http, package_id

    id = package_id(data)
    code, st = _http(agent, "PUT", f"/v1/updates/{id}", data, {"Upload-Offset": "0", "Upload-Length": str(len(data))})
    deadline = time.monotonic() + 60
    while st.get("status") not in ("healthy", "rejected", "rolled-back") and time.monotonic() < deadline:
        time.sleep(0.05)
        code, st = _http(agent, "GET", f"/v1/updates/{id}")
    return st


# ---------------------------------------------------------------------------------------------
# (a) TUF root rotation
# ---------------------------------------------------------------------------------------------
def _rotate_root(repo, old_key, new_key) -> None:
    """Root v2: every role moves to ``new_key`` (the old key is revoked), signed by the old and the new root keys."""
    from securesystemslib.signer import CryptoSigner, SSlibKey
    from tuf.api.metadata import Metadata
    from tuf.api.serialization.json import JSONSerializer

    from edgepeft.contracts.signing import load_private_key

    old, new = load_private_key(old_key), load_private_key(new_key)
    md = Metadata.from_file(str(repo / "metadata" / "1.root.json"))
    root = md.signed
    old_id = SSlibKey.from_crypto(old.public_key()).keyid
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(SSlibKey.from_crypto(new.public_key()), role)
        root.revoke_key(old_id, role)
    root.version = 2
    md.signatures.clear()
    md.sign(CryptoSigner(old), append=True)
    md.sign(CryptoSigner(new), append=True)
    (repo / "metadata" / "2.root.json").write_bytes(md.to_bytes(JSONSerializer(compact=False)))


def _repo(repo, key):
    from edgepeft.contracts.signing import load_private_key
    from edgepeft.release.tuf_repo import ROLES, TufRepository

    return TufRepository(repo, {r: load_private_key(key) for r in ROLES})


def test_tuf_root_rotation_is_followed_and_the_revoked_key_is_refused(built, tmp_path):
    from edgepeft.contracts.signing import generate_keypair

    fleet, fleet_pub = built["private_key"], built["public_key"]
    new_key, _ = generate_keypair(tmp_path / "tuf-new")
    repo = tmp_path / "repo"
    repo.mkdir()
    _repo(repo, fleet).publish([built["package"]])
    mirror = Mirror(repo)
    agent = AgentProcess(built["bundle"], fleet_pub, tmp_path / "state", "--pull", mirror.url, "--interval", "0.3")
    try:
        assert _until(lambda: _serving(agent) == 2), agent.logtext()[-2000:]
        # the rotation: root v2 signed by the old and the new key; the repository is signed by the new key from now
        _rotate_root(repo, fleet, new_key)
        v3 = version_of(built, tmp_path / "alpha-3.epu", 3)  # the package itself keeps the update-signing key
        _repo(repo, new_key).publish([v3], trusted_keys=[fleet_pub])
        assert _until(lambda: _serving(agent) == 3), agent.logtext()[-2000:]
        roots = sorted((tmp_path / "state/tuf/metadata/root_history").glob("*.root.json"))
        assert [p.name for p in roots][-1] == "2.root.json"  # the device keeps the rotated root
        # the leaked old key signs a new release (v4): refused (the old key no longer holds any role)
        v4 = version_of(built, tmp_path / "alpha-4.epu", 4)
        saved = tmp_path / "repo-v3"
        shutil.copytree(repo, saved)
        log0 = len(agent.logtext())
        _sign_release_with_revoked_key(repo, fleet, v4, fleet_pub)
        mark = len(mirror.hits)
        assert _until(lambda: mirror.polls_since(mark) >= 3, 30)
        assert _serving(agent) == 3
        assert "Unsigned" in agent.logtext()[log0:] or "threshold" in agent.logtext()[log0:], agent.logtext()[log0:]
        # ... also when the mirror hides root v2, hoping the device falls back to the root it was first given
        mirror.rules["/2.root.json"] = b""
        (repo / "metadata/2.root.json").unlink()
        log1 = len(agent.logtext())
        mark = len(mirror.hits)
        assert _until(lambda: mirror.polls_since(mark) >= 3, 30)
        assert _serving(agent) == 3
        assert "pulled" not in agent.logtext()[log1:]
        # an attacker's root v3 signed only by the revoked key is refused too
        mirror.rules.clear()
        shutil.rmtree(repo)
        shutil.copytree(saved, repo)
        _attacker_root(repo, fleet, version=3)
        log2 = len(agent.logtext())
        mark = len(mirror.hits)
        assert _until(lambda: mirror.polls_since(mark) >= 3, 30)
        assert _serving(agent) == 3 and "root" in agent.logtext()[log2:].lower()
        # and the genuine new-key repository goes on working: v5 installs
        (repo / "metadata/3.root.json").unlink()
        v5 = version_of(built, tmp_path / "alpha-5.epu", 5)
        _repo(repo, new_key).publish([v5], trusted_keys=[fleet_pub])
        assert _until(lambda: _serving(agent) == 5), agent.logtext()[-2000:]
    finally:
        agent.stop()
        mirror.stop()


def _sign_release_with_revoked_key(repo, old_key, package, fleet_pub):
    """New targets/snapshot/timestamp signed by the old key alone (bypassing the root check a publisher makes)."""
    from edgepeft.contracts.signing import load_private_key
    from edgepeft.release.tuf_repo import ROLES, TufRepository

    repo_obj = TufRepository(repo, {r: load_private_key(old_key) for r in ROLES})
    repo_obj._root = lambda: None  # the attacker's tool does not refuse to sign
    repo_obj.publish([package], trusted_keys=[fleet_pub])


def _attacker_root(repo, old_key, version):
    from securesystemslib.signer import CryptoSigner, SSlibKey
    from tuf.api.metadata import Metadata
    from tuf.api.serialization.json import JSONSerializer

    from edgepeft.contracts.signing import load_private_key

    old = load_private_key(old_key)
    md = Metadata.from_file(str(repo / "metadata" / "2.root.json"))
    for role in ("root", "targets", "snapshot", "timestamp"):
        md.signed.add_key(SSlibKey.from_crypto(old.public_key()), role)
    md.signed.version = version
    md.signatures.clear()
    md.sign(CryptoSigner(old))
    (repo / "metadata" / f"{version}.root.json").write_bytes(md.to_bytes(JSONSerializer(compact=False)))


# ---------------------------------------------------------------------------------------------
# (b) the update-signing keys a device trusts
# ---------------------------------------------------------------------------------------------
def test_a_leaked_update_key_is_replaced_and_then_refused(built, tmp_path):
    from edgepeft.contracts.signing import generate_keypair

    old, old_pub = built["private_key"], built["public_key"]
    new, new_pub = generate_keypair(tmp_path / "fleet-2")
    pkg = built["package"].read_bytes()
    # step 1 (the leak is known): a bundle re-signed by the new key, and devices trusting both keys
    bundle = _bundle_signed_by(built, tmp_path / "bundle-new", new)
    state = tmp_path / "state"
    agent = AgentProcess(bundle, old_pub, state, "--trusted-key", new_pub)
    try:
        # step 2: every package is published signed by both keys (a device not yet moved still takes it)
        both_v2 = _signed_by(pkg, old, new)
        st = _push(agent, both_v2)
        assert st["status"] == "healthy" and st["version"] == 2, st
        assert _serving(agent) == 2
    finally:
        agent.stop()
    # a device still trusting only the old key takes the doubly signed package too
    legacy = AgentProcess(built["bundle"], old_pub, tmp_path / "legacy")
    try:
        assert _push(legacy, both_v2)["status"] == "healthy"
    finally:
        legacy.stop()
    # step 3: the old key is revoked on the device (its trusted set is the new key alone): it comes up on what
    # it holds (the doubly signed v2 verifies with the new key), and refuses what the leaked key signs
    agent = AgentProcess(bundle, new_pub, state)
    try:
        assert _serving(agent) == 2
        from update_support import forge

        def bump(m):
            m["adapter"]["version"] = 9
        leaked = forge(pkg, old, mutate=bump)
        st = _push(agent, leaked)
        assert st["status"] == "rejected" and "does not trust" in st["reason"], st
        assert _serving(agent) == 2
        # the new key alone is enough from now on
        st = _push(agent, forge(pkg, new, mutate=lambda m: m["adapter"].__setitem__("version", 10)))
        assert st["status"] == "healthy" and st["version"] == 10, st
        assert _serving(agent) == 10
        dev = agent.device()
        assert next(a for a in dev["adapters"] if a["name"] == "alpha")["floor"] == 10
    finally:
        agent.stop()


def test_revoking_the_key_that_signed_what_a_device_holds_needs_re_signing_first(built, tmp_path):
    """The pitfall the runbook orders around: a stored version signed only by the revoked key stops verifying
    (the device serves the bundle's own version and says why); a shipped bundle signed only by it does not open."""
    from edgepeft.contracts.signing import generate_keypair

    old_pub = built["public_key"]
    new, new_pub = generate_keypair(tmp_path / "fleet-2")
    bundle = _bundle_signed_by(built, tmp_path / "bundle-new", new)
    state = tmp_path / "state"
    agent = AgentProcess(bundle, old_pub, state, "--trusted-key", new_pub)
    try:
        assert _push(agent, built["package"].read_bytes())["status"] == "healthy"  # v2, signed by the old key only
    finally:
        agent.stop()
    agent = AgentProcess(bundle, new_pub, state)
    try:
        assert _serving(agent) == 1  # v2 no longer verifies: never served
        notes = " ".join(agent.device()["notes"])
        assert "alpha" in notes and ("trust" in notes or "signature" in notes or "v2" in notes), notes
    finally:
        agent.stop()
    from agent_support import run_cli

    r = run_cli("agent", built["bundle"], "--trusted-key", new_pub, "--state", tmp_path / "state-old-bundle",
                "--listen", "127.0.0.1:0", timeout=120)  # a bundle signed only by the revoked key: it refuses to run
    assert r.returncode != 0 and "trust" in r.stderr, r.stderr[-1000:]
