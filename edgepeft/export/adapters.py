"""An adapter directory -> ONNX Runtime adapter file (``.onnx_adapter``) for a bundle's graph.

Every family travels in this one container (:mod:`edgepeft.contracts.methods`): LoRA and
bottleneck adapters as slot tensors, prefix and prompt tuning as the per-layer
key/value prefix (:mod:`.prefix`). LoRA:

The file holds one tensor per slot, named exactly as the graph inputs, so
``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter`` activate it
with no copy of the base. Per group the modules' ``A.T`` are placed side by
side and ``(B * scaling).T`` block-diagonally (see :mod:`.slots`), each module
zero-padded up to the bundle's slot rank; modules the adapter does not train
stay zero. Groups with ``split_b`` (gate|up) get one B tensor per module.
Payloads: fp32 (activates as is), fp16, int8 or int4 (smaller updates;
the device expands them to the slots' dtypes once at install with
:func:`edgepeft.contracts.adapter_payload.expand_adapter`). Bundles whose LoRA B slots
are int8 (:mod:`.slots`) get B as int8 with each row's scale folded into A
(:func:`fold_b_int8`), whatever the payload: it is the slot's own form.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..contracts.fields import check_choice
from ..errors import AdapterError
from .peft_reader import read_peft_lora

PAYLOADS = ("fp32", "fp16", "int8", "int4")
HEAD_WEIGHT, HEAD_BIAS = "head.classifier.weight", "head.classifier.bias"
_DECODER_MODULE = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


@dataclass
class AdapterInfo:
    """What the bundle manifest records about one adapter file."""

    name: str
    rank: int
    alpha: float | None
    method: str
    target_modules: list
    bytes: int
    dtype: str
    slot_rank: int
    labels: list | None = None
    base_model_name_or_path: str | None = None
    virtual_tokens: int | None = None
    bottleneck_size: int | None = None
    activation: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def arch_for(model_info: dict):
    """The architecture description (:mod:`.arch`) a bundle's graph was exported from."""
    from ..models.arch import DECODERS, ENCODERS

    fam = model_info["architecture"]
    table = ENCODERS if model_info.get("task") == "classification" else DECODERS
    arch = table.get(fam)
    if arch is None:
        raise AdapterError(f"model_info names unknown architecture {fam!r}",
                           hint="re-export the base with this version of edgepeft")
    return arch


def layer_groups_for(model_info: dict):
    """The per-layer projection groups of the exported graph described by ``model_info``."""
    arch, dims, targets = arch_for(model_info), model_info["dims"], model_info["target_modules"]
    if model_info.get("task") == "classification":
        from .encoder_graph import layer_groups

        return layer_groups(dims, targets, arch)
    from .decoder_graph import layer_groups

    # the graph's own form: bundles built before gate|up could be packed (and large ones since) split its B
    split = any(".gate_up.lora_B." in name for name in model_info.get("slots") or {})
    return layer_groups(dims, targets, arch, split_gate_up=split)


def _matcher(model_info: dict):
    """module path (PEFT, without "base_model.model.") -> (layer or None, adaptable name), or None."""
    arch = arch_for(model_info)
    if model_info.get("task") != "classification":
        def match(module):
            m = _DECODER_MODULE.fullmatch(module)
            return (int(m[1]), m[2]) if m else None
        return match
    prefix = re.escape(arch.prefix)
    layer = re.compile(rf"(?:{prefix})?" + re.escape(arch.layer).replace(re.escape("{i}"), r"(\d+)") + r"(.+)")
    base_heads = {s.module for s in arch.head if s.source == "base"}

    def match(module):
        m = layer.fullmatch(module)
        if m:
            return int(m[1]), m[2]
        bare = module[len(arch.prefix):] if module.startswith(arch.prefix) else module
        return (None, bare) if bare in base_heads else None
    return match


def head_stages(model_info: dict) -> list[dict]:
    """The adapter-filled head stages of a classifier graph: ``[{"module", "default"}]`` in order."""
    if "head" in model_info:
        return list(model_info["head"])
    return [{"module": "classifier", "default": False}]  # bundles exported before heads were described


