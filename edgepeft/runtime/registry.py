"""Loaded adapters: compatibility checks, loading from verified bytes, per-request activation.

Why the checks: ONNX Runtime accepts any adapter whose tensor names match graph
inputs and only fails (or silently misbehaves) at run time: an adapter for
another base runs and answers nonsense, and when two active adapters set the
same input the first one silently wins. The registry refuses all of that before
a request runs, and counts requests per adapter so one in use is never unloaded.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..contracts.adapter_payload import SCALE_SUFFIX
from ..contracts.methods import BOTTLENECK, BOTTLENECK_TAG, LORA, METHODS, PREFIX_METHODS, prefix_names
from ..errors import AdapterError
from .adapter_file import AdapterHeader, logical_header, map_arrays, read_header

_SERIAL = itertools.count(1)  # identifies each loaded adapter object for the decode contexts' bindings


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


@dataclass
class LoadedAdapter:
    """An adapter ready for requests: its tensors (from verified bytes) plus what the checks found.

    Prepared adapters are not in service until :meth:`AdapterRegistry.put` publishes them, so
    an update can be health-checked on the very object that will serve.
    """

    name: str
    version: int
    rank: int
    base_fingerprint: str
    params: frozenset
    nbytes: int
    task: str = "causal-lm"
    labels: tuple | None = None
    review_threshold: float | None = None
    meta: dict = field(default_factory=dict)
    values: tuple = ()  # ((slot name, OrtValue over the arrays), ...) for IOBinding
    arrays: dict = field(default_factory=dict, repr=False)  # slot name -> read-only array (keeps the bytes alive)
    in_use: int = 0
    serial: int = field(default_factory=lambda: next(_SERIAL))
    prefix: tuple = ()  # prefix families: per layer (key, value) arrays [kv_heads, P, head_dim], in layer order

    @property
    def method(self) -> str:
        return self.meta.get("method", LORA)

    @property
    def prefix_len(self) -> int:
        """Key/value positions this adapter puts before a request's tokens (0 unless a prefix family)."""
        return int(self.prefix[0].shape[1]) if self.prefix else 0

    @property
    def key(self) -> tuple:
        """Identity of this exact loaded adapter (decode contexts keep their bindings by it; a
        serial, unlike id(), is never reused by a later load)."""
        return (self.name, self.version, self.serial)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "rank": self.rank or None, "task": self.task,
                "method": self.method, "virtual_tokens": self.prefix_len or None,
                "bottleneck_size": self.meta.get("bottleneck_size"), "base_fingerprint": self.base_fingerprint,
                "bytes": self.nbytes, "in_use": self.in_use, "labels": list(self.labels) if self.labels else None,
                "review_threshold": self.review_threshold, "sha256": self.meta.get("sha256"), "loaded": True}


@dataclass
class DeferredAdapter:
    """A bundled adapter in service whose file is not read yet: its signed manifest entry stands in.

    Opening a bundle then costs nothing per adapter; the first request that names it (or anything
    else that needs its tensors) calls ``load``, which reads the file, checks its SHA-256 against
    the manifest and prepares the tensors from those very bytes, so what serves is still what was
    verified. A failed load leaves it deferred and raises the same error to every request.
    """

    name: str
    version: int
    meta: dict
    load: Callable[[], LoadedAdapter] = field(repr=False)
    serial: int = field(default_factory=lambda: next(_SERIAL))
    in_use: int = 0  # never used by a request: it is loaded first
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def key(self) -> tuple:
        return (self.name, self.version, self.serial)

    def describe(self) -> dict:
        m = self.meta  # the fields a loaded adapter reports that its manifest entry already holds
        lora = m.get("method", LORA) == LORA
        return {"name": self.name, "version": self.version, "rank": (m.get("rank") or None) if lora else None,
                "task": m.get("task", "causal-lm"), "method": m.get("method", LORA),
                "virtual_tokens": m.get("virtual_tokens"), "bottleneck_size": m.get("bottleneck_size"),
                "base_fingerprint": m.get("base_fingerprint"), "bytes": None, "in_use": 0,
                "labels": list(m["labels"]) if m.get("labels") else None,
                "review_threshold": m.get("review_threshold"), "sha256": m.get("sha256"), "loaded": False}


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


