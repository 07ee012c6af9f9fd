"""Which bases the exporter takes: one description per architecture family, read from a config.

Adding an architecture is a row here plus a parity test, not a new graph writer:
the decoder and encoder graph writers (:mod:`.decoder_graph`, :mod:`.encoder_graph`)
read only these descriptions and the numbers a config carries. The same table
answers, before any weights are loaded, whether a base can be exported for a task,
and if not, what to do instead (:func:`describe`).

Torch-free: only a config object (``transformers.PretrainedConfig`` or anything
with the same attributes) is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..contracts.fields import check_choice
from ..contracts.manifest import TASKS
from ..errors import ModelError

# ---------------------------------------------------------------------------------------------------------------
# Decoders


@dataclass(frozen=True)
class DecoderArch:
    """How one decoder family differs from Llama; every field's default is Llama's.

    ``qkv`` / ``gate_up``: the checkpoint's projection names, in packing order; one name
    means the checkpoint already holds them fused (Phi-3), and a PEFT adapter then
    trains the fused module. ``norms``: ``"pre"`` (Llama), ``"sandwich"`` (Gemma 2/3:
    the attention and MLP outputs are normed again before the residual add) or
    ``"post"`` (OLMo 2: no input norm, outputs normed before the add).
    ``norm_offset``: Gemma stores RMSNorm weights as ``w`` and applies ``1 + w``.
    ``qk_norm``: RMSNorm on q and k before rotary, per head (``"head"``: Qwen3,
    Gemma 3) or over the whole projection (``"full"``: OLMo 2). ``window``: which
    layers use sliding-window attention (``"all"`` with ``config.sliding_window``,
    or per ``config.layer_types``). ``rope``: one table for all layers
    (``"global"``), one per ``config.layer_types`` entry (Gemma 3: local and global
    bases), or none on the layers ``config.no_rope_layers`` marks 0 (SmolLM3).
    ``scale``: the config attribute that sets the attention scale (Gemma's
    ``query_pre_attn_scalar ** -0.5``, Granite's ``attention_multiplier``); None is
    ``head_dim ** -0.5``. ``embed_scale``: ``"sqrt_hidden"`` (Gemma) or a config
    attribute multiplying the embeddings (Granite). ``residual_scale``,
    ``logits_divisor``, ``attn_softcap``, ``final_softcap``: config attributes (Granite,
    Gemma 2) read when present.
    """

    family: str
    names: str                       # docs/architectures.md: the bases this row stands for
    qkv: tuple = ("q_proj", "k_proj", "v_proj")
    gate_up: tuple = ("gate_proj", "up_proj")
    norms: str = "pre"
    norm_offset: float = 0.0
    qk_norm: str | None = None
    window: str = "layer_types"
    rope: str = "global"
    act_attr: str = "hidden_act"
    scale: str | None = None
    embed_scale: str | None = None
    residual_scale: str | None = None
    logits_divisor: str | None = None
    attn_softcap: str | None = None
    final_softcap: str | None = None

    @property
    def adaptable(self) -> dict[str, str]:
        """PEFT module name -> short alias, for every projection that can carry a LoRA slot."""
        short = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "qkv_proj": "qkv", "o_proj": "o",
                 "gate_proj": "gate", "up_proj": "up", "gate_up_proj": "gate_up", "down_proj": "down"}
        names = [*self.qkv, "o_proj", *self.gate_up, "down_proj"]
        return {n: short.get(n, n) for n in names}

    def bottleneck_modules(self) -> dict[str, str]:
        """Bottleneck point -> the module (``{i}`` = layer) whose output it adapts, in the causal-LM model:
        the attention's output projection and the MLP's down projection (where the graph's
        ``attn_out``/``mlp_out`` points are)."""
        return {"attn_out": "model.layers.{i}.self_attn.o_proj", "mlp_out": "model.layers.{i}.mlp.down_proj"}


_GEMMA = dict(norm_offset=1.0, act_attr="hidden_activation", embed_scale="sqrt_hidden",
              scale="query_pre_attn_scalar")
DECODERS: dict[str, DecoderArch] = {a.family: a for a in (
    DecoderArch("llama", "Llama 2, Llama 3.x (llama3/linear/yarn/dynamic rope scaling), SmolLM2, TinyLlama"),
    DecoderArch("mistral", "Mistral 7B, Ministral-style dense models (sliding window on every layer)",
                window="all"),
    DecoderArch("qwen2", "Qwen2, Qwen2.5 0.5-7B (q/k/v bias)"),
    DecoderArch("qwen3", "Qwen3 0.6-8B dense (q/k RMSNorm per head)", qk_norm="head"),
    DecoderArch("phi3", "Phi-3, Phi-3.5-mini, Phi-4-mini (fused qkv_proj and gate_up_proj, LongRoPE, partial rotary)",
                qkv=("qkv_proj",), gate_up=("gate_up_proj",), window="all"),
    DecoderArch("gemma", "Gemma 2B/7B (v1)", norm_offset=1.0, embed_scale="sqrt_hidden"),
    DecoderArch("gemma2", "Gemma 2 2B/9B (attention and final logit soft-capping, sandwich norms, "
                "alternating local/global layers)", norms="sandwich", attn_softcap="attn_logit_softcapping",
                final_softcap="final_logit_softcapping", **_GEMMA),
    DecoderArch("gemma3_text", "Gemma 3 1B and the text tower of larger Gemma 3 (q/k norm, local and global rope, "
                "5:1 local/global layers)", norms="sandwich", qk_norm="head", rope="layer_types",
                attn_softcap="attn_logit_softcapping", final_softcap="final_logit_softcapping", **_GEMMA),
    DecoderArch("granite", "IBM Granite 3.x dense (embedding, residual, attention and logit multipliers)",
                scale="attention_multiplier", embed_scale="embedding_multiplier",
                residual_scale="residual_multiplier", logits_divisor="logits_scaling"),
    DecoderArch("olmo2", "OLMo 2 (post-norm blocks, q/k RMSNorm over the whole projection)", norms="post",
                qk_norm="full"),
    DecoderArch("smollm3", "SmolLM3 3B (no rotary on every 4th layer)", rope="no_rope_layers"),
)}

# ---------------------------------------------------------------------------------------------------------------
# Encoders (sequence classification)


@dataclass(frozen=True)
class HeadStage:
    """One linear layer of a classification head, applied to the pooled vector in order.

    ``module``: its PEFT/transformers module path (``classifier.out_proj``), which also
    names its slots (``head.<module>.weight`` [in, out], ``head.<module>.bias``).
    ``source``: ``"adapter"`` stages are slots that every adapter fills (PEFT saves
    them through ``modules_to_save``), with the checkpoint's weights as the default
    when the checkpoint has them; ``"base"`` stages are the checkpoint's weights
    with a LoRA slot (BERT's pooler). ``act``: the activation after it, ``norm``: a
    LayerNorm module after the activation (ModernBERT's head).
    """

    module: str
    source: str = "adapter"
    act: str | None = None
    norm: str | None = None


@dataclass(frozen=True)
class EncoderArch:
    """How one encoder family is laid out: weight names (``{i}`` = layer), attention, head.

    ``proj``: the per-layer projections as (PEFT module path below the layer, role);
    roles are q, k, v (or qkv when fused), o, up (or gate_up: GLU), down.
    ``attention``: ``"mha"`` (absolute positions, key padding mask), ``"deberta"``
    (disentangled relative attention) or ``"rotary"`` (ModernBERT: rotary, local
    windows on some layers). ``positions``: ``"absolute"``, ``"padding_offset"``
    (RoBERTa: counted from ``pad_token_id + 1``) or ``"config"`` (DeBERTa decides
    with ``position_biased_input``). ``norms``: ``"post"`` (BERT) or ``"pre"``.
    """

    family: str
    names: str
    prefix: str                      # the encoder's module path in the *ForSequenceClassification model
    layer: str                       # one layer's path below the prefix, with {i}
    proj: tuple                      # ((module below the layer, role), ...)
    norm1: str                       # the norm around attention (below the layer)
    norm2: str                       # the norm around the MLP
    embeddings: dict                 # word / position / type / norm -> path below the prefix
    head: tuple                      # HeadStage, in order
    attention: str = "mha"
    positions: str = "absolute"
    norms: str = "post"
    act_attr: str = "hidden_act"
    pooling: str = "cls"
    final_norm: str | None = None

    @property
    def adaptable(self) -> dict[str, str]:
        """PEFT module name -> short alias (as the slots describe them)."""
        out = {m: m for m, _ in self.proj}
        out.update({s.module: s.module for s in self.head if s.source == "base"})
        return out

    def bottleneck_modules(self) -> dict[str, str]:
        """Bottleneck point -> the module (``{i}`` = layer) whose output it adapts, in the
        ``*ForSequenceClassification`` model: the attention output and the MLP output projections."""
        roles = {r: m for m, r in self.proj}
        return {"attn_out": f"{self.prefix}{self.layer}{roles['o']}", "mlp_out": f"{self.prefix}{self.layer}{roles['down']}"}


_BERT_LAYER = (("attention.self.query", "q"), ("attention.self.key", "k"), ("attention.self.value", "v"),
               ("attention.output.dense", "o"), ("intermediate.dense", "up"), ("output.dense", "down"))
_BERT_EMB = {"word": "embeddings.word_embeddings", "position": "embeddings.position_embeddings",
             "type": "embeddings.token_type_embeddings", "norm": "embeddings.LayerNorm"}
ENCODERS: dict[str, EncoderArch] = {a.family: a for a in (
    EncoderArch("bert", "BERT, MiniLM (all-MiniLM-L6-v2), other BertModel checkpoints", "bert.", "encoder.layer.{i}.",
                _BERT_LAYER, "attention.output.LayerNorm", "output.LayerNorm", _BERT_EMB,
                (HeadStage("pooler.dense", "base", act="tanh"), HeadStage("classifier"))),
    EncoderArch("roberta", "RoBERTa", "roberta.", "encoder.layer.{i}.", _BERT_LAYER, "attention.output.LayerNorm",
                "output.LayerNorm", _BERT_EMB,
                (HeadStage("classifier.dense", act="tanh"), HeadStage("classifier.out_proj")),
                positions="padding_offset"),
    EncoderArch("xlm-roberta", "XLM-RoBERTa (multilingual)", "roberta.", "encoder.layer.{i}.", _BERT_LAYER,
                "attention.output.LayerNorm", "output.LayerNorm", _BERT_EMB,
                (HeadStage("classifier.dense", act="tanh"), HeadStage("classifier.out_proj")),
                positions="padding_offset"),
    EncoderArch("distilbert", "DistilBERT", "distilbert.", "transformer.layer.{i}.",
                (("attention.q_lin", "q"), ("attention.k_lin", "k"), ("attention.v_lin", "v"),
                 ("attention.out_lin", "o"), ("ffn.lin1", "up"), ("ffn.lin2", "down")),
                "sa_layer_norm", "output_layer_norm",
                {"word": "embeddings.word_embeddings", "position": "embeddings.position_embeddings",
                 "norm": "embeddings.LayerNorm"},
                (HeadStage("pre_classifier", act="relu"), HeadStage("classifier")), act_attr="activation"),
    EncoderArch("deberta-v2", "DeBERTa-v2, DeBERTa-v3 (disentangled relative attention)", "deberta.",
                "encoder.layer.{i}.",
                (("attention.self.query_proj", "q"), ("attention.self.key_proj", "k"),
                 ("attention.self.value_proj", "v"), ("attention.output.dense", "o"), ("intermediate.dense", "up"),
                 ("output.dense", "down")),
                "attention.output.LayerNorm", "output.LayerNorm", _BERT_EMB,
                (HeadStage("pooler.dense", act="pooler_hidden_act"), HeadStage("classifier")),
                attention="deberta", positions="config"),
    EncoderArch("modernbert", "ModernBERT (rotary, alternating local/global attention, GLU)", "model.",
                "layers.{i}.", (("attn.Wqkv", "qkv"), ("attn.Wo", "o"), ("mlp.Wi", "gate_up"), ("mlp.Wo", "down")),
                "attn_norm", "mlp_norm", {"word": "embeddings.tok_embeddings", "norm": "embeddings.norm"},
                (HeadStage("head.dense", "base", act="classifier_activation", norm="head.norm"),
                 HeadStage("classifier")),
                attention="rotary", positions="none", norms="pre", act_attr="hidden_activation",
                pooling="classifier_pooling", final_norm="final_norm"),
)}

# ---------------------------------------------------------------------------------------------------------------
# What is not supported, and what to do instead

# model_type -> the closest thing that works
_WORKAROUNDS = {
    "gemma3": "Gemma 3 4B+ checkpoints are multimodal; export the text model (Gemma3ForCausalLM, model_type "
              "gemma3_text), e.g. google/gemma-3-1b-it",
    "phi": "Phi-2 is not supported; Phi-3.5-mini and Phi-4-mini (phi3) are",
    "phimoe": "mixture-of-experts models are not supported; use a dense model such as Phi-3.5-mini",
    "mixtral": "mixture-of-experts models are not supported; use a dense model such as Mistral 7B",
    "qwen2_moe": "mixture-of-experts models are not supported; use a dense Qwen2.5 or Qwen3 model",
    "qwen3_moe": "mixture-of-experts models are not supported; use a dense Qwen3 model (0.6B-8B)",
    "olmo": "OLMo 1 is not supported; OLMo 2 (olmo2) is",
    "gpt2": "GPT-2-style models are not supported; SmolLM2 (llama) is a small modern decoder",
    "deberta": "DeBERTa v1 is not supported; DeBERTa-v3 (deberta-v2) is",
    "electra": "ELECTRA is not supported; BERT or DeBERTa-v3 discriminators are",
    "albert": "ALBERT is not supported; use BERT, DistilBERT or DeBERTa-v3",
    "camembert": "CamemBERT is not supported as such; XLM-RoBERTa covers French",
    "t5": "encoder-decoder models are not supported; use a decoder (for generation) or an encoder classifier",
    "bart": "encoder-decoder models are not supported; use a decoder (for generation) or an encoder classifier",
}
_GENERIC_WORKAROUND = ("fine-tune a supported base of similar size, or merge the adapter into the base "
                       "(PEFT merge_and_unload) and export it with onnxruntime-genai or optimum, without adapter slots")


def supported() -> dict[str, list[str]]:
    """Supported families per task, for messages and docs/architectures.md."""
    return {"causal-lm": sorted(DECODERS), "classification": sorted(ENCODERS)}


supported_architectures = supported


def describe(config, task: str) -> DecoderArch | EncoderArch:
    """The description for exporting ``config`` as ``task``; raises :class:`ModelError` otherwise.

    Never guesses: an encoder asked for as a decoder (or the reverse), a checkpoint
    whose head is for another task, or an unknown ``model_type`` is refused with
    the supported families and the nearest workaround.
    """
    check_choice(task, TASKS, "task", error=ModelError, hint_flag="--task")
    mtype = str(getattr(config, "model_type", "") or "unknown")
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    if task == "causal-lm":
        if mtype in ENCODERS:
            raise ModelError(f"{mtype} is an encoder: edgepeft exports it as a classifier, not as a text generator",
                             hint="build with --task classification (or with classification adapters)")
        arch = DECODERS.get(mtype)
        if arch is not None:
            cls = [a for a in archs if not a.endswith(("ForCausalLM", "Model", "LMHeadModel"))]
            if cls:
                raise ModelError(f"the checkpoint is a {cls[0]}, not a causal language model: exporting it as a "
                                 "decoder would drop its trained head",
                                 hint=f"export the {mtype} causal-LM base it was fine-tuned from, with the adapter")
            _check_decoder(arch, config)
            return arch
    elif task == "classification":
        arch = ENCODERS.get(mtype)
        if arch is not None:
            _check_encoder(arch, config)
            return arch
        if mtype in DECODERS:
            raise ModelError(f"{mtype} is a decoder: edgepeft exports sequence classifiers from encoders only",
                             hint=f"use an encoder ({', '.join(sorted(ENCODERS))}), or train a causal-LM adapter "
                                  "that answers with the label")
    fams = supported()[task]
    hint = _WORKAROUNDS.get(mtype, _GENERIC_WORKAROUND)
    raise ModelError(f"architecture {mtype!r} is not supported for {task} (supported: {', '.join(fams)})",
                     hint=hint)


def task_of(config) -> str:
    """The task a checkpoint was made for, from its config: "classification" for a
    ``*ForSequenceClassification`` checkpoint or an encoder family, else "causal-lm"."""
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    return "classification" if str(getattr(config, "model_type", "")) in ENCODERS else "causal-lm"


def _refuse(config, what: str, hint: str):
    raise ModelError(f"{config.model_type}: {what} is not supported by the exporter", hint=hint)


_DECODER_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                 "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def decoder_act(arch: DecoderArch, config) -> str:
    name = getattr(config, arch.act_attr, None) or getattr(config, "hidden_act", "silu")
    act = _DECODER_ACTS.get(str(name))
    if act is None:
        _refuse(config, f"activation {name!r}", f"supported activations: {', '.join(sorted(_DECODER_ACTS))}")
    return act


def _check_decoder(arch: DecoderArch, config) -> None:
    if getattr(config, "__dict__", {}).get("_heterogeneity_spec") is not None:
        _refuse(config, "a heterogeneous config (per-layer sizes)", "use a model whose layers share one shape")
    decoder_act(arch, config)
    types = getattr(config, "layer_types", None) or []
    odd = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if odd:
        _refuse(config, f"attention layer type(s) {', '.join(odd)}", "use a model with full or sliding-window layers")
    if getattr(config, "use_bidirectional_attention", False):
        _refuse(config, "bidirectional attention (an embedding model)", "export a causal decoder")


_ENCODER_ACTS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "tanh", "silu")


def _check_encoder(arch: EncoderArch, config) -> None:
    act = getattr(config, arch.act_attr, None) or "gelu"
    if act not in _ENCODER_ACTS:
        _refuse(config, f"activation {act!r}", f"supported: {', '.join(_ENCODER_ACTS)}")
    if getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        _refuse(config, f"position_embedding_type {config.position_embedding_type!r}",
                "use a checkpoint with absolute position embeddings")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        _refuse(config, "a decoder / cross-attention configuration", "use the plain encoder checkpoint")
    if arch.attention == "deberta":
        if getattr(config, "conv_kernel_size", 0):
            _refuse(config, "the convolution layer of DeBERTa-v2 xlarge/xxlarge", "use DeBERTa-v3 (base/small/xsmall)")
        emb = getattr(config, "embedding_size", None)
        if emb is not None and emb != config.hidden_size:
            _refuse(config, "an embedding size different from the hidden size", "use a standard DeBERTa-v3 checkpoint")
        if config.relative_attention:
            pos = [str(p) for p in (getattr(config, "pos_att_type", None) or [])]
            if set(pos) - {"c2p", "p2c"}:
                _refuse(config, f"pos_att_type {pos}", "DeBERTa-v3 uses c2p and p2c")
            if not getattr(config, "share_att_key", False) and pos:
                _refuse(config, "separate positional key projections (share_att_key=false)",
                        "use DeBERTa-v3, which shares them")
    if arch.attention == "rotary" and str(getattr(config, "classifier_pooling", "cls")) not in ("cls", "mean"):
        _refuse(config, f"classifier_pooling {config.classifier_pooling!r}", "use cls or mean pooling")


__all__ = ["DecoderArch", "EncoderArch", "HeadStage", "DECODERS", "ENCODERS", "describe", "supported", "task_of",
           "supported_architectures", "decoder_act"]
