"""Every encoder family and every adapter family a classifier takes (LoRA, bottleneck) goes the whole way
a user goes: build -> update create (fp32, int8, a continued adapter) -> install on a device -> healthy.
The module names of a plain PEFT classifier (``key``, ``query``, ``lin1``, ``Wqkv``) are matched by the one
rule ``build`` uses, so an adapter that built also updates (issue 26, item 1). Tiny models: a few seconds
per family."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_export_support import (  # noqa: E402
    ENCODER_FAMILIES,
    ENCODER_TARGETS,
    make_bottleneck_adapter,
    make_peft_adapter,
    tiny_encoder_dir,
)
from test_runtime_support import wordpiece_tokenizer  # noqa: E402

# builds classifiers with torch and transformers: the server side (its name puts it in the device selection)
pytestmark = pytest.mark.host_only

from edgepeft.contracts.signing import generate_keypair  # noqa: E402
from edgepeft.models.arch import ENCODERS  # noqa: E402


@pytest.mark.parametrize("family", sorted(ENCODER_FAMILIES))
def test_a_classifier_that_built_updates_over_the_air(family, tmp_path):
    from edgepeft.bundle.build import build_bundle
    from edgepeft.release.package import create_adapter_update
    from edgepeft.update.device import Device

    priv, pub = generate_keypair(tmp_path / "keys" / "fleet")
    base = tiny_encoder_dir(family, tmp_path / "base")
    wordpiece_tokenizer(base)
    extra = {k: list(v) for k, v in ENCODER_FAMILIES[family][2].items()}  # PEFT extends modules_to_save in place
    lora, lora2 = tmp_path / "lora", tmp_path / "lora-2"
    for seed, d in ((1, lora), (2, lora2)):
        make_peft_adapter(base, d, task="classification", targets=ENCODER_TARGETS[family], seed=seed,
                          num_labels=3, **extra)
    bn, bn2 = tmp_path / "bn", tmp_path / "bn-2"
    heads = [s.module.split(".")[0] for s in ENCODERS[family].head if s.source == "adapter"]
    for seed, d in ((3, bn), (4, bn2)):
        make_bottleneck_adapter(base, d, task="classification", size=4, seed=seed, heads=sorted(set(heads)))
    res = build_bundle(base=str(base), adapters=[("inbox", lora), ("bn", bn)], target="x86-64-gateway", key=priv,
                       out=tmp_path / "bundle", quant="fp32", slot_rank=4, task="classification")
    # a continued adapter (edgepeft train --init-adapter) carries the record of its previous version
    (lora2 / "edgepeft_training.json").write_text(json.dumps({"version": 2, "init_adapter": str(lora)}))
    packages = [create_adapter_update(bundle=res.bundle_dir, name="inbox", adapter=lora2, version=2, key=priv,
                                      out=tmp_path / "inbox-2.epu"),
                create_adapter_update(bundle=res.bundle_dir, name="inbox", adapter=lora2, version=3, key=priv,
                                      out=tmp_path / "inbox-3-int8.epu", adapter_dtype="int8"),
                create_adapter_update(bundle=res.bundle_dir, name="bn", adapter=bn2, version=2, key=priv,
                                      out=tmp_path / "bn-2.epu", adapter_dtype="int8")]
    dev = Device(res.bundle_dir, [pub], tmp_path / "state")
    try:
        for pkg in packages:
            got = dev.install_file(pkg.path)
            assert got.status == "healthy", (pkg.path.name, got.reason)
        assert {a["name"]: a["version"] for a in dev.adapters()["adapters"]} == {"inbox": 3, "bn": 2}
    finally:
        dev.close()


def test_update_create_on_the_command_line_takes_a_plain_peft_classifier(tmp_path):
    """The user's own words: `edgepeft update create --bundle B --adapter inbox=DIR` for the adapter the
    bundle was built with (PEFT names key, query, value; the bundle's slots attention.self.key ...)."""
    from edgepeft.bundle.build import build_bundle

    priv, _ = generate_keypair(tmp_path / "keys" / "fleet")
    base = tiny_encoder_dir("bert", tmp_path / "base")
    wordpiece_tokenizer(base)
    make_peft_adapter(base, tmp_path / "inbox", task="classification", targets=("key", "query", "value"))
    res = build_bundle(base=str(base), adapters=[("inbox", tmp_path / "inbox")], target="x86-64-gateway", key=priv,
                       out=tmp_path / "bundles" / "pi5-inbox", quant="fp32", slot_rank=4, task="classification")
    r = subprocess.run([sys.executable, "-m", "edgepeft", "update", "create", "--bundle", str(res.bundle_dir),
                        "--adapter", f"inbox={tmp_path / 'inbox'}", "--version", "2", "--key", str(priv),
                        "--out", str(tmp_path / "inbox-2.epu")], capture_output=True, text=True, timeout=300,
                       env=os.environ | {"EDGEPEFT_DEBUG": ""})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "inbox-2.epu").is_file() and "adapter inbox v2" in r.stdout


@pytest.mark.parametrize("family", ["distilbert", "deberta-v2"])
def test_edgepeft_train_saves_every_head_stage_the_bundle_needs(family, tmp_path):
    """DistilBERT's pre_classifier and DeBERTa-v3's pooler are head stages the exporter fills from the adapter:
    `edgepeft train` saves them (LoRA and bottleneck), so what it trains builds and updates."""
    from edgepeft.bundle.build import build_bundle
    from edgepeft.release.package import create_adapter_update
    from edgepeft.train import train

    priv, _ = generate_keypair(tmp_path / "keys" / "fleet")
    base = tiny_encoder_dir(family, tmp_path / "base")
    wordpiece_tokenizer(base)
    data = tmp_path / "inbox.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} product {i}", "label": w}) + "\n"
                            for i in range(12) for w in ("good", "bad")), encoding="utf-8")
    outs = {}
    for method in ("lora", "bottleneck"):
        outs[method] = tmp_path / method
        train(data=str(data), base=str(base), out=str(outs[method]), method=method, max_steps=2, batch_size=4,
              eval_split=0.0, progress=False, max_length=32)
    res = build_bundle(base=str(base), adapters=list(outs.items()), target="x86-64-gateway", key=priv,
                       out=tmp_path / "bundle", quant="fp32", slot_rank=8, task="classification")
    for method, d in outs.items():
        create_adapter_update(bundle=res.bundle_dir, name=method, adapter=d, version=2, key=priv,
                              out=tmp_path / f"{method}-2.epu")
