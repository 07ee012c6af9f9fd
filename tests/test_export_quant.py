"""Quantized exports (fp16, int8, int4) stay within stated tolerances, adapters still apply exactly."""

from __future__ import annotations

import numpy as np
import pytest
from test_export_support import decoder_feeds, greedy_check, make_peft_adapter, run_options, session, tiny_llama_dir

# Two bounds per kind, on a tiny random llama with a LoRA adapter active:
# - IMPL: vs torch running the SAME dequantized weights (what the graph must compute; the rest is
#   MatMulNBits' int8 activation rounding at accuracy_level 4), relative to max |logit|;
# - COS: cosine similarity of logits vs the fp32 model (random weights are the worst case for int4).
# int4 with zero points on every block (the default) measured 0.054 / 0.919 here, the earlier "auto" mix
# 0.026 / 0.967: on this tiny random model; on SmolLM2 "all" is the better one (KL to fp32 per token
# 0.50 against 0.61, top-1 agreement 65.5 % against 62.5 %, perplexity 20.6 against 23.4).
IMPL_TOL = {"fp16": 3e-3, "int8": 0.04, "int4": 0.08}
COS_MIN = {"fp16": 0.9999, "int8": 0.999, "int4": 0.9}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"), hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    return d, make_peft_adapter(base, d, r=4, targets=("q_proj", "v_proj", "up_proj"))


def _fake_quant_dir(base, out, kind):
    """The base with every quantized weight replaced by its dequantized value (fp16: rounded to fp16)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepeft.export import WeightQuant
    from edgepeft.export.quantize import fake_quantize

    q = WeightQuant(kind)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2:
                continue
            w = p.numpy()
            if kind == "fp16":
                deq = w.astype(np.float16).astype(np.float32)
            elif "embed" in name:
                deq = fake_quantize(w, q, "embed")
            else:  # the graph's names for the packed projections decide the scheme
                proj = name.split(".")[-2]
                role = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
                        "down_proj": "down"}.get(proj, proj)
                deq = fake_quantize(w, q, f"l0.{role}")
            p.copy_(torch.from_numpy(deq))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4"])
def test_quantized_with_adapter_within_tolerance(base, adapter, tmp_path, kind):
    import torch

    from edgepeft.export import export_model, write_adapter

    res = export_model(str(base), tmp_path, quant=kind, slot_rank=8)
    assert res.model_info["quant"]["weights"] == kind
    write_adapter(adapter[0], res.model_info, tmp_path / "a.onnx_adapter")
    ro = run_options(tmp_path / "a.onnx_adapter")
    fq = make_peft_adapter(_fake_quant_dir(base, tmp_path / "fq", kind), tmp_path / "fq_peft", r=4,
                           targets=("q_proj", "v_proj", "up_proj"))  # same seed: same LoRA weights
    prompt = np.array([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = adapter[1](torch.tensor(prompt)).logits.numpy()
    scale = float(np.abs(ref).max())
    diffs = greedy_check(session(res.model_path), res.model_info, fq, prompt, steps=2, ro=ro)
    assert max(diffs) / scale < IMPL_TOL[kind], (kind, diffs, scale)
    got = session(res.model_path).run(["logits"], decoder_feeds(res.model_info, prompt), ro)[0]
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > COS_MIN[kind], (kind, cos)


def test_int4_graph_uses_fused_quantized_ops_and_one_embedding_copy(base, tmp_path):
    import onnx

    from edgepeft.export import WeightQuant, export_model

    res = export_model(str(base), tmp_path, quant=WeightQuant("int4", lora_b="int8"), slot_rank=8)
    g = onnx.load(res.model_path).graph
    ops = {n.op_type for n in g.node}
    assert {"MatMulNBits", "GatherBlockQuantized", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert "MatMul" in ops  # the LoRA path stays fp32
    float_inits = [i for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT and i.name.startswith(("embed",
                                                                                                            "l0."))]
    assert all(np.prod(i.dims) < 10_000 for i in float_inits)  # only scales are float, no fp32 weight copies
    emb_users = [n for n in g.node if "embed.qweight" in n.input]
    assert {n.op_type for n in emb_users} == {"Reshape", "MatMulNBits"}  # Gather and lm_head share the bytes
    # A slots stay fp32, B slots are int8 (DynamicQuantizeMatMul); their zero defaults (one column / row per
    # module: DynamicQuantizeMatMul leaves an empty input's output unwritten) are sparse: no bytes
    slots = {i.values.name: i for i in g.sparse_initializer if i.values.name in res.model_info["slots"]}
    assert set(slots) == set(res.model_info["slots"]) and not any(i.name in slots for i in g.initializer)
    b_slots = {k for k in slots if ".lora_B" in k}
    assert b_slots and res.model_info["slot_dtypes"] == {k: "int8" for k in b_slots}
    assert all(slots[k].values.data_type == (onnx.TensorProto.INT8 if k in b_slots else onnx.TensorProto.FLOAT)
               for k in slots)
    assert all(len(i.values.raw_data) == 0 and 0 not in i.dims for i in slots.values())
    assert {n.op_type for n in g.node if set(n.input) & b_slots} == {"DynamicQuantizeMatMul"}


def test_quantized_base_without_adapter_equals_empty_slots(base, tmp_path):
    """No adapter: the graph's output equals a slot-free (merge-mode-like) quantized graph: slots are a no-op."""
    from edgepeft.export import export_model

    with_slots = export_model(str(base), tmp_path / "s", quant="int4", slot_rank=8)
    ids = np.array([[1, 2, 3]])
    a = session(with_slots.model_path).run(["logits"], decoder_feeds(with_slots.model_info, ids))[0]
    no_slots = export_model(str(base), tmp_path / "n", quant="int4", target_modules=["q_proj"], slot_rank=8)
    b = session(no_slots.model_path).run(["logits"], decoder_feeds(no_slots.model_info, ids))[0]
    assert np.array_equal(a, b)


