"""Architecture detection: every base gets its own description or a clear refusal, never a wrong guess."""

from __future__ import annotations

import pytest

from edgepeft.errors import AdapterError, ModelError
from edgepeft.models.arch import DECODERS, ENCODERS, describe, supported


def _config(name, **kw):
    import transformers

    return getattr(transformers, name)(**kw)


def _config_dir(path, name, **kw):
    """A base directory holding only config.json: architecture checks must need nothing more."""
    cfg = _config(name, **kw)
    cfg.save_pretrained(path)
    return path


def test_every_family_has_a_description_and_a_docs_row():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    for fam, arch in {**DECODERS, **ENCODERS}.items():
        assert f"| `{fam}` |" in page, f"docs/architectures.md's table lacks {fam}"
        assert arch.names
    assert supported()["causal-lm"] == sorted(DECODERS)


@pytest.mark.parametrize("name,task,fragment", [
    ("RobertaConfig", "causal-lm", "roberta is an encoder"),
    ("DistilBertConfig", "causal-lm", "distilbert is an encoder"),
    ("ModernBertConfig", "causal-lm", "modernbert is an encoder"),
    ("LlamaConfig", "classification", "llama is a decoder"),
    ("Qwen3Config", "classification", "qwen3 is a decoder"),
])
def test_wrong_task_is_refused_with_the_right_one(name, task, fragment):
    with pytest.raises(ModelError, match=fragment) as ei:
        describe(_config(name), task)
    assert ei.value.hint


@pytest.mark.parametrize("name,hint", [
    ("GPT2Config", "SmolLM2"),
    ("MixtralConfig", "mixture-of-experts"),
    ("FalconConfig", "merge the adapter"),
    ("ElectraConfig", "DeBERTa"),
])
def test_unsupported_architecture_names_itself_the_supported_ones_and_a_workaround(name, hint):
    cfg = _config(name)
    task = "classification" if name == "ElectraConfig" else "causal-lm"
    with pytest.raises(ModelError) as ei:
        describe(cfg, task)
    msg = str(ei.value)
    assert repr(cfg.model_type) in msg and "supported:" in msg and hint in ei.value.hint
    assert all(f in msg for f in supported()[task])


def test_a_classifier_checkpoint_is_never_exported_as_a_decoder():
    cfg = _config("LlamaConfig", architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ModelError, match="LlamaForSequenceClassification, not a causal language model"):
        describe(cfg, "causal-lm")
    assert describe(_config("LlamaConfig", architectures=["LlamaForCausalLM"]), "causal-lm").family == "llama"


def test_unusable_variants_are_refused():
    with pytest.raises(ModelError, match="activation 'relu'"):
        describe(_config("LlamaConfig", hidden_act="relu"), "causal-lm")
    with pytest.raises(ModelError, match="convolution"):
        describe(_config("DebertaV2Config", conv_kernel_size=3), "classification")
    with pytest.raises(ModelError, match="position_embedding_type"):
        describe(_config("BertConfig", position_embedding_type="relative_key"), "classification")


@pytest.mark.parametrize("name,task", [("RobertaConfig", "causal-lm"), ("DistilBertConfig", "causal-lm"),
                                       ("GPT2Config", "causal-lm")])
def test_export_refuses_before_loading_weights(tmp_path, name, task):
    """The config alone decides (the directory has no weights at all): an edgepeft error, not transformers'."""
    from edgepeft.export import export_model

    base = _config_dir(tmp_path / "base", name)
    with pytest.raises(ModelError) as ei:
        export_model(str(base), tmp_path / "out", task=task, quant="fp32")
    assert "Unrecognized configuration class" not in str(ei.value) and ei.value.hint
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_unknown_model_type_in_config_is_a_clear_error(tmp_path):
    import json

    from edgepeft.export import export_model

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "frobnet", "hidden_size": 8}))
    with pytest.raises(ModelError, match="cannot read the config") as ei:
        export_model(str(tmp_path / "base"), tmp_path / "out", quant="fp32")
    assert "llama" in ei.value.hint and "bert" in ei.value.hint
    assert len(str(ei.value)) < 600  # not transformers' list of every known model type


