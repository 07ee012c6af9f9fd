"""The signed adapter store and the install transaction (in process; the agent tests drive the same
code through real processes): verify -> stage -> health check -> commit, floors, failed versions,
rollback, planted files, and a power cut at every write of an install."""

from __future__ import annotations

import json
import shutil

import pytest
from test_runtime_support import require_fixtures
from update_support import forge, unpack_package

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.fsio import FaultyIO, FileIO, PowerCut  # noqa: E402
from edgepeft.runtime import Engine  # noqa: E402
from edgepeft.update.installer import Updater  # noqa: E402

PROMPT = "the tin ünï ☃"


@pytest.fixture(scope="module")
def answers(built):
    """What the bundle's alpha v1 and the update's v2 answer (greedy), and the update's bytes."""
    eng = Engine(built["bundle"], [built["public_key"]])
    v1 = eng.generate(PROMPT, adapter="alpha", max_new_tokens=8).text
    eng.load_adapter(built["package"], name="probe")
    v2 = eng.generate(PROMPT, adapter="probe", max_new_tokens=8).text
    chat_v2 = eng.generate(messages=[{"role": "user", "content": PROMPT}], adapter="probe", max_new_tokens=8).text
    assert v1 != v2
    return {"v1": v1, "v2": v2, "chat_v2": chat_v2}


def _engine(built):
    return Engine(built["bundle"], [built["public_key"]])


def _serving(eng):
    return eng.generate(PROMPT, adapter="alpha", max_new_tokens=8)


def _with_checks(built, checks, version=2, **kw):
    def mutate(m):
        m["health_checks"] = checks
        m["adapter"]["version"] = version
    return forge(built["package"].read_bytes(), built["private_key"], mutate=mutate, **kw)


def test_install_serves_the_new_version_and_survives_a_restart(built, answers, tmp_path):
    eng = _engine(built)
    up = Updater(eng, tmp_path / "state")
    seen = []
    res = up.install(built["package"].read_bytes(), on_status=lambda s, r: seen.append(s))
    assert res.status == "healthy", res.reason
    assert seen == ["verified", "installed", "healthy"] and (res.name, res.version) == ("alpha", 2)
    out = _serving(eng)
    assert out.text == answers["v2"] and out.adapter_version == 2
    # a restart serves the committed version, re-verified from the stored package
    eng2 = _engine(built)
    up2 = Updater(eng2, tmp_path / "state")
    assert _serving(eng2).text == answers["v2"] and not up2.notes
    assert {"name": "alpha", "version": 2, "source": "store"}.items() <= up2.installed()[0].items()
    # the very package that serves, delivered again (pulled, then pushed by a rollout): healthy, nothing installed
    seen.clear()
    res = up2.install(built["package"].read_bytes(), on_status=lambda s, r: seen.append(s))
    assert res.status == "healthy" and "already installed" in res.reason and seen == ["verified", "healthy"]
    from edgepeft.contracts.update import read_update

    envelope, _ = read_update(built["package"].read_bytes(), eng2.trusted_keys)
    up2.check(envelope)  # a link's early check (after the envelope) lets it through too
    assert up2.store.state("alpha").current == 2
    # another package under the same version, and an older version, are refused, also after the restart
    other_v2 = forge(built["package"].read_bytes(), built["private_key"],
                     mutate=lambda m: m.__setitem__("expires", "2099-01-01T00:00:00Z"))
    assert other_v2 != built["package"].read_bytes()
    for data, why in ((other_v2, "same version"),
                      (_with_checks(built, [], version=1), "older than")):
        res = up2.install(data)
        assert res.status == "rejected" and why in res.reason, res.reason
    assert _serving(eng2).text == answers["v2"]


def test_failed_health_check_rolls_back_and_that_version_never_installs_again(built, answers, tmp_path):
    eng = _engine(built)
    up = Updater(eng, tmp_path / "state")
    bad = _with_checks(built, [{"input": "hi", "expect": {"equals": "never this"}}], version=3)
    res = up.install(bad)
    assert res.status == "rolled-back" and "check #0" in res.reason and "v1 keeps serving" in res.reason
    assert _serving(eng).text == answers["v1"]
    assert not list((tmp_path / "state/adapters/alpha").glob("v-3*"))
    again = up.install(bad)
    assert again.status == "rejected" and "failed its health check on this device before" in again.reason
    # a newer version with a passing check installs; the failed record below the floor is dropped
    good = _with_checks(built, [{"input": PROMPT, "expect": {"contains": answers["chat_v2"][:3]},
                                 "max_new_tokens": 8}], version=4)
    assert up.install(good).status == "healthy"
    assert _serving(eng).text == answers["v2"] and up.store.state("alpha").failed == {}


def test_rollback_goes_to_the_previous_version_then_to_the_bundle(built, answers, tmp_path):
    eng = _engine(built)
    up = Updater(eng, tmp_path / "state")
    assert up.install(built["package"].read_bytes()).status == "healthy"
    assert up.install(_with_checks(built, [], version=3)).status == "healthy"
    assert up.rollback("alpha")["version"] == 2
    assert _serving(eng).text == answers["v2"]
    assert up.rollback("alpha")["version"] == 1
    assert _serving(eng).text == answers["v1"]
    from edgepeft.errors import StoreError

    with pytest.raises(StoreError, match="no installed update") as ei:
        up.rollback("alpha")
    assert ei.value.hint
    # the floor stays: v3 was accepted once, so v3 cannot come back
    assert up.install(_with_checks(built, [], version=3)).status == "rejected"


