"""Decoder graph writer: every family of :data:`.arch.DECODERS` as one ONNX graph with a KV cache.

I/O follows onnxruntime-genai's convention (see the decoder graph contract):
``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/.value`` in;
``logits``, ``present.{i}.key/.value`` out, the same for every family, so the
device runtime needs no per-architecture code. Per layer:

- norms fused with the residual add where the layout allows
  (``SkipSimplifiedLayerNormalization``; Gemma's sandwich norms and OLMo 2's
  post-norms add plain ``SimplifiedLayerNormalization`` nodes);
- one packed q|k|v projection feeds ``GroupQueryAttention``, which also does
  rotary (cos/sin tables per rope flavour, see :mod:`.rope`), sliding windows
  (``local_window_size``, per layer) and attention soft-capping (``softcap``);
  q/k norms (Qwen3, Gemma 3, OLMo 2) run between the projection and GQA;
- one packed gate|up projection, SiLU or tanh-GELU, down;
- each projection group carries a LoRA slot pair (see :mod:`.slots`). Every base
  weight goes through :class:`.quantize.LinearEmitter`, the one place that decides
  how it is stored.

``attn_out`` and ``mlp_out`` in :func:`build_decoder` are the two points where a
block's output joins the residual stream: with ``bottleneck`` they carry bottleneck
adapter slots (:func:`.slots.emit_bottleneck`), right after the output projection as in
the PyTorch module (:mod:`edgepeft.train.bottleneck`). The tensor ``inputs_embeds`` is
where transformers' ``inputs_embeds`` enters (after Gemma's scaled embedding, before
Granite's multiplier): the server computes a prompt-tuning soft prompt's key/value cache
by feeding it there (:mod:`.prompt_kv`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelError
from ..models.arch import DecoderArch, decoder_act
from .quantize import LinearEmitter, WeightQuant
from .rope import RopeTable, rope_subgraph
from .slots import (
    ROW_SLOTS_META,
    Group,
    Module,
    emit_bottleneck,
    emit_lora,
    emit_lora_split,
    groups_info,
    pack_gate_up,
    resolve_targets,
)

EMBEDS = "inputs_embeds"  # the named tensor where token embeddings enter the layers (see the module docstring)


@dataclass(frozen=True)
class LayerPlan:
    """What differs between layers: attention window, rope table (None: no rotary), scale, soft-cap."""

    window: int = 0
    rope: str | None = "default"
    scale: float = 1.0
    softcap: float = 0.0


@dataclass
class DecoderPlan:
    """An architecture description resolved against one config: every number the graph needs."""

    arch: DecoderArch
    dims: dict
    layers: list
    act: str = "silu"
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    logits_divisor: float = 1.0
    final_softcap: float = 0.0
    rope: dict = field(default_factory=dict)  # key -> RopeTable, filled by the exporter

    @property
    def rope_keys(self) -> set:
        return {layer.rope for layer in self.layers if layer.rope}

    def describe(self) -> dict:
        """The manifest's view: per-layer attention facts, only where a model has them."""
        out = {"activation": self.act, "norms": self.arch.norms}
        windows = [layer.window for layer in self.layers]
        if any(windows):
            out["sliding_window"] = windows
        if any(layer.softcap for layer in self.layers):
            out["attn_softcap"] = self.layers[0].softcap
        if self.final_softcap:
            out["final_softcap"] = self.final_softcap
        if any(layer.rope is None for layer in self.layers):
            out["no_rope_layers"] = [i for i, layer in enumerate(self.layers) if layer.rope is None]
        return out


def _num(config, attr: str | None, default: float) -> float:
    value = getattr(config, attr, None) if attr else None
    return default if value is None else float(value)


def decoder_dims(config) -> dict:
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


