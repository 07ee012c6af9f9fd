"""`edgepeft build` end to end on tiny models: signed bundle + archive, refusals, no partial output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_export_support import decoder_feeds, make_peft_adapter, run_options, session, tiny_llama_dir
from test_runtime_support import byte_level_tokenizer

from edgepeft.bundle.build import build_bundle
from edgepeft.cli.main import main
from edgepeft.contracts import verify_bundle
from edgepeft.contracts.archive import unpack_bundle
from edgepeft.errors import AdapterError, SignatureError, TargetFitError, UsageError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = tiny_llama_dir(root / "base", vocab_size=300)
    byte_level_tokenizer(base)
    make_peft_adapter(base, root / "support", r=4, alpha=8, targets=("q_proj", "v_proj"), seed=1)
    make_peft_adapter(base, root / "legal", r=2, alpha=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=2)
    other = tiny_llama_dir(root / "other", vocab_size=300, hidden_size=32, intermediate_size=64)
    make_peft_adapter(other, root / "foreign", r=4, alpha=8, targets=("q_proj", "v_proj"), seed=3)
    return root


def _build(tiny, tmp_path, keypair, **kw):
    args = dict(base=str(tiny / "base"), adapters=[("support", tiny / "support"), ("legal", tiny / "legal")],
                target="raspberry-pi-5", key=keypair[0], out=tmp_path / "bundle", quant="fp32", adapter_dtype="fp32")
    return build_bundle(**(args | kw))


def test_build_signs_a_bundle_whose_graph_runs_each_adapter(tiny, tmp_path, keypair):
    result = _build(tiny, tmp_path, keypair)
    m = verify_bundle(result.bundle_dir, [keypair[1]])
    assert [a.name for a in m.adapters] == ["support", "legal"] and m.adapters[0].rank == 4
    assert m.model["slot_rank"] == 4 and m.base["fingerprint"].startswith("sha256:")
    assert {f.path for f in m.files} >= {"model.onnx", "tokenizer.json", "adapters/support-1.onnx_adapter"}
    assert result.archive.is_file() and result.summary()["adapters"][1]["bytes"] > 0
    # the same graph serves the bare base and each adapter, chosen per run
    sess = session(result.bundle_dir / "model.onnx")
    ids = np.array([[5, 17, 42, 7]])
    bare = sess.run(["logits"], decoder_feeds(m.model, ids))[0]
    outs = [sess.run(["logits"], decoder_feeds(m.model, ids),
                     run_options(result.bundle_dir / a.file))[0] for a in m.adapters]
    assert not np.allclose(bare, outs[0]) and not np.allclose(outs[0], outs[1])
    unpacked = unpack_bundle(result.archive, tmp_path / "unpacked")
    assert verify_bundle(unpacked, [keypair[1]]).to_dict() == m.to_dict()


def test_compact_adapter_payloads_are_smaller_and_expand_to_the_same_output(tiny, tmp_path, keypair):
    from edgepeft.contracts.adapter_payload import expand_adapter

    ref = _build(tiny, tmp_path, keypair, adapters=[("support", tiny / "support")])
    m = verify_bundle(ref.bundle_dir, [keypair[1]])
    sess = session(ref.bundle_dir / "model.onnx")
    ids = np.array([[9, 8, 7, 6]])
    want = sess.run(["logits"], decoder_feeds(m.model, ids), run_options(ref.bundle_dir / m.adapters[0].file))[0]
    sizes = {}
    for dtype, tol in (("fp16", 2e-3), ("int8", 5e-2)):
        b = _build(tiny, tmp_path, keypair, adapters=[("support", tiny / "support")], adapter_dtype=dtype,
                   out=tmp_path / dtype)
        entry = verify_bundle(b.bundle_dir, [keypair[1]]).adapters[0]
        assert entry.dtype == dtype
        sizes[dtype] = (b.bundle_dir / entry.file).stat().st_size
        expand_adapter(b.bundle_dir / entry.file, tmp_path / f"{dtype}.onnx_adapter")
        got = sess.run(["logits"], decoder_feeds(m.model, ids), run_options(tmp_path / f"{dtype}.onnx_adapter"))[0]
        np.testing.assert_allclose(got, want, atol=tol)
    fp32 = (ref.bundle_dir / m.adapters[0].file).stat().st_size
    assert sizes["int8"] < sizes["fp16"] < fp32


def test_merged_bundle_matches_slots(tiny, tmp_path, keypair):
    slots = _build(tiny, tmp_path, keypair, adapters=[("support", tiny / "support")])
    merged = _build(tiny, tmp_path, keypair, adapters=[("support", tiny / "support")], merge="support",
                    out=tmp_path / "merged")
    mm = verify_bundle(merged.bundle_dir, [keypair[1]])
    assert mm.merged_adapter == "support" and mm.adapters == () and mm.model["slot_rank"] == 0
    ids = np.array([[3, 1, 4, 1, 5]])
    ms = verify_bundle(slots.bundle_dir, [keypair[1]])
    a = session(slots.bundle_dir / "model.onnx").run(
        ["logits"], decoder_feeds(ms.model, ids), run_options(slots.bundle_dir / ms.adapters[0].file))[0]
    b = session(merged.bundle_dir / "model.onnx").run(["logits"], decoder_feeds(mm.model, ids))[0]
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("kw, error, match", [
    ({"target": "no-such-target"}, Exception, "not a known target"),
    ({"key": "/nonexistent/key.key"}, SignatureError, "does not exist"),
    ({"merge": "ghost"}, UsageError, "names no --adapter"),
    ({"target": "android-arm64", "adapters": [("big", "RANK32")]}, AdapterError, "above target android-arm64"),
    ({"adapters": [("x", "FOREIGN")]}, AdapterError, "trained for a different base"),
    ({"adapters": [("x", "/nonexistent")]}, AdapterError, "not a directory"),
])
def test_bad_input_is_refused_and_leaves_nothing(tiny, tmp_path, keypair, kw, error, match):
    if kw.get("adapters") == [("big", "RANK32")]:
        make_peft_adapter(tiny / "base", tmp_path / "big", r=32, alpha=32, seed=4)
        kw = kw | {"adapters": [("big", tmp_path / "big")]}
    if kw.get("adapters") == [("x", "FOREIGN")]:
        kw = kw | {"adapters": [("x", tiny / "foreign")]}
    with pytest.raises(error, match=match):
        _build(tiny, tmp_path, keypair, **kw)
    assert not (tmp_path / "bundle").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []


def test_phone_profile_build_gets_int8_lora_b(tiny, tmp_path, keypair):
    """The phone profile serves one request at a time (never a batch), so "auto" LoRA B slots are int8 there:
    the manifest records the resolved form and the graph's B slots take int8."""
    m = verify_bundle(_build(tiny, tmp_path, keypair, target="android-arm64", quant="int4").bundle_dir, [keypair[1]])
    assert m.quantization["lora_b"] == "int8"
    b_slots = [n for n in m.model["slots"] if ".lora_B" in n]
    assert b_slots and all(m.model["slot_dtypes"].get(n) == "int8" for n in b_slots)