def build_slot_tensors(peft_dir, model_info: dict, labels=None, *, pad: bool = True):
    """Pack a PEFT LoRA directory into fp32 slot tensors; returns ``(tensors, lora, labels)``.

    ``pad=True`` pads every module up to the bundle's slot rank (fixed shapes, as
    the manifest's slot_shapes say); ``pad=False`` keeps the adapter's own rank:
    the graph's rank dims are dynamic, so a rank-4 adapter in a rank-16 bundle
    then reads 4x fewer bytes per token.

    Raises :class:`AdapterError` when the adapter's modules, shapes or rank do
    not fit the bundle's slots.
    """
    lora = read_peft_lora(peft_dir)
    slot_rank, nl = model_info["slot_rank"], model_info["num_layers"]
    if not model_info.get("slots"):
        raise AdapterError("this bundle's graph has no adapter slots (merged export)",
                           hint="export the base with slots to ship swappable adapters")
    if lora.rank > slot_rank:
        raise AdapterError(f"{lora.path.name}: LoRA rank {lora.rank} exceeds the bundle's slot rank {slot_rank}",
                           hint=f"retrain with r <= {slot_rank}, or rebuild the bundle with a slot rank >= {lora.rank}")
    width = slot_rank if pad else lora.rank
    groups = layer_groups_for(model_info)
    where = {m.peft_name: (g, j) for g in groups for j, m in enumerate(g.modules)}
    all_names = {m.peft_name for g in groups for m in g.modules}
    tensors = {}
    layerless = set()
    if model_info.get("task") == "classification":  # base head stages (BERT's pooler) have one slot pair
        layerless = {s.module.split(".")[0] for s in arch_for(model_info).head if s.source == "base"}
    for g in groups:
        if g.modules:
            for i in (range(nl) if g.key not in layerless else [None]):
                a_name, b_name = g.slot_names(i)
                tensors[a_name] = np.zeros((g.in_dim, len(g.modules) * width), np.float32)
                if g.split_b:
                    for mod in g.modules:
                        tensors[g.b_slot_name(i, mod)] = np.zeros((width, mod.out_size), np.float32)
                else:
                    tensors[b_name] = np.zeros((len(g.modules) * width, g.out_dim), np.float32)
    trained = set()
    match = _matcher(model_info)
    for module, (a, b, scaling) in lora.modules.items():
        layer, name = match(module) or (None, None)
        if name not in where:
            hint = f"the bundle has slots for {', '.join(sorted(all_names)) or 'nothing'}"
            raise AdapterError(f"{lora.path.name}: adapter trains {module}, which has no slot in this bundle",
                               hint=hint + "; rebuild the bundle with these target modules or retrain")
        if layer is not None and layer >= nl:
            raise AdapterError(f"{lora.path.name}: {module} is layer {layer}, the base has {nl} layers",
                               hint="the adapter was trained for a different base")
        g, j = where[name]
        mod = g.modules[j]
        r = a.shape[0]
        if a.shape[1] != g.in_dim or b.shape[0] != mod.out_size:
            raise AdapterError(f"{lora.path.name}: {module} is {a.shape[1]}->{b.shape[0]}, the base has "
                               f"{g.in_dim}->{mod.out_size}", hint="the adapter was trained for a different base")
        a_name, b_name = g.slot_names(layer)
        c0 = j * width
        tensors[a_name][:, c0:c0 + r] = a.T
        if g.split_b:
            tensors[g.b_slot_name(layer, mod)][:r, :] = (b * scaling).T
        else:
            tensors[b_name][c0:c0 + r, mod.out_offset:mod.out_offset + mod.out_size] = (b * scaling).T
        trained.add(name)
    labels = _saved_head(lora, model_info, tensors, labels, "modules_to_save other than the classification head "
                                                            "cannot be swapped; use merge mode")
    lora.trained = sorted(trained)
    return tensors, lora, labels