def plan_decoder(arch: DecoderArch, config) -> DecoderPlan:
    """Resolve ``arch`` against ``config`` (torch-free). Raises :class:`ModelError` on values it cannot express."""
    dims = decoder_dims(config)
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * dims["layers"])
    sw = int(getattr(config, "sliding_window", None) or 0)
    if not getattr(config, "use_sliding_window", True):
        sw = 0
    scale = dims["head_dim"] ** -0.5
    if arch.scale == "query_pre_attn_scalar":
        scale = float(config.query_pre_attn_scalar) ** -0.5
    elif arch.scale:
        scale = _num(config, arch.scale, scale)
    softcap = _num(config, arch.attn_softcap, 0.0)
    layers = []
    for i in range(dims["layers"]):
        window = sw if (arch.window == "all" or types[i] == "sliding_attention") else 0
        if arch.rope == "layer_types":
            rope = types[i]
        elif arch.rope == "no_rope_layers":
            rope = "default" if config.no_rope_layers[i] else None
        else:
            rope = "default"
        layers.append(LayerPlan(window=window, rope=rope, scale=scale, softcap=softcap))
    embed = float(np.float32(dims["hidden"] ** 0.5)) if arch.embed_scale == "sqrt_hidden" else \
        _num(config, arch.embed_scale, 1.0)
    return DecoderPlan(arch, dims, layers, act=decoder_act(arch, config), embed_scale=embed,
                       residual_scale=_num(config, arch.residual_scale, 1.0),
                       logits_divisor=_num(config, arch.logits_divisor, 1.0),
                       final_softcap=_num(config, arch.final_softcap, 0.0))


def layer_groups(dims: dict, targets: list[str], arch: DecoderArch, *, split_gate_up: bool = True) -> list[Group]:
    """The four projection groups of one layer (qkv, o, gate_up, down), only ``targets`` adapted.

    Separate gate/up projections get one B slot each with ``split_gate_up`` (``split_b``: no
    block-diagonal zeros), else one packed B (:func:`.slots.pack_gate_up` decides at export); a
    checkpoint's fused ``qkv_proj`` / ``gate_up_proj`` is one module whose LoRA covers all its output columns.
    """
    d, h, kv = dims["head_dim"], dims["heads"], dims["kv_heads"]
    q_out, kv_out, inter, hid = h * d, kv * d, dims["inter"], dims["hidden"]
    qkv = list(zip(arch.qkv, (0, q_out, q_out + kv_out), (q_out, kv_out, kv_out))) if len(arch.qkv) == 3 \
        else [(arch.qkv[0], 0, q_out + 2 * kv_out)]
    gu = list(zip(arch.gate_up, (0, inter), (inter, inter))) if len(arch.gate_up) == 2 \
        else [(arch.gate_up[0], 0, 2 * inter)]
    spec = [("qkv", hid, qkv), ("o", q_out, [("o_proj", 0, hid)]), ("gate_up", hid, gu),
            ("down", inter, [("down_proj", 0, hid)])]
    out = []
    for key, in_dim, mods in spec:
        out.append(Group(key, in_dim, sum(m[2] for m in mods), tuple(Module(*m) for m in mods if m[0] in targets),
                         split_b=split_gate_up and key == "gate_up" and len(mods) == 2))
    return out