def test_build_of_an_encoder_base_as_a_decoder_says_to_pass_the_task(tmp_path, keypair):
    """Without --task the checkpoint's config decides (an encoder is a classifier: issue 26); asked for
    causal-lm, an encoder is refused with the option to pass."""
    from edgepeft.bundle.build import build_bundle
    from edgepeft.export.api import read_config
    from edgepeft.models.arch import task_of
    from edgepeft.models.base import resolve_base

    base = _config_dir(tmp_path / "base", "RobertaConfig")
    assert task_of(read_config(resolve_base(str(base)))) == "classification"
    with pytest.raises(ModelError, match="encoder") as ei:
        build_bundle(base=str(base), adapters=[], target="raspberry-pi-5", key=keypair[0], out=tmp_path / "b",
                     quant="fp32", task="causal-lm")
    assert "--task classification" in ei.value.hint
    assert not (tmp_path / "b").exists()


def test_head_the_checkpoint_lacks_must_come_with_the_adapter(tmp_path):
    """DeBERTa's pooler is not in its pretrained checkpoint: an adapter that does not save it is refused."""
    from test_export_support import make_peft_adapter, tiny_encoder_dir

    from edgepeft.export import export_model, write_adapter

    base = tiny_encoder_dir("deberta-v2", tmp_path / "base")
    res = export_model(str(base), tmp_path / "o", task="classification", quant="fp32", slot_rank=4)
    assert [h["module"] for h in res.model_info["head"]] == ["pooler.dense", "classifier"]
    assert not any(h["default"] for h in res.model_info["head"])
    make_peft_adapter(base, tmp_path / "p", task="classification", r=2, targets=("query_proj",))
    with pytest.raises(AdapterError, match=r"must carry its head \(pooler.dense.weight\)") as ei:
        write_adapter(tmp_path / "p", res.model_info, tmp_path / "a.onnx_adapter")
    assert "modules_to_save including 'pooler'" in ei.value.hint
    with pytest.raises(ModelError, match="pooler.dense"):
        export_model(str(base), tmp_path / "m", task="classification", quant="fp32", merge_adapter=tmp_path / "p")


def test_phi3_slots_follow_the_fused_checkpoint_modules(tmp_path):
    from test_export_support import tiny_decoder_dir

    from edgepeft.errors import UsageError
    from edgepeft.export import export_model

    base = tiny_decoder_dir("phi3", tmp_path / "base")
    with pytest.raises(UsageError, match="'q_proj' is not an adaptable projection") as ei:
        export_model(str(base), tmp_path / "o", quant="fp32", target_modules=["q_proj"])
    assert "qkv_proj" in ei.value.hint


def test_a_checkpoint_with_missing_weights_is_refused(tmp_path):
    """transformers would fill a missing tensor with random values; the exporter refuses instead."""
    from safetensors.torch import load_file, save_file
    from test_export_support import tiny_decoder_dir

    from edgepeft.export import export_model

    base = tiny_decoder_dir("qwen3", tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"lacks 1 weight\(s\) of a qwen3 model \(model.layers.1.mlp.down_proj"):
        export_model(str(base), tmp_path / "o", quant="fp32")


def test_head_stage_from_a_classifier_checkpoint_is_the_default(tmp_path):
    """A DeBERTa checkpoint saved with its pooler: an adapter that does not save the pooler uses the
    checkpoint's (as PEFT did when training it), and the bare graph still runs."""
    import numpy as np
    import torch
    import transformers
    from test_export_support import ENCODER_FAMILIES, make_peft_adapter, run_options, session

    from edgepeft.export import export_model, write_adapter

    cls, over, _ = ENCODER_FAMILIES["deberta-v2"]
    cfg = getattr(transformers, cls)(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, initializer_range=0.1, **over)
    torch.manual_seed(0)
    transformers.DebertaV2ForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    res = export_model(str(tmp_path / "base"), tmp_path / "o", task="classification", quant="fp32", slot_rank=4)
    assert [h["default"] for h in res.model_info["head"]] == [True, True]
    model = make_peft_adapter(tmp_path / "base", tmp_path / "p", task="classification", r=2, num_labels=2,
                              targets=("query_proj", "value_proj"))
    info = write_adapter(tmp_path / "p", res.model_info, tmp_path / "a.onnx_adapter")
    assert info.labels == ["LABEL_0", "LABEL_1"]
    ids = np.array([[5, 7, 8, 9], [5, 9, 0, 0]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    sess = session(res.model_path)
    got = sess.run(["logits"], feeds, run_options(tmp_path / "a.onnx_adapter"))[0]
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert sess.run(["logits"], feeds)[0].shape == (2, 2)  # the checkpoint's own head answers without an adapter