class AdapterRegistry:
    """Adapters by name. Thread-safe; preparing and activating never touch the base session."""

    def __init__(self, slots: dict[str, SlotSpec], base_fingerprint: str, slot_rank: int | None = None,
                 task: str = "causal-lm", facts: GraphFacts | None = None):
        self.slots, self.base_fingerprint, self.slot_rank, self.task = slots, base_fingerprint, slot_rank, task
        self.facts = facts or GraphFacts()
        self._adapters: dict[str, LoadedAdapter | DeferredAdapter] = {}
        self._lock = threading.Lock()

    def prepare(self, data, meta: dict, *, name: str | None = None) -> LoadedAdapter:
        """Check an adapter's bytes against the graph and make its tensors ready, without serving it.

        ``data`` is the adapter file's content, already verified by the caller (bundle hash or
        signed update): the tensors are views over these very bytes (compact fp16/int8 payloads
        are expanded from them). ``meta`` holds the manifest entry's fields (``base_fingerprint``,
        ``version``, ``rank``, ``task``, ``labels``, ``review_threshold``). Raises :class:`AdapterError`.
        """
        import onnxruntime as ort

        from ..contracts.adapter_payload import expand_arrays

        name = name or meta.get("name")
        if not name:
            raise AdapterError("an adapter needs a name", hint="its manifest or update entry names it")
        source = f"adapter {name!r}"
        stored = read_header(data, source)
        try:
            mapped = map_arrays(data, stored)
        except ValueError as exc:  # numpy: a tensor that does not lie within the file
            raise AdapterError(f"{source} cannot be loaded: {exc}",
                               hint="re-export the adapter; the file may be truncated") from exc
        header = logical_header(stored, mapped, source)  # int4 parts seen as what they expand to
        rank = check_entry(header, meta, slots=self.slots, base_fingerprint=self.base_fingerprint,
                           slot_rank=self.slot_rank, task=self.task, source=source, facts=self.facts, compact=True)
        is_prefix = meta.get("method") in PREFIX_METHODS
        labels = tuple(meta["labels"]) if meta.get("labels") else None
        if self.task == "classification" and not labels:
            raise AdapterError(f"classification adapter {name!r} lists no labels",
                               hint="its manifest entry must carry the label names")
        try:
            arrays = mapped
            if header is not stored or any(p.dtype == "tensor(float16)" or p.name.endswith(SCALE_SUFFIX)
                                           for p in header.params.values()):
                arrays = {k: v for k, v in expand_arrays(arrays).items()}
                for v in arrays.values():
                    v.flags.writeable = False
            prefix = ()
            if is_prefix:  # not graph inputs: the decode loop copies them into a request's cache
                prefix = tuple(arrays[n] for i in range(self.facts.kv[0]) for n in prefix_names(i))
                params, values = frozenset(), ()
            else:
                params = active_params(arrays)
                arrays = {k: v for k, v in arrays.items() if k in params}
                values = tuple((k, ort.OrtValue.ortvalue_from_numpy(v)) for k, v in arrays.items())
        except AdapterError:
            raise
        except Exception as exc:  # numpy/onnxruntime raise their own exception types
            raise AdapterError(f"{source} cannot be loaded: {exc}",
                               hint="re-export the adapter; the file may be truncated") from exc
        return LoadedAdapter(name=name, version=int(meta.get("version") or 0),
                             rank=rank if meta.get("method", LORA) == LORA else 0,
                             base_fingerprint=meta["base_fingerprint"], params=params,
                             nbytes=sum(v.nbytes for v in arrays.values()), task=self.task, labels=labels,
                             review_threshold=meta.get("review_threshold"), meta=dict(meta), values=values,
                             arrays=arrays, prefix=prefix)

    def put(self, adapter: LoadedAdapter | DeferredAdapter, *,
            replace: bool = True) -> LoadedAdapter | DeferredAdapter | None:
        """Serve ``adapter`` under its name (a :class:`DeferredAdapter` is loaded when first used);
        return the one it replaced (requests already running finish on that one). Raises
        :class:`AdapterError` when the name is taken and not ``replace``."""
        with self._lock:
            old = self._adapters.get(adapter.name)
            if old is not None and not replace:
                raise AdapterError(f"an adapter named {adapter.name!r} is already loaded",
                                   hint="unload it first, or install the new version as a signed update")
            self._adapters[adapter.name] = adapter
            return old

    def unload(self, name: str) -> LoadedAdapter | DeferredAdapter:
        """Drop ``name`` (loaded or deferred); refused while a request uses it. Returns what was unloaded."""
        with self._lock:
            a = self._get(name)
            if a.in_use:
                raise AdapterError(f"adapter {name!r} is in use by {a.in_use} running request(s)",
                                   hint="retry when they finish")
            return self._adapters.pop(name)

    def _get(self, name: str) -> LoadedAdapter | DeferredAdapter:
        a = self._adapters.get(name) if isinstance(name, str) else None
        if a is None:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise AdapterError(f"unknown adapter {name!r}", hint=f"loaded adapters: {known}")
        return a

    def get(self, name: str) -> LoadedAdapter:
        """The adapter serving as ``name``, loaded now if it was deferred. Raises :class:`AdapterError`
        (unknown name, or a bundled file that does not fit the graph) or :class:`IntegrityError`
        (a bundled file that no longer matches its manifest hash)."""
        while True:
            with self._lock:
                a = self._get(name)
            if isinstance(a, LoadedAdapter):
                return a
            with a.lock:  # one reader per deferred adapter; the others wait for its result
                with self._lock:
                    if self._adapters.get(name) is not a:
                        continue  # loaded, replaced or unloaded meanwhile: look again
                loaded = a.load()
                with self._lock:
                    if self._adapters.get(name) is a:
                        self._adapters[name] = loaded
                        return loaded

    def peek(self, name: str) -> LoadedAdapter | DeferredAdapter | None:
        """What serves as ``name`` without loading it (a :class:`DeferredAdapter` until first use), or None."""
        with self._lock:
            return self._adapters.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def describe(self) -> list[dict]:
        with self._lock:
            return [a.describe() for _, a in sorted(self._adapters.items())]

    @contextmanager
    def activate(self, names) -> Iterator[list[LoadedAdapter]]:
        """Yield the adapters for a request; counts them as in use meanwhile.

        ``names``: None, a name, or a list of names and/or prepared :class:`LoadedAdapter` objects
        (an update under its health check runs before it is served). Raises :class:`AdapterError`
        for an unknown name or adapters whose tensors overlap (ONNX Runtime would silently let the
        first one win).
        """
        if names is None:
            names = []
        elif isinstance(names, (str, LoadedAdapter)):
            names = [names]
        while True:
            with self._lock:
                found = [n if isinstance(n, LoadedAdapter) else self._get(n) for n in names]
                deferred = [a.name for a in found if isinstance(a, DeferredAdapter)]
                if not deferred:
                    chosen = list({id(a): a for a in found}.values())
                    if len(chosen) > 1:
                        check_disjoint(chosen)
                        prefixes = [a.name for a in chosen if a.prefix]
                        if len(prefixes) > 1:
                            raise AdapterError(f"adapters {', '.join(map(repr, prefixes))} are all prefixes; a "
                                               "request starts from one key/value prefix",
                                               hint="name one prefix adapter per request")
                    for a in chosen:
                        a.in_use += 1
                    break
            for name in deferred:  # read, hashed and loaded outside the lock; then look again
                self.get(name)
        try:
            yield chosen
        finally:
            with self._lock:
                for a in chosen:
                    a.in_use -= 1

    @staticmethod
    def prefix_of(chosen: Sequence[LoadedAdapter]) -> LoadedAdapter | None:
        """The prefix adapter among ``chosen`` (activate() allows at most one), or None."""
        return next((a for a in chosen if a.prefix), None)

    def feeds(self, chosen: Sequence[LoadedAdapter]) -> dict:
        """``{slot name: array}`` of ``chosen``, for ``session.run`` (slots are graph inputs)."""
        return {k: v for a in chosen for k, v in a.arrays.items()}


