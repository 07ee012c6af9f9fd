"""The exporter's entry point: a base model (+ optional merged adapter) -> model.onnx + model facts.

``export_model`` is what the bundle builder calls; ``write_adapter`` (in
:mod:`.adapters`) turns each PEFT directory into a file for the exported slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._extras import require
from ..contracts.fields import check_choice
from ..contracts.manifest import TASKS
from ..errors import ModelError, UsageError
from .quantize import WeightQuant
from .slots import check_rank

MODEL_FILE = "model.onnx"


@dataclass
class ExportResult:
    """Files written (relative names -> absolute paths), manifest["model"] facts, base fingerprint."""

    out_dir: Path
    files: dict = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def model_path(self) -> Path:
        return self.files[MODEL_FILE]


def _state_dict_numpy(model) -> dict:
    return {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}


def read_config(src):
    """The base's config, read without loading weights; raises :class:`ModelError` for a config transformers
    cannot read (an unknown model type included), naming what the exporter supports."""
    from transformers import AutoConfig

    from ..models.arch import supported

    try:
        return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    except OSError as exc:  # missing files, no network for a hub id
        raise ModelError(f"cannot read the config of base {src.path}: {str(exc).splitlines()[0][:300]}",
                         hint="check --base; hub ids need internet access") from exc
    except (ValueError, KeyError) as exc:  # a model type transformers does not know, a malformed config
        fams = supported()
        raise ModelError(f"cannot read the config of base {src.path}: {str(exc).splitlines()[0][:300]}",
                         hint=f"edgepeft exports decoders ({', '.join(fams['causal-lm'])}) and encoder classifiers "
                              f"({', '.join(fams['classification'])})") from exc


def export_model(source=None, out_dir=".", *, task: str = "causal-lm", quant="int4", slot_rank: int = 16,
                 target_modules="all-linear", merge_adapter=None, max_context: int | None = None,
                 bottleneck: dict | None = None, progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``source`` (a BaseSource, a model dir/hub id/.gguf, or None for the default) to ``out_dir``.

    - ``task``: "causal-lm" (a decoder of :data:`.arch.DECODERS`, with KV cache) or
      "classification" (an encoder of :data:`.arch.ENCODERS` whose head is a slot).
    - ``quant``: "int4" | "int8" | "fp16" | "fp32", a WeightQuant, or a spec QuantSpec.
    - ``slot_rank``: the LoRA rank every adapter of the bundle is padded to.
    - ``target_modules``: projections that get slots ("all-linear" or PEFT names).
    - ``merge_adapter``: a PEFT dir merged into the weights; the graph then has no slots.
    - ``bottleneck``: ``{"points": ["attn_out", "mlp_out"], "activation": "relu"}`` adds bottleneck
      adapter slots (empty: the identity) at those points; None: none.

    The architecture is checked on the config before any weights load. Raises
    ModelError (base cannot be loaded / unsupported architecture / wrong task),
    UsageError (bad options), AdapterError (merge adapter does not fit), BuildError (too big).
    """
    require("torch", "transformers", "onnx", "onnxruntime", feature="exporting a model")
    from ..models.arch import describe
    from ..models.base import BaseSource, load_model, resolve_base, weights_fingerprint
    from .onnx_builder import save_model

    say = progress or (lambda msg: None)
    check_choice(task, TASKS, "task")
    wq = WeightQuant.coerce(quant)
    slot_rank = check_rank(slot_rank)
    bottleneck = check_bottleneck(bottleneck)
    src = source if isinstance(source, BaseSource) else resolve_base(None if source is None else str(source), task=task)
    config = read_config(src)
    arch = describe(config, task)
    lazy = _streamable(src, config, task, wq, merge_adapter)
    if lazy is not None:  # one weight in memory at a time (:mod:`..models.lazy`)
        say(f"streaming the weights of {src.name} ({arch.family})")
        model, sd, expected = lazy
        fingerprint = weights_fingerprint(sd)
        missing = _missing_modules(arch, {"missing_keys": sorted(expected - set(sd))})
    else:
        say(f"loading {src.name} ({arch.family})")
        model, loading = load_model(src, task=task, quiet=True, loading_info=True)
        config = model.config
        arch = describe(config, task)
        fingerprint = weights_fingerprint(model.state_dict())
        sd = _state_dict_numpy(model)
        missing = _missing_modules(arch, loading)
    lora = None
    if merge_adapter is not None:
        from .merge import merge_into

        say(f"merging {Path(merge_adapter).name}")
        sd, lora = merge_into(sd, merge_adapter, task=task)
        missing -= {k.rsplit(".", 1)[0] for k in lora.saved}
    out_dir = Path(out_dir)
    blocks = gguf = _gguf_blocks(src, config, sd, wq, task, say)
    if wq.kind == "nf4":
        if task != "causal-lm":
            raise UsageError("--quant nf4 is for decoders (the QLoRA base); classifiers export as int8 or fp32",
                             hint="use --quant int8")
        blocks = _nf4_blocks(sd, gguf, say)
    say(f"building the {wq.kind} graph")
    if task == "causal-lm":
        from .decoder_graph import build_decoder, plan_decoder
        from .rope import rope_tables

        plan = plan_decoder(arch, config)
        ctx = int(max_context or min(config.max_position_embeddings, 4096))
        plan.rope = rope_tables(model, plan.rope_keys, ctx)
        spool = out_dir / f".{MODEL_FILE}.spool"
        try:
            graph, info = build_decoder(plan, sd, quant=wq, target_modules=target_modules, max_context=ctx,
                                        slots=merge_adapter is None, bottleneck=bottleneck, blocks=blocks, spool=spool,
                                        slot_rank=slot_rank)
        except BaseException:
            spool.unlink(missing_ok=True)
            raise
        dims = info["dims"]
        model_info = {
            "architecture": arch.family, "task": task, "model_type": config.model_type,
            "num_layers": dims["layers"], "num_heads": dims["heads"], "num_kv_heads": dims["kv_heads"],
            "head_dim": dims["head_dim"], "hidden_size": dims["hidden"], "vocab_size": dims["vocab"],
            "max_context": ctx, "attention": plan.describe(),
            "io": {"inputs": ["input_ids", "attention_mask", "past_key_values.{i}.key", "past_key_values.{i}.value"],
                   "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
                   "kv_layout": "BNSH", "kv_dtype": "float32", "past_present_share_buffer": True},
        }
    else:
        from .encoder_graph import build_encoder

        extra = _encoder_extra(arch, model, missing)
        head_present = frozenset(s.module for s in arch.head if s.module not in missing)
        graph, info = build_encoder(arch, config, sd, quant=wq, target_modules=target_modules,
                                    slots=merge_adapter is None, merged_head=merge_adapter is not None,
                                    head_present=head_present, extra=extra, bottleneck=bottleneck)
        dims = info["dims"]
        ctx = int(dims["max_positions"])
        model_info = {
            "architecture": arch.family, "task": task, "model_type": config.model_type,
            "num_layers": dims["layers"], "num_heads": dims["heads"], "head_dim": dims["hidden"] // dims["heads"],
            "hidden_size": dims["hidden"], "vocab_size": dims["vocab"], "max_context": ctx, "head": info["head"],
            "io": {"inputs": [i.name for i in graph.graph.input if i.name in _ENCODER_INPUTS], "outputs": ["logits"]},
        }
        from .adapters import config_labels, head_labels

        base_labels = config_labels(config)
        if base_labels:  # names for a plain PEFT classifier that carries none (issue 26)
            model_info["base_labels"] = base_labels
        final = arch.head[-1].module + ".weight"
        if lora is not None:
            model_info["labels"] = head_labels(lora.path, int(sd[final].shape[0]), None, fallback=base_labels)
        elif info["head"] and info["head"][-1]["default"]:  # a fine-tuned checkpoint: its own head serves
            model_info["labels"] = head_labels(Path(src.path), int(sd[final].shape[0]), None, fallback=base_labels)
    merged = merge_adapter is not None
    model_info.update({
        "dims": dims,
        "target_modules": [] if merged else _targets(info),
        "slots": info["slots"],
        "slot_shapes": {k: _concrete(v, slot_rank) for k, v in info["slots"].items()},
        "slot_rank": 0 if merged else slot_rank,
        "slot_dtypes": info.get("slot_dtypes", {}),  # slots that are not float32 (int8 LoRA B)
        "merged_adapter": Path(merge_adapter).name if merged else None,
        "quant": wq.to_dict() | _carried_facts(wq, gguf, blocks, info),
    })
    if info.get("bottleneck"):
        model_info["bottleneck"] = info["bottleneck"]
    say("writing model.onnx")
    path = out_dir / MODEL_FILE
    spool = out_dir / f".{MODEL_FILE}.spool"
    (out_dir / f"{MODEL_FILE}.data").unlink(missing_ok=True)  # an earlier export's, here: not this graph's
    try:
        size = save_model(graph, path, spool=spool if spool.is_file() else None)
    finally:
        spool.unlink(missing_ok=True)
    model_info["model_bytes"] = size
    files = {MODEL_FILE: path}
    data = out_dir / f"{MODEL_FILE}.data"
    if data.is_file():  # over 2 GiB: ONNX external data beside the graph
        files[data.name] = data
    return ExportResult(out_dir=out_dir, files=files, model_info=model_info, fingerprint=fingerprint)


_ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _streamable(src, config, task: str, wq: WeightQuant, merge_adapter):
    """``(rope source, lazy weights, the weight names the model has)`` when the export can stream the base's safetensors one weight at a
    time, else None (the model is loaded as before): a decoder without a merged adapter, an nf4 base
    (bitsandbytes quantizes a loaded model) or a GGUF to match against."""
    if task != "causal-lm" or merge_adapter is not None or wq.kind == "nf4" or src.is_hub or src.gguf_file:
        return None
    from ..models.base import gguf_origin
    from ..models.lazy import lazy_weights

    if (wq.bits or wq.kind == "nf4") and wq.gguf != "requantize" and gguf_origin(src) is not None:
        return None
    sd = lazy_weights(src.path, config)
    if sd is None or "model.embed_tokens.weight" not in sd:
        return None
    import torch
    from transformers import AutoModelForCausalLM

    from .rope import rope_source

    try:
        with torch.device("meta"):  # the model's structure without weights: its rotary module, its weight names
            meta = AutoModelForCausalLM.from_config(config)
    except (TypeError, ValueError, AttributeError, RuntimeError):
        return None
    rope = rope_source(meta)
    return None if rope is None else (rope, sd, set(meta.state_dict()))


def _gguf_blocks(src, config, sd: dict, wq: WeightQuant, task: str, say):
    """The base's GGUF blocks to carry into an int4/int8/nf4 decoder graph (``gguf`` "keep" or "layers";
    nf4 takes only the embedding from them), or None."""
    if not (wq.bits or wq.kind == "nf4") or wq.gguf == "requantize" or task != "causal-lm":
        return None
    from ..models.base import gguf_origin

    path = gguf_origin(src)
    if path is None:
        return None
    from .gguf_blocks import load_gguf_blocks

    say(f"reading the quantized blocks of {path.name}")
    blocks = load_gguf_blocks(path, config, sd)
    if blocks.skipped:
        why = sorted(set(blocks.skipped.values()))
        say(f"{len(blocks.weights)} GGUF weights carried as they are; {len(blocks.skipped)} re-quantized ({'; '.join(why)})")
    return blocks