def build_decoder(plan: DecoderPlan, sd: dict, *, quant: WeightQuant, target_modules, max_context: int,
                  slots: bool = True, bottleneck: dict | None = None, blocks=None, spool=None,
                  row_slots: bool = True, slot_rank: int | None = None):
    """Build the decoder graph from ``sd`` (HF names -> float32 numpy).

    ``slots=False`` builds a graph without LoRA inputs (merge mode). ``bottleneck``
    (``{"points": ["attn_out", "mlp_out"], "activation": "relu"}``) adds bottleneck slots at
    those points. ``blocks``: quantized source weights by HF name to carry as they are (a GGUF's
    blocks, :mod:`.gguf_blocks`; NF4, :mod:`.nf4`). ``spool``: a file the large initializers are written
    to as they are made (:class:`.onnx_builder.GraphBuilder`). ``row_slots``: slots that take one tensor per
    row, so one run decodes rows with different adapters (:mod:`.slots`; False only to measure against).
    Returns ``(ModelProto, info)`` where info holds
    the dims, slots, group layout and carried weights.
    Raises :class:`ModelError` when a weight the description names is missing.
    """
    from onnx import TensorProto

    from .onnx_builder import GraphBuilder

    arch, dims = plan.arch, plan.dims
    targets = resolve_targets(target_modules, arch.adaptable) if slots else []
    # packing pays only where both gate and up are adapted: one of them alone has no Split to save
    pack = pack_gate_up(dims["inter"], slot_rank) and all(n in targets for n in arch.gate_up)
    g_qkv, g_o, g_gu, g_down = layer_groups(dims, targets, arch, split_gate_up=not pack)
    gb = GraphBuilder("edgepeft_decoder", spool=spool)
    lin = LinearEmitter(gb, quant, blocks)
    b_int8 = quant.lora_b_int8  # LoRA B slots stored int8 (see .slots)
    heads, kvh, hd, nl = dims["heads"], dims["kv_heads"], dims["head_dim"], dims["layers"]
    eps, off = dims["eps"], arch.norm_offset

    ids = gb.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = gb.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    past = [[gb.input(f"past_key_values.{i}.{w}", TensorProto.FLOAT, ["batch_size", kvh, "past_sequence_length", hd])
             for w in ("key", "value")] for i in range(nl)]

    def w(name):
        try:
            return sd[name]
        except KeyError:
            raise ModelError(f"the base model has no weight {name}",
                             hint=f"is this a {arch.family} checkpoint? its config says so") from None

    def norm_w(name, tag):
        return gb.const(w(name) + np.float32(off) if off else w(name), tag)

    def cat(names, suffix):
        parts = [sd.get(n + suffix) for n in names]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise ModelError(f"{names[0]}{suffix} and its neighbours disagree on having a bias", hint="check the checkpoint")
        return np.concatenate(parts, 0)

    # seqlens_k = sum(mask) - 1 and total_sequence_length, computed once for all layers (int32 for GQA)
    msum = gb.op("ReduceSum", [mask, gb.const(np.array([1], np.int64))], keepdims=0, hint="mask_sum")
    seqlens = gb.op("Cast", [gb.op("Sub", [msum, gb.const(np.array(1, np.int64))])], to=TensorProto.INT32,
                    hint="seqlens_k")
    total = gb.op("Cast", [gb.op("Gather", [gb.op("Shape", [mask]), gb.const(np.array(1, np.int64))])],
                  to=TensorProto.INT32, hint="total_seq_len")
    rope = {key: rope_subgraph(gb, plan.rope[key], max_context, total) for key in sorted(plan.rope_keys)}

    emb, tied_head = lin.tied_embedding(ids, w("model.embed_tokens.weight"), source="model.embed_tokens.weight")
    inside = arch.embed_scale == "sqrt_hidden"  # Gemma scales inside its embedding module, Granite after it
    if plan.embed_scale != 1.0 and inside:
        emb = gb.op("Mul", [emb, gb.const(np.array(plan.embed_scale, np.float32))], hint="embed_scale")
    gb.alias(emb, EMBEDS, "inputs_embeds_point")
    emb = EMBEDS
    if plan.embed_scale != 1.0 and not inside:
        emb = gb.op("Mul", [emb, gb.const(np.array(plan.embed_scale, np.float32))], hint="embed_scale")
    points = set((bottleneck or {}).get("points") or ()) if slots else set()

    def adapted(h, point, layer):
        if point not in points:
            return h
        return emit_bottleneck(gb, h, point, layer, dims["hidden"], bottleneck["activation"], row_slots)

    def rms(x, name, tag):
        return gb.op("SimplifiedLayerNormalization", [x, norm_w(name, tag)], axis=-1, epsilon=eps, stash_type=1,
                     hint="rms")

    def skip_rms(x, residual, name, tag):
        out, _, _, summed = gb.ms("SkipSimplifiedLayerNormalization", [x, residual, norm_w(name, tag)],
                                  outputs=[None, "", "", None], epsilon=eps, hint="skipln")
        return out, summed

    def scaled(y):
        if plan.residual_scale == 1.0:
            return y
        return gb.op("Mul", [y, gb.const(np.array(plan.residual_scale, np.float32))], hint="residual_scale")

    def qk_normed(t, n_heads, name, tag):
        if arch.qk_norm == "full":
            return rms(t, name, tag)
        t4 = gb.op("Reshape", [t, gb.const(np.array([0, 0, n_heads, hd], np.int64))], hint="qk_heads")
        t4 = rms(t4, name, tag)
        return gb.op("Reshape", [t4, gb.const(np.array([0, 0, n_heads * hd], np.int64))], hint="qk_flat")

    residual, pending = emb, None  # pending: the last block's output, not yet added to residual
    for i, lp in enumerate(plan.layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        # -- attention input
        if arch.norms == "post":
            x = residual
        elif pending is None:
            x = rms(residual, p + "input_layernorm.weight", p + "ln1")
        else:
            x, residual = skip_rms(pending, residual, p + "input_layernorm.weight", p + "ln1")
        # -- q|k|v, q/k norms, attention
        names = [a + n for n in arch.qkv]
        qkv = emit_lora(gb, x, lin.linear(x, cat(names, ".weight"), cat(names, ".bias"), f"l{i}.qkv",
                                          source=[n + ".weight" for n in names]), g_qkv, i, b_int8, row_slots)
        qkv_in = [qkv, "", ""]
        if arch.qk_norm:
            q, k, v = gb.op("Split", [qkv, gb.const(np.array([heads * hd, kvh * hd, kvh * hd], np.int64))],
                            outputs=3, axis=-1, hint="qkv_split")
            qkv_in = [qk_normed(q, heads, a + "q_norm.weight", p + "q_norm"),
                      qk_normed(k, kvh, a + "k_norm.weight", p + "k_norm"), v]
        cos, sin = rope[lp.rope] if lp.rope else ("", "")
        attrs = dict(num_heads=heads, kv_num_heads=kvh, do_rotary=int(lp.rope is not None), rotary_interleaved=0,
                     scale=float(lp.scale))
        if lp.window:
            attrs["local_window_size"] = int(lp.window)
        if lp.softcap:
            attrs["softcap"] = float(lp.softcap)
        attn, pk, pv = gb.ms("GroupQueryAttention", [*qkv_in, past[i][0], past[i][1], seqlens, total, cos, sin],
                             outputs=[None, f"present.{i}.key", f"present.{i}.value"], hint="gqa", **attrs)
        o = emit_lora(gb, attn, lin.linear(attn, w(a + "o_proj.weight"), sd.get(a + "o_proj.bias"), f"l{i}.o",
                                           source=[a + "o_proj.weight"]), g_o, i, b_int8, row_slots)
        attn_out = scaled(adapted(o, "attn_out", i))
        # -- MLP input
        if arch.norms == "post":
            attn_out = rms(attn_out, p + "post_attention_layernorm.weight", p + "ln2")
            residual = gb.op("Add", [residual, attn_out], hint="residual")
            x2 = residual
        elif arch.norms == "sandwich":
            attn_out = rms(attn_out, p + "post_attention_layernorm.weight", p + "post_attn_ln")
            x2, residual = skip_rms(attn_out, residual, p + "pre_feedforward_layernorm.weight", p + "ln2")
        else:
            x2, residual = skip_rms(attn_out, residual, p + "post_attention_layernorm.weight", p + "ln2")
        # -- gate|up, activation, down
        names = [m + n for n in arch.gate_up]
        gu = lin.linear(x2, cat(names, ".weight"), cat(names, ".bias"), f"l{i}.gate_up",
                        source=[n + ".weight" for n in names])
        if g_gu.split_b:
            gate, up = gb.op("Split", [gu], outputs=2, axis=-1, hint="gate_up_split")
            parts = emit_lora_split(gb, x2, dict(zip(arch.gate_up, (gate, up))), g_gu, i, b_int8,
                                    row_slots)
            gate, up = (parts[n] for n in arch.gate_up)
        else:
            gate, up = gb.op("Split", [emit_lora(gb, x2, gu, g_gu, i, b_int8, row_slots)], outputs=2, axis=-1,
                             hint="gate_up_split")
        if plan.act == "silu":
            act = gb.op("Mul", [gate, gb.op("Sigmoid", [gate])], hint="silu")
        elif plan.act == "gelu_tanh":
            act = gb.ms("FastGelu", [gate], hint="gelu_tanh")
        else:
            act = gb.ms("Gelu", [gate], hint="gelu")
        h = gb.op("Mul", [act, up], hint="glu")
        d = emit_lora(gb, h, lin.linear(h, w(m + "down_proj.weight"), sd.get(m + "down_proj.bias"), f"l{i}.down",
                                        source=[m + "down_proj.weight"]), g_down, i, b_int8, row_slots)
        mlp_out = scaled(adapted(d, "mlp_out", i))
        if arch.norms == "post":
            mlp_out = rms(mlp_out, p + "post_feedforward_layernorm.weight", p + "ln3")
            residual = gb.op("Add", [residual, mlp_out], hint="residual")
        elif arch.norms == "sandwich":
            pending = rms(mlp_out, p + "post_feedforward_layernorm.weight", p + "post_ff_ln")
        else:
            pending = mlp_out
        for name in (pk, pv):
            gb.output(name, TensorProto.FLOAT, ["batch_size", kvh, "total_sequence_length", hd])

    # Granite divides logits by logits_scaling: folded into the final norm's weight (the head is linear).
    final_w = (w("model.norm.weight") + np.float32(off)) / np.float32(plan.logits_divisor)
    if arch.norms == "post":
        final = gb.op("SimplifiedLayerNormalization", [residual, gb.const(final_w, "model.norm")], axis=-1,
                      epsilon=eps, stash_type=1, hint="final_norm")
    else:
        final, _, _, _ = gb.ms("SkipSimplifiedLayerNormalization", [pending, residual, gb.const(final_w, "model.norm")],
                               outputs=[None, "", "", ""], epsilon=eps, hint="final_norm")
    if dims["tied"] or "lm_head.weight" not in sd:
        logits = tied_head(final)
    else:
        logits = lin.linear(final, sd["lm_head.weight"], None, "lm_head", source=["lm_head.weight"])
    if plan.final_softcap:
        cap = gb.const(np.array(plan.final_softcap, np.float32))
        logits = gb.op("Mul", [gb.op("Tanh", [gb.op("Div", [logits, cap])]), cap], hint="final_softcap")
    gb.alias(logits, "logits", "logits_out")
    gb.output("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", dims["vocab"]])
    # Graph outputs must be listed after all present.* in a stable order: logits first like genai.
    gb.outputs.insert(0, gb.outputs.pop())
    if row_slots and slots:
        gb.metadata[ROW_SLOTS_META] = "1"
    info = {"dims": dims, "groups": groups_info([g_qkv, g_o, g_gu, g_down]), "slots": dict(gb.slots),
            "bottleneck": {"points": [p for p in ("attn_out", "mlp_out") if p in points],
                           "activation": bottleneck["activation"]} if points else None,
            "slot_dtypes": dict(gb.slot_dtypes), "carried": list(lin.carried)}
    return gb.model(f"edgepeft {arch.family} decoder"), info


__all__ = ["DecoderPlan", "LayerPlan", "RopeTable", "plan_decoder", "layer_groups", "build_decoder", "decoder_dims",
           "EMBEDS"]