def test_planted_and_damaged_files_are_never_served(built, answers, tmp_path):
    eng = _engine(built)
    state = tmp_path / "state"
    up = Updater(eng, state)
    assert up.install(built["package"].read_bytes()).status == "healthy"
    d = state / "adapters/alpha"
    # an attacker who can write the folder plants "v999": an unsigned adapter under a high version
    (d / "v-999.epu").write_bytes(built["update"].read_bytes())
    st = json.loads((d / "state.json").read_text())
    st.update(current=999, previous=2)
    (d / "state.json").write_text(json.dumps(st))
    eng2 = _engine(built)
    up2 = Updater(eng2, state)
    assert _serving(eng2).text == answers["v2"]
    assert any("v999 not served" in n and "not an edgepeft update package" in n for n in up2.notes), up2.notes
    # a flipped byte in the stored payload: not served, the bundle's version serves
    data = bytearray((d / "v-2.epu").read_bytes())
    data[-7] ^= 0x40
    (d / "v-2.epu").write_bytes(bytes(data))
    eng3 = _engine(built)
    up3 = Updater(eng3, state)
    assert _serving(eng3).text == answers["v1"]
    assert any("does not match its signed SHA-256" in n for n in up3.notes), up3.notes


def test_compact_int8_update_is_expanded_from_the_verified_bytes(built, tmp_path):
    pkg = built["package_int8"]  # made by `edgepeft update create --adapter-dtype int8`
    meta, _, payload = unpack_package(pkg.read_bytes())
    assert meta["adapter"]["dtype"] == "int8" and any(s.endswith("lora_A") for s in meta["slots"])
    eng = _engine(built)
    up = Updater(eng, tmp_path / "state")
    res = up.install(pkg.read_bytes())
    assert res.status == "healthy", res.reason
    served = eng.registry.get("alpha")
    assert served.version == 7 and all(a.dtype.name == "float32" for a in served.arrays.values())
    assert _serving(eng).completion_tokens > 0
    assert sorted(p.name for p in (tmp_path / "state/adapters/alpha").iterdir()) == ["state.json", "v-7.epu"]


def _fresh_state(tmp_path, tag):
    return tmp_path / f"state-{tag}"


@pytest.mark.parametrize("health", ["passes", "fails"])
def test_power_cut_at_every_step_of_an_install_leaves_the_old_or_the_new_version(built, answers, tmp_path, health):
    """Cut the power at operation N (write, fsync, rename, unlink, the health check itself) for every N.

    The injector loses unsynced data and unsynced directory entries. After the cut a restarted
    device must serve exactly v1 or v2, never a mix or nothing; with a failing health check, only v1.
    """
    check = ({"input": PROMPT, "expect": {"contains": answers["chat_v2"][:3]}, "max_new_tokens": 8}
             if health == "passes" else {"input": "hi", "expect": {"equals": "never"}})
    data = _with_checks(built, [check])
    counting = FaultyIO(cut_at=None)
    up = Updater(_engine(built), _fresh_state(tmp_path, "count"), io=counting)
    first = len(counting.ops)
    res = up.install(data)
    assert res.status == ("healthy" if health == "passes" else "rolled-back"), res.reason
    ops = counting.ops[first:]
    assert any(o.startswith("checkpoint health check") for o in ops) and len(ops) >= 8, ops

    outcomes = set()
    for n in range(1, len(ops) + 1):
        state = _fresh_state(tmp_path, n)
        faulty = FaultyIO(cut_at=None)
        up = Updater(_engine(built), state, io=faulty)
        faulty.cut_at = len(faulty.ops) + n
        with pytest.raises(PowerCut):
            up.install(data)
        eng = _engine(built)
        after = Updater(eng, state, io=FileIO())
        got = _serving(eng).text
        assert got in {answers["v1"], answers["v2"]}, (n, ops[n - 1])
        if health == "fails":
            assert got == answers["v1"], (n, ops[n - 1])
        outcomes.add(got)
        names = {p.name for p in (state / "adapters/alpha").iterdir()} if (state / "adapters/alpha").exists() else set()
        assert not [x for x in names if x.endswith(".tmp")], (n, names)
        if got == answers["v1"] and "trial" in ops[n - 1]:
            assert any("stopped during its health check" in x for x in after.notes)
        shutil.rmtree(state)
    assert answers["v1"] in outcomes
    if health == "passes":
        assert answers["v2"] in outcomes


def test_a_device_s_own_checks_can_refuse_an_update_the_signed_checks_pass(built, answers, tmp_path):
    """Site acceptance: checks kept on the device run after the signed ones and can only make it stricter."""
    from edgepeft.contracts.manifest import HealthCheck

    strict = [HealthCheck(input="hello", expect={"contains": "Contoso"}, max_new_tokens=8)]
    eng = _engine(built)
    up = Updater(eng, tmp_path / "state", local_checks=strict)
    res = up.install(built["package"].read_bytes())
    assert res.status == "rolled-back" and "Contoso" in res.reason
    assert _serving(eng).text == answers["v1"]
    other = HealthCheck(input="hello", expect={"contains": "x"}, adapter="beta")  # about another adapter: not run
    eng2 = _engine(built)
    assert Updater(eng2, tmp_path / "state2", local_checks=[other]).install(
        built["package"].read_bytes()).status == "healthy"
