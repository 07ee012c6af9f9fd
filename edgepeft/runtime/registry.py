"""Loaded adapters: loading from verified bytes, per-request activation, what serves under each name.

Why: ONNX Runtime accepts any adapter whose tensor names match graph inputs and
only fails (or silently misbehaves) at run time. Each adapter is checked against
the graph (:mod:`edgepeft.runtime.slots`) before it is prepared; when two active
adapters set the same input the first one would silently win, so the registry
refuses that too, and counts requests per adapter so one in use is never unloaded.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..contracts.adapter_payload import SCALE_SUFFIX
from ..contracts.methods import BOTTLENECK_TAG, LORA, PREFIX_METHODS, prefix_names
from ..errors import AdapterError, AdapterInUseError, UnknownAdapterError
from .adapter_file import logical_header, map_arrays, read_header
from .slots import GraphFacts, SlotSpec, check_entry

_SERIAL = itertools.count(1)  # identifies each loaded adapter object for the decode contexts' bindings


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
        """Drop ``name`` (loaded or deferred); returns what was unloaded. Raises :class:`UnknownAdapterError`,
        or :class:`AdapterInUseError` while a request uses it."""
        with self._lock:
            a = self._get(name)
            if a.in_use:
                raise AdapterInUseError(f"adapter {name!r} is in use by {a.in_use} running request(s)",
                                        hint="retry when they finish")
            return self._adapters.pop(name)

    def _get(self, name: str) -> LoadedAdapter | DeferredAdapter:
        a = self._adapters.get(name) if isinstance(name, str) else None
        if a is None:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r}", hint=f"loaded adapters: {known}")
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
