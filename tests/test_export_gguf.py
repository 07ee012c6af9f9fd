"""GGUF import: a GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 and Q4_K / Q5_K / Q6_K blocks reach MatMulNBits
as they are.

Exactness is checked against the weights the blocks dequantize to (gguf-py's own
formulas) on tiny GGUF files written here with the ``gguf`` package the way
llama.cpp's converter writes them (q/k rows permuted for its rotary layout). gguf-py
quantizes the legacy types; it cannot quantize to K-quants, so their blocks are built by
hand from the documented layout (``random_k_blocks``: random codes and sub-scales, small
fp16 super-scales) and gguf-py's dequantization is the reference:
- the parsed blocks dequantize bit for bit as gguf-py does;
- with ``accuracy_level=0`` (fp32 activations) the graph carrying the blocks gives the
  logits of the fp32 graph of the same (dequantized) model to float rounding
  (``EXACT_TOL`` of the largest logit); at the default ``accuracy_level=4`` MLAS
  rounds activations to int8 per block, which costs ``INT8_ACT_TOL``;
- a weight that does not equal its GGUF blocks (a merged adapter) is re-quantized instead,
  with the reason in the manifest's quant facts.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from test_export_support import decoder_feeds, random_k_blocks, session, tiny_gguf, tiny_llama_dir

EXACT_TOL = 2e-5      # relative to max |logit|: float rounding of the same weights
INT8_ACT_TOL = 0.03   # accuracy_level 4: int8 activations (as every int4/int8 export)
MIXED = {"token_embd": "Q8_0", "attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_0", "attn_output": "Q4_0",
         "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q8_0"}
# Q4_K_M's mix (Q4_K layers, Q6_K down / v), with Q5_K and the 5-bit legacy types in the other roles
K_MIX = {"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q5_0",
         "ffn_gate": "Q4_K", "ffn_up": "Q5_1", "ffn_down": "Q6_K"}
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_TYPES = ["Q4_K", "Q5_K", "Q6_K"]


def _raw(qtype, w):
    """GGUF bytes for ``w``'s shape: gguf-py's quantization of ``w`` (legacy types) or hand-built K blocks."""
    if qtype in K_TYPES:
        return random_k_blocks(qtype, *w.shape)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf = tiny_llama_dir(d / "hf", hidden_size=64, intermediate_size=128)
    hk = tiny_llama_dir(d / "hfk", hidden_size=256, intermediate_size=512, head_dim=64)
    return {"mixed": tiny_gguf(hf, d / "mixed.gguf", MIXED), "kmix": tiny_gguf(hk, d / "kmix.gguf", K_MIX),
            "q4_0": tiny_gguf(hf, d / "q4_0.gguf", {k: "Q4_0" for k in MIXED}),
            "q4_1": tiny_gguf(hf, d / "q4_1.gguf", {k: "Q4_1" for k in MIXED})}


@pytest.mark.parametrize("qtype", LEGACY + K_TYPES)
def test_blocks_dequantize_as_gguf_py_does(qtype):
    from edgepeft.export.gguf_blocks import from_gguf_rows

    rng = np.random.default_rng(0)
    cols = 512 if qtype in K_TYPES else 96
    w = (rng.standard_normal((24, cols)) * rng.uniform(0.01, 2, (24, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block (scale 0)
    raw = _raw(qtype, w)
    blk = from_gguf_rows(qtype, raw, cols)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(blk.dequantize(), ref)
    # the graph stores the GGUF's bytes; Q4_K / Q5_K's 6-bit sub-scales and minimums take a byte each
    assert blk.nbytes == raw.nbytes + (4 * raw.size // (144 if qtype == "Q4_K" else 176) if qtype in ("Q4_K", "Q5_K")
                                       else 0)


@pytest.mark.parametrize("qtype", LEGACY + K_TYPES)
def test_one_linear_computes_the_dequantized_weight(qtype):
    """LinearEmitter on blocks alone, fp32 activations: y = x @ dequantized.T to float rounding."""
    import onnxruntime as ort
    from onnx import TensorProto

    from edgepeft.export.gguf_blocks import GGUFBlocks, from_gguf_rows
    from edgepeft.export.onnx_builder import GraphBuilder
    from edgepeft.export.quantize import LinearEmitter, WeightQuant

    rng = np.random.default_rng(1)
    k = 512 if qtype in K_TYPES else 128
    w = rng.standard_normal((48, k)).astype(np.float32) + rng.uniform(-1, 1, (48, 1)).astype(np.float32)
    raw = _raw(qtype, w)
    blk = from_gguf_rows(qtype, raw, k)
    gb = GraphBuilder("one")
    x = gb.input("x", TensorProto.FLOAT, [1, "s", k])
    lin = LinearEmitter(gb, WeightQuant("int4", accuracy_level=0), GGUFBlocks("t.gguf", {"w": blk}))
    y = lin.linear(x, blk.dequantize(), None, "l0.o", source=["w"])
    gb.alias(y, "y", "y")
    gb.output("y", TensorProto.FLOAT, [1, "s", 48])
    assert lin.carried == ["w"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(gb.model().SerializeToString(), so, providers=["CPUExecutionProvider"])
    xs = rng.standard_normal((1, 5, k)).astype(np.float32)
    got = sess.run(["y"], {"x": xs})[0]
    ref = xs @ blk.dequantize().T
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def _logits(path, info, prompt):
    return session(path).run(["logits"], decoder_feeds(info, prompt))[0]


@pytest.mark.parametrize("kind", ["mixed", "q4_0", "q4_1", "kmix"])
def test_gguf_base_graph_equals_its_dequantized_weights(tiny_files, tmp_path, kind):
    from edgepeft.export import WeightQuant, export_model

    src = str(tiny_files[kind])
    ref = export_model(src, tmp_path / "fp32", quant="fp32")
    keep = export_model(src, tmp_path / "keep", quant=WeightQuant("int4", accuracy_level=0))
    facts = keep.model_info["quant"]
    assert facts["gguf"] == "keep" and "requantized" not in facts["gguf_blocks"]
    assert sum(facts["gguf_blocks"]["carried"].values()) == 2 * 7 + 1  # every layer weight and the embedding
    if kind == "kmix":
        assert facts["gguf_blocks"]["carried"] == {"Q4_K": 4, "Q5_0": 2, "Q5_1": 2, "Q5_K": 2, "Q6_K": 5}
        # the 5- and 6-bit codes are stored packed: the weights take the GGUF's bytes (plus a byte per 6-bit
        # sub-scale of Q4_K / Q5_K); the graph's nodes weigh more than that at this size
        import onnx

        stored = sum(len(t.raw_data) for t in onnx.load(str(keep.model_path)).graph.initializer)
        assert stored <= 1.01 * tiny_files[kind].stat().st_size
    prompt = np.array([[3, 17, 42, 5, 99, 200, 7]])
    want = _logits(ref.model_path, ref.model_info, prompt)
    got = _logits(keep.model_path, keep.model_info, prompt)
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() / scale < EXACT_TOL
    # the default accuracy level (int8 activations) stays close; re-quantizing moves further away
    fast = export_model(src, tmp_path / "fast", quant="int4")
    requant = export_model(src, tmp_path / "rq", quant=WeightQuant("int4", gguf="requantize", accuracy_level=0))
    assert "gguf_blocks" not in requant.model_info["quant"]
    err_fast = np.abs(_logits(fast.model_path, fast.model_info, prompt) - want).max() / scale
    err_rq = np.abs(_logits(requant.model_path, requant.model_info, prompt) - want).max() / scale
    assert err_fast < INT8_ACT_TOL
    assert err_rq > 10 * EXACT_TOL  # what the round trip costs even on fp32 activations


def test_layers_mode_requantizes_only_the_embedding(tiny_files, tmp_path):
    from edgepeft.export import WeightQuant, export_model

    src = str(tiny_files["mixed"])
    res = export_model(src, tmp_path / "layers", quant=WeightQuant("int4", gguf="layers"))
    facts = res.model_info["quant"]["gguf_blocks"]
    assert facts["carried"] == {"Q4_0": 4, "Q4_1": 8, "Q8_0": 2}  # o and v Q4_0; q, k, gate, up Q4_1; down Q8_0
    assert list(facts["requantized"]) == ["model.embed_tokens.weight"]
    import onnx

    names = {t.name for t in onnx.load(str(res.model_path)).graph.initializer}
    assert "embed.zero_points" in names and "embed.scales_fp16" not in names  # the int4 scheme's embedding


def test_a_changed_weight_is_requantized_with_the_reason(tiny_files, tmp_path):
    """A state dict that differs from the GGUF (a merged adapter) keeps the weights it exports."""
    from transformers import AutoConfig

    from edgepeft.export.gguf_blocks import load_gguf_blocks

    path = tiny_files["mixed"]
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    from edgepeft.models.base import BaseSource, load_model

    model = load_model(BaseSource("t", str(path.parent), gguf_file=path.name), quiet=True)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] += 0.5
    blocks = load_gguf_blocks(path, config, sd)
    assert "model.layers.1.mlp.down_proj.weight" not in blocks.weights
    assert "differs" in blocks.skipped["model.layers.1.mlp.down_proj.weight"]
    assert "model.layers.0.mlp.down_proj.weight" in blocks.weights
    # q/k were found in llama.cpp's permuted row order and put back
    q = blocks.weights["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(q.dequantize(), sd["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=1e-6)


def test_requantize_and_float_bases_ignore_gguf(tiny_files, tmp_path):
    from edgepeft.models.base import BaseSource, gguf_origin

    path = tiny_files["mixed"]
    assert gguf_origin(BaseSource("t", str(path.parent), gguf_file=path.name)) == path
    assert gguf_origin(BaseSource("t", str(tmp_path))) is None
    assert gguf_origin(BaseSource("t", "owner/name", is_hub=True)) is None


def test_unknown_gguf_mode_is_refused():
    from edgepeft.errors import UsageError
    from edgepeft.export import WeightQuant

    with pytest.raises(UsageError, match="GGUF mode"):
        WeightQuant("int4", gguf="dequantize")