def _carried_facts(wq: WeightQuant, gguf, used, info: dict) -> dict:
    """manifest["model"]["quant"] additions: which GGUF blocks went in as they are; nf4's layout.
    ``used``: the weights the graph was given (GGUF blocks, or nf4's mix of NF4 and GGUF blocks)."""
    from .gguf_blocks import BlockWeight

    carried = [n for n in info.get("carried", []) if isinstance(used.get(n), BlockWeight)] if used else []
    out = {"gguf_blocks": gguf.describe(carried)} if gguf is not None and carried else {}
    if wq.kind == "nf4":
        out.get("gguf_blocks", {}).pop("requantized", None)  # the layers are NF4 by design, not listed
        out["nf4"] = {"op": "MatMulBnb4", "block_size": 64, "double_quant": True, "quantized_by": "bitsandbytes",
                      "embedding": "GGUF blocks" if carried else "int8"}
    return out


def _nf4_blocks(sd: dict, blocks, say) -> dict:
    """nf4: the layers' linear weights quantized by bitsandbytes (what QLoRA trains against), plus any GGUF
    block weight of the embedding; ``{HF name: weight}``."""
    from .nf4 import nf4_weights

    names = [k for k, v in sd.items() if k.startswith("model.layers.") and k.endswith(".weight") and np.ndim(v) == 2]
    say(f"quantizing {len(names)} layer weights to NF4 with bitsandbytes (the QLoRA base)")
    out = nf4_weights(sd, names)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if blocks is not None and blocks.get(k) is not None:
            out[k] = blocks.get(k)
    return out


