"""Encoder graph writer: every family of :data:`.arch.ENCODERS` as one sequence-classifier graph.

Same math as transformers' ``*ForSequenceClassification``: embeddings -> N
layers -> pooling (the first token, or the masked mean) -> the head. Three
attention kinds, chosen by the description:

- ``mha`` (BERT, RoBERTa, XLM-R, DistilBERT): ``MultiHeadAttention`` with a key
  padding mask, residual adds fused into ``SkipLayerNormalization``;
- ``rotary`` (ModernBERT): ``GroupQueryAttention`` with ``causal=0`` (bidirectional),
  rotary inside, padding through ``seqlens_k`` and the local layers' window as an
  additive bias built once per run;
- ``deberta`` (DeBERTa-v2/v3): disentangled attention written out in plain ops
  (content->position and position->content scores gathered by log-bucketed
  relative distance); the positional projections of the shared relative table are
  constants that ONNX Runtime folds at load.

The head: stages the checkpoint provides and adapters do not change (BERT's pooler,
ModernBERT's prediction head) are base weights with a LoRA slot; the stages PEFT
trains and saves with an adapter (``modules_to_save``) are slots
``head.<module>.weight`` [in, out] / ``head.<module>.bias``. Their default is the
checkpoint's weights when it has them, else empty (no adapter, no head: the bare
graph returns [batch, 0] logits), so every adapter carries its own head and labels.
``merged_head=True`` (merge mode) bakes the merged adapter's head in as constants.

Per-row slots (``row_slots``, :mod:`.slots`): every slot, the head's included, is declared without a
shape, and the head runs on the pooled vector as [batch, 1, hidden], so a run may bind a head per row
([batch, hidden, labels] weight, [batch, 1, labels] bias) as well as one adapter's own [hidden, labels].
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from ..models.arch import EncoderArch
from .quantize import LinearEmitter, WeightQuant
from .slots import ROW_SLOTS_META, Group, Module, emit_bottleneck, emit_lora, groups_info, resolve_targets, slot_shape

HEAD_WEIGHT, HEAD_BIAS = "head.classifier.weight", "head.classifier.bias"  # BERT's head slots (unchanged names)
_ROLES_IN = {"q": "hidden", "k": "hidden", "v": "hidden", "qkv": "hidden", "o": "hidden", "up": "hidden",
             "gate_up": "hidden", "down": "inter"}


def head_slot_names(module: str) -> tuple[str, str]:
    """The weight and bias slots of an adapter head stage (``classifier`` -> ``head.classifier.weight``)."""
    return f"head.{module}.weight", f"head.{module}.bias"


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def encoder_dims(arch: EncoderArch, config) -> dict:
    hidden = int(_cfg(config, "hidden_size", "dim"))
    return {"hidden": hidden, "heads": int(_cfg(config, "num_attention_heads", "n_heads")),
            "inter": int(_cfg(config, "intermediate_size", "hidden_dim")),
            "layers": int(_cfg(config, "num_hidden_layers", "n_layers")), "vocab": int(config.vocab_size),
            "max_positions": int(config.max_position_embeddings),
            "eps": float(_cfg(config, "layer_norm_eps", "norm_eps", default=1e-12))}


def layer_groups(dims: dict, targets: list[str], arch: EncoderArch) -> list[Group]:
    """Per-layer groups (qkv, attn_out, up, down: q|k|v and ModernBERT's gate|up packed as the checkpoint
    orders them) plus one layer-less group per base head stage (``pooler`` for BERT's pooler.dense)."""
    hid, inter = dims["hidden"], dims["inter"]
    size = {"q": hid, "k": hid, "v": hid, "qkv": 3 * hid, "o": hid, "up": inter, "gate_up": 2 * inter, "down": hid}
    packs = {"qkv": ("q", "k", "v", "qkv"), "attn_out": ("o",), "up": ("up", "gate_up"), "down": ("down",)}
    out = []
    for key, roles in packs.items():
        mods, off = [], 0
        for module, role in arch.proj:
            if role in roles:
                mods.append(Module(module, off, size[role]))
                off += size[role]
        out.append(Group(key, inter if key == "down" else hid, off, tuple(m for m in mods if m.peft_name in targets)))
    for stage in arch.head:
        if stage.source == "base":
            mods = (Module(stage.module, 0, hid),) if stage.module in targets else ()
            out.append(Group(stage.module.split(".")[0], hid, hid, mods))
    return out


def _act(gb, x: str, name: str) -> str:
    if name in ("gelu",):
        return gb.ms("Gelu", [x], hint="gelu")
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return gb.ms("FastGelu", [x], hint="gelu_tanh")
    if name == "relu":
        return gb.op("Relu", [x])
    if name == "tanh":
        return gb.op("Tanh", [x])
    if name == "silu":
        return gb.op("Mul", [x, gb.op("Sigmoid", [x])], hint="silu")
    raise ModelError(f"activation {name!r} is not supported", hint="use gelu, relu, tanh or silu")


def build_encoder(arch: EncoderArch, config, sd: dict, *, quant: WeightQuant, target_modules, slots: bool = True,
                  merged_head: bool = False, head_present: frozenset = frozenset(), extra: dict | None = None,
                  bottleneck: dict | None = None, row_slots: bool = True):
    """Build the classifier graph from ``sd`` (``*ForSequenceClassification`` names -> float32 numpy).

    ``bottleneck`` (``{"points": [...], "activation": ...}``) adds bottleneck adapter slots after
    the attention output and/or the MLP output projection of every layer (before the residual add).

    ``head_present``: adapter head stages whose weights the checkpoint holds (their
    slot defaults). ``extra``: what the rotary/deberta attention needs from the loaded
    model (rope tables, relative-position tables), see :func:`.api.export_model`.
    ``row_slots``: slots that take one tensor per row, so one run classifies texts for different adapters
    (:mod:`.slots`; False only to measure against, or to build a graph as older edgepeft did).
    Returns ``(ModelProto, info)``. Raises :class:`ModelError` for missing weights.
    """
    from onnx import TensorProto

    from .onnx_builder import GraphBuilder

    dims = encoder_dims(arch, config)
    targets = resolve_targets(target_modules, arch.adaptable) if slots else []
    row_slots = row_slots and slots and not merged_head
    groups = {g.key: g for g in layer_groups(dims, targets, arch)}
    gb = GraphBuilder("edgepeft_encoder")
    lin = LinearEmitter(gb, quant, per_channel_int8=True)  # int8: per-channel DynamicQuantizeMatMul
    hid, eps = dims["hidden"], dims["eps"]
    extra = extra or {}
    pre = arch.prefix

    def w(name, prefix=pre):
        try:
            return sd[prefix + name]
        except KeyError:
            raise ModelError(f"the base model has no weight {prefix}{name}",
                             hint=f"is this a {arch.family} checkpoint? its config says so") from None

    def opt(name, prefix=pre):
        return sd.get(prefix + name)

    def ln(x, path, hint="ln", prefix=pre):
        ins = [x, gb.const(w(path + ".weight", prefix))]
        if opt(path + ".bias", prefix) is not None:
            ins.append(gb.const(w(path + ".bias", prefix)))
        return gb.op("LayerNormalization", ins, axis=-1, epsilon=eps, hint=hint)

    def head_w(name):  # head modules live below the encoder (BERT's pooler) or at the top (classifier)
        return opt(name) if opt(name) is not None else sd.get(name)

    def skip_ln(x, skip, path):
        ins = [x, skip, gb.const(w(path + ".weight"))]
        if opt(path + ".bias") is not None:
            ins.append(gb.const(w(path + ".bias")))
        return gb.ms("SkipLayerNormalization", ins, epsilon=eps, hint="skipln")

    ids = gb.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = gb.input("attention_mask", TensorProto.INT64, ["batch_size", "sequence_length"])
    emb_names = arch.embeddings
    type_table = opt(emb_names.get("type", "?") + ".weight")
    types = None
    if type_table is not None and type_table.shape[0] > 1:
        types = gb.input("token_type_ids", TensorProto.INT64, ["batch_size", "sequence_length"])

    # -- embeddings
    x, _ = lin.tied_embedding(ids, w(emb_names["word"] + ".weight"), name="embeddings.word")
    seq = gb.op("Gather", [gb.op("Shape", [ids]), gb.const(np.array([1], np.int64))], hint="seq_len")
    positions = arch.positions
    if positions == "config":
        positions = "absolute" if getattr(config, "position_biased_input", True) else "none"
    table = None
    if positions != "none":
        table = w(emb_names["position"] + ".weight")
        if type_table is not None and types is None:  # one token type (RoBERTa): fold its row into the positions
            table = table + type_table[0]
    if types is not None:
        x = gb.op("Add", [x, gb.op("Gather", [gb.const(type_table, "embeddings.type"), types])], hint="emb_type")
    elif type_table is not None and positions == "none":
        x = gb.op("Add", [x, gb.const(type_table[0])], hint="emb_type")
    if positions == "absolute":
        pos = gb.op("Slice", [gb.const(table, "embeddings.position"), gb.const(np.array([0], np.int64)), seq,
                              gb.const(np.array([0], np.int64))], hint="pos")
        x = gb.op("Add", [x, pos], hint="emb")
    elif positions == "padding_offset":  # RoBERTa: positions count non-pad tokens from padding_idx + 1
        pad = int(config.pad_token_id)
        real = gb.op("Cast", [gb.op("Not", [gb.op("Equal", [ids, gb.const(np.array(pad, np.int64))])])],
                     to=TensorProto.INT64, hint="not_pad")
        pid = gb.op("Add", [gb.op("Mul", [gb.op("CumSum", [real, gb.const(np.array(1, np.int64))]), real]),
                            gb.const(np.array(pad, np.int64))], hint="pos_ids")
        x = gb.op("Add", [x, gb.op("Gather", [gb.const(table, "embeddings.position"), pid])], hint="emb")
    x = ln(x, emb_names["norm"], "emb_ln")

    attention = _ATTENTION[arch.attention](gb, config, dims, mask, extra, ln, lin)
    points = set((bottleneck or {}).get("points") or ()) if slots else set()

    def adapted(h, point, layer):
        if point not in points:
            return h
        return emit_bottleneck(gb, h, point, layer, hid, bottleneck["activation"], row_slots)
    layer_tmpl = arch.layer
    roles = {r: m for m, r in arch.proj}
    for i in range(dims["layers"]):
        p = layer_tmpl.format(i=i)

        def proj(inp, key, role_list, name, again=False):
            if again:  # the same stored weights on another input (DeBERTa's relative table)
                return emit_lora(gb, inp, lin.emit_on(inp, f"l{i}.{name}"), groups[key], i, row_slots=row_slots)
            mods = [roles[r] for r in role_list if r in roles]
            wt = np.concatenate([w(p + m + ".weight") for m in mods], 0)
            bs = [opt(p + m + ".bias") for m in mods]
            bias = None if all(b is None for b in bs) else np.concatenate(
                [b if b is not None else np.zeros(w(p + m + ".weight").shape[0], np.float32) for b, m in zip(bs, mods)])
            return emit_lora(gb, inp, lin.linear(inp, wt, bias, f"l{i}.{name}"), groups[key], i,
                             row_slots=row_slots)

        if arch.norms == "pre":
            h_in = x if i == 0 else ln(x, p + arch.norm1, "attn_ln")
        else:
            h_in = x
        qkv = proj(h_in, "qkv", ["q", "k", "v", "qkv"], "qkv")
        att = attention.layer(i, qkv, h_in, lambda inp: proj(inp, "qkv", [], "qkv", again=True))
        o = adapted(proj(att, "attn_out", ["o"], "attn_out"), "attn_out", i)
        if arch.norms == "pre":
            x = gb.op("Add", [x, o], hint="residual")
            m_in = ln(x, p + arch.norm2, "mlp_ln")
        else:
            x = skip_ln(o, x, p + arch.norm1)
            m_in = x
        up = proj(m_in, "up", ["up", "gate_up"], "up")
        act_name = str(_cfg(config, arch.act_attr, "hidden_act", default="gelu"))
        if "gate_up" in roles:
            a_in, gate = gb.op("Split", [up], outputs=2, axis=-1, hint="glu_split")
            h = gb.op("Mul", [_act(gb, a_in, act_name), gate], hint="glu")
        else:
            h = _act(gb, up, act_name)
        d = adapted(proj(h, "down", ["down"], "down"), "mlp_out", i)
        if arch.norms == "pre":
            x = gb.op("Add", [x, d], hint="residual")
        else:
            x = skip_ln(d, x, p + arch.norm2)
    if arch.final_norm:
        x = ln(x, arch.final_norm, "final_norm")

    # -- pooling and head
    def mean_pool(x):
        m3 = gb.op("Unsqueeze", [mask, gb.const(np.array([2], np.int64))], hint="mask3")
        keep = gb.op("Where", [gb.op("Cast", [m3], to=TensorProto.BOOL), x, gb.const(np.array(0, np.float32))])
        total = gb.op("ReduceSum", [keep, gb.const(np.array([1], np.int64))], keepdims=0, hint="pool_sum")
        count = gb.op("Cast", [gb.op("ReduceSum", [m3, gb.const(np.array([1], np.int64))], keepdims=0)],
                      to=TensorProto.FLOAT)
        return gb.op("Div", [total, count], hint="pool_mean")

    pooling = arch.pooling if arch.pooling == "cls" else str(getattr(config, arch.pooling, "cls"))
    mean = mean_pool(x)
    pooled = mean if pooling == "mean" else gb.op("Gather", [x, gb.const(np.array(0, np.int64))], axis=1, hint="cls")
    # a sentence embedding (what /v1/embeddings returns): the mean of the last hidden states over the
    # text's tokens, sentence-transformers' default pooling, whatever pooling the classification head uses
    gb.alias(mean, "embeddings", "embeddings_out")
    gb.output("embeddings", TensorProto.FLOAT, ["batch_size", hid])
    if row_slots:  # [batch, 1, hidden]: a per-row [batch, hidden, x] weight then applies to its own row
        pooled = gb.op("Unsqueeze", [pooled, gb.const(np.array([1], np.int64))], hint="head_rows")
    head_info, n_labels, width = [], None, hid
    default_in = hid  # the width the previous stage's default produces (1 after an empty intermediate default)
    last_adapter = [s for s in arch.head if s.source == "adapter"][-1]
    for stage in arch.head:
        last = stage is last_adapter
        wt, bias = head_w(stage.module + ".weight"), head_w(stage.module + ".bias")
        if stage.source == "base":
            if wt is None or stage.module in extra.get("missing", ()):
                raise ModelError(f"the checkpoint has no {stage.module} weights (they would be randomly initialized)",
                                 hint=f"use a {arch.family} checkpoint that includes its {stage.module}")
            key = stage.module.split(".")[0]
            pooled = emit_lora(gb, pooled, lin.linear(pooled, wt, bias, key), groups[key], None, row_slots=row_slots)
        elif merged_head:
            if wt is None or stage.module in extra.get("missing", ()):
                raise ModelError(f"the merged adapter and the checkpoint both lack {stage.module}",
                                 hint=f"train with modules_to_save including {stage.module.split('.')[0]}")
            b = bias if bias is not None else np.zeros(wt.shape[0], np.float32)
            pooled = gb.op("Gemm", [pooled, gb.const(np.ascontiguousarray(wt), stage.module + ".weight"),
                                    gb.const(b, stage.module + ".bias")], transB=1, hint="head")
            n_labels = int(wt.shape[0]) if last else n_labels
        else:
            ws, bs = head_slot_names(stage.module)
            out_sym = "num_labels" if last else f"{stage.module}_out"
            has = stage.module in head_present and wt is not None
            # empty defaults: the final stage [in, 0]; a stage before it [in, 1] of zeros, so every MatMul
            # of the bare graph keeps a non-empty inner dimension (ORT's fused Gemm refuses K = 0)
            empty = np.zeros((default_in, 0 if last else 1), np.float32)
            wdef = np.ascontiguousarray(wt.T) if has else empty
            bdef = np.zeros(wdef.shape[1], np.float32) if bias is None or not has else bias
            gb.slot(ws, wdef, slot_shape([width, out_sym], row_slots), [hid, "num_labels" if last else hid])
            gb.slot(bs, bdef, slot_shape([out_sym], row_slots), ["num_labels" if last else hid])
            pooled = gb.op("Add", [gb.op("MatMul", [pooled, ws], hint="head"), bs], hint="head_bias")
            width, n_labels, default_in = out_sym, "num_labels", int(wdef.shape[1])
            head_info.append({"module": stage.module, "default": bool(has)})
        if stage.act:
            act = stage.act if stage.act in ("tanh", "relu") else str(_cfg(config, stage.act, default="gelu"))
            pooled = _act(gb, pooled, act)
        if stage.norm:
            pooled = ln(pooled, stage.norm, "head_ln", prefix="")
    if row_slots:
        pooled = gb.op("Squeeze", [pooled, gb.const(np.array([1], np.int64))], hint="head_rows")
        gb.metadata[ROW_SLOTS_META] = "1"
    gb.alias(pooled, "logits", "logits_out")
    gb.output("logits", TensorProto.FLOAT, ["batch_size", n_labels])
    info = {"dims": dims, "groups": groups_info(list(groups.values())), "slots": dict(gb.slots), "head": head_info,
            "bottleneck": {"points": [p for p in ("attn_out", "mlp_out") if p in points],
                           "activation": bottleneck["activation"]} if points else None}
    return gb.model(f"edgepeft {arch.family} classifier"), info


# ---------------------------------------------------------------------------------------------------------------
# Attention kinds


class _MHA:
    """Absolute-position encoders: ``MultiHeadAttention`` with an int32 key padding mask."""

    def __init__(self, gb, config, dims, mask, extra, ln, lin):
        from onnx import TensorProto

        self.gb, self.heads = gb, dims["heads"]
        self.kmask = gb.op("Cast", [mask], to=TensorProto.INT32, hint="key_mask")

    def layer(self, i, qkv, h_in, rel_proj):
        q, k, v = self.gb.op("Split", [qkv], outputs=3, axis=-1, hint="qkv_split")
        return self.gb.ms("MultiHeadAttention", [q, k, v, "", self.kmask], num_heads=self.heads, hint="mha")


class _Rotary:
    """ModernBERT: bidirectional ``GroupQueryAttention`` (rotary inside), local layers masked by a window bias."""

    def __init__(self, gb, config, dims, mask, extra, ln, lin):
        from onnx import TensorProto

        from .rope import rope_subgraph

        self.gb, self.heads, self.types = gb, dims["heads"], list(config.layer_types)
        msum = gb.op("ReduceSum", [mask, gb.const(np.array([1], np.int64))], keepdims=0, hint="mask_sum")
        self.seqlens = gb.op("Cast", [gb.op("Sub", [msum, gb.const(np.array(1, np.int64))])], to=TensorProto.INT32,
                             hint="seqlens_k")
        seq = gb.op("Gather", [gb.op("Shape", [mask]), gb.const(np.array(1, np.int64))], hint="seq")
        self.total = gb.op("Cast", [seq], to=TensorProto.INT32, hint="total_seq_len")
        self.rope = {k: rope_subgraph(gb, t, dims["max_positions"]) for k, t in extra["rope"].items()}
        self.bias = None
        if "sliding_attention" in self.types:
            r = gb.op("Range", [gb.const(np.array(0, np.int64)), seq, gb.const(np.array(1, np.int64))], hint="pos")
            dist = gb.op("Abs", [gb.op("Sub", [gb.op("Unsqueeze", [r, gb.const(np.array([1], np.int64))]),
                                               gb.op("Unsqueeze", [r, gb.const(np.array([0], np.int64))])])])
            inside = gb.op("LessOrEqual", [dist, gb.const(np.array(int(config.sliding_window), np.int64))])
            bias = gb.op("Where", [inside, gb.const(np.array(0, np.float32)), gb.const(np.array(-1e30, np.float32))],
                         hint="window_bias")
            self.bias = gb.op("Unsqueeze", [bias, gb.const(np.array([0, 1], np.int64))], hint="window_bias4")

    def layer(self, i, qkv, h_in, rel_proj):
        t = self.types[i]
        cos, sin = self.rope[t]
        ins = [qkv, "", "", "", "", self.seqlens, self.total, cos, sin]
        if t == "sliding_attention":
            ins += ["", self.bias]
        return self.gb.ms("GroupQueryAttention", ins, num_heads=self.heads, kv_num_heads=self.heads, causal=0,
                          do_rotary=1, rotary_interleaved=0, hint="gqa_bidir")


class _Deberta:
    """DeBERTa-v2/v3 disentangled attention in plain ONNX ops (see the module docstring)."""

    def __init__(self, gb, config, dims, mask, extra, ln, lin):
        from onnx import TensorProto

        self.gb, self.heads, self.hd = gb, dims["heads"], dims["hidden"] // dims["heads"]
        self.rel = bool(config.relative_attention)
        self.pos_types = [str(p) for p in (config.pos_att_type or [])] if self.rel else []
        self.scale = float(np.float32(1.0) / np.sqrt(np.float32(self.hd * (1 + len(self.pos_types)))))
        m4 = gb.op("Unsqueeze", [mask, gb.const(np.array([1, 2], np.int64))], hint="mask4")
        self.keep = gb.op("Cast", [m4], to=TensorProto.BOOL, hint="key_keep")
        self.neg = gb.const(np.array(np.finfo(np.float32).min, np.float32))
        if self.rel:
            span = extra["att_span"]
            rel = gb.const(extra["rel_embeddings"][: 2 * span][None], "encoder.rel_embeddings")
            if extra.get("rel_norm"):
                rel = ln(rel, "encoder.LayerNorm", "rel_ln")
            self.rel_in = rel
            seq = gb.op("Gather", [gb.op("Shape", [mask]), gb.const(np.array([1], np.int64))], hint="seq")
            r = gb.op("Range", [gb.const(np.array(0, np.int64)), gb.op("Squeeze", [seq]),
                                gb.const(np.array(1, np.int64))], hint="pos")
            off = extra["rel_offset"]
            d = gb.op("Add", [gb.op("Sub", [gb.op("Unsqueeze", [r, gb.const(np.array([1], np.int64))]),
                                            gb.op("Unsqueeze", [r, gb.const(np.array([0], np.int64))])]),
                              gb.const(np.array(off, np.int64))], hint="rel_idx")
            self.c2p = gb.op("Gather", [gb.const(extra["c2p_table"], "rel.c2p"), d], hint="c2p_idx")
            self.p2c = gb.op("Gather", [gb.const(extra["p2c_table"], "rel.p2c"), d], hint="p2c_idx")

    def _heads(self, t, batch_dim=True):
        """[B, S, H*D] -> [B, H, S, D]."""
        gb = self.gb
        t = gb.op("Reshape", [t, gb.const(np.array([0, 0, self.heads, self.hd], np.int64))], hint="heads")
        return gb.op("Transpose", [t], perm=[0, 2, 1, 3], hint="bhsd")

    def layer(self, i, qkv, h_in, rel_proj):
        gb = self.gb
        q, k, v = gb.op("Split", [qkv], outputs=3, axis=-1, hint="qkv_split")
        qh, kh, vh = self._heads(q), self._heads(k), self._heads(v)
        sc = gb.const(np.array(self.scale, np.float32))
        scores = gb.op("Mul", [gb.op("MatMul", [qh, gb.op("Transpose", [kh], perm=[0, 1, 3, 2])]), sc], hint="qk")
        if self.rel and self.pos_types:
            pq, pk, _ = gb.op("Split", [rel_proj(self.rel_in)], outputs=3, axis=-1, hint="rel_qkv")

            def pos_t(t):  # [1, 2span, H*D] -> [1, H, D, 2span]
                t = gb.op("Reshape", [t, gb.const(np.array([0, 0, self.heads, self.hd], np.int64))])
                return gb.op("Transpose", [t], perm=[0, 2, 3, 1], hint="pos_t")

            shape = gb.op("Shape", [scores], hint="score_shape")
            if "c2p" in self.pos_types:
                att = gb.op("MatMul", [qh, pos_t(pk)], hint="c2p")
                idx = gb.op("Expand", [self.c2p, shape], hint="c2p_idx4")
                scores = gb.op("Add", [scores, gb.op("Mul", [gb.op("GatherElements", [att, idx], axis=-1), sc])])
            if "p2c" in self.pos_types:
                att = gb.op("MatMul", [kh, pos_t(pq)], hint="p2c")
                idx = gb.op("Expand", [self.p2c, shape], hint="p2c_idx4")
                g = gb.op("Transpose", [gb.op("GatherElements", [att, idx], axis=-1)], perm=[0, 1, 3, 2])
                scores = gb.op("Add", [scores, gb.op("Mul", [g, sc])])
        scores = gb.op("Where", [self.keep, scores, self.neg], hint="masked")
        probs = gb.op("Softmax", [scores], axis=-1, hint="probs")
        ctx = gb.op("Transpose", [gb.op("MatMul", [probs, vh])], perm=[0, 2, 1, 3], hint="ctx")
        return gb.op("Reshape", [ctx, gb.const(np.array([0, 0, self.heads * self.hd], np.int64))], hint="ctx_flat")


_ATTENTION = {"mha": _MHA, "rotary": _Rotary, "deberta": _Deberta}


__all__ = ["build_encoder", "encoder_dims", "layer_groups", "head_slot_names", "HEAD_WEIGHT", "HEAD_BIAS"]
