"""A saved bottleneck adapter (the format of :mod:`edgepeft.models.bottleneck`) -> tensors for a graph's slots.

Per adapted module ``M`` the format holds ``M.bottleneck.down.weight`` [size, hidden]
(torch's Linear layout) and friends; the graph's slots take the transposed weights
(``layers.{i}.{point}.bottleneck.down.weight`` [hidden, size]) so the graph computes
``x @ W``. Points the graph has but the adapter does not use keep their identity defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contracts.methods import bottleneck_names
from ..errors import AdapterError

_TAG = ".bottleneck."


@dataclass
class SavedBottleneck:
    """A read bottleneck adapter: its config, adapter tensors, and whole modules saved beside (a head)."""

    path: Path
    config: object  # edgepeft.models.bottleneck.BottleneckConfig
    tensors: dict = field(default_factory=dict)  # module path -> {part: array}
    saved: dict = field(default_factory=dict)  # e.g. "classifier.weight" -> array


def read_bottleneck(adapter_dir) -> SavedBottleneck:
    """Parse and check a bottleneck adapter directory; raises :class:`AdapterError`."""
    from ..models.bottleneck import WEIGHTS_NAME, read_config
    from .peft_reader import load_adapter_tensors

    adir = Path(adapter_dir)
    cfg = read_config(adir)
    if not (adir / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{adir.name} has no {WEIGHTS_NAME}", hint="the adapter directory is incomplete")
    out = SavedBottleneck(adir, cfg)
    for key, arr in load_adapter_tensors(adir).items():
        if _TAG in key:
            module, part = key.split(_TAG, 1)
            out.tensors.setdefault(module, {})[part] = arr
        else:
            out.saved[key] = arr
    paths = cfg.module_paths()
    if set(out.tensors) != set(paths):
        odd = sorted(set(out.tensors) ^ set(paths))
        raise AdapterError(f"{adir.name}: its tensors and its config disagree on the adapted modules ({odd[0]} ...)",
                           hint="re-save the adapter with edgepeft train")
    return out


def bottleneck_slot_tensors(adapter_dir, model_info: dict) -> tuple[dict, SavedBottleneck]:
    """Slot tensors for the graph ``model_info`` describes; raises :class:`AdapterError` when the graph
    has no bottleneck slots at the adapter's points, another activation, or other dimensions."""
    b = read_bottleneck(adapter_dir)
    cfg, name = b.config, b.path.name
    graph = model_info.get("bottleneck") or {}
    missing = [p for p in cfg.points if p not in (graph.get("points") or [])]
    if missing:
        have = ", ".join(graph.get("points") or []) or "none"
        raise AdapterError(f"{name}: this bundle's graph has no bottleneck slots at {', '.join(missing)} "
                           f"(it has {have})", hint="rebuild the bundle with this adapter (or --bottleneck-slots "
                                                    f"{cfg.placement}) before shipping it as an update")
    if graph.get("activation") != cfg.non_linearity:
        raise AdapterError(f"{name}: trained with {cfg.non_linearity}, the bundle's bottleneck slots apply "
                           f"{graph.get('activation')}", hint="retrain with the bundle's --non-linearity, or rebuild "
                                                              "the bundle for this adapter")
    hidden, layers = int(model_info["hidden_size"]), int(model_info["num_layers"])
    if (cfg.hidden_size, cfg.num_layers) != (hidden, layers) or cfg.model_type not in (None,
                                                                                        model_info.get("model_type")):
        raise AdapterError(f"{name}: trained on a {cfg.model_type} base of {cfg.num_layers} layers x "
                           f"{cfg.hidden_size}; this base is {model_info.get('model_type')} {layers} x {hidden}",
                           hint="the adapter was trained for a different base")
    size, tensors = cfg.bottleneck_size, {}
    want = {"down.weight": (size, hidden), "down.bias": (size,), "up.weight": (hidden, size), "up.bias": (hidden,)}
    for point in cfg.points:
        template = cfg.modules[point]
        for i in range(layers):
            parts = b.tensors[template.format(i=i)]
            for part, shape in want.items():
                arr = parts.get(part)
                if arr is None or tuple(arr.shape) != shape:
                    got = None if arr is None else list(arr.shape)
                    raise AdapterError(f"{name}: {template.format(i=i)}.bottleneck.{part} is {got}, expected "
                                       f"{list(shape)}", hint="re-save the adapter with edgepeft train")
                if not np.all(np.isfinite(arr)):
                    raise AdapterError(f"{name}: {template.format(i=i)} holds NaN or inf",
                                       hint="the training run diverged")
            slot = bottleneck_names(point, i)
            tensors[slot["down.weight"]] = np.ascontiguousarray(parts["down.weight"].T, np.float32)
            tensors[slot["down.bias"]] = parts["down.bias"].astype(np.float32)
            tensors[slot["up.weight"]] = np.ascontiguousarray(parts["up.weight"].T, np.float32)
            tensors[slot["up.bias"]] = parts["up.bias"].astype(np.float32)
    return tensors, b


__all__ = ["SavedBottleneck", "read_bottleneck", "bottleneck_slot_tensors"]