def _missing_modules(arch, loading: dict | None) -> set:
    """Modules whose weights the checkpoint lacks (transformers initialized them at random).

    Only a classifier's head may be missing (adapters bring it; the encoder writer checks each stage);
    anything else is refused, since a graph of random weights would be a wrong guess.
    """
    keys = sorted((loading or {}).get("missing_keys", ()))
    heads = {s.module for s in getattr(arch, "head", ())}
    prefix = getattr(arch, "prefix", "")
    modules = {k.rsplit(".", 1)[0] for k in keys}
    stray = [k for k in keys if k.rsplit(".", 1)[0].removeprefix(prefix) not in heads]
    if stray:
        raise ModelError(f"the checkpoint lacks {len(stray)} weight(s) of a {arch.family} model "
                         f"({', '.join(stray[:4])}{', ...' if len(stray) > 4 else ''}); they would be random",
                         hint="the checkpoint is incomplete or not what its config.json says; re-download or "
                              "re-save it")
    return {m.removeprefix(prefix) for m in modules}


def _encoder_extra(arch, model, missing: set) -> dict:
    """What the rotary and DeBERTa attention kinds take from the loaded model (rope, relative-position tables)."""
    config = model.config
    extra = {"missing": missing}
    if arch.attention == "rotary":
        from .rope import rope_tables

        extra["rope"] = rope_tables(model, set(config.layer_types), int(config.max_position_embeddings))
    elif arch.attention == "deberta" and config.relative_attention:
        import torch
        from transformers.models.deberta_v2 import modeling_deberta_v2 as dv2

        enc = model.deberta.encoder
        buckets, max_rel = int(enc.position_buckets), int(enc.max_relative_positions)
        span = buckets if buckets > 0 else max_rel
        n = int(config.max_position_embeddings)
        d = torch.arange(-(n - 1), n, dtype=torch.long)
        rel = dv2.make_log_bucket_position(d, buckets, max_rel) if buckets > 0 and max_rel > 0 else d
        rel = rel.to(torch.long)
        extra.update(att_span=span, rel_offset=n - 1, rel_norm="layer_norm" in enc.norm_rel_ebd,
                     rel_embeddings=enc.rel_embeddings.weight.detach().float().numpy(),
                     c2p_table=torch.clamp(rel + span, 0, 2 * span - 1).numpy().astype(np.int64),
                     p2c_table=torch.clamp(-rel + span, 0, 2 * span - 1).numpy().astype(np.int64))
    return extra


def _targets(info: dict) -> list:
    names = []
    for g in info["groups"].values():
        names += [m[0] for m in g["modules"]]
    return names


def check_bottleneck(bottleneck: dict | None) -> dict | None:
    """Validate the ``bottleneck`` option of :func:`export_model`; raises :class:`UsageError`."""
    from ..contracts.methods import ACTIVATIONS, BOTTLENECK_POINTS

    if not bottleneck:
        return None
    points = [p for p in BOTTLENECK_POINTS if p in set(bottleneck.get("points") or ())]
    odd = sorted(set(bottleneck.get("points") or ()) - set(BOTTLENECK_POINTS))
    act = bottleneck.get("activation", "relu")
    if odd or not points:
        raise UsageError(f"bottleneck points {sorted(bottleneck.get('points') or [])} are not among "
                         f"{', '.join(BOTTLENECK_POINTS)}", hint="use attn_out and/or mlp_out (houlsby: both)")
    check_choice(act, ACTIVATIONS, "bottleneck activation", hint="use the --non-linearity the adapters were trained with")
    return {"points": points, "activation": act}


def _concrete(shape: list, rank: int) -> list:
    out = []
    for d in shape:
        if d == "bottleneck":
            out.append(0)  # each bottleneck adapter brings its own width
        elif isinstance(d, str) and d.endswith("rank"):
            m = d.split("*")[0]
            out.append(rank * (int(m) if m != "rank" else 1))
        else:
            out.append(d)
    return out


def base_fingerprint(source=None, *, task: str = "causal-lm") -> str:
    """The fingerprint of a base's weights (edgepeft.models.base.weights_fingerprint), loading it once."""
    from ..models.base import BaseSource, load_model, resolve_base, weights_fingerprint

    src = source if isinstance(source, BaseSource) else resolve_base(None if source is None else str(source), task=task)
    return weights_fingerprint(load_model(src, task=task).state_dict())


__all__ = ["ExportResult", "export_model", "base_fingerprint"]
