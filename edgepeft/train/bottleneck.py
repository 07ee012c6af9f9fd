"""Bottleneck adapters in PyTorch: the modules that wrap a frozen base (:func:`wrap`) and load a saved one.

The format (config, file layout) lives in :mod:`edgepeft.models.bottleneck`, where export reads it too.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from ..errors import AdapterError, TrainError
from ..models.bottleneck import (
    CONFIG_NAME,
    FORMAT_VERSION,
    PEFT_TYPE,
    TAG,
    WEIGHTS_NAME,
    BottleneckConfig,
    config_for,
    read_config,
)


def _act(name: str):
    import torch.nn as nn

    return {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}[name]()


def _adapter_module(hidden: int, size: int, act: str):
    import torch.nn as nn

    class BottleneckAdapter(nn.Module):
        """``h + up(act(down(h)))``; ``up`` starts at zero, so a new adapter is the identity."""

        def __init__(self):
            super().__init__()
            self.down = nn.Linear(hidden, size)
            self.act = _act(act)
            self.up = nn.Linear(size, hidden)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
            nn.init.zeros_(self.down.bias)

        def forward(self, h):
            return h + self.up(self.act(self.down(h)))

    return BottleneckAdapter()


def _key(path: str) -> str:
    return path.replace(".", "__")


def wrap(model, config: BottleneckConfig):
    """Freeze ``model`` and attach a bottleneck adapter after every module ``config`` names.

    Returns a :class:`BottleneckModel` (an ``nn.Module``) that trains like a PeftModel in
    edgepeft's loop: ``forward``/``generate`` pass through, ``disable_adapter()`` runs the bare
    base, ``save_pretrained(dir)`` writes the format above. Raises :class:`TrainError` when a
    module the architecture names is missing from ``model``.
    """
    import torch.nn as nn

    class BottleneckModel(nn.Module):
        def __init__(self, base, cfg: BottleneckConfig):
            super().__init__()
            self.base_model = base
            self.bottleneck_config = cfg
            self.bottleneck = nn.ModuleDict()
            self._enabled = True
            self._hooks = []
            named = dict(base.named_modules())
            for p in base.parameters():
                p.requires_grad_(False)
            for path in cfg.module_paths():
                if path not in named:
                    raise TrainError(f"the base has no module {path} for a bottleneck adapter",
                                     hint="bottleneck adapters need a base of the exporter's architecture table")
                adapter = _adapter_module(cfg.hidden_size, cfg.bottleneck_size, cfg.non_linearity)
                self.bottleneck[_key(path)] = adapter
                self._hooks.append(named[path].register_forward_hook(self._hook(adapter)))
            for head in cfg.modules_to_save or []:
                for p in named[head].parameters():
                    p.requires_grad_(True)

        def _hook(self, adapter):
            def hook(module, args, output):
                return adapter(output) if self._enabled else output
            return hook

        @property
        def config(self):
            return self.base_model.config

        def forward(self, *args, **kwargs):
            return self.base_model(*args, **kwargs)

        def generate(self, *args, **kwargs):
            return self.base_model.generate(*args, **kwargs)

        def get_base_model(self):
            return self.base_model

        @contextmanager
        def disable_adapter(self):
            """Run the bare base inside the block (the adapters stay attached)."""
            was, self._enabled = self._enabled, False
            try:
                yield
            finally:
                self._enabled = was

        def adapter_state_dict(self) -> dict:
            """The tensors the format saves: adapters by module path, then the head's."""
            out = {}
            for path in self.bottleneck_config.module_paths():
                for name, t in self.bottleneck[_key(path)].state_dict().items():
                    out[f"{path}{TAG}{name}"] = t.detach().cpu().contiguous()
            named = dict(self.base_model.named_modules())
            for head in self.bottleneck_config.modules_to_save or []:
                for name, t in named[head].state_dict().items():
                    out[f"{head}.{name}"] = t.detach().cpu().contiguous()
            return out

        def load_adapter_state_dict(self, tensors: dict, source: str) -> None:
            """Fill the adapters (and head) from saved tensors; raises :class:`AdapterError` on any mismatch."""
            import torch

            mine = self.adapter_state_dict()
            missing = sorted(set(mine) - set(tensors))
            extra = sorted(set(tensors) - set(mine))
            if missing or extra:
                raise AdapterError(f"{source} does not fit this model ({len(missing)} tensors missing, "
                                   f"{len(extra)} unexpected, e.g. {(missing or extra)[0]})",
                                   hint="load it into the base, size and placement it was trained with")
            params = dict(self.bottleneck.named_parameters())
            named = dict(self.base_model.named_modules())
            with torch.no_grad():
                for key, t in tensors.items():
                    if tuple(t.shape) != tuple(mine[key].shape):
                        raise AdapterError(f"{source}: {key} is {list(t.shape)}, the model needs "
                                           f"{list(mine[key].shape)}", hint="the adapter was trained for another base")
                    if TAG in key:
                        path, part = key.split(TAG)
                        params[f"{_key(path)}.{part}"].copy_(t)
                    else:
                        mod, _, pname = key.rpartition(".")
                        getattr(named[mod], pname).copy_(t)

        def save_pretrained(self, out_dir, safe_serialization: bool = True, **_) -> None:
            from safetensors.torch import save_file

            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_file(self.adapter_state_dict(), str(out / WEIGHTS_NAME),
                      metadata={"format": "pt", "edgepeft.method": "bottleneck",
                                "edgepeft.format_version": str(FORMAT_VERSION)})
            (out / CONFIG_NAME).write_text(json.dumps(self.bottleneck_config.to_dict(), indent=2) + "\n")

    return BottleneckModel(model, config)


def load(model, adapter_dir):
    """Wrap ``model`` with the saved bottleneck adapter in ``adapter_dir`` (PyTorch reference, resume,
    ``--init-adapter``). Raises :class:`AdapterError` when it does not fit."""
    from safetensors.torch import load_file

    cfg = read_config(adapter_dir)
    wrapped = wrap(model, cfg)
    path = Path(adapter_dir) / WEIGHTS_NAME
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise AdapterError(f"{path} is unreadable: {exc}", hint="re-save the adapter") from exc
    wrapped.load_adapter_state_dict(tensors, str(path))
    return wrapped


__all__ = ["BottleneckConfig", "config_for", "wrap", "load", "read_config", "PEFT_TYPE", "FORMAT_VERSION"]
