"""Adapter files: bad adapters are refused with AdapterError, compact payloads expand to the same result."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_export_support import decoder_feeds, make_peft_adapter, run_options, session, tiny_llama_dir

from edgepeft.errors import AdapterError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    from edgepeft.export import export_model

    return export_model(str(base), tmp_path_factory.mktemp("onnx"), quant="fp32", slot_rank=4,
                        target_modules=["q_proj", "k_proj", "v_proj"])


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    make_peft_adapter(base, d, r=4, targets=("q_proj", "v_proj"))
    return d


def _save_other_peft(base, out, config):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    model.save_pretrained(out)
    return out


def _write(adapter_dir, exported, tmp_path, **kw):
    from edgepeft.export import write_adapter

    return write_adapter(adapter_dir, exported.model_info, tmp_path / "x.onnx_adapter", **kw)


def test_other_peft_methods_refused(base, exported, tmp_path):
    from peft import IA3Config, LoraConfig, PromptEncoderConfig, PromptTuningConfig

    cases = {
        "ia3": (IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[], task_type="CAUSAL_LM"), "IA3"),
        "ptuning": (PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM"),
                    "P_TUNING"),
        # a soft prompt is compiled by the bundle's graph, which write_adapter must be given
        "prompt": (PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "needs the bundle's graph"),
        "dora": (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"), "DoRA"),
    }
    for name, (cfg, word) in cases.items():
        d = _save_other_peft(base, tmp_path / name, cfg)
        with pytest.raises(AdapterError, match=word):
            _write(d, exported, tmp_path)


def test_rank_above_slot_rank_refused(base, exported, tmp_path):
    make_peft_adapter(base, tmp_path / "big", r=8, targets=("q_proj",))
    with pytest.raises(AdapterError, match="rank 8 exceeds the bundle's slot rank 4") as ei:
        _write(tmp_path / "big", exported, tmp_path)
    assert "retrain with r <= 4" in ei.value.hint


def test_module_without_slot_refused(base, exported, tmp_path):
    make_peft_adapter(base, tmp_path / "o", r=2, targets=("q_proj", "o_proj"))
    with pytest.raises(AdapterError, match="o_proj, which has no slot"):
        _write(tmp_path / "o", exported, tmp_path)


def test_adapter_for_another_base_refused(exported, tmp_path):
    other = tiny_llama_dir(tmp_path / "other", hidden_size=32, intermediate_size=64)
    make_peft_adapter(other, tmp_path / "p", r=2, targets=("q_proj",))
    with pytest.raises(AdapterError, match="different base"):
        _write(tmp_path / "p", exported, tmp_path)


def test_corrupt_and_incomplete_dirs_refused(good, exported, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    st = bad / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        _write(bad, exported, tmp_path)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        _write(bad, exported, tmp_path)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        _write(bad, exported, tmp_path)
    with pytest.raises(AdapterError, match="does not exist"):
        _write(tmp_path / "missing", exported, tmp_path)


def test_trained_bias_refused(good, exported, tmp_path):
    import shutil

    d = tmp_path / "bias"
    shutil.copytree(good, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["bias"] = "lora_only"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="bias"):
        _write(d, exported, tmp_path)


def test_merged_bundle_has_no_slots(base, good, tmp_path):
    from edgepeft.export import export_model

    merged = export_model(str(base), tmp_path / "m", quant="fp32", merge_adapter=good)
    with pytest.raises(AdapterError, match="no adapter slots"):
        _write(good, merged, tmp_path)


@pytest.mark.parametrize("dtype,tol", [("fp16", 2e-3), ("int8", 2e-2), ("int4", 0.3)])  # int4: 0.21 measured
def test_compact_payloads_expand_to_fp32(good, exported, tmp_path, dtype, tol):
    from edgepeft.contracts.adapter_payload import expand_adapter, needs_expansion

    ref_info = _write(good, exported, tmp_path, dtype="fp32")
    (tmp_path / "x.onnx_adapter").rename(tmp_path / "fp32.onnx_adapter")
    info = _write(good, exported, tmp_path, dtype=dtype)
    assert info.bytes < ref_info.bytes and info.dtype == dtype
    assert needs_expansion(tmp_path / "x.onnx_adapter") and not needs_expansion(tmp_path / "fp32.onnx_adapter")
    shapes = expand_adapter(tmp_path / "x.onnx_adapter", tmp_path / "expanded.onnx_adapter")
    assert shapes == {k: v for k, v in exported.model_info["slot_shapes"].items() if k in shapes}
    sess = session(exported.model_path)
    feeds = decoder_feeds(exported.model_info, np.array([[3, 1, 4, 1, 5]]))
    ref = sess.run(["logits"], feeds, run_options(tmp_path / "fp32.onnx_adapter"))[0]
    got = sess.run(["logits"], feeds, run_options(tmp_path / "expanded.onnx_adapter"))[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < tol