def _saved_head(adapter, model_info: dict, tensors: dict, labels, hint: str):
    """A classifier's head from ``adapter.saved`` into ``tensors``; returns its labels (None for a decoder).
    Raises :class:`AdapterError` when the adapter saves any other whole module."""
    if model_info.get("task") == "classification":
        labels = head_labels(adapter.path, _head_tensors(adapter, model_info, tensors), labels,
                             fallback=model_info.get("base_labels"))
        allowed = {f"{h['module']}.{p}" for h in head_stages(model_info) for p in ("weight", "bias")}
    else:
        labels, allowed = None, set()
    extra = sorted(k for k in adapter.saved if k not in allowed)
    if extra:
        raise AdapterError(f"{adapter.path.name}: adapter also saves whole modules ({', '.join(extra)})", hint=hint)
    return labels


def _head_tensors(lora, model_info: dict, tensors: dict) -> int:
    """Fill the head slots from the adapter's saved head modules; returns the number of labels.

    A stage the adapter does not save keeps the graph's default (the checkpoint's
    weights) when there is one; otherwise the adapter cannot be served.
    """
    from .encoder_graph import head_slot_names

    hidden, stages = model_info["hidden_size"], head_stages(model_info)
    n = None
    for j, st in enumerate(stages):
        module, last = st["module"], j == len(stages) - 1
        w = lora.saved.get(module + ".weight")
        if w is None:
            if st.get("default") and not last:
                continue
            root = module.split(".")[0]
            raise AdapterError(f"{lora.path.name}: a classification adapter must carry its head ({module}.weight)",
                               hint=f"train with task_type=SEQ_CLS and modules_to_save including {root!r} "
                                    "(PEFT saves 'classifier' by default)")
        out = w.shape[0] if last else hidden
        if w.ndim != 2 or w.shape[1] != hidden or w.shape[0] != out:
            want = f"[labels, {hidden}]" if last else f"[{hidden}, {hidden}]"
            raise AdapterError(f"{lora.path.name}: {module}.weight is {tuple(w.shape)}, expected {want}",
                               hint="the adapter was trained for a different base")
        bias = lora.saved.get(module + ".bias", np.zeros(w.shape[0], np.float32))
        ws, bs = head_slot_names(module)
        tensors[ws] = np.ascontiguousarray(w.T.astype(np.float32))
        tensors[bs] = bias.astype(np.float32)
        n = int(w.shape[0]) if last else n
    return n


def config_labels(config) -> list[str] | None:
    """The label names of a transformers config's ``id2label`` in id order; None when it has none or only
    the generic ``LABEL_i`` names transformers fills in."""
    id2label = getattr(config, "id2label", None) or {}
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names


