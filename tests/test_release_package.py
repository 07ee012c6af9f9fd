"""`edgepeft update create`: a package for the bundle's base and slots, or a refusal that says why."""

from __future__ import annotations

import json
import shutil

import pytest
from agent_support import run_cli
from update_support import unpack_package

from edgepeft.errors import AdapterError, UsageError
from edgepeft.release.package import create_adapter_update, parse_expiry


def test_the_package_carries_what_a_device_needs_and_verifies(built, tmp_path):
    from edgepeft.runtime import Engine

    with Engine(built["bundle"], [built["public_key"]]) as eng:  # a check v3 passes: v2's weights, v2's answer
        eng.load_adapter(built["package"], name="probe")
        said = eng.generate(messages=[{"role": "user", "content": "hi"}], adapter="probe", max_new_tokens=8,
                            temperature=0.0).text
    checks = tmp_path / "checks.jsonl"
    checks.write_text(json.dumps({"input": "hi", "expect": {"equals": said}, "max_new_tokens": 8}) + "\n")
    r = run_cli("update", "create", "--bundle", built["bundle"], "--adapter", f"alpha={built['root'] / 'peft-gamma'}",
                "--version", "3", "--key", built["private_key"], "--expires", "12h", "--health-check", checks,
                "--adapter-dtype", "fp16", "--out", tmp_path / "a.epu", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    meta, sigs, payload = unpack_package((tmp_path / "a.epu").read_bytes())
    assert (meta["type"], meta["adapter"]["name"], meta["adapter"]["version"]) == ("adapter", "alpha", 3)
    assert meta["adapter"]["dtype"] == "fp16" and meta["payload"]["size"] == len(payload)
    assert meta["base_fingerprint"] == built["manifest"]["base"]["fingerprint"] and meta["health_checks"]
    assert summary["id"] and len(sigs) == 1 and meta["slots"]
    r = run_cli("update", "inspect", tmp_path / "a.epu", "--trusted-key", built["public_key"])
    assert r.returncode == 0 and "verified" in r.stdout


def test_adapters_that_do_not_fit_are_refused_with_the_reason(built, tmp_path):
    from test_export_support import make_peft_adapter

    key, bundle = built["private_key"], built["bundle"]

    def create(adapter, **kw):
        return create_adapter_update(bundle=bundle, name="alpha", adapter=adapter, version=kw.pop("version", 3),
                                     key=key, out=tmp_path / "x.epu", **kw)

    # trained on another base (its training record says so)
    other = tmp_path / "other-base"
    shutil.copytree(built["root"] / "peft-gamma", other)
    (other / "edgepeft_training.json").write_text(json.dumps({"base": {"fingerprint": "ff" * 32}}))
    with pytest.raises(AdapterError, match="trained on a different base") as ei:
        create(other)
    assert ei.value.hint
    # a rank above the bundle's slots
    big = tmp_path / "big"
    make_peft_adapter(built["base"], big, r=8, alpha=16, targets=("q_proj", "v_proj"), seed=3)
    with pytest.raises(AdapterError, match="rank 8; bundle .* takes ranks up to 4"):
        create(big)
    # modules the bundle has no slots for
    odd = tmp_path / "odd"
    make_peft_adapter(built["base"], odd, r=4, alpha=8, targets=("k_proj",), seed=4)
    with pytest.raises(AdapterError, match="trains k_proj, which bundle .* has no slots for"):
        create(odd)
    with pytest.raises(UsageError, match="whole number"):
        create(built["root"] / "peft-gamma", version=0)
    with pytest.raises(UsageError, match="should end in .epu"):
        create_adapter_update(bundle=bundle, name="alpha", adapter=built["root"] / "peft-gamma", version=3, key=key,
                              out=tmp_path / "x.bin")
    assert not (tmp_path / "x.epu").exists()


def test_expiry_forms():
    assert parse_expiry("never") is None
    assert parse_expiry("30d").endswith("Z") and parse_expiry("2099-01-01T00:00:00Z") == "2099-01-01T00:00:00Z"
    for bad in ("-1d", "tomorrow", "2001-01-01T00:00:00Z"):
        with pytest.raises(UsageError):
            parse_expiry(bad)


def test_a_rollout_names_the_path_publish_gives_a_package(built, tmp_path):
    """The controller's job and the TUF repository agree on where a package lives (one rule, in contracts)."""
    from pathlib import Path

    from edgepeft.fleet.controller import PackageInfo

    r = run_cli("publish", built["package"], "--repo", tmp_path / "repo", "--key", built["private_key"], "--json")
    assert r.returncode == 0, r.stderr
    published = json.loads(r.stdout)["published"][0]["path"]
    assert published == "edgepeft/adapters/alpha/v2.epu"
    assert PackageInfo.read(Path(built["package"])).target_path == published
