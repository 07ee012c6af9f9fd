"""Decoder export: fp32 graph parity with transformers (bare and with a PEFT adapter), KV cache, merge."""

from __future__ import annotations

import numpy as np
import pytest
from test_export_support import decoder_feeds, greedy_check, make_peft_adapter, run_options, session, tiny_llama_dir

TOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    from edgepeft.export import export_model

    return export_model(str(base), tmp_path_factory.mktemp("onnx"), quant="fp32", slot_rank=8)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    model = make_peft_adapter(base, d, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    return d, model


def _base_model(base):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def test_model_info_describes_the_graph(exported):
    info = exported.model_info
    assert (info["architecture"], info["num_layers"], info["num_kv_heads"], info["head_dim"]) == ("llama", 2, 2, 16)
    assert info["slot_rank"] == 8 and info["vocab_size"] == 256
    assert info["slots"]["layers.0.qkv.lora_A"] == [64, "3*rank"]
    assert info["slot_shapes"]["layers.1.gate_up.lora_A"] == [64, 16]
    assert info["slot_shapes"]["layers.1.gate_up.lora_B"] == [16, 256]  # packed: its zeros are small here
    sess = session(exported.model_path)
    names = {i.name for i in sess.get_inputs()}
    assert {"input_ids", "attention_mask", "past_key_values.1.value"} <= names
    assert set(info["slots"]).isdisjoint(names)  # slots are overridable initializers, not required inputs
    assert [o.name for o in sess.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]


def test_bare_graph_matches_base_with_kv_cache(base, exported):
    diffs = greedy_check(session(exported.model_path), exported.model_info, _base_model(base),
                         np.array([[3, 17, 42, 99, 5, 250, 7]]), steps=4)
    assert max(diffs) < TOL, diffs


def test_adapter_matches_peft_with_kv_cache(exported, adapter, tmp_path):
    from edgepeft.export import write_adapter

    peft_dir, peft_model = adapter
    info = write_adapter(peft_dir, exported.model_info, tmp_path / "a.onnx_adapter")
    assert info.rank == 4 and info.method == "lora" and info.target_modules == ["down_proj", "q_proj", "v_proj"]
    ro = run_options(tmp_path / "a.onnx_adapter")
    diffs = greedy_check(session(exported.model_path), exported.model_info, peft_model,
                         np.array([[1, 2, 3, 4, 5, 6]]), steps=3, ro=ro)
    assert max(diffs) < TOL, diffs


def test_adapter_changes_output_and_switches_back(base, exported, adapter, tmp_path):
    from edgepeft.export import write_adapter

    write_adapter(adapter[0], exported.model_info, tmp_path / "a.onnx_adapter")
    sess = session(exported.model_path)
    feeds = decoder_feeds(exported.model_info, np.array([[9, 8, 7]]))
    bare = sess.run(["logits"], feeds)[0]
    with_a = sess.run(["logits"], feeds, run_options(tmp_path / "a.onnx_adapter"))[0]
    again = sess.run(["logits"], feeds)[0]
    assert np.abs(with_a - bare).max() > 1e-2
    assert np.array_equal(bare, again)


def test_rslora_all_linear_rank_pattern(base, exported, tmp_path):
    from edgepeft.export import write_adapter

    model = make_peft_adapter(base, tmp_path / "p", r=8, alpha=4, use_rslora=True, rank_pattern={"o_proj": 2},
                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    info = write_adapter(tmp_path / "p", exported.model_info, tmp_path / "r.onnx_adapter")
    assert info.method == "rslora" and info.rank == 8
    diffs = greedy_check(session(exported.model_path), exported.model_info, model, np.array([[4, 4, 2]]),
                         steps=2, ro=run_options(tmp_path / "r.onnx_adapter"))
    assert max(diffs) < TOL, diffs


@pytest.fixture(scope="module")
def exported_split(base, tmp_path_factory):
    """The same base at a slot rank whose packed gate|up zeros pass PACK_GATE_UP_MAX_ZEROS: one B per module."""
    from edgepeft.export import export_model

    return export_model(str(base), tmp_path_factory.mktemp("onnx_split"), quant="fp32", slot_rank=512)


def test_gate_up_packs_only_while_its_zeros_are_small(exported, exported_split):
    from edgepeft.export.slots import pack_gate_up

    assert pack_gate_up(1536, 8) and pack_gate_up(1536, 16)  # SmolLM2-135M
    assert not pack_gate_up(8192, 16) and not pack_gate_up(1536, None)  # Llama-3.2-1B's shape; merged
    assert "layers.0.gate_up.lora_B" in exported.model_info["slots"]
    assert exported_split.model_info["slot_shapes"]["layers.1.gate_up.lora_B.up_proj"] == [512, 128]


def test_gate_up_stays_split_when_only_one_of_them_is_adapted(base, tmp_path):
    """With gate alone, packing would only add zeros (one module has no Split to save)."""
    from edgepeft.export import export_model

    res = export_model(str(base), tmp_path, quant="fp32", slot_rank=8, target_modules=["gate_proj", "down_proj"])
    assert res.model_info["slot_shapes"]["layers.0.gate_up.lora_B.gate_proj"] == [8, 128]
    assert "layers.0.gate_up.lora_B" not in res.model_info["slots"]


@pytest.mark.parametrize("form", ["packed", "split"])
def test_all_linear_adapter_matches_peft_in_both_gate_up_forms(base, exported, exported_split, tmp_path, form):
    """The adapter writer reads the graph's form from its slots, so each gets tensors it can bind."""
    from edgepeft.export import write_adapter

    graph = exported if form == "packed" else exported_split
    model = make_peft_adapter(base, tmp_path / "p", r=4, alpha=8, seed=3,
                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    write_adapter(tmp_path / "p", graph.model_info, tmp_path / "a.onnx_adapter", pad=False)
    diffs = greedy_check(session(graph.model_path), graph.model_info, model, np.array([[5, 9, 2, 6]]),
                         steps=2, ro=run_options(tmp_path / "a.onnx_adapter"))
    assert max(diffs) < TOL, diffs


def test_merged_export_matches_slots(base, adapter, exported, tmp_path):
    from edgepeft.export import export_model, write_adapter

    merged = export_model(str(base), tmp_path / "m", quant="fp32", merge_adapter=adapter[0])
    assert merged.model_info["slots"] == {} and merged.model_info["merged_adapter"] == adapter[0].name
    write_adapter(adapter[0], exported.model_info, tmp_path / "a.onnx_adapter")
    ids = np.array([[11, 22, 33, 44]])
    m = session(merged.model_path).run(["logits"], decoder_feeds(merged.model_info, ids))[0]
    s = session(exported.model_path).run(["logits"], decoder_feeds(exported.model_info, ids),
                                         run_options(tmp_path / "a.onnx_adapter"))[0]
    assert np.abs(m - s).max() < TOL


def test_unpadded_adapter_uses_its_own_rank(exported, adapter, tmp_path):
    """pad=False: rank-4 tensors in rank-8 slots (the rank dim is dynamic) give the same logits, fewer bytes."""
    from edgepeft.export import write_adapter

    padded = write_adapter(adapter[0], exported.model_info, tmp_path / "p.onnx_adapter")
    small = write_adapter(adapter[0], exported.model_info, tmp_path / "s.onnx_adapter", pad=False)
    assert small.bytes < padded.bytes
    sess = session(exported.model_path)
    feeds = decoder_feeds(exported.model_info, np.array([[2, 7, 1, 8]]))
    a = sess.run(["logits"], feeds, run_options(tmp_path / "p.onnx_adapter"))[0]
    b = sess.run(["logits"], feeds, run_options(tmp_path / "s.onnx_adapter"))[0]
    assert np.abs(a - b).max() < 1e-5
