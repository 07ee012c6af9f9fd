"""Read and pre-check PEFT adapter directories before any export work starts.

Adapters may come from ``edgepeft train`` (then ``edgepeft_training.json``
beside them carries version, labels, metrics and the base fingerprint) or
from anywhere PEFT can save. Everything here is cheap JSON reading, so bad
input is refused before the long export begins.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..contracts.methods import ACTIVATIONS, BOTTLENECK, BOTTLENECK_POINTS, PREFIX_METHODS
from ..contracts.names import check_name
from ..errors import AdapterError

TRAINING_RECORD = "edgepeft_training.json"
_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification"}
_METHODS = {"LORA": "lora", "PREFIX_TUNING": "prefix-tuning", "PROMPT_TUNING": "prompt-tuning",
            "BOTTLENECK": "bottleneck"}


@dataclass
class AdapterInput:
    """One ``--adapter NAME=DIR`` after its config was read and checked."""

    name: str
    path: Path
    config: dict
    rank: int  # LoRA rank; 0 for the other families
    alpha: float | None
    task: str
    target_modules: list[str]  # LoRA: projections; bottleneck: points (attn_out, mlp_out)
    version: int = 1
    record: dict = field(default_factory=dict)
    record_sha256: str | None = None  # of the edgepeft_training.json bytes that were read
    method: str = "lora"
    virtual_tokens: int | None = None  # prefix and prompt tuning
    bottleneck_size: int | None = None
    activation: str | None = None  # bottleneck: its non-linearity

    @property
    def public_metrics(self) -> dict:
        """What a bundle may carry about this adapter's training: metric values and the record's hash."""
        from ..contracts.metrics import manifest_metrics

        out = manifest_metrics(self.metrics)
        if self.record_sha256:
            out["record_sha256"] = self.record_sha256
        return out

    @property
    def labels(self) -> list[str] | None:
        return self.record.get("labels")

    @property
    def metrics(self) -> dict:
        return self.record.get("metrics", {})

    @property
    def base_fingerprint(self) -> str | None:
        return (self.record.get("base") or {}).get("fingerprint")


def parse_adapter_arg(text: str) -> tuple[str, Path]:
    """``NAME=DIR`` -> (name, path); raises :class:`AdapterError`."""
    if "=" not in text:
        raise AdapterError(f"--adapter {text!r} is not NAME=DIR", hint="e.g. --adapter support=out/support-lora")
    name, _, path = text.partition("=")
    check_name(name, "--adapter", "NAME")
    return name, Path(path)


def read_adapter(name: str, path: Path, *, version: int | None = None) -> AdapterInput:
    """Read an adapter directory (PEFT LoRA, prefix or prompt tuning; edgepeft's bottleneck format);
    refuse what edgepeft cannot ship.

    Raises :class:`AdapterError` for a missing directory or file, an unreadable
    config, or a method edgepeft cannot apply on a device.
    """
    cfg_path = path / "adapter_config.json"
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory",
                           hint="pass the directory PEFT's save_pretrained wrote")
    if not cfg_path.is_file():
        raise AdapterError(f"adapter {name!r}: {path} has no adapter_config.json",
                           hint="pass the directory PEFT's save_pretrained wrote")
    weights = [p for p in ("adapter_model.safetensors", "adapter_model.bin") if (path / p).is_file()]
    if not weights:
        raise AdapterError(f"adapter {name!r}: {path} has no adapter_model.safetensors",
                           hint="save the adapter with PEFT's save_pretrained (safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: {cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {cfg_path} is not a JSON object", hint="re-save the adapter")
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype not in _METHODS:
        raise AdapterError(
            f"adapter {name!r} uses PEFT method {ptype or 'unknown'}, which edgepeft cannot ship to a device",
            hint="train LoRA, QLoRA, prompt tuning, prefix tuning or a bottleneck adapter "
                 "(edgepeft train --method lora|qlora|prompt-tuning|prefix-tuning|bottleneck)")
    record, record_sha = _record(name, path)
    task = _TASKS.get(str(cfg.get("task_type", "CAUSAL_LM")).upper())
    if task is None:
        raise AdapterError(f"adapter {name!r} has task_type {cfg.get('task_type')!r}",
                           hint="edgepeft builds causal-LM and sequence-classification adapters")
    ver = version or int(record.get("version", 1) or 1)
    common = dict(name=name, path=path, config=cfg, task=task, version=ver, record=record, record_sha256=record_sha)
    method = _METHODS[ptype]
    if method in PREFIX_METHODS:
        n = cfg.get("num_virtual_tokens")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise AdapterError(f"adapter {name!r} has num_virtual_tokens {n!r}", hint="re-save it with PEFT")
        if task != "causal-lm":
            raise AdapterError(f"adapter {name!r} is {method} for a classifier; prefixes are exported for decoders",
                               hint="train the classifier with --method bottleneck or lora")
        return AdapterInput(rank=0, alpha=None, target_modules=[], method=method, virtual_tokens=n, **common)
    if method == BOTTLENECK:
        size, act, points = cfg.get("bottleneck_size"), cfg.get("non_linearity"), cfg.get("points")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or act not in ACTIVATIONS or \
                not isinstance(points, list) or not points or set(points) - set(BOTTLENECK_POINTS):
            raise AdapterError(f"adapter {name!r}: {cfg_path} is not a valid bottleneck config "
                               f"(bottleneck_size {size!r}, non_linearity {act!r}, points {points!r})",
                               hint="re-save it with edgepeft train --method bottleneck")
        return AdapterInput(rank=0, alpha=None, target_modules=list(points), method=method, bottleneck_size=size,
                            activation=act, **common)
    for flag, label in (("use_dora", "DoRA"), ("layer_replication", "layer replication")):
        if cfg.get(flag):
            raise AdapterError(f"adapter {name!r} uses {label}, which adapter slots cannot express",
                               hint="train a plain LoRA adapter, or merge it with --merge")
    rank = int(cfg.get("r", 0))
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError(f"adapter {name!r} uses per-module ranks (rank_pattern/alpha_pattern)",
                           hint="train with one rank for all modules")
    if rank <= 0:
        raise AdapterError(f"adapter {name!r} has rank {rank}", hint="the LoRA rank r must be positive")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return AdapterInput(rank=rank, alpha=float(cfg.get("lora_alpha", rank)), target_modules=sorted(targets),
                        **common)


def _record(name: str, path: Path) -> tuple[dict, str | None]:
    """The training record beside an adapter (``{}`` if none) and the SHA-256 of its bytes."""
    record, record_sha = {}, None
    rec_path = path / TRAINING_RECORD
    if rec_path.is_file():
        try:
            raw = rec_path.read_bytes()
            record = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise AdapterError(f"adapter {name!r}: {rec_path} is not valid JSON: {exc}",
                               hint="rewrite it, or remove it to build the adapter without its training record") from exc
        if not isinstance(record, dict):
            raise AdapterError(f"adapter {name!r}: {rec_path} is not a JSON object",
                               hint="rewrite it, or remove it to build the adapter without its training record")
        record_sha = "sha256:" + hashlib.sha256(raw).hexdigest()
    return record, record_sha


def check_trained_base(a: AdapterInput, base_name: str, base_dir: str | None) -> None:
    """Refuse an adapter whose training record names another kind of base than ``base_dir``'s config.

    Cheap (two small JSON files), so it runs before the export; the weights fingerprint
    is compared after the export. Raises :class:`AdapterError` naming the base it was trained on.
    """
    trained = a.record.get("base") or {}
    trained_type = trained.get("model_type")
    cfg = Path(base_dir or "") / "config.json"
    if not trained_type or not base_dir or not cfg.is_file():
        return
    try:
        base_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return
    if base_type and base_type != trained_type:
        from ..models.base import EMBEDDED, embedded_key

        key = embedded_key(str(trained.get("name") or ""))
        use = f"--base {EMBEDDED[key][0]}" if key else f"--base {trained.get('path') or trained.get('name')}"
        raise AdapterError(f"adapter {a.name!r} was trained on {trained.get('name')} ({trained_type}), "
                           f"not on {base_name} ({base_type})",
                           hint=f"build it with {use}" + (" (or leave --base out)" if key else "")
                           + ", or retrain it on this base")
