"""An adapter graph's slots and the checks that an adapter fits them, before any tensor is used.

Both sides run the same checks: the device (:mod:`edgepeft.runtime.registry`) before it prepares an
adapter, the server (:mod:`edgepeft.release.package`) before it packages one, so an adapter that a
device would refuse is refused where it was made. Every check raises :class:`AdapterError`
naming what this graph cannot apply and what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..contracts.adapter_payload import SCALE_SUFFIX
from ..contracts.methods import BOTTLENECK, BOTTLENECK_TAG, LORA, METHODS, PREFIX_METHODS, prefix_names
from ..errors import AdapterError
from .adapter_file import AdapterHeader


@dataclass(frozen=True)
class SlotSpec:
    """One adapter slot of the graph: its dims (ints, or expressions like ``"rank"``/``"3*rank"``) and dtype."""

    name: str
    dims: tuple
    dtype: str = "tensor(float)"


def parse_slots(model: dict, graph_inputs: dict[str, tuple] | None = None) -> dict[str, SlotSpec]:
    """Slots from manifest["model"]["slots"], cross-checked with the session's overridable inputs.

    ``graph_inputs`` maps an overridable initializer's name to ``(shape, type)`` from
    ``InferenceSession.get_overridable_initializers()``; a slot missing from the graph is an error.
    """
    raw = model.get("slots") or {}
    stated = {k: f"tensor({v})" for k, v in (model.get("slot_dtypes") or {}).items()}  # not float32: int8 LoRA B
    slots = {}
    for name, dims in raw.items():
        dtype = stated.get(name, "tensor(float)")
        if graph_inputs is not None:
            if name not in graph_inputs:
                raise AdapterError(f"the manifest lists adapter slot {name!r} that the graph does not have",
                                   hint="the bundle's model.onnx and manifest do not belong together; rebuild it")
            if graph_inputs[name][1] != dtype:
                raise AdapterError(f"adapter slot {name!r} is {graph_inputs[name][1]} in the graph, {dtype} in the "
                                   "manifest", hint="the bundle's model.onnx and manifest do not belong together")
            dtype = graph_inputs[name][1]
        slots[name] = SlotSpec(name, tuple(dims), dtype)
    return slots


def _rank_of(dim, actual: int) -> int | None:
    """For a slot dim ``"k*rank"``/``"rank"`` (or a bottleneck's ``"bottleneck"``), the size that ``actual``
    implies (None if not a symbolic dim)."""
    if isinstance(dim, int):
        return None
    if str(dim).strip() == "bottleneck":
        return actual
    m = re.fullmatch(r"\s*(?:(\d+)\s*\*\s*)?rank\s*", str(dim))
    if not m:
        return None
    k = int(m.group(1) or 1)
    return actual // k if actual % k == 0 else -1


COMPACT = {"tensor(float16)", "tensor(int8)"}  # stored forms a float slot or a prefix takes once expanded


@dataclass(frozen=True)
class GraphFacts:
    """What the checks of the other families need to know about the graph (from manifest["model"]).

    ``bottleneck``: the graph's bottleneck slots (``{"points", "activation"}``) or None;
    ``kv``: (layers, key/value heads, head size) of a decoder's cache, None for encoders;
    ``max_context``: positions a request may use, prefix included.
    """

    bottleneck: dict | None = None
    kv: tuple | None = None
    max_context: int = 0

    @classmethod
    def from_model(cls, model: dict, max_context: int | None = None) -> GraphFacts:
        kv = None
        if model.get("task", "causal-lm") == "causal-lm" and model.get("num_layers"):
            kv = (int(model["num_layers"]), int(model.get("num_kv_heads") or model.get("num_heads") or 0),
                  int(model.get("head_dim") or 0))
        return cls(model.get("bottleneck") or None, kv, int(max_context or model.get("max_context") or 0))


def check_entry(header: AdapterHeader, meta: dict, *, slots: dict[str, SlotSpec], base_fingerprint: str,
                slot_rank: int | None, task: str, source: str, facts: GraphFacts, compact: bool = False) -> int:
    """Check an adapter of any family against the graph; return its size (LoRA rank, bottleneck width or
    virtual tokens). Raises :class:`AdapterError` naming what this graph cannot apply."""
    method = meta.get("method", LORA)
    if method not in METHODS:
        raise AdapterError(f"{source} is a {method!r} adapter, which this runtime cannot apply",
                           hint=f"this edgepeft applies {', '.join(METHODS)}; upgrade it on the device")
    if method in PREFIX_METHODS:
        return check_prefix(header, meta, base_fingerprint=base_fingerprint, task=task, source=source,
                            facts=facts, compact=compact)
    bottleneck = [p.name for p in header.params.values() if BOTTLENECK_TAG in p.name]
    if method == BOTTLENECK:
        graph = facts.bottleneck
        if not graph:
            raise AdapterError(f"{source} is a bottleneck adapter, and this bundle's graph has no bottleneck slots",
                               hint="rebuild the bundle with bottleneck slots (edgepeft build --bottleneck-slots "
                                    "houlsby, or with a bottleneck adapter), then install it")
        if meta.get("activation") and meta["activation"] != graph.get("activation"):
            raise AdapterError(f"{source} was trained with {meta['activation']}; this graph's bottleneck slots "
                               f"apply {graph.get('activation')}", hint="retrain it with the bundle's non-linearity")
        stray = [p for p in header.params if BOTTLENECK_TAG not in p and not p.startswith("head.")]
        if stray:
            raise AdapterError(f"{source}: a bottleneck adapter sets {stray[0]!r}, which is not a bottleneck slot",
                               hint="re-export the adapter with edgepeft")
    elif bottleneck:
        raise AdapterError(f"{source}: a {method} adapter sets bottleneck slot {bottleneck[0]!r}",
                           hint="its manifest entry names the wrong method; re-export the adapter")
    return check_adapter(header, meta, slots=slots, base_fingerprint=base_fingerprint,
                         slot_rank=slot_rank if method == LORA else None, task=task, source=source, compact=compact)


def _check_base(meta: dict, *, base_fingerprint: str, task: str, source: str) -> None:
    fp = meta.get("base_fingerprint")
    if not fp:
        raise AdapterError(f"{source} does not say which base it was trained for",
                           hint="install adapters through a signed bundle or update that records the base fingerprint")
    if fp != base_fingerprint:
        raise AdapterError(f"{source} was built for base {fp}, but this engine runs base {base_fingerprint}",
                           hint="build the adapter against this bundle's base model")
    a_task = meta.get("task", "causal-lm")
    if a_task != task:
        raise AdapterError(f"{source} is a {a_task} adapter; this engine runs a {task} model",
                           hint="load it into an engine for a bundle of that task")


def check_prefix(header: AdapterHeader, meta: dict, *, base_fingerprint: str, task: str, source: str,
                 facts: GraphFacts, compact: bool = False) -> int:
    """Check a prefix (prefix or prompt tuning) against the decoder's cache; return its length.

    Raises :class:`AdapterError` for an encoder, tensors of another layout, or a prefix that
    leaves no room for a prompt in the context.
    """
    _check_base(meta, base_fingerprint=base_fingerprint, task=task, source=source)
    if facts.kv is None:
        raise AdapterError(f"{source} is a {meta.get('method')} adapter; prefixes apply to decoders only",
                           hint="load it into a decoder bundle")
    layers, kv, hd = facts.kv
    want = {n for i in range(layers) for n in prefix_names(i)}
    names = {p for p in header.params if not (compact and p.endswith(SCALE_SUFFIX) and
                                                p[: -len(SCALE_SUFFIX)] in header.params)}
    if names != want:
        odd = sorted(names ^ want)
        raise AdapterError(f"{source}: its tensors are not a prefix for this graph's {layers} layers "
                           f"({odd[0]} ...)", hint="the adapter was exported for another base")
    lengths = set()
    for n in names:
        p = header.params[n]
        ok = p.dtype == "tensor(float)" or (compact and p.dtype in COMPACT and (
            p.dtype != "tensor(int8)" or n + SCALE_SUFFIX in header.params))  # int8 only with its scale
        if not ok or len(p.shape) != 3 or p.shape[0] != kv or p.shape[2] != hd or p.shape[1] < 1:
            raise AdapterError(f"{source}: {n} is {p.dtype} {list(p.shape)}, the cache takes "
                               f"[{kv}, positions, {hd}] floats", hint="the adapter was exported for another base")
        lengths.add(p.shape[1])
    if len(lengths) != 1:
        raise AdapterError(f"{source}: its layers disagree on the prefix length ({sorted(lengths)})",
                           hint="re-export the adapter")
    n = lengths.pop()
    declared = meta.get("virtual_tokens")
    if declared is not None and int(declared) != n:
        raise AdapterError(f"{source}: its entry says {declared} virtual tokens, its tensors hold {n}",
                           hint="re-export the adapter")
    if facts.max_context and n + 2 > facts.max_context:
        raise AdapterError(f"{source} is a prefix of {n} positions; this device's context holds {facts.max_context}, "
                           "leaving no room for a prompt", hint=f"train it with far fewer than {facts.max_context} "
                                                                "virtual tokens")
    return n


def check_adapter(header: AdapterHeader, meta: dict, *, slots: dict[str, SlotSpec], base_fingerprint: str,
                  slot_rank: int | None, task: str, source: str, compact: bool = False) -> int:
    """Check a slot adapter file (LoRA, bottleneck) against the graph; return its rank (width).
    Raises :class:`AdapterError`.

    With ``compact``, fp16/int8 payloads (and their ``.scale`` tensors) are accepted for float
    slots: they are expanded to the slot's dtype before they are used.
    """
    _check_base(meta, base_fingerprint=base_fingerprint, task=task, source=source)
    if not header.params:
        raise AdapterError(f"{source} holds no tensors", hint="re-export the adapter")
    ranks = set()
    for p in header.params.values():
        if compact and p.name.endswith(SCALE_SUFFIX) and p.name[: -len(SCALE_SUFFIX)] in header.params:
            continue
        slot = slots.get(p.name)
        if slot is None:
            raise AdapterError(f"{source}: tensor {p.name!r} matches no adapter slot of this graph",
                               hint="the adapter targets modules the bundle was not exported with; rebuild it for this bundle")
        if not _dtype_fits(p, slot, header, compact):
            raise AdapterError(f"{source}: tensor {p.name!r} is {p.dtype}"
                               f"{' with a scale' if p.name + SCALE_SUFFIX in header.params else ''}, "
                               f"the slot takes {slot.dtype}",
                               hint="export the adapter for this bundle (edgepeft build or edgepeft update create)")
        if len(p.shape) != len(slot.dims):
            raise AdapterError(f"{source}: tensor {p.name!r} has shape {list(p.shape)}, the slot is {list(slot.dims)}",
                               hint="the adapter was exported for another graph")
        fixed = max((d for d in slot.dims if isinstance(d, int)), default=None)
        for dim, actual in zip(slot.dims, p.shape):
            r = _rank_of(dim, actual)
            if r is not None and fixed is not None and actual > fixed:
                # a rank or bottleneck width above the layer's own size is no low-rank adapter, and would
                # let a small (int4, zero-group) file expand into an arbitrarily large tensor
                raise AdapterError(f"{source}: tensor {p.name!r} has shape {list(p.shape)}: its {dim} dim {actual} "
                                   f"exceeds the slot's fixed size {fixed}", hint="the adapter was exported for "
                                   "another graph; re-export it for this bundle")
            if r is None and isinstance(dim, int) and dim != actual:
                raise AdapterError(f"{source}: tensor {p.name!r} has shape {list(p.shape)}, the slot is "
                                   f"{list(slot.dims)}", hint="the adapter was exported for another base or graph")
            if r is not None:
                if r <= 0:
                    raise AdapterError(f"{source}: tensor {p.name!r} dim {actual} does not fit slot dim {dim!r}",
                                       hint="the adapter was exported for another graph")
                ranks.add(r)
    if len(ranks) > 1:
        raise AdapterError(f"{source}: tensors disagree on the rank ({sorted(ranks)})",
                           hint="pad every module to the bundle's rank when exporting")
    rank = ranks.pop() if ranks else int(meta.get("rank") or 0)
    if slot_rank is not None and rank > slot_rank:
        raise AdapterError(f"{source} has rank {rank}, above this bundle's slot rank {slot_rank}",
                           hint=f"retrain with rank <= {slot_rank} or rebuild the bundle with a larger rank")
    return rank


def _dtype_fits(p, slot: SlotSpec, header: AdapterHeader, compact: bool) -> bool:
    """An int8 slot takes int8 as stored (scales folded into lora_A); a float slot takes float32, and with
    ``compact`` fp16 or int8 with its ``.scale`` (expanded before use)."""
    scaled = p.name + SCALE_SUFFIX in header.params
    if slot.dtype == "tensor(int8)":
        return p.dtype == "tensor(int8)" and not scaled
    if p.dtype == slot.dtype:
        return True
    return compact and slot.dtype == "tensor(float)" and (
        p.dtype == "tensor(float16)" or (p.dtype == "tensor(int8)" and scaled))
