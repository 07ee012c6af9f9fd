"""Adapter slots: which projections get LoRA inputs, how they are packed and named.

Projections that share an input are packed into one *group* (q|k|v, gate|up):
the graph computes ``y = x @ W + (x @ A) @ B`` once per group, with
``A = [A_q | A_k | A_v]`` of shape [in, m*rank] and ``B`` block-diagonal of
shape [m*rank, out_q+out_k+out_v] (each module's rows write only its own output
columns). That is 2 small MatMuls and an Add per group instead of per module.

Slot defaults are EMPTY (rank dim 0): the rank dim is symbolic in the graph,
so an adapter of rank r overrides them, and without an adapter the LoRA path
is two zero-FLOP MatMuls and an Add of zeros.

For gate|up, whose block-diagonal B is half zeros, each module gets its own B slot
(``split_b``: ``layers.{i}.gate_up.lora_B.gate_proj`` [rank, inter]) once those zeros
outweigh what packing saves (:func:`pack_gate_up`): packed, each layer runs one MatMul, one
Add and the Split of the LoRA activations fewer.

int8 B slots (``b_int8``, decoders with int4/int8 weights): B is stored int8 and
multiplied by ``DynamicQuantizeMatMul``, which reads a quarter of fp32's bytes per
token. Each B row's scale is folded into the matching column of A (the adapter
writer does it, :func:`.adapters.fold_b_int8`), so the op needs no per-row scale:
``x @ (A * s) @ round(B / s)``. Their defaults cannot be empty: ``DynamicQuantizeMatMul``
leaves its output unwritten for an empty input (whatever the arena held comes out), so
they hold one zero column (A) / row (B) per module, stored as sparse initializers with
no values (a shape, no bytes; dense zeros would add 0.8 MB to SmolLM2's graph).

Per-row slots (decoders and encoders; what lets one run serve rows with different adapters): the LoRA
and bottleneck slots (an encoder's head slots too) are declared without a shape, so besides an adapter's own tensors ([in, m*rank]
...) a run may bind one tensor per row, stacked ([batch, in, m*rank], [batch, m*rank, out],
[batch, 1, size] for a bias ...): the graph's MatMuls and Adds broadcast over the batch, so row b
uses its own adapter (zeros for a row without one) and the graph needs no node more than before (the
encoder's head: two, an Unsqueeze and a Squeeze, so that a [batch, hidden, labels] weight applies per row).
The graph's metadata ``edgepeft.row_slots`` says so (:mod:`edgepeft.runtime.batching`).

Slot names: ``layers.{i}.{group}.lora_A`` / ``.lora_B`` (``pooler.lora_A`` for the
encoder's layer-less pooler); the encoder's head:
``head.classifier.weight`` [hidden, num_labels] and ``head.classifier.bias``.
In manifest["model"]["slots"] the rank dim reads "rank" or "m*rank".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contracts.fields import check_choice
from ..errors import UsageError


@dataclass(frozen=True)
class Module:
    """One adaptable projection: its PEFT name (the module path's last part) and output columns."""

    peft_name: str   # e.g. "q_proj" or "attention.self.query"
    out_offset: int
    out_size: int


@dataclass(frozen=True)
class Group:
    """Projections packed behind one pair of slots in one layer."""

    key: str              # e.g. "qkv"
    in_dim: int
    out_dim: int          # all projections of the group, targeted or not
    modules: tuple        # of Module, targeted ones only, in packing order
    split_b: bool = False  # one B slot per module (no block-diagonal zeros), see emit_lora_split

    def slot_names(self, layer: int | None) -> tuple[str, str]:
        """Slot input names; ``layer=None`` for layer-less groups (the encoder's pooler)."""
        prefix = self.key if layer is None else f"layers.{layer}.{self.key}"
        return f"{prefix}.lora_A", f"{prefix}.lora_B"

    def b_slot_name(self, layer: int | None, module: Module) -> str:
        """The B slot of one module in a ``split_b`` group, e.g. ``layers.3.gate_up.lora_B.up_proj``."""
        return f"{self.slot_names(layer)[1]}.{module.peft_name}"


def rank_expr(m: int) -> str:
    return "rank" if m == 1 else f"{m}*rank"


def names_module(target: str, module: str, alias: str | None = None) -> bool:
    """Whether a PEFT ``target_modules`` entry names ``module`` (a module path below the layer, e.g.
    ``attention.self.key``): the path, its short alias, a dotted suffix (``key``), as PEFT matches, or one
    layer's full path (``deberta.encoder.layer.0.attention.self.key``: what PEFT saves for "all-linear")."""
    if target in (module, alias) or module.endswith("." + target):
        return True
    return target.endswith("." + module) and target[:-len(module) - 1].rpartition(".")[2].isdigit()


def missing_targets(targets, modules) -> list[str]:
    """The entries of ``targets`` that name none of ``modules`` (the slots a bundle has), by
    :func:`names_module`: the one rule ``build`` and ``update create`` both use."""
    return sorted(t for t in targets if not any(names_module(t, m) for m in modules))


def resolve_targets(target_modules, known: dict[str, str]) -> list[str]:
    """Turn target_modules ("all-linear", a list of PEFT names or suffixes) into PEFT names.

    ``known`` maps each adaptable PEFT name to its short alias. Raises
    :class:`UsageError` for a name the architecture does not have.
    """
    if target_modules is None or target_modules in ("all-linear", "all", ["all-linear"]):
        return list(known)
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    out = []
    for t in target_modules:
        hits = [k for k, alias in known.items() if names_module(t, k, alias)]
        if not hits:
            raise UsageError(f"target module {t!r} is not an adaptable projection of this model",
                             hint=f"choose from {', '.join(known)} or 'all-linear'")
        out += [h for h in hits if h not in out]
    return [k for k in known if k in out]


B_SCALE = "lora.b_scale"  # the scalar 1.0 every int8 B slot's DynamicQuantizeMatMul takes
ROW_SLOTS_META = "edgepeft.row_slots"  # graph metadata: its slots take per-row tensors (see the module docstring)


def slot_shape(shape: list, row_slots: bool) -> list | None:
    """A slot's declared shape: none with ``row_slots`` (per-row tensors of another rank may be bound)."""
    return None if row_slots else shape


def _a_slot(gb, group: Group, layer, b_int8: bool, row_slots: bool = False) -> str:
    """The group's A slot [in, m*rank]: empty by default, or one zero column per module with int8 B."""
    m = len(group.modules)
    a_name = group.slot_names(layer)[0]
    gb.slot(a_name, np.zeros((group.in_dim, m if b_int8 else 0), np.float32),
            slot_shape([group.in_dim, f"{group.key}_rank"], row_slots), [group.in_dim, rank_expr(m)])
    return a_name


def _b_times(gb, t: str, b_name: str, rows: int, cols: int, sym: str, described: str, b_int8: bool, hint: str,
             row_slots: bool = False):
    """``t @ B`` for a B slot [rank rows, cols]: fp32 MatMul (empty default), or int8 B with
    DynamicQuantizeMatMul (``rows`` zero rows by default)."""
    if not b_int8:
        gb.slot(b_name, np.zeros((0, cols), np.float32), slot_shape([sym, cols], row_slots), [described, cols])
        return gb.op("MatMul", [t, b_name], hint=hint)
    gb.slot(b_name, np.zeros((rows, cols), np.int8), slot_shape([sym, cols], row_slots), [described, cols])
    return gb.ms("DynamicQuantizeMatMul", [t, b_name, gb.shared(B_SCALE, np.array(1.0, np.float32))], hint=hint)


def emit_lora(gb, x: str, y: str, group: Group, layer: int, b_int8: bool = False, row_slots: bool = False) -> str:
    """Add the LoRA path of ``group`` to ``y`` (the base projection of ``x``); returns the sum.
    ``row_slots``: declare the slots without a shape (see the module docstring)."""
    if not group.modules:
        return y
    m = len(group.modules)
    a_name = _a_slot(gb, group, layer, b_int8, row_slots)
    t = gb.op("MatMul", [x, a_name], hint=f"l{layer}_{group.key}_loraA")
    d = _b_times(gb, t, group.slot_names(layer)[1], m, group.out_dim, f"{group.key}_rank", rank_expr(m), b_int8,
                 f"l{layer}_{group.key}_loraB", row_slots)
    return gb.op("Add", [y, d], hint=f"l{layer}_{group.key}_lora")


def emit_lora_split(gb, x: str, outs: dict, group: Group, layer: int, b_int8: bool = False,
                    row_slots: bool = False) -> dict:
    """LoRA for a ``split_b`` group whose base output is already split per projection.

    ``outs`` maps each projection's PEFT name to its base output; one packed
    ``x @ A`` feeds a per-module ``t_j @ B_j``. Used for gate|up, whose
    block-diagonal B would be half zeros: per-module B slots cut the bytes an
    adapter reads per token (and its file) by ~20%. Returns the updated map.
    """
    if not group.modules:
        return outs
    m = len(group.modules)
    a_name = _a_slot(gb, group, layer, b_int8, row_slots)
    t = gb.op("MatMul", [x, a_name], hint=f"l{layer}_{group.key}_loraA")
    parts = gb.op("Split", [t], outputs=m, axis=-1, hint="lora_split") if m > 1 else [t]
    out = dict(outs)
    for j, mod in enumerate(group.modules):
        d = _b_times(gb, parts[j], group.b_slot_name(layer, mod), 1, mod.out_size, f"{group.key}_rank_1", "rank",
                     b_int8, f"l{layer}_{group.key}_loraB", row_slots)
        out[mod.peft_name] = gb.op("Add", [out[mod.peft_name], d], hint=f"l{layer}_{group.key}_lora")
    return out


def groups_info(groups: list[Group]) -> dict:
    """What the adapter writer needs about a layer's groups (JSON-friendly)."""
    return {g.key: {"in_dim": g.in_dim, "out_dim": g.out_dim, "split_b": g.split_b,
                    "modules": [[m.peft_name, m.out_offset, m.out_size] for m in g.modules]}
            for g in groups if g.modules}


PACK_GATE_UP_MAX_ZEROS = 256 * 1024  # bytes of fp32 zeros per layer; docs/measured-defaults.md


def pack_gate_up(inter: int, slot_rank: int | None) -> bool:
    """Whether a decoder's gate|up group gets one block-diagonal B slot rather than one per module.

    Packed, each layer runs three slot nodes fewer (a B MatMul, an Add and the Split of the LoRA
    activations), which is measurable where a token's kernels are short; the price is the block's zeros,
    2 x rank x inter fp32 per layer in every served adapter (also read per token). So it packs while
    those zeros, at the slot rank, stay under ``PACK_GATE_UP_MAX_ZEROS`` (SmolLM2 at rank 8 or 16: packed;
    a Llama-3.2-1B shape at rank 16: split).
    """
    return slot_rank is not None and 2 * int(slot_rank) * int(inter) * 4 <= PACK_GATE_UP_MAX_ZEROS


def check_rank(slot_rank) -> int:
    if not isinstance(slot_rank, int) or slot_rank < 1 or slot_rank > 1024:
        raise UsageError(f"slot rank {slot_rank!r} is not an integer in 1..1024",
                         hint="pass the largest LoRA rank the bundle must accept, e.g. 16")
    return slot_rank


def emit_bottleneck(gb, h: str, point: str, layer: int, dim: int, activation: str, row_slots: bool = False) -> str:
    """A bottleneck adapter slot on ``h`` (a block's output [.., dim]): ``h + act(h @ D + d) @ U + u``.

    Slots (:func:`edgepeft.contracts.methods.bottleneck_names`): ``down.weight`` [dim, size],
    ``down.bias`` [size], ``up.weight`` [size, dim], ``up.bias`` [dim]. The defaults (size 0,
    ``up.bias`` zeros) make the point the identity; ``size`` is symbolic, so each adapter keeps
    its own width. ``row_slots``: declare the slots without a shape (see the module docstring). Returns
    the adapted output.
    """
    from ..contracts.methods import ACTIVATIONS, bottleneck_names

    names = bottleneck_names(point, layer)
    sym = f"{point}_bottleneck"  # one symbol per point: ORT plans buffers as if equal symbols were equal sizes
    gb.slot(names["down.weight"], np.zeros((dim, 0), np.float32), slot_shape([dim, sym], row_slots), [dim, "bottleneck"])
    gb.slot(names["down.bias"], np.zeros((0,), np.float32), slot_shape([sym], row_slots), ["bottleneck"])
    gb.slot(names["up.weight"], np.zeros((0, dim), np.float32), slot_shape([sym, dim], row_slots), ["bottleneck", dim])
    gb.slot(names["up.bias"], np.zeros((dim,), np.float32), slot_shape([dim], row_slots), [dim])
    check_choice(activation, ACTIVATIONS, "bottleneck activation",
                 hint="train the adapter with --non-linearity relu, silu or gelu")
    tag = f"l{layer}_{point}_bneck"
    z = gb.op("Add", [gb.op("MatMul", [h, names["down.weight"]], hint=tag), names["down.bias"]], hint=tag)
    if activation == "relu":
        a = gb.op("Relu", [z], hint=tag)
    elif activation == "silu":
        a = gb.op("Mul", [z, gb.op("Sigmoid", [z], hint=tag)], hint=tag)
    else:  # gelu
        a = gb.ms("Gelu", [z], hint=tag)
    up = gb.op("Add", [gb.op("MatMul", [a, names["up.weight"]], hint=tag), names["up.bias"]], hint=tag)
    return gb.op("Add", [h, up], hint=tag)