def slot_group(name: str) -> str:
    """``layers.3.qkv.lora_A`` -> ``layers.3.qkv``: the slots that must be bound together (A with all
    its B slots, e.g. ``layers.3.gate_up.lora_B.up_proj``; a head's weight with its bias; the four
    tensors of one bottleneck point)."""
    if ".lora_" in name:
        return name.split(".lora_")[0]
    if BOTTLENECK_TAG in name:
        return name.split(BOTTLENECK_TAG)[0] + BOTTLENECK_TAG.rstrip(".")
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def active_params(arrays: dict) -> frozenset:
    """The tensors an adapter really sets: every slot pair with a non-zero tensor.

    Adapter files carry zeros for projection groups the adapter never trained; binding
    those would make two adapters on different modules look like they overlap (and the
    later binding would silently erase the other's weights). Reading them once at load
    is cheap next to a request.
    """
    live = {slot_group(k) for k, v in arrays.items() if v.size and np.any(v)}
    return frozenset(k for k in arrays if slot_group(k) in live)


def check_disjoint(adapters: Iterable[LoadedAdapter]) -> None:
    """Refuse adapters that set the same slot: ONNX Runtime would silently use only the first."""
    seen: dict[str, str] = {}
    for a in adapters:
        for p in sorted(a.params):
            if p in seen:
                raise AdapterError(f"adapters {seen[p]!r} and {a.name!r} both set {p!r}; "
                                   "ONNX Runtime would silently use only the first",
                                   hint="activate adapters together only when they target different modules")
            seen[p] = a.name