def test_target_that_cannot_hold_the_bundle(tiny, tmp_path, keypair):
    from edgepeft.contracts.target import targets_dir

    small = tmp_path / "small.toml"
    profile = (targets_dir() / "android-arm64.toml").read_text()
    small.write_text(profile.replace("storage_mib = 512", "storage_mib = 16").replace("memory_mib = 384",
                                                                                      "memory_mib = 16"))
    with pytest.raises(TargetFitError, match="memory budget is 16 MiB"):
        _build(tiny, tmp_path, keypair, target=str(small))
    assert not (tmp_path / "bundle").exists()


def test_cli_build_json_summary(tiny, tmp_path, keypair, capsys):
    code = main(["build", "--base", str(tiny / "base"), "--adapter", f"support={tiny / 'support'}",
                 "--target", "x86-64-gateway", "--key", str(keypair[0]), "--out", str(tmp_path / "b"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["quantization"]["weights"] == "int8" and summary["adapters"][0]["name"] == "support"
    assert "exporting" in captured.err
    assert main(["build", "--base", str(tiny / "base"), "--target", "x86-64-gateway", "--key", str(keypair[0]),
                 "--out", str(tmp_path / "b")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_adapter_whose_record_names_another_base_fingerprint(tiny, tmp_path, keypair):
    import shutil

    copy = shutil.copytree(tiny / "support", tmp_path / "support-other")
    (copy / "edgepeft_training.json").write_text(json.dumps({"base": {"fingerprint": "sha256:" + "0" * 64},
                                                            "version": 3}))
    with pytest.raises(AdapterError, match="trained on a different base"):
        _build(tiny, tmp_path, keypair, adapters=[("support", copy)])
    assert not (tmp_path / "bundle").exists()


def test_adapter_below_the_slot_rank_matches_peft(tiny, tmp_path, keypair):
    """A rank-4 adapter in rank-8 slots ships unpadded and still matches PyTorch + PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = _build(tiny, tmp_path, keypair, adapters=[("support", tiny / "support")], slot_rank=8)
    m = verify_bundle(result.bundle_dir, [keypair[1]])
    assert m.model["slot_rank"] == 8 and m.adapters[0].rank == 4
    ids = np.array([[11, 22, 33, 44, 55]])
    got = session(result.bundle_dir / "model.onnx").run(
        ["logits"], decoder_feeds(m.model, ids), run_options(result.bundle_dir / m.adapters[0].file))[0]
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "base", dtype=torch.float32),
                                    tiny / "support").eval()
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_bundle_files_are_readable_by_other_users(tiny, tmp_path, keypair):
    result = _build(tiny, tmp_path, keypair, adapters=[("support", tiny / "support")])
    assert result.bundle_dir.stat().st_mode & 0o777 == 0o755
    assert (result.bundle_dir / "adapters").stat().st_mode & 0o777 == 0o755
    assert (result.bundle_dir / "model.onnx").stat().st_mode & 0o777 == 0o644
    assert result.archive.stat().st_mode & 0o777 == 0o644


def test_manifest_carries_metric_values_and_the_record_hash_never_training_samples(tiny, tmp_path, keypair):
    import hashlib
    import shutil

    secret = "patient 4711 was prescribed 20 mg"
    copy = shutil.copytree(tiny / "support", tmp_path / "support-trained")
    held_out = {"task": "causal-lm", "examples": 3, "loss": 1.5, "perplexity": 4.48,
                "answer_match": {"generated": 1, "exact": 0.0, "contains": 0.0, "overlap": 0.5},
                "samples": [{"prompt": secret, "reference": secret, "prediction": secret, "exact": False}]}
    record = {"base": {"name": "tiny", "path": str(tiny / "base"), "model_type": "llama"}, "version": 2,
              "metrics": {"schema": 1, "task": "causal-lm", "train": {"steps": 3, "loss_first": 2.0},
                          "eval": held_out, "baseline": dict(held_out, loss=2.5)}}
    (copy / "edgepeft_training.json").write_text(json.dumps(record))
    result = _build(tiny, tmp_path, keypair, adapters=[("support", copy)])
    raw = (result.bundle_dir / "manifest.json").read_text()
    assert "patient 4711" not in raw and '"samples"' not in raw
    metrics = json.loads(raw)["adapters"][0]["metrics"]
    assert metrics["eval"]["perplexity"] == 4.48 and metrics["eval"]["answer_match"]["overlap"] == 0.5
    assert metrics["baseline"]["loss"] == 2.5 and metrics["task"] == metrics["eval"]["task"] == "causal-lm"
    digest = hashlib.sha256((copy / "edgepeft_training.json").read_bytes()).hexdigest()
    assert metrics["record_sha256"] == "sha256:" + digest


def test_encoder_adapter_on_a_decoder_base_names_the_base_it_was_trained_on(tiny, tmp_path, keypair, capsys):
    import shutil

    copy = shutil.copytree(tiny / "support", tmp_path / "intents")
    cfg = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(cfg | {"task_type": "SEQ_CLS"}))
    (copy / "edgepeft_training.json").write_text(json.dumps({
        "labels": ["a", "b"], "base": {"name": "all-MiniLM-L6-v2", "path": "/x/model", "model_type": "bert"}}))
    code = main(["build", "--base", str(tiny / "base"), "--adapter", f"intents={copy}", "--target", "x86-64-gateway",
                 "--key", str(keypair[0]), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and err[0] == "error: adapter 'intents' was trained on all-MiniLM-L6-v2 (bert), not on base (llama)"
    assert err[1] == "hint: build it with --base all-minilm-l6-v2 (or leave --base out), or retrain it on this base"
    assert not (tmp_path / "b").exists()


def test_bpe_merges_are_written_compact_and_read_back_the_same(tmp_path):
    """A bundle's tokenizer.json keeps BPE merges as "a b" strings (smaller; tokenizers reads both forms),
    unless a token holds a space, which only the pair form can say."""
    from test_runtime_support import byte_level_tokenizer
    from tokenizers import Tokenizer

    from edgepeft.bundle.build import _compact_merges

    byte_level_tokenizer(tmp_path)
    raw = (tmp_path / "tokenizer.json").read_text(encoding="utf-8")
    spec = json.loads(raw)
    assert all(isinstance(m, list) for m in spec["model"]["merges"])
    _compact_merges(spec)
    assert spec["model"]["merges"][0] == "Ġ t"
    text = "the tin ünï ☃ then\n<|im_end|>"
    assert Tokenizer.from_str(json.dumps(spec)).encode(text).ids == Tokenizer.from_str(raw).encode(text).ids
    spaced = {"model": {"type": "BPE", "merges": [["a b", "c"], ["d", "e"]]}}
    _compact_merges(spaced)
    assert spaced["model"]["merges"] == [["a b", "c"], ["d", "e"]]


def test_a_graph_over_2gib_ships_its_data_file_and_runs_from_folder_and_archive(tiny, tmp_path, keypair, monkeypatch):
    """An 8B int4 graph is over protobuf's 2 GiB: its weights go to model.onnx.data (lowered limit here),
    signed with the rest; the engine answers as from the single-file bundle, from its folder and from its
    archive (tests/test_external_data_trust.py: only the verified weights are ever used)."""
    import edgepeft.export.onnx_builder as ob
    from edgepeft.runtime import Engine

    one = _build(tiny, tmp_path / "one", keypair, quant="int4")
    monkeypatch.setattr(ob, "_MAX_PROTO", 1 << 16)
    ext = _build(tiny, tmp_path / "ext", keypair, quant="int4")
    m = verify_bundle(ext.bundle_dir, [keypair[1]])
    assert {"model.onnx", "model.onnx.data"} <= {f.path for f in m.files}
    want = Engine(one.bundle_dir, [keypair[1]]).generate("hello", adapter="support", max_new_tokens=5, temperature=0)
    got = Engine(ext.bundle_dir, [keypair[1]]).generate("hello", adapter="support", max_new_tokens=5, temperature=0)
    assert got.token_ids == want.token_ids
    packed = Engine(ext.archive, [keypair[1]]).generate("hello", adapter="support", max_new_tokens=5, temperature=0)
    assert packed.token_ids == want.token_ids
