"""Encoder (BERT classifier) export: the head is a slot; parity with transformers + PEFT SEQ_CLS adapters."""

from __future__ import annotations

import numpy as np
import pytest
from test_export_support import make_peft_adapter, run_options, session, tiny_bert_dir

TOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    from edgepeft.export import export_model

    return export_model(str(base), tmp_path_factory.mktemp("onnx"), task="classification", quant="fp32",
                        slot_rank=8)


def _batch():
    ids = np.array([[101, 7, 8, 9, 10, 102], [101, 55, 66, 102, 0, 0]], np.int64)
    mask = (ids != 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _torch_logits(model, feeds):
    import torch

    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in feeds.items()}).logits.numpy()


def test_head_is_a_slot(exported):
    info = exported.model_info
    assert info["architecture"] == "bert" and info["task"] == "classification"
    assert info["slots"]["head.classifier.weight"] == [64, "num_labels"]
    assert info["slots"]["pooler.lora_B"] == ["rank", 64]
    # slot names deployed bundles already carry (updates are written against them)
    assert info["slots"]["layers.1.attn_out.lora_A"] == [64, "rank"] and "layers.0.qkv.lora_B" in info["slots"]
    bare = session(exported.model_path).run(["logits"], _batch())[0]
    assert bare.shape == (2, 0)  # no adapter, no head


@pytest.mark.parametrize("targets,labels", [(("query", "value"), 3), (("query", "key", "value", "dense"), 5)])
def test_adapter_with_head_matches_peft(base, exported, tmp_path, targets, labels):
    from edgepeft.export import write_adapter

    model = make_peft_adapter(base, tmp_path / "p", task="classification", r=4, alpha=16, targets=targets,
                              num_labels=labels)
    (tmp_path / "p" / "labels.json").write_text('["' + '","'.join(f"l{i}" for i in range(labels)) + '"]')
    info = write_adapter(tmp_path / "p", exported.model_info, tmp_path / "c.onnx_adapter")
    assert info.labels == [f"l{i}" for i in range(labels)]
    if "dense" in targets:
        assert "pooler.dense" in info.target_modules  # PEFT's suffix match reaches the pooler too
    got = session(exported.model_path).run(["logits"], _batch(), run_options(tmp_path / "c.onnx_adapter"))[0]
    ref = _torch_logits(model, _batch())
    assert got.shape == (2, labels)
    assert np.abs(got - ref).max() < TOL


def test_merged_classifier_matches_peft(base, tmp_path):
    from edgepeft.export import export_model

    model = make_peft_adapter(base, tmp_path / "p", task="classification", r=4, targets=("query", "value"))
    merged = export_model(str(base), tmp_path / "m", task="classification", quant="fp32",
                          merge_adapter=tmp_path / "p")
    assert merged.model_info["slots"] == {} and merged.model_info["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    got = session(merged.model_path).run(["logits"], _batch())[0]
    assert np.abs(got - _torch_logits(model, _batch())).max() < TOL


def test_int8_encoder_close(base, tmp_path):
    from edgepeft.export import export_model, write_adapter

    model = make_peft_adapter(base, tmp_path / "p", task="classification", r=4, targets=("query", "value"))
    q = export_model(str(base), tmp_path / "q", task="classification", quant="int8", slot_rank=4)
    write_adapter(tmp_path / "p", q.model_info, tmp_path / "c.onnx_adapter")
    got = session(q.model_path).run(["logits"], _batch(), run_options(tmp_path / "c.onnx_adapter"))[0]
    ref = _torch_logits(model, _batch())
    assert np.abs(got - ref).max() < 0.05 * max(1.0, np.abs(ref).max())
