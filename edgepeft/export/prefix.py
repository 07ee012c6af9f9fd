"""PEFT prompt learning (prefix tuning, prompt tuning) -> the initial key/value cache of a request.

Both families leave a decoder's weights alone and put something *before* the
request's tokens; on the device both become the same thing, a per-layer prefix
``prefix.{i}.key`` / ``prefix.{i}.value`` [kv_heads, virtual_tokens, head_dim]
(:mod:`edgepeft.contracts.methods`) that the decode loop places in the key/value cache
ahead of the prompt. So one base graph serves both, with no new input.

- Prefix tuning: PEFT saves ``prompt_embeddings`` [virtual_tokens, layers * 2 *
  kv_heads * head_dim] (already through its MLP when trained with
  ``prefix_projection``); its own ``get_prompt`` views that as [tokens, layers*2,
  kv_heads, head_dim], even rows keys, odd rows values (GQA bases are sized with
  the key/value heads). Exact: these are the very tensors PEFT feeds as ``past_key_values``.
- Prompt tuning: PEFT saves the soft prompt, ``prompt_embeddings`` [virtual_tokens,
  hidden]: input embeddings that precede the prompt. For a causal decoder the cache
  those positions leave is a function of the soft prompt alone, so the server runs the
  bundle's own graph over it once (:mod:`.prompt_kv`: the same quantized weights the
  device runs) and ships the cache. One exception to exactness: LongRoPE (Phi-3) picks
  its rotary factors by the length of each forward pass, so once soft prompt + prompt
  outgrow ``original_max_position_embeddings`` (4096 for Phi-3.5-mini) PyTorch re-rotates
  the soft prompt with the long factors while the compiled cache keeps the short ones,
  as every cached conversation does in transformers too. Why not an embeddings input on the device: it would
  re-run the soft prompt through every layer on every request; the measured trade
  (bytes shipped against prefill time) is in docs/bundle-format.md and the benchmark.

Raises :class:`AdapterError` for anything else PEFT's prompt learning can save
(P-tuning, multitask prompts, encoder-decoder submodules, classifiers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contracts.methods import PREFIX_TUNING, PROMPT_TUNING, prefix_names
from ..errors import AdapterError

PEFT_TYPES = {"PREFIX_TUNING": PREFIX_TUNING, "PROMPT_TUNING": PROMPT_TUNING}


@dataclass
class PeftPrompt:
    """A parsed prompt-learning adapter: its family, length, and the saved ``prompt_embeddings``."""

    path: Path
    config: dict
    method: str
    virtual_tokens: int
    embeddings: np.ndarray  # [virtual_tokens, width]

    @property
    def name(self) -> str:
        return self.path.name


def read_peft_prompt(peft_dir) -> PeftPrompt:
    """Parse and check a PEFT prefix- or prompt-tuning directory; raises :class:`AdapterError`."""
    from .peft_reader import load_adapter_json, load_adapter_tensors

    adir = Path(peft_dir)
    cfg = load_adapter_json(adir / "adapter_config.json")
    ptype = str(cfg.get("peft_type", "")).upper()
    method = PEFT_TYPES.get(ptype)
    if method is None:
        raise AdapterError(f"{adir.name}: PEFT method {ptype or 'unknown'} is not prefix or prompt tuning",
                           hint="pass a directory PEFT saved for PrefixTuningConfig or PromptTuningConfig")
    task = str(cfg.get("task_type") or "CAUSAL_LM").upper()
    if task != "CAUSAL_LM":
        raise AdapterError(f"{adir.name}: {method} for task {task} cannot be exported; on a device the prefix is "
                           "a decoder's initial key/value cache", hint="train it for a causal LM, or train a "
                           "classifier with --method bottleneck or lora")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise AdapterError(f"{adir.name}: {method} for an encoder-decoder model cannot be exported",
                           hint="edgepeft exports decoder-only bases")
    n = int(cfg.get("num_virtual_tokens") or 0)
    tensors = load_adapter_tensors(adir)
    emb = tensors.get("prompt_embeddings")
    if emb is None or emb.ndim != 2 or n < 1 or emb.shape[0] != n:
        shape = None if emb is None else list(emb.shape)
        raise AdapterError(f"{adir.name}: expected prompt_embeddings of {n} rows, found {shape}",
                           hint="save the adapter with PEFT's save_pretrained")
    if not np.all(np.isfinite(emb)):
        raise AdapterError(f"{adir.name}: prompt_embeddings hold NaN or inf", hint="the training run diverged")
    return PeftPrompt(adir, cfg, method, n, np.ascontiguousarray(emb, dtype=np.float32))


def _check_length(p: PeftPrompt, model_info: dict) -> None:
    ctx = int(model_info.get("max_context") or 0)
    if ctx and p.virtual_tokens + 2 > ctx:
        raise AdapterError(f"{p.name}: a prefix of {p.virtual_tokens} virtual tokens leaves no room in a context of "
                           f"{ctx} tokens", hint=f"train with --virtual-tokens well under {ctx}")


def prefix_tensors(p: PeftPrompt, model_info: dict) -> dict:
    """Prefix tuning's saved cache as ``prefix.{i}.key/value`` [kv_heads, tokens, head_dim]; raises
    :class:`AdapterError` when its layout does not match the graph's layers, heads and head size."""
    if model_info.get("task") == "classification":
        raise AdapterError(f"{p.name}: prefix adapters apply to decoders", hint="build it into a decoder bundle")
    layers, kv, hd = (int(model_info[k]) for k in ("num_layers", "num_kv_heads", "head_dim"))
    _check_length(p, model_info)
    cfg_layers, heads = int(p.config.get("num_layers") or 0), int(p.config.get("num_attention_heads") or 0)
    if (cfg_layers, heads) != (layers, kv) or p.embeddings.shape[1] != layers * 2 * kv * hd:
        raise AdapterError(f"{p.name}: its prefix is {cfg_layers} layers x {heads} heads "
                           f"({p.embeddings.shape[1]} values per token); this base has {layers} layers x {kv} "
                           f"key/value heads x {hd}", hint="the adapter was trained for a different base")
    grid = p.embeddings.reshape(p.virtual_tokens, layers * 2, kv, hd).transpose(1, 2, 0, 3)
    out = {}
    for i in range(layers):
        k, v = prefix_names(i)
        out[k] = np.ascontiguousarray(grid[2 * i])
        out[v] = np.ascontiguousarray(grid[2 * i + 1])
    return out


