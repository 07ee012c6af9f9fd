"""`edgepeft inspect` (directory or .epb, verified or not) and `edgepeft eval` (the training metrics, computed on
the device runtime, equal to PyTorch + PEFT on an fp32 bundle, shown beside the training record's figures)."""

from __future__ import annotations

import json
import shutil

import pytest

from edgepeft.cli.main import main

SENTIMENT = [{"text": "the product was very good", "label": "positive", "slice": "app"},
             {"text": "awful service", "label": "negative", "slice": "sms"},
             {"text": "the thing is bad bad bad", "label": "negative", "slice": "app"},
             {"text": "great", "label": "positive", "slice": "sms"}]
CHATS = [{"prompt": "the tin", "completion": "the thing is here"},
         {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo ☃"},
                       {"role": "assistant", "content": "hi there"}]}]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(encoder_bundle, tmp_path_factory):
    """A classifier bundle whose adapter carries a training record with held-out figures."""
    from edgepeft.bundle.build import build_bundle

    root = tmp_path_factory.mktemp("trained")
    adapter = shutil.copytree(encoder_bundle["root"] / "peft-sentiment", root / "sentiment")
    metrics = {"task": "classification", "examples": 4, "loss": 0.61, "accuracy": 0.75, "macro_f1": 0.73,
               "slices": {"app": {"examples": 2, "accuracy": 1.0, "macro_f1": 1.0}}}
    (adapter / "edgepeft_training.json").write_text(json.dumps({
        "labels": ["negative", "positive"], "version": 3,
        "metrics": {"schema": 1, "task": "classification", "eval": metrics, "baseline": dict(metrics, accuracy=0.5)}}))
    res = build_bundle(base=str(encoder_bundle["base"]), adapters=[("sentiment", adapter)], target="x86-64-gateway",
                       key=encoder_bundle["private_key"], out=root / "bundle", quant="fp32", task="classification")
    return {"bundle": res.bundle_dir, "archive": res.archive, "public_key": encoder_bundle["public_key"]}


# --- inspect ----------------------------------------------------------------------------------

def test_inspect_shows_target_base_signer_adapters_and_metrics(trained, capsys):
    assert main(["inspect", str(trained["bundle"])]) == 0
    out = capsys.readouterr().out
    for needle in ("x86-64-gateway", "base (bert, classification)", "fingerprint  sha256:", "NOT verified",
                   "sentiment v3: lora r=4", "labels: negative, positive", "held-out (4 examples): accuracy 0.5 -> 0.75",
                   "by slice: app 1"):
        assert needle in out, needle


