"""The bottleneck adapter format: its config and on-disk layout, shared by training and export (torch-free).

PEFT has no bottleneck adapters, and the ``adapters`` library pins another
transformers line, so this is the project's own small module. One adapter::

    h -> h + up(act(down(h)))      down: Linear(hidden, size), up: Linear(size, hidden) initialised to zero

sits on a block's output before it joins the residual stream: after the attention
block (its output projection) and/or after the MLP block (its down projection).
``placement="houlsby"`` adapts both points (Houlsby et al. 2019), ``"pfeiffer"`` only
the MLP's (Pfeiffer et al. 2020). A zero ``up`` makes a new adapter the identity, so
training starts from the base's behaviour. The exporter's graphs put the same
computation at the same points (:func:`edgepeft.export.slots.emit_bottleneck`).

On disk (a directory, like PEFT's)::

    adapter_config.json         {"peft_type": "BOTTLENECK", "format_version": 1, "edgepeft_version",
                                 "task_type": "CAUSAL_LM" | "SEQ_CLS", "base_model_name_or_path",
                                 "model_type", "hidden_size", "num_layers", "bottleneck_size",
                                 "non_linearity": "relu" | "silu" | "gelu", "placement",
                                 "points": ["attn_out", "mlp_out"],
                                 "modules": {point: "model.layers.{i}.self_attn.o_proj", ...},
                                 "modules_to_save": ["classifier"] | null}
    adapter_model.safetensors   per adapted module M (e.g. model.layers.3.mlp.down_proj):
                                  M.bottleneck.down.weight [size, hidden]   M.bottleneck.down.bias [size]
                                  M.bottleneck.up.weight   [hidden, size]   M.bottleneck.up.bias   [hidden]
                                plus, for classifiers, the head's tensors by module name (classifier.weight ...)

``gelu`` is the exact (erf) GELU. The config is stamped with the edgepeft version and a
format version, as PEFT stamps ``peft_version``. Torch is imported inside the functions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..contracts.fields import check_choice
from ..contracts.methods import ACTIVATIONS, PLACEMENTS
from ..errors import AdapterError, TrainError

PEFT_TYPE = "BOTTLENECK"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TAG = ".bottleneck."


@dataclass
class BottleneckConfig:
    """What an adapter is: its size, non-linearity, points and the modules they follow."""

    bottleneck_size: int
    hidden_size: int
    num_layers: int
    modules: dict  # point -> module path with "{i}" for the layer
    non_linearity: str = "relu"
    placement: str = "houlsby"
    task_type: str = "CAUSAL_LM"
    model_type: str | None = None
    base_model_name_or_path: str | None = None
    modules_to_save: list | None = None
    points: list = field(default_factory=list)
    peft_type: str = PEFT_TYPE
    format_version: int = FORMAT_VERSION
    edgepeft_version: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.placement, PLACEMENTS, "bottleneck placement", error=TrainError)
        check_choice(self.non_linearity, ACTIVATIONS, "bottleneck non-linearity", error=TrainError)
        if not self.points:
            self.points = list(PLACEMENTS[self.placement])
        if not isinstance(self.bottleneck_size, int) or not 1 <= self.bottleneck_size <= self.hidden_size:
            raise TrainError(f"bottleneck size {self.bottleneck_size!r} is not between 1 and the hidden size "
                             f"{self.hidden_size}", hint="use --bottleneck-size 16..64 (hidden / 16 by default)")
        if self.edgepeft_version is None:
            from .. import __version__

            self.edgepeft_version = __version__

    def module_paths(self) -> dict[str, str]:
        """Every adapted module path -> its point."""
        return {self.modules[p].format(i=i): p for p in self.points for i in range(self.num_layers)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = CONFIG_NAME) -> BottleneckConfig:
        """Parse a saved config; raises :class:`AdapterError` naming what is wrong."""
        if not isinstance(data, dict) or str(data.get("peft_type", "")).upper() != PEFT_TYPE:
            raise AdapterError(f"{source} is not a bottleneck adapter config", hint="pass a directory that "
                               "`edgepeft train --method bottleneck` wrote")
        if int(data.get("format_version", 0) or 0) > FORMAT_VERSION:
            raise AdapterError(f"{source} uses bottleneck format {data.get('format_version')}, newer than this "
                               f"edgepeft reads ({FORMAT_VERSION})", hint="upgrade edgepeft")
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError, TrainError) as exc:
            msg = exc.message if isinstance(exc, TrainError) else str(exc)
            raise AdapterError(f"{source}: {msg}", hint="re-save the adapter with edgepeft train") from exc


def config_for(model, *, size: int | None, non_linearity: str, placement: str, task: str,
               heads: list | None = None, base_name: str | None = None) -> BottleneckConfig:
    """A config for ``model`` (a transformers task model) from the architecture table; ``size`` None is
    hidden // 16 (at least 8). Raises :class:`TrainError` for an architecture the exporter lacks."""
    from ..errors import ModelError
    from .arch import describe

    cfg = model.config
    try:
        arch = describe(cfg, task)
    except ModelError as exc:
        raise TrainError(f"bottleneck adapters need an exportable architecture: {exc.message}", hint=exc.hint) from exc
    hidden = int(getattr(cfg, "hidden_size", None) or cfg.dim)
    layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layers)
    return BottleneckConfig(bottleneck_size=size or max(8, hidden // 16), hidden_size=hidden, num_layers=layers,
                            modules=arch.bottleneck_modules(), non_linearity=non_linearity, placement=placement,
                            task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
                            model_type=cfg.model_type, base_model_name_or_path=base_name, modules_to_save=heads)


def read_config(adapter_dir) -> BottleneckConfig:
    """The config of a saved bottleneck adapter; raises :class:`AdapterError`."""
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {path}: {exc}", hint="pass a bottleneck adapter directory") from exc
    return BottleneckConfig.from_dict(data, str(path))