def prompt_tensors(p: PeftPrompt, model_info: dict, graph_path) -> dict:
    """A prompt-tuning soft prompt compiled into ``prefix.{i}.key/value`` by the graph at ``graph_path``
    (the bundle's own model.onnx). Raises :class:`AdapterError` for a soft prompt of another width."""
    from .prompt_kv import compile_prompt

    if model_info.get("task") == "classification":
        raise AdapterError(f"{p.name}: prompt-tuning adapters are exported for decoders",
                           hint="build it into a decoder bundle")
    hidden = int(model_info["hidden_size"])
    _check_length(p, model_info)
    if p.embeddings.shape[1] != hidden:
        raise AdapterError(f"{p.name}: its soft prompt is {p.embeddings.shape[1]} wide, this base's embeddings are "
                           f"{hidden}", hint="the adapter was trained for a different base")
    if graph_path is None:
        raise AdapterError(f"{p.name}: compiling a soft prompt needs the bundle's graph",
                           hint="pass the bundle's model.onnx (edgepeft build and update create do)")
    return compile_prompt(graph_path, p.embeddings, model_info)


def read_method(peft_dir) -> str:
    """The family of the adapter in ``peft_dir`` from its adapter_config.json (``lora``, ``bottleneck``,
    ``prefix-tuning``, ``prompt-tuning``); raises :class:`AdapterError` for anything else."""
    if not Path(peft_dir).is_dir():
        raise AdapterError(f"adapter directory {peft_dir} does not exist", hint="check the adapter path")
    path = Path(peft_dir) / "adapter_config.json"
    try:
        ptype = str(json.loads(path.read_text()).get("peft_type", "")).upper()
    except FileNotFoundError:
        raise AdapterError(f"{Path(peft_dir)} has no adapter_config.json",
                           hint="pass a directory written by PEFT's save_pretrained or edgepeft train") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}", hint="re-save the adapter") from exc
    known = {"LORA": "lora", "BOTTLENECK": "bottleneck", **PEFT_TYPES}
    if ptype not in known:
        raise AdapterError(f"{Path(peft_dir).name}: PEFT method {ptype or 'unknown'} cannot be exported as a "
                           "swappable adapter", hint="edgepeft ships LoRA (incl. QLoRA-trained), prefix tuning, "
                                                     "prompt tuning and bottleneck adapters")
    return known[ptype]


__all__ = ["PeftPrompt", "read_peft_prompt", "prefix_tensors", "prompt_tensors", "read_method"]
