"""Rotary position tables for the decoder graph, read from the model's own rotary module.

Every rope flavour transformers implements (default, linear, llama3, yarn, dynamic
NTK, LongRoPE, partial rotary, one table per layer type as in Gemma 3) ends in the
same two numbers per table: inverse frequencies and a factor on cos/sin. Taking
them from the loaded ``rotary_emb`` module, instead of re-deriving each formula,
keeps the graph exactly on what PyTorch computes. Two flavours change with the
sequence length: LongRoPE switches to its long factors once a sequence passes the
original context (the graph selects the table per run, as transformers does), and
dynamic NTK rescales past ``max_position_embeddings`` (refused: cap the context).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError


@dataclass(frozen=True)
class RopeTable:
    """cos/sin = cos/sin(position * inv_freq) * scaling; ``long`` replaces both past ``switch_above`` tokens."""

    inv_freq: np.ndarray            # [rotary_dim / 2]
    scaling: float = 1.0
    long_inv_freq: np.ndarray | None = None
    switch_above: int = 0

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.shape[0])


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().astype(np.float32)


def rope_tables(model, keys: set[str], max_context: int) -> dict[str, RopeTable]:
    """One :class:`RopeTable` per key ("default", or a ``config.layer_types`` entry).

    Raises :class:`ModelError` when the model has no rotary module or its rope
    changes within ``max_context`` in a way the graph does not follow.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    config = model.config
    if rot is None:
        raise ModelError(f"{config.model_type}: the model has no rotary embedding module",
                         hint="the decoder exporter needs a rotary (RoPE) decoder")
    out = {}
    for key in sorted(keys):
        per_type = key != "default"
        prefix = f"{key}_" if per_type else ""
        inv = getattr(rot, f"{prefix}original_inv_freq", None)
        if inv is None:
            inv = getattr(rot, f"{prefix}inv_freq")
        scaling = float(getattr(rot, f"{prefix}attention_scaling", 1.0))
        rope_type = rot.rope_type[key] if per_type else rot.rope_type
        params = config.rope_parameters[key] if per_type else config.rope_parameters
        table = RopeTable(_np(inv), scaling)
        if table.rotary_dim % 16:
            raise ModelError(f"{config.model_type}: a rotary dimension of {table.rotary_dim} is not a multiple of 16, "
                             "which GroupQueryAttention needs", hint="every published Phi/Llama/Gemma/Qwen size meets "
                             "this; check head_dim and partial_rotary_factor")
        if rope_type == "longrope":
            orig = int(params.get("original_max_position_embeddings") or config.max_position_embeddings)
            if max_context > orig:
                long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=orig + 1,
                                                             **({"layer_type": key} if per_type else {}))
                table = RopeTable(table.inv_freq, scaling, _np(long_inv), orig)
        elif rope_type == "dynamic" and max_context > config.max_position_embeddings:
            raise ModelError(f"dynamic NTK rope rescales past {config.max_position_embeddings} tokens, and the "
                             f"export asks for a context of {max_context}",
                             hint=f"export with a context <= {config.max_position_embeddings}")
        out[key] = table
    return out


def rope_source(meta):
    """A stand-in for the model that :func:`rope_tables` reads: the model's own rotary module, built
    alone on the CPU from the config of ``meta`` (the model instantiated on the meta device, no weights),
    so a streamed export needs no loaded model. Returns None when the module cannot be built that way."""
    from types import SimpleNamespace

    try:
        rot = getattr(getattr(meta, "model", None), "rotary_emb", None)
        if rot is None:
            return None
        rot = type(rot)(config=meta.config)
    except (TypeError, ValueError, AttributeError, RuntimeError):
        return None
    return SimpleNamespace(model=SimpleNamespace(rotary_emb=rot), config=meta.config)


def rope_subgraph(gb, table: RopeTable, max_context: int, total_len: str | None = None):
    """cos/sin caches [max_context, rotary_dim/2] as constant subgraphs over ``inv_freq``.

    ONNX Runtime folds them once at load, so the file stores the frequencies
    instead of two max_context x rotary_dim/2 tables (1 MiB at 4096 positions).
    With a LongRoPE ``long`` table, ``total_len`` (int32 scalar) picks per run.
    """
    def tables(inv_freq, tag):
        pos = gb.op("Range", [gb.const(np.array(0, np.float32)), gb.const(np.array(max_context, np.float32)),
                              gb.const(np.array(1, np.float32))], hint="rope_pos")
        pos = gb.op("Unsqueeze", [pos, gb.const(np.array([1], np.int64))], hint="rope_pos_col")
        freqs = gb.op("Mul", [pos, gb.const(np.asarray(inv_freq, np.float32)[None, :], gb.fresh(f"rope.{tag}"))],
                      hint="rope_f")
        cos, sin = gb.op("Cos", [freqs], hint="rope_cos"), gb.op("Sin", [freqs], hint="rope_sin")
        if table.scaling != 1.0:
            sc = gb.const(np.array(table.scaling, np.float32))
            cos, sin = gb.op("Mul", [cos, sc]), gb.op("Mul", [sin, sc])
        return cos, sin

    cos, sin = tables(table.inv_freq, "inv_freq")
    if table.long_inv_freq is None:
        return cos, sin
    lcos, lsin = tables(table.long_inv_freq, "long_inv_freq")
    use_long = gb.op("Greater", [total_len, gb.const(np.array(table.switch_above, np.int32))], hint="rope_long")
    return gb.op("Where", [use_long, lcos, cos], hint="rope_cos"), gb.op("Where", [use_long, lsin, sin], hint="rope_sin")
