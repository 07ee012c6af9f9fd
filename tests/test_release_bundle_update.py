"""Bundle updates (a new base): staged beside the running bundle, verified and health-checked by a
second engine, committed atomically and swapped in; refused or rolled back with the reason otherwise."""

from __future__ import annotations

import json

import pytest

# builds a second base during the test: server side, so not among the device-side modules
from test_runtime_support import build_decoder_bundle

from edgepeft.release.package import create_bundle_update
from edgepeft.update.device import Device

Q = "héllo ☃"


@pytest.fixture(scope="module")
def new_base(built, tmp_path_factory):
    """A second bundle on another base (other weights), signed with the same fleet key."""
    root = tmp_path_factory.mktemp("newbase")
    nb = build_decoder_bundle(root, built["private_key"], base_seed=7)
    assert nb["manifest"]["base"]["fingerprint"] != built["manifest"]["base"]["fingerprint"]
    return nb


def test_a_new_bundle_installs_beside_the_old_one_and_switches_atomically(built, new_base, tmp_path):
    key = built["private_key"]
    state = tmp_path / "state"
    # the device was shipped the .epb archive
    dev = Device(built["bundle"].with_name("bundle.epb"), [built["public_key"]], state)
    assert dev.install_file(built["package"]).status == "healthy"  # alpha v2 for the old base
    old_fp = dev.engine.base_fingerprint
    before = dev.engine.generate(Q, max_new_tokens=6).token_ids
    pkg = create_bundle_update(bundle=new_base["bundle"], version=1, key=key, out=tmp_path / "bundle-1.epu").path
    # sent in pieces through the receiver, as a link would
    data = pkg.read_bytes()
    from edgepeft.transport.link import Package

    p = Package.read(pkg)
    for off in range(0, len(data), 64 << 10):
        dev.receiver.write(p.id, off, data[off:off + (64 << 10)], len(data))
    st = dev.receiver.wait(p.id, 120)
    assert st["status"] == "healthy", st
    assert [s["status"] for s in st["steps"]] == ["received", "verified", "installed", "healthy"]
    assert dev.engine.base_fingerprint == new_base["manifest"]["base"]["fingerprint"] != old_fp
    assert dev.engine.generate(Q, max_new_tokens=6).token_ids != before
    alpha = next(a for a in dev.status()["adapters"] if a["name"] == "alpha")
    assert (alpha["version"], alpha["source"]) == (1, "bundle")  # the new bundle's alpha; v2 was for the old base
    assert any("v2 not served" in n and "for base" in n for n in dev.status()["notes"])
    # a restart runs the new bundle; the same package again is refused; an adapter for the old base too
    dev.close()
    dev = Device(built["bundle"].with_name("bundle.epb"), [built["public_key"]], state)
    assert dev.engine.base_fingerprint == new_base["manifest"]["base"]["fingerprint"]
    again = dev.install(pkg.read_bytes())
    assert again.status == "rejected" and "same version" in again.reason
    from update_support import forge

    v5_old_base = forge(built["package"].read_bytes(), key, mutate=lambda m: m["adapter"].update(version=5))
    res = dev.install(v5_old_base)
    assert res.status == "rejected" and "built for base" in res.reason
    # rolling the bundle back returns to the shipped bundle and its adapters
    assert dev.rollback("bundle")["rolled_back_from"] == 1
    assert dev.engine.base_fingerprint == old_fp
    assert dev.engine.generate(Q, max_new_tokens=6).token_ids == before
    dev.close()


FAILING = {"input": "hello", "expect": {"equals": "an answer no tiny model gives"}}


def test_a_bundle_update_whose_checks_fail_is_refused_before_signing(built, new_base, tmp_path):
    """The checks a device would run on install run at creation: a failing one writes no package."""
    from edgepeft.errors import BuildError

    checks = tmp_path / "checks.jsonl"
    checks.write_text(json.dumps(FAILING) + "\n")
    out = tmp_path / "bundle-3.epu"
    with pytest.raises(BuildError, match="health checks fail.*nothing was signed") as err:
        create_bundle_update(bundle=new_base["bundle"].with_name("bundle.epb"), version=3, key=built["private_key"],
                             out=out, health_checks=checks)
    assert "check #0" in err.value.message and not out.exists()


def test_a_new_bundle_that_fails_its_health_check_is_rolled_back(built, new_base, tmp_path):
    from update_support import forge

    # creation refuses such a package (above), so the device's own check is reached with a re-signed one
    good = create_bundle_update(bundle=new_base["bundle"].with_name("bundle.epb"), version=3,
                                key=built["private_key"], out=tmp_path / "bundle-3.epu").path
    pkg = tmp_path / "failing-3.epu"
    pkg.write_bytes(forge(good.read_bytes(), built["private_key"], mutate=lambda m: m.update(health_checks=[FAILING])))
    dev = Device(built["bundle"], [built["public_key"]], tmp_path / "state")
    old_fp = dev.engine.base_fingerprint
    res = dev.install_file(pkg)
    assert res.status == "rolled-back" and "check #0" in res.reason and "keeps serving" in res.reason
    assert dev.engine.base_fingerprint == old_fp
    assert not (tmp_path / "state/bundles/v3").exists()
    assert dev.install_file(pkg).status == "rejected"  # never installed again
    dev.close()
