"""Read and validate a PEFT LoRA directory (adapter_config.json + adapter weights).

Anything PEFT's ``save_pretrained`` writes for plain LoRA is accepted (rsLoRA,
rank_pattern / alpha_pattern, modules_to_save for a classification head).
Methods whose effect cannot live in additive low-rank slots are refused with
an :class:`AdapterError` that says why: other PEFT types (prompt tuning, IA3,
...), DoRA, trained biases, embedding LoRA, trainable tokens, layer replication.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AdapterError

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


@dataclass
class PeftLora:
    """A parsed LoRA adapter: per-module (A [r, in], B [out, r], scaling), plus saved whole modules."""

    path: Path
    config: dict
    modules: dict = field(default_factory=dict)   # module path -> (A, B, scaling)
    saved: dict = field(default_factory=dict)     # e.g. "classifier.weight" -> array
    method: str = "lora"

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _, _ in self.modules.values()), default=0)

    @property
    def alpha(self):
        return self.config.get("lora_alpha")


def load_adapter_json(path: Path) -> dict:
    """A PEFT adapter's JSON file as an object. Raises :class:`AdapterError` (missing, unreadable, not an object)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path.parent} has no adapter_config.json",
                           hint="pass a directory written by PEFT's save_pretrained or edgepeft train") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}", hint="re-save the adapter with PEFT") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{path} is not a JSON object", hint="re-save the adapter with PEFT")
    return data


def load_adapter_tensors(adir: Path) -> dict:
    """A PEFT adapter folder's tensors as float32 numpy arrays. Raises :class:`AdapterError`."""
    st = adir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            out = {}
            with safe_open(str(st), framework="pt") as fh:
                for k in fh.keys():
                    out[k] = fh.get_tensor(k).float().numpy()
            return out
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterError(f"{st} is corrupt or truncated: {exc}",
                               hint="re-save or re-download the adapter") from exc
    binf = adir / "adapter_model.bin"
    if binf.is_file():
        import torch

        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise AdapterError(f"{binf} is corrupt or unreadable: {exc}", hint="re-save the adapter") from exc
        return {k: v.float().numpy() for k, v in sd.items()}
    raise AdapterError(f"{adir} has no adapter_model.safetensors", hint="the PEFT directory is incomplete")


def _pattern_value(pattern: dict, module: str, default):
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module) or module.endswith(key):
            return value
    return default


def read_peft_lora(peft_dir) -> PeftLora:
    """Parse and check ``peft_dir``; raises :class:`AdapterError` on anything not plain LoRA."""
    adir = Path(peft_dir)
    if not adir.is_dir():
        raise AdapterError(f"adapter directory {adir} does not exist", hint="check the adapter path")
    cfg = load_adapter_json(adir / "adapter_config.json")
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype != "LORA":
        raise AdapterError(f"{adir.name}: PEFT method {ptype or 'unknown'} cannot be exported as adapter slots",
                           hint="only LoRA adapters (incl. rsLoRA, QLoRA-trained) swap on the device; "
                                "prompt tuning, IA3, LoHa etc. are not supported")
    refusals = [
        (cfg.get("use_dora"), "DoRA adds a magnitude vector that is not additive low-rank"),
        (cfg.get("bias", "none") not in ("none", None), f"bias={cfg.get('bias')!r} trains base biases"),
        (cfg.get("lora_bias"), "lora_bias adds a trained bias to lora_B"),
        (cfg.get("layer_replication"), "layer_replication changes the base architecture"),
        (cfg.get("trainable_token_indices"), "trainable tokens change the embedding table"),
        (cfg.get("use_qalora"), "QA-LoRA pools inputs before lora_A"),
    ]
    for bad, why in refusals:
        if bad:
            raise AdapterError(f"{adir.name}: {why}, which adapter slots cannot carry",
                               hint="train a plain LoRA adapter (edgepeft train does), or use merge mode")
    tensors = load_adapter_tensors(adir)
    out = PeftLora(path=adir, config=cfg, method="rslora" if cfg.get("use_rslora") else "lora")
    pairs: dict[str, dict] = {}
    for key, arr in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _LORA_KEY.fullmatch(name)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = arr
        elif "lora_embedding" in name or "lora_magnitude" in name:
            raise AdapterError(f"{adir.name}: tensor {key} (embedding LoRA or DoRA) cannot be exported",
                               hint="target linear projections only")
        else:
            out.saved[name.replace(".modules_to_save.default", "")] = arr
    if not pairs:
        raise AdapterError(f"{adir.name}: no LoRA weights found", hint="the adapter file is empty or not LoRA")
    alpha = cfg.get("lora_alpha", 8)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{adir.name}: module {module} has lora_{''.join(ab)} but not both A and B",
                               hint="the adapter file is incomplete")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{adir.name}: {module} has lora_A {a.shape} and lora_B {b.shape}, not a rank-r pair",
                               hint="only linear-layer LoRA is supported")
        if cfg.get("fan_in_fan_out"):
            raise AdapterError(f"{adir.name}: fan_in_fan_out (Conv1D bases) is not supported",
                               hint="use a model with nn.Linear projections")
        r = a.shape[0]
        mod_alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        scaling = mod_alpha / math.sqrt(r) if cfg.get("use_rslora") else mod_alpha / r
        if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
            raise AdapterError(f"{adir.name}: {module} holds NaN or inf", hint="the training run diverged")
        out.modules[module] = (a, b, float(scaling))
    return out