def test_quant_options_validated():
    from edgepeft.errors import UsageError
    from edgepeft.export import WeightQuant

    with pytest.raises(UsageError):
        WeightQuant("int3")
    with pytest.raises(UsageError):
        WeightQuant("int4", block_size=48)
    q = WeightQuant("int4")  # default: zero points on every block of 32, the embedding's included
    assert q.to_dict()["embed_block_size"] == 32 and q.asymmetric("l3.gate_up") and q.block_for("l3.down") == 32
    assert WeightQuant("int4", zero_points="auto").to_dict()["embed_block_size"] == 64
    q = WeightQuant("int4", zero_points="auto")
    assert q.asymmetric("embed") and q.asymmetric("l3.qkv") and not q.asymmetric("l3.gate_up")
    assert q.block_for("l3.down") == 64 and q.block_for("l3.qkv") == 32
    assert not WeightQuant("int4", zero_points="none").asymmetric("embed")
    assert not WeightQuant("int8").asymmetric("embed") and WeightQuant("int8").block_for("l0.down") == 32
    with pytest.raises(UsageError):
        WeightQuant("int4", zero_points="some")
    assert WeightQuant.coerce(type("Q", (), {"weights": "int8", "block_size": 128})()).block_size == 128


@pytest.mark.parametrize("sym", [True, False])
def test_blockwise_packing_roundtrips(sym):
    """Packed codes, scales and zero points decode (as MatMulNBits does) to the returned dequantized weight."""
    from edgepeft.export.quantize import quantize_blockwise

    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 96)).astype(np.float32) + (0.0 if sym else 0.7)  # 3 blocks of 32
    blk = quantize_blockwise(w, 4, 32, symmetric=sym)
    codes = np.stack([blk.packed & 15, blk.packed >> 4], -1).reshape(5, 3, 32).astype(np.float32)
    if sym:
        z = np.full((5, 3), 8.0)
    else:
        z = np.stack([blk.zero_points & 15, blk.zero_points >> 4], -1).reshape(5, -1)[:, :3].astype(np.float32)
    deq = ((codes - z[..., None]) * blk.scales[..., None]).reshape(5, 96)
    np.testing.assert_allclose(deq, blk.deq, rtol=1e-6, atol=1e-7)
    # the larger-magnitude extreme of every block is exact
    err = np.abs(blk.deq - w).reshape(5, 3, 32)
    big = np.abs(w).reshape(5, 3, 32).argmax(-1)[..., None]
    assert np.take_along_axis(err, big, -1).max() < 1e-6