def head_labels(adir: Path, n: int, labels, *, fallback: list | None = None) -> list:
    """Labels from the argument, the adapter's labels.json or config.json id2label, then ``fallback`` (the
    base's config.json id2label, when it names ``n``); else LABEL_i."""
    if labels is None:
        for fname in ("labels.json", "config.json"):
            p = adir / fname
            if p.is_file():
                try:
                    data = json.loads(p.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                if isinstance(data, list):
                    labels = data
                elif isinstance(data, dict) and isinstance(data.get("id2label"), dict):
                    labels = [data["id2label"][k] for k in sorted(data["id2label"], key=int)]
                elif isinstance(data, dict) and isinstance(data.get("labels"), list):
                    labels = data["labels"]
                if labels:
                    break
    if not labels and fallback and len(fallback) == n:
        labels = fallback
    labels = list(labels) if labels else [f"LABEL_{i}" for i in range(n)]
    if len(labels) != n:
        raise AdapterError(f"{adir.name}: {len(labels)} labels for a head with {n} outputs",
                           hint="fix labels.json / id2label to match the classifier")
    return [str(x) for x in labels]


def fold_b_int8(tensors: dict, model_info: dict) -> dict:
    """For a graph whose LoRA B slots are int8 (``model_info["slot_dtypes"]``): each B row quantized to int8
    with its own scale (max |row| / 127), that scale multiplied into the matching column of A.

    ``x @ A @ B == x @ (A * s) @ (B / s)`` exactly; only ``round(B / s)`` rounds (half a step of each row's
    largest value). Rows of a packed B [m*rank, out] match A's columns one to one; a split group's
    ``B_j`` [rank, out_j] matches A's columns ``j*rank .. (j+1)*rank``. Returns a new dict.
    """
    int8 = {k for k, v in (model_info.get("slot_dtypes") or {}).items() if v == "int8"}
    if not int8:
        return tensors
    out = dict(tensors)
    groups = layer_groups_for(model_info)
    for name in sorted(int8 & set(tensors)):
        b = np.asarray(tensors[name], np.float32)
        prefix, _, module = name.partition(".lora_B")
        a_name = prefix + ".lora_A"
        if a_name not in out:
            raise AdapterError(f"int8 slot {name} has no {a_name} to fold its scales into",
                               hint="re-export the adapter with this version of edgepeft")
        cols = slice(0, b.shape[0])
        if module:  # ".gate_proj": a split group's per-module B
            key = prefix.rsplit(".", 1)[-1]
            g = next(g for g in groups if g.key == key)
            j = [m.peft_name for m in g.modules].index(module[1:])
            cols = slice(j * b.shape[0], (j + 1) * b.shape[0])
        amax = np.abs(b).max(axis=1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        out[name] = np.clip(np.rint(b / scale[:, None]), -127, 127).astype(np.int8)
        a = np.array(out[a_name], np.float32)
        a[:, cols] *= scale[None, :]
        out[a_name] = a
    return out


def encode_payload(tensors: dict, dtype: str) -> dict:
    """Slot tensors -> stored tensors: float ones as is, fp16, or int8 with ``<name>.scale`` (per rank
    row/col, per bottleneck unit, per prefix head and position); int8 tensors (int8 B slots, already in the
    slot's form) pass through."""
    if dtype == "fp32":
        return tensors
    if dtype == "fp16":
        return {k: v if v.dtype == np.int8 else v.astype(np.float16) for k, v in tensors.items()}
    if dtype == "int4":
        return _encode_int4(tensors)
    out = {}
    for k, v in tensors.items():
        if v.dtype == np.int8:
            out[k] = v
        elif v.ndim == 3:  # a prefix [heads, positions, head_dim]: one scale per head and position
            amax = np.abs(v).max(axis=-1, keepdims=True)
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            out[k] = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
            out[k + ".scale"] = scale
        elif v.ndim == 2:
            first = k.endswith(("lora_A", "down.weight")) or k == HEAD_WEIGHT
            axis = 0 if first else 1  # scale per rank column / row / label / bottleneck unit
            amax = np.abs(v).max(axis=axis, keepdims=True)
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            out[k] = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
            out[k + ".scale"] = scale
        else:
            out[k] = v.astype(np.float32)
    return out


def _encode_int4(tensors: dict) -> dict:
    """int4 payload: every matrix and prefix in 4-bit groups (:func:`edgepeft.contracts.adapter_payload.int4_encode`;
    lora_A grouped along its inputs, one rank column at a time); a classifier's head as int8, 1-D tensors
    (biases) as they are. int8 B slots are re-coded from their int8 form and come back as int8.

    Feeding A's rounding error into B by least squares (as GPTQ does between columns) was measured and
    left out: at rank 8 it cut the product's error from 13.1 % to 13.0 % (Frobenius, tiny llama)."""
    from ..contracts.adapter_payload import int4_encode

    out = {}
    for k, v in tensors.items():
        if v.ndim < 2 or v.size < 64:
            out[k] = v if v.dtype == np.int8 else v.astype(np.float32)
        elif k == HEAD_WEIGHT:
            out.update(encode_payload({k: v}, "int8"))
        else:
            parts = int4_encode(v, transposed=v.ndim == 2 and k.endswith(("lora_A", "down.weight")))
            out.update({k + sfx: part for sfx, part in parts.items()})
    return out


def write_adapter(peft_dir, model_info: dict, out_path, dtype: str = "fp32", *, name: str | None = None,
                  version: int = 1, labels=None, pad: bool = True, graph_path=None) -> AdapterInfo:
    """Write the adapter in ``peft_dir`` (any family) as an ORT adapter file for the graph ``model_info``
    describes.

    ``dtype`` is the payload: "fp32" (activates directly), "fp16", "int8" or "int4"
    (expand on the device with edgepeft.contracts.adapter_payload). ``pad`` as in
    :func:`build_slot_tensors`. ``graph_path`` is the bundle's model.onnx, which compiles a
    prompt-tuning soft prompt (:mod:`.prefix`). The write is atomic. Raises :class:`AdapterError`
    for adapters that do not fit.
    """
    from .._extras import require

    require("onnxruntime", "safetensors", "torch", feature="writing adapter files")
    from ..contracts.adapter_payload import write_adapter_file

    check_choice(dtype, PAYLOADS, "adapter payload dtype", hint="fp32 is the default")
    tensors, info = family_tensors(peft_dir, model_info, labels, pad=pad, graph_path=graph_path)
    stored = encode_payload(fold_b_int8(tensors, model_info), dtype)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_adapter_file(out_path, stored, adapter_version=version)
    info.name = name or info.name
    info.bytes, info.dtype = out_path.stat().st_size, dtype
    return info


def family_tensors(peft_dir, model_info: dict, labels=None, *, pad: bool = True,
                   graph_path=None) -> tuple[dict, AdapterInfo]:
    """fp32 tensors of any family's adapter for the graph ``model_info`` describes, and what the
    manifest records about it (``bytes`` and ``dtype`` still unset). Raises :class:`AdapterError`."""
    from ..contracts.methods import BOTTLENECK, LORA, PREFIX_TUNING
    from .prefix import read_method

    method = read_method(peft_dir)
    slot_rank = int(model_info.get("slot_rank") or 0)
    if method == LORA:
        tensors, lora, labels = build_slot_tensors(peft_dir, model_info, labels, pad=pad)
        return tensors, AdapterInfo(name=lora.path.name, rank=lora.rank, alpha=lora.alpha, method=lora.method,
                                    target_modules=lora.trained, bytes=0, dtype="", slot_rank=slot_rank,
                                    labels=labels, base_model_name_or_path=lora.config.get("base_model_name_or_path"))
    if method == BOTTLENECK:
        from .bottleneck_slots import bottleneck_slot_tensors

        if not model_info.get("slots"):
            raise AdapterError("this bundle's graph has no adapter slots (merged export)",
                               hint="export the base with slots to ship swappable adapters")
        tensors, b = bottleneck_slot_tensors(peft_dir, model_info)
        labels = _saved_head(b, model_info, tensors, labels, "only a classifier's head may travel with a "
                                                            "bottleneck adapter")
        cfg = b.config
        return tensors, AdapterInfo(name=b.path.name, rank=0, alpha=None, method=BOTTLENECK,
                                    target_modules=list(cfg.points), bytes=0, dtype="", slot_rank=slot_rank,
                                    labels=labels, base_model_name_or_path=cfg.base_model_name_or_path,
                                    bottleneck_size=cfg.bottleneck_size, activation=cfg.non_linearity)
    from .prefix import prefix_tensors, prompt_tensors, read_peft_prompt

    p = read_peft_prompt(peft_dir)
    tensors = prefix_tensors(p, model_info) if method == PREFIX_TUNING else prompt_tensors(p, model_info, graph_path)
    return tensors, AdapterInfo(name=p.name, rank=0, alpha=None, method=method, target_modules=[], bytes=0,
                                dtype="", slot_rank=slot_rank, base_model_name_or_path=p.config.get(
                                    "base_model_name_or_path"), virtual_tokens=p.virtual_tokens)