def test_inspect_an_archive_verified_as_json(trained, capsys):
    assert main(["inspect", str(trained["archive"]), "--trusted-key", str(trained["public_key"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "archive" and info["verified"] is True and len(info["signer"]["key_id"]) == 16
    (a,) = info["adapters"]
    assert a["name"] == "sentiment" and a["version"] == 3 and a["rank"] == 4 and a["labels"] == ["negative", "positive"]
    assert a["metrics"]["eval"]["accuracy"] == 0.75 and info["base"]["architecture"] == "bert"


def test_inspect_refuses_a_tampered_archive_when_asked_to_verify(trained, tmp_path, capsys):
    import tarfile

    with tarfile.open(trained["archive"]) as tar:
        at = tar.getmember("tokenizer.json").offset_data + 10
    data = bytearray(trained["archive"].read_bytes())
    data[at] ^= 0x01
    bad = tmp_path / "bad.epb"
    bad.write_bytes(bytes(data))
    assert main(["inspect", str(bad), "--trusted-key", str(trained["public_key"])]) == 1
    assert "does not match the manifest" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 1
    assert "has no manifest.json" in capsys.readouterr().err


def test_inspect_refuses_a_manifest_with_a_duplicate_key_as_a_device_would(trained, tmp_path, capsys):
    """Parsers disagree on which of two equal keys wins; inspect must not show what a device refuses."""
    copy = shutil.copytree(trained["bundle"], tmp_path / "dup")
    manifest = copy / "manifest.json"
    text = manifest.read_text(encoding="utf-8")
    assert text.startswith("{") and '"schema_version"' in text
    manifest.write_text('{"schema_version": 999,' + text[1:], encoding="utf-8")
    assert main(["inspect", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "'schema_version' appears twice" in err, err


# --- eval -------------------------------------------------------------------------------------

def test_eval_classifier_matches_pytorch_peft_on_an_fp32_bundle(encoder_bundle):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgepeft.runtime import Engine
    from edgepeft.runtime.evaluate import classifier_metrics
    from edgepeft.train.encode import encode_classification
    from edgepeft.train.evaluate import classification_metrics

    engine = Engine(encoder_bundle["bundle"], [encoder_bundle["public_key"]])
    device = classifier_metrics(engine, SENTIMENT, adapter="sentiment", labels=["negative", "positive"],
                                slice_column="slice")
    tok = AutoTokenizer.from_pretrained(encoder_bundle["base"])
    base = AutoModelForSequenceClassification.from_pretrained(encoder_bundle["base"], num_labels=2, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, encoder_bundle["root"] / "peft-sentiment").eval()
    rows = [dict(r, label=["negative", "positive"].index(r["label"])) for r in SENTIMENT]
    ref = classification_metrics(model, rows, encode_classification(rows, tok, 64), ["negative", "positive"],
                                 pad_id=tok.pad_token_id, batch_size=8, device="cpu", slice_column="slice")
    for key in ("accuracy", "macro_f1", "per_label", "confusion", "slices"):
        assert device[key] == ref[key], key
    assert device["loss"] == pytest.approx(ref["loss"], abs=1e-4)


def test_eval_decoder_loss_matches_pytorch_peft_on_an_fp32_bundle(decoder_bundle):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepeft.runtime import Engine
    from edgepeft.runtime.evaluate import decoder_metrics
    from edgepeft.train.encode import encode_causal
    from edgepeft.train.evaluate import mean_loss

    engine = Engine(decoder_bundle["bundle"], [decoder_bundle["public_key"]])
    device = decoder_metrics(engine, CHATS, adapter="alpha", generate=2, max_new_tokens=4)
    tok = AutoTokenizer.from_pretrained(decoder_bundle["base"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(decoder_bundle["base"], dtype=torch.float32),
                                      decoder_bundle["root"] / "peft-alpha").eval()
    items, _ = encode_causal(CHATS, tok, 128)
    assert device["loss"] == pytest.approx(mean_loss(model, items, tok.pad_token_id, 8, "cpu"), rel=1e-4)
    assert device["answer_match"]["generated"] == 2 and set(device["answer_match"]) >= {"exact", "overlap"}


def test_eval_cli_puts_device_figures_beside_the_training_record(trained, tmp_path, capsys):
    data = jsonl(tmp_path / "eval.jsonl", SENTIMENT)
    args = ["eval", str(trained["bundle"]), "--data", data, "--trusted-key", str(trained["public_key"])]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"adapter sentiment v3 on {data}: 4 examples, fp32 bundle for x86-64-gateway"
    assert lines[1].split("  ")[0] == "figure" and "training record (4 held-out, PyTorch)" in lines[1]
    accuracy = next(line for line in lines if line.startswith("accuracy "))
    assert accuracy.split()[1] == "0.75"
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["training_record"]["eval"]["accuracy"] == 0.75 and out["device"]["examples"] == 4
    assert out["training_record"]["record_sha256"].startswith("sha256:")


def test_eval_refuses_labels_the_adapter_does_not_know_and_unnamed_adapters(encoder_bundle, tmp_path, capsys):
    data = jsonl(tmp_path / "e.jsonl", [{"text": "great", "label": "ecstatic"}, {"text": "bad", "label": "negative"}])
    base = ["eval", str(encoder_bundle["bundle"]), "--data", data, "--trusted-key", str(encoder_bundle["public_key"])]
    assert main(base) == 2
    assert "pass --adapter with one of: sentiment, topic" in capsys.readouterr().err
    assert main(base + ["--adapter", "sentiment"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: record 1 has label 'ecstatic', which adapter 'sentiment' does not know",
                   "hint: its labels are: negative, positive"]


def test_eval_on_a_device_never_loads_the_training_package(trained, tmp_path):
    """`edgepeft eval` is a device verb: reading and scoring its data must not import edgepeft.train (nor models)."""
    import subprocess
    import sys

    data = jsonl(tmp_path / "e.jsonl", SENTIMENT)
    script = ("import json, sys\n"
              "from edgepeft.cli.main import main\n"
              f"rc = main(['eval', {str(trained['bundle'])!r}, '--data', {data!r}, '--trusted-key', "
              f"{str(trained['public_key'])!r}, '--json'])\n"
              "server = sorted(m for m in sys.modules if m.split('.')[:2] in (['edgepeft', 'train'], "
              "['edgepeft', 'models']))\n"
              "print(json.dumps({'rc': rc, 'server': server}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "server": []}, proc.stderr[-2000:]
