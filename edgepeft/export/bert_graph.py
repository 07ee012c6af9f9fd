"""BERT-family encoder classifier (all-MiniLM-L6-v2 and friends) as one ONNX graph.

Same math as transformers' ``BertForSequenceClassification``: embeddings ->
LayerNorm -> N x (attention, SkipLayerNorm, GELU MLP, SkipLayerNorm) ->
pooler (tanh(dense(CLS))) -> classifier. Attention is ``MultiHeadAttention``
with a key padding mask; residual adds are fused into ``SkipLayerNormalization``.

The classifier is itself a slot (``head.classifier.weight`` [hidden, num_labels],
``head.classifier.bias`` [num_labels], empty by default), so every adapter
carries its own head and labels. ``merged_head=True`` (merge mode) bakes the
merged adapter's head in as plain weights instead.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .quantize import LinearEmitter, WeightQuant
from .slots import Group, Module, emit_lora, groups_info, resolve_targets

ADAPTABLE = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
             "attention.output.dense": "attention.output.dense", "intermediate.dense": "intermediate.dense",
             "output.dense": "output.dense", "pooler.dense": "pooler"}
HEAD_WEIGHT, HEAD_BIAS = "head.classifier.weight", "head.classifier.bias"


def encoder_dims(config) -> dict:
    if getattr(config, "model_type", "") not in ("bert",):
        raise ModelError(f"encoder architecture {config.model_type!r} is not supported",
                         hint="use a BERT-family model such as all-MiniLM-L6-v2")
    if getattr(config, "hidden_act", "gelu") != "gelu":
        raise ModelError(f"activation {config.hidden_act!r} is not supported", hint="BERT uses gelu")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ModelError("only absolute position embeddings are supported", hint="use a standard BERT model")
    return {"hidden": config.hidden_size, "heads": config.num_attention_heads, "inter": config.intermediate_size,
            "layers": config.num_hidden_layers, "vocab": config.vocab_size,
            "max_positions": config.max_position_embeddings, "eps": float(config.layer_norm_eps)}


def layer_groups(dims: dict, targets: list[str]) -> list[Group]:
    """Per-layer groups (qkv, attn_out, up, down) plus the layer-less ``pooler`` group."""
    hid, inter = dims["hidden"], dims["inter"]
    spec = [
        ("qkv", hid, 3 * hid, [("attention.self.query", 0, hid), ("attention.self.key", hid, hid),
                               ("attention.self.value", 2 * hid, hid)]),
        ("attn_out", hid, hid, [("attention.output.dense", 0, hid)]),
        ("up", hid, inter, [("intermediate.dense", 0, inter)]),
        ("down", inter, hid, [("output.dense", 0, hid)]),
        ("pooler", hid, hid, [("pooler.dense", 0, hid)]),
    ]
    return [Group(key, i, o, tuple(Module(*m) for m in mods if m[0] in targets)) for key, i, o, mods in spec]


def build_encoder(config, sd: dict, *, quant: WeightQuant, target_modules, slots: bool = True,
                  merged_head: bool = False):
    """Build the classifier graph from ``sd`` (BertForSequenceClassification names -> float32 numpy)."""
    from onnx import TensorProto

    from .onnx_builder import GraphBuilder

    dims = encoder_dims(config)
    targets = resolve_targets(target_modules, ADAPTABLE) if slots else []
    groups = {g.key: g for g in layer_groups(dims, targets)}
    gb = GraphBuilder("edgepeft_encoder")
    lin = LinearEmitter(gb, quant)
    hid, eps = dims["hidden"], dims["eps"]

    def w(name):
        try:
            return sd["bert." + name]
        except KeyError:
            raise ModelError(f"the base model has no weight bert.{name}", hint="is this a BERT checkpoint?") from None

    ids = gb.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = gb.input("attention_mask", TensorProto.INT64, ["batch_size", "sequence_length"])
    types = gb.input("token_type_ids", TensorProto.INT64, ["batch_size", "sequence_length"])

    word, _ = lin.tied_embedding(ids, w("embeddings.word_embeddings.weight"), name="embeddings.word")
    seq = gb.op("Gather", [gb.op("Shape", [ids]), gb.const(np.array([1], np.int64))], hint="seq_len")
    pos = gb.op("Slice", [gb.const(w("embeddings.position_embeddings.weight"), "embeddings.position"),
                          gb.const(np.array([0], np.int64)), seq, gb.const(np.array([0], np.int64))], hint="pos")
    typ = gb.op("Gather", [gb.const(w("embeddings.token_type_embeddings.weight"), "embeddings.type"), types])
    emb = gb.op("Add", [gb.op("Add", [word, typ]), pos], hint="emb")
    x = gb.op("LayerNormalization", [emb, gb.const(w("embeddings.LayerNorm.weight"), "embeddings.ln.g"),
                                     gb.const(w("embeddings.LayerNorm.bias"), "embeddings.ln.b")],
              axis=-1, epsilon=eps, hint="emb_ln")
    kmask = gb.op("Cast", [mask], to=TensorProto.INT32, hint="key_mask")

    for i in range(dims["layers"]):
        p = f"encoder.layer.{i}."
        s = p + "attention.self."
        wqkv = np.concatenate([w(s + "query.weight"), w(s + "key.weight"), w(s + "value.weight")], 0)
        bqkv = np.concatenate([w(s + "query.bias"), w(s + "key.bias"), w(s + "value.bias")], 0)
        qkv = emit_lora(gb, x, lin.linear(x, wqkv, bqkv, f"l{i}.qkv"), groups["qkv"], i)
        q, k, v = gb.op("Split", [qkv], outputs=3, axis=-1, hint="qkv_split")
        att = gb.ms("MultiHeadAttention", [q, k, v, "", kmask], num_heads=dims["heads"], hint="mha")
        o = emit_lora(gb, att, lin.linear(att, w(p + "attention.output.dense.weight"),
                                          w(p + "attention.output.dense.bias"), f"l{i}.attn_out"),
                      groups["attn_out"], i)
        x = gb.ms("SkipLayerNormalization", [o, x, gb.const(w(p + "attention.output.LayerNorm.weight"), p + "ln1.g"),
                                             gb.const(w(p + "attention.output.LayerNorm.bias"), p + "ln1.b")],
                  epsilon=eps, hint="skipln")
        h = emit_lora(gb, x, lin.linear(x, w(p + "intermediate.dense.weight"), w(p + "intermediate.dense.bias"),
                                        f"l{i}.up"), groups["up"], i)
        h = gb.ms("Gelu", [h], hint="gelu")
        d = emit_lora(gb, h, lin.linear(h, w(p + "output.dense.weight"), w(p + "output.dense.bias"), f"l{i}.down"),
                      groups["down"], i)
        x = gb.ms("SkipLayerNormalization", [d, x, gb.const(w(p + "output.LayerNorm.weight"), p + "ln2.g"),
                                             gb.const(w(p + "output.LayerNorm.bias"), p + "ln2.b")],
                  epsilon=eps, hint="skipln")

    cls = gb.op("Gather", [x, gb.const(np.array(0, np.int64))], axis=1, hint="cls")
    pooled = emit_lora(gb, cls, lin.linear(cls, w("pooler.dense.weight"), w("pooler.dense.bias"), "pooler"),
                       groups["pooler"], None)
    pooled = gb.op("Tanh", [pooled], hint="pooled")
    if merged_head:
        head_w = gb.const(np.ascontiguousarray(sd["classifier.weight"].T), "classifier.weight")
        head_b = gb.const(sd["classifier.bias"], "classifier.bias")
        n_labels = int(sd["classifier.weight"].shape[0])
    else:
        head_w = gb.slot(HEAD_WEIGHT, np.zeros((hid, 0), np.float32), [hid, "num_labels"], [hid, "num_labels"])
        head_b = gb.slot(HEAD_BIAS, np.zeros((0,), np.float32), ["num_labels"], ["num_labels"])
        n_labels = "num_labels"
    logits = gb.op("Add", [gb.op("MatMul", [pooled, head_w], hint="head"), head_b], hint="head_bias")
    gb.nodes.append(gb._helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
    gb.output("logits", TensorProto.FLOAT, ["batch_size", n_labels])
    info = {"dims": dims, "groups": groups_info(list(groups.values())), "slots": dict(gb.slots)}
    return gb.model("edgepeft BERT-family classifier"), info
