"""What is signed was checked: `edgepeft build` and `edgepeft update create` run the health checks on the
built graph and refuse to sign what fails, showing the answer produced (issue 26, item 3); an update signed
by another key than the bundle's warns at once, and the device's refusal names the keys it trusts (item 9);
`update create --bundle X.epb` (item 11)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_export_support import make_peft_adapter, tiny_llama_dir  # noqa: E402
from test_runtime_support import VOCAB, byte_level_tokenizer  # noqa: E402

from edgepeft.contracts.signing import generate_keypair  # noqa: E402


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=os.environ | {"EDGEPEFT_DEBUG": ""})


def _checks(path, expect: dict):
    path.write_text(json.dumps({"input": "where is the bakery?", "adapter": "voice", "expect": expect,
                                "max_new_tokens": 6}) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from edgepeft.bundle.build import build_bundle

    root = tmp_path_factory.mktemp("checks")
    priv, pub = generate_keypair(root / "keys" / "fleet")
    base = tiny_llama_dir(root / "base", vocab_size=VOCAB, initializer_range=0.2)
    byte_level_tokenizer(base)
    make_peft_adapter(base, root / "voice", seed=5)
    shutil.copytree(root / "voice", root / "voice-2")  # v2 answers as v1 does: the bundle's check holds
    probe = build_bundle(base=str(base), adapters=[("voice", root / "voice")], target="x86-64-gateway", key=priv,
                         out=root / "probe", quant="fp32", slot_rank=4)
    from edgepeft.runtime import Engine

    with Engine(probe.bundle_dir, [pub]) as eng:
        said = eng.generate(messages=[{"role": "user", "content": "where is the bakery?"}], adapter="voice",
                            max_new_tokens=6, temperature=0.0).text
    assert said.strip()
    res = build_bundle(base=str(base), adapters=[("voice", root / "voice")], target="x86-64-gateway", key=priv,
                       out=root / "bundle", quant="fp32", slot_rank=4,
                       health_checks=_checks(root / "pass.jsonl", {"equals": said}))
    return {"root": root, "priv": priv, "pub": pub, "base": base, "bundle": res.bundle_dir}


def test_build_refuses_to_sign_a_check_the_graph_fails(made, tmp_path):
    r = _cli("build", "--base", made["base"], "--adapter", f"voice={made['root'] / 'voice'}", "--target",
             "x86-64-gateway", "--quant", "fp32", "--key", made["priv"], "--out", tmp_path / "bakery",
             "--health-check", _checks(tmp_path / "typo.jsonl", {"contains": "Contoso"}))
    assert r.returncode != 0
    assert "health checks fail on the built graph" in r.stderr and "nothing was signed" in r.stderr, r.stderr
    assert "expected text containing 'Contoso', got '" in r.stderr and "typo.jsonl" in r.stderr
    assert not (tmp_path / "bakery").exists() and not (tmp_path / "bakery.epb").exists()


def test_update_create_runs_the_checks_a_device_will_run(made, tmp_path):
    out = tmp_path / "voice-2.epu"
    r = _cli("update", "create", "--bundle", made["bundle"], "--adapter", f"voice={made['root'] / 'voice-2'}",
             "--version", "2", "--key", made["priv"], "--out", out,
             "--health-check", _checks(tmp_path / "typo.jsonl", {"equals": "Contoso bakery"}))
    assert r.returncode != 0 and "expected exactly 'Contoso bakery', got '" in r.stderr, r.stderr
    assert not out.exists()
    # no checks of its own: the bundle's checks for this adapter run, as on the device (and pass here)
    r = _cli("update", "create", "--bundle", made["bundle"], "--adapter", f"voice={made['root'] / 'voice-2'}",
             "--version", "2", "--key", made["priv"], "--out", out)
    assert r.returncode == 0 and "running 1 health check(s)" in r.stderr, r.stderr


def test_update_create_takes_the_bundle_archive(made, tmp_path):
    r = _cli("update", "create", "--bundle", f"{made['bundle']}.epb", "--adapter",
             f"voice={made['root'] / 'voice-2'}", "--version", "2", "--key", made["priv"], "--out", tmp_path / "v2.epu")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v2.epu").is_file()


def test_another_key_warns_at_create_and_the_device_names_the_keys_it_trusts(made, tmp_path):
    from edgepeft.contracts.verify import key_id, load_public_key
    from edgepeft.update.device import Device

    other, _ = generate_keypair(tmp_path / "other")
    out = tmp_path / "voice-2.epu"
    r = _cli("update", "create", "--bundle", made["bundle"], "--adapter", f"voice={made['root'] / 'voice-2'}",
             "--version", "2", "--key", other, "--out", out)
    fleet_id = key_id(load_public_key(made["pub"]))
    assert r.returncode == 0 and "warning: bundle" in r.stderr and f"trust {fleet_id}" in r.stderr, r.stderr
    dev = Device(made["bundle"], [made["pub"]], tmp_path / "state")
    try:
        got = dev.install_file(out)
    finally:
        dev.close()
    assert got.status == "rejected" and f"it trusts '{fleet_id}'" in got.reason, got.reason


def test_answers_in_messages_are_cut_with_an_ellipsis():
    from edgepeft.runtime.health import shorten

    assert shorten("x" * 100, 80) == repr("x" * 80) + "…"
    assert shorten("short", 80) == "'short'"


def test_inspect_says_which_checks_run_on_install(made, tmp_path):
    out = tmp_path / "v2.epu"
    r = _cli("update", "create", "--bundle", made["bundle"], "--adapter", f"voice={made['root'] / 'voice-2'}",
             "--version", "2", "--key", made["priv"], "--out", out)
    assert r.returncode == 0 and "the bundle's own health checks run on install" in r.stdout, r.stdout + r.stderr
    r = _cli("update", "inspect", out)
    assert r.returncode == 0 and "runs its bundle's health checks for voice" in r.stdout, r.stdout
