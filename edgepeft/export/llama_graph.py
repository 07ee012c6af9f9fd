"""Llama-family decoder (Llama, SmolLM2, Mistral without sliding window, Qwen2) as one ONNX graph.

I/O follows onnxruntime-genai's convention (see the decoder graph contract):
``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/.value`` in;
``logits``, ``present.{i}.key/.value`` out. Per layer:

- ``SkipSimplifiedLayerNormalization`` fuses the residual add with RMSNorm;
- one packed q|k|v projection feeds ``GroupQueryAttention`` (rotary inside,
  cos/sin caches as initializers, KV cache in BNSH; the runtime may share
  past/present buffers of max length);
- one packed gate|up projection, SiLU, down;
- each projection group carries a LoRA slot pair (see :mod:`.slots`).
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .quantize import LinearEmitter, WeightQuant
from .slots import Group, Module, emit_lora, emit_lora_split, groups_info, resolve_targets

SUPPORTED = ("llama", "mistral", "qwen2")
ADAPTABLE = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
             "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def decoder_dims(config) -> dict:
    """The graph facts of a HF decoder config; raises ModelError for unsupported architectures."""
    mtype = getattr(config, "model_type", "")
    if mtype not in SUPPORTED:
        raise ModelError(f"decoder architecture {mtype!r} is not supported by the exporter",
                         hint=f"use a {', '.join(SUPPORTED)} model (SmolLM2 is llama)")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"activation {act!r} is not supported", hint="llama-family models use silu")
    if mtype == "mistral" and getattr(config, "sliding_window", None):
        raise ModelError("sliding-window attention is not supported yet", hint="use a model without sliding_window")
    heads = config.num_attention_heads
    return {
        "hidden": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "inter": config.intermediate_size,
        "layers": config.num_hidden_layers,
        "vocab": config.vocab_size,
        "eps": float(config.rms_norm_eps),
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
    }


def layer_groups(dims: dict, targets: list[str]) -> list[Group]:
    """The four projection groups of one layer, with only ``targets`` adapted (gate|up with split B slots)."""
    d, h, kv = dims["head_dim"], dims["heads"], dims["kv_heads"]
    q_out, kv_out, inter, hid = h * d, kv * d, dims["inter"], dims["hidden"]
    spec = [
        ("qkv", hid, [("q_proj", 0, q_out), ("k_proj", q_out, kv_out), ("v_proj", q_out + kv_out, kv_out)]),
        ("o", q_out, [("o_proj", 0, hid)]),
        ("gate_up", hid, [("gate_proj", 0, inter), ("up_proj", inter, inter)]),
        ("down", inter, [("down_proj", 0, hid)]),
    ]
    out = []
    for key, in_dim, mods in spec:
        out_dim = sum(m[2] for m in mods)
        out.append(Group(key, in_dim, out_dim, tuple(Module(*m) for m in mods if m[0] in targets),
                         split_b=key == "gate_up"))
    return out


def rope_subgraph(gb, inv_freq: np.ndarray, scaling: float, max_context: int):
    """cos/sin caches [max_context, head_dim/2] as a constant subgraph over inv_freq.

    ONNX Runtime folds it once at load, so the file stores 32 floats instead of
    two max_context x head_dim/2 tables (1 MiB at 4096 positions), and a long
    max_context costs nothing on disk.
    """
    pos = gb.op("Range", [gb.const(np.array(0, np.float32)), gb.const(np.array(max_context, np.float32)),
                          gb.const(np.array(1, np.float32))], hint="rope_pos")
    pos = gb.op("Unsqueeze", [pos, gb.const(np.array([1], np.int64))], hint="rope_pos_col")
    freqs = gb.op("Mul", [pos, gb.const(np.asarray(inv_freq, np.float32)[None, :], "rope.inv_freq")], hint="rope_f")
    cos, sin = gb.op("Cos", [freqs], hint="rope_cos"), gb.op("Sin", [freqs], hint="rope_sin")
    if scaling != 1.0:
        sc = gb.const(np.array(scaling, np.float32))
        cos, sin = gb.op("Mul", [cos, sc]), gb.op("Mul", [sin, sc])
    return cos, sin


def build_decoder(config, sd: dict, *, quant: WeightQuant, target_modules, max_context: int,
                  inv_freq: np.ndarray, rope_scaling: float = 1.0, slots: bool = True):
    """Build the decoder graph from ``sd`` (HF names -> float32 numpy).

    ``slots=False`` builds a graph without LoRA inputs (merge mode). Returns
    ``(ModelProto, info)`` where info holds the dims, slots and group layout.
    """
    from onnx import TensorProto

    from .onnx_builder import GraphBuilder

    dims = decoder_dims(config)
    targets = resolve_targets(target_modules, ADAPTABLE) if slots else []
    groups = layer_groups(dims, targets)
    gb = GraphBuilder("edgepeft_decoder")
    lin = LinearEmitter(gb, quant)
    kvh, hd, nl = dims["kv_heads"], dims["head_dim"], dims["layers"]

    ids = gb.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = gb.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    past = []
    for i in range(nl):
        kv = [gb.input(f"past_key_values.{i}.{w}", TensorProto.FLOAT,
                       ["batch_size", kvh, "past_sequence_length", hd]) for w in ("key", "value")]
        past.append(kv)

    def w(name):
        try:
            return sd[name]
        except KeyError:
            raise ModelError(f"the base model has no weight {name}",
                             hint="is this a llama-family checkpoint?") from None

    def b(name):
        return sd.get(name)

    # seqlens_k = sum(mask) - 1 and total_sequence_length, computed once for all layers (int32 for GQA)
    msum = gb.op("ReduceSum", [mask, gb.const(np.array([1], np.int64))], keepdims=0, hint="mask_sum")
    seqlens = gb.op("Cast", [gb.op("Sub", [msum, gb.const(np.array(1, np.int64))])], to=TensorProto.INT32,
                    hint="seqlens_k")
    total = gb.op("Cast", [gb.op("Gather", [gb.op("Shape", [mask]), gb.const(np.array(1, np.int64))])],
                  to=TensorProto.INT32, hint="total_seq_len")
    cos_n, sin_n = rope_subgraph(gb, inv_freq, rope_scaling, max_context)

    emb, tied_head = lin.tied_embedding(ids, w("model.embed_tokens.weight"))
    eps = dims["eps"]
    residual, hidden_in = emb, None
    for i in range(nl):
        p = f"model.layers.{i}."
        if i == 0:
            x = gb.op("SimplifiedLayerNormalization", [emb, gb.const(w(p + "input_layernorm.weight"), p + "ln1")],
                      axis=-1, epsilon=eps, stash_type=1, hint="ln")
        else:
            x, _, _, residual = gb.ms("SkipSimplifiedLayerNormalization",
                                      [hidden_in, residual, gb.const(w(p + "input_layernorm.weight"), p + "ln1")],
                                      outputs=[None, "", "", None], epsilon=eps, hint="skipln")
        g_qkv, g_o, g_gu, g_down = groups
        a = p + "self_attn."
        wqkv = np.concatenate([w(a + "q_proj.weight"), w(a + "k_proj.weight"), w(a + "v_proj.weight")], 0)
        bqkv = None
        if b(a + "q_proj.bias") is not None:
            bqkv = np.concatenate([b(a + "q_proj.bias"), b(a + "k_proj.bias"), b(a + "v_proj.bias")], 0)
        qkv = emit_lora(gb, x, lin.linear(x, wqkv, bqkv, f"l{i}.qkv"), g_qkv, i)
        attn, pk, pv = gb.ms("GroupQueryAttention",
                             [qkv, "", "", past[i][0], past[i][1], seqlens, total, cos_n, sin_n],
                             outputs=[None, f"present.{i}.key", f"present.{i}.value"],
                             num_heads=dims["heads"], kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0,
                             scale=float(hd ** -0.5), hint="gqa")
        o = emit_lora(gb, attn, lin.linear(attn, w(a + "o_proj.weight"), b(a + "o_proj.bias"), f"l{i}.o"), g_o, i)
        x2, _, _, residual = gb.ms("SkipSimplifiedLayerNormalization",
                                   [o, residual, gb.const(w(p + "post_attention_layernorm.weight"), p + "ln2")],
                                   outputs=[None, "", "", None], epsilon=eps, hint="skipln")
        m = p + "mlp."
        wgu = np.concatenate([w(m + "gate_proj.weight"), w(m + "up_proj.weight")], 0)
        bgu = None
        if b(m + "gate_proj.bias") is not None:
            bgu = np.concatenate([b(m + "gate_proj.bias"), b(m + "up_proj.bias")], 0)
        gate, up = gb.op("Split", [lin.linear(x2, wgu, bgu, f"l{i}.gate_up")], outputs=2, axis=-1, hint="gate_up_split")
        gu = emit_lora_split(gb, x2, {"gate_proj": gate, "up_proj": up}, g_gu, i)
        gate, up = gu["gate_proj"], gu["up_proj"]
        act = gb.op("Mul", [gb.op("Mul", [gate, gb.op("Sigmoid", [gate])], hint="silu"), up], hint="swiglu")
        hidden_in = emit_lora(gb, act, lin.linear(act, w(m + "down_proj.weight"), b(m + "down_proj.bias"),
                                                  f"l{i}.down"), g_down, i)
        for name in (pk, pv):
            gb.output(name, TensorProto.FLOAT, ["batch_size", kvh, "total_sequence_length", hd])

    final, _, _, _ = gb.ms("SkipSimplifiedLayerNormalization",
                           [hidden_in, residual, gb.const(w("model.norm.weight"), "model.norm")],
                           outputs=[None, "", "", ""], epsilon=eps, hint="final_norm")
    if dims["tied"] or "lm_head.weight" not in sd:
        logits = tied_head(final)
    else:
        logits = lin.linear(final, sd["lm_head.weight"], None, "lm_head")
    gb.nodes.append(gb._helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
    gb.output("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", dims["vocab"]])
    # Graph outputs must be listed after all present.* in a stable order: logits first like genai.
    gb.outputs.insert(0, gb.outputs.pop())
    info = {"dims": dims, "groups": groups_info(groups), "slots": dict(gb.slots)}
    return gb.model("edgepeft llama-family decoder"), info
