"""Load the base, fingerprint it, and attach the adapter family: LoRA/QLoRA, prompt or prefix tuning
(PEFT), or a bottleneck adapter (:mod:`.bottleneck`).

Target modules are checked on a weightless ("meta") copy of the model first, so
a typo fails in a second instead of after loading gigabytes. The fingerprint
(:func:`edgepeft.models.base.weights_fingerprint`) is taken on the fp32 task model
before LoRA is attached; for QLoRA that means one fp32 load before the 4-bit
one, so the adapter is bound to the same fingerprint the exporter computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._extras import require
from ..errors import MissingExtraError, ModelError, TrainError
from ..models.base import BaseSource, load_model, weights_fingerprint
from .options import TrainOptions, default_targets

HEAD_NAMES = ("classifier", "score")


@dataclass
class Prepared:
    model: object  # peft.PeftModel
    fingerprint: str
    model_type: str
    target_modules: list[str] | str
    modules_to_save: list[str] | None
    trainable_params: int
    total_params: int
    adapter: dict = field(default_factory=dict)  # the training record's view: family and size


def check_qlora_available() -> None:
    """Raise :class:`MissingExtraError` when bitsandbytes is missing or broken."""
    require("bitsandbytes", feature="--method qlora (4-bit NF4 base)")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken install raises anything from OSError to RuntimeError
        raise MissingExtraError(f"bitsandbytes is installed but cannot be imported: {exc}",
                                hint="reinstall it (pip install -U bitsandbytes), or use --method lora") from exc


def load_config(source: BaseSource, task: str, num_labels: int | None):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of base {source.path}: {exc}",
                         hint="check --base; hub ids need internet access") from exc
    if task == "classification" and num_labels:
        config.num_labels = num_labels
    return config


def check_targets(config, task: str, targets: list[str] | None) -> tuple[list[str] | str, list[str] | None]:
    """Resolve and verify target modules on a meta-device model; returns (targets, modules_to_save)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            skeleton = auto.from_config(config)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"model type {config.model_type!r} cannot be used for {task}: {exc}",
                         hint="pick a base made for this task (a decoder for chat data, an encoder for text + label)") from exc
    names = dict(skeleton.named_modules())
    heads = _head_modules(config, names) if task == "classification" else None
    if task == "classification" and not heads:
        raise ModelError(f"cannot find the classification head of {config.model_type}",
                         hint="use a BERT-family or Llama-family base")
    chosen = targets if targets is not None else default_targets(config.model_type)
    if chosen == "all-linear" and task == "classification":
        chosen = _encoder_projections(config) or chosen
    if chosen == "all-linear":
        return chosen, heads
    adaptable = {n for n, m in names.items() if _is_adaptable(m)}
    for t in chosen:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits or not any(h in adaptable for h in hits):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in adaptable if not n.startswith(HEAD_NAMES)})
            why = "no module has that name" if not hits else "it is not a linear layer"
            raise TrainError(f"target module {t!r} cannot be adapted in {config.model_type}: {why}",
                             hint=f"choose from: {', '.join(leaves)}")
    return list(chosen), heads


def _head_modules(config, names: dict) -> list[str]:
    """The whole modules a classifier adapter must save: every head stage the exporter fills from the adapter
    (DistilBERT's pre_classifier, DeBERTa-v3's pooler, not only ``classifier``), else the usual head names."""
    from ..models.arch import ENCODERS

    arch = ENCODERS.get(str(getattr(config, "model_type", "")))
    stages = [s.module.split(".")[0] for s in arch.head if s.source == "adapter"] if arch else []
    return [h for h in dict.fromkeys([*stages, *HEAD_NAMES]) if h in names]


def _encoder_projections(config) -> list[str] | None:
    """An encoder's per-layer projections from the exporter's table: "all-linear" without its head stages
    (which the adapter saves whole), so every trained module has a slot."""
    from ..models.arch import ENCODERS

    arch = ENCODERS.get(str(getattr(config, "model_type", "")))
    return [m for m, _ in arch.proj] if arch else None


def _is_adaptable(module) -> bool:
    import torch.nn as nn

    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)) or type(module).__name__ == "Conv1D"


def prepare(opts: TrainOptions, source: BaseSource, task: str, labels: list[str] | None,
            tokenizer, device) -> Prepared:
    """Load the base for ``task``, fingerprint it, attach the adapter; raises ModelError/TrainError."""
    require("torch", "transformers", "peft", feature="training")
    import torch

    num_labels = len(labels) if labels else None
    config = load_config(source, task, num_labels)
    lora_family = opts.method in ("lora", "qlora")
    targets, heads = check_targets(config, task, opts.target_modules if lora_family else None)
    id2label = {i: n for i, n in enumerate(labels)} if labels else None

    # quiet: transformers' load report would list the new head as MISSING; plan_lines already said so
    model = load_model(source, task=task, num_labels=num_labels, id2label=id2label, dtype=torch.float32, quiet=True)
    fingerprint = weights_fingerprint(model.state_dict())
    if opts.method == "qlora":
        del model
        model = _load_4bit(source, task, num_labels, id2label, device, heads)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if opts.gradient_checkpointing and opts.method != "qlora":  # qlora turned it on already
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    elif opts.method == "prefix-tuning":
        _no_checkpointing(model)
    if lora_family:
        adapted, info = _attach_lora(opts, model, config, task, targets, heads)
    elif opts.method == "bottleneck":
        adapted, info = _attach_bottleneck(opts, model, task, heads, source)
        targets = info["points"]
    else:
        adapted, info = _attach_prompt(opts, model, task, tokenizer)
        targets = []
    if opts.init_adapter:
        load_initial_adapter(adapted, opts.init_adapter, fingerprint, opts)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.parameters())
    return Prepared(adapted, fingerprint, config.model_type, targets, heads, trainable, total,
                    {"method": opts.method} | info)


def _attach_lora(opts, model, config, task, targets, heads=None):
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                      bias="none",  # SEQ_CLS makes peft save "classifier"/"score"; other head stages listed
                      modules_to_save=[h for h in heads or [] if h not in HEAD_NAMES] or None,
                      task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM)
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise TrainError(f"cannot attach LoRA to {config.model_type}: {exc}",
                         hint="pass --target-modules with linear layer names of this model") from exc
    return peft_model, {"rank": opts.rank, "alpha": opts.alpha, "dropout": opts.dropout}


def _attach_bottleneck(opts, model, task, heads, source):
    from . import bottleneck

    cfg = bottleneck.config_for(model, size=opts.bottleneck_size, non_linearity=opts.non_linearity,
                                placement=opts.placement, task=task, heads=heads, base_name=source.name)
    return bottleneck.wrap(model, cfg), {"bottleneck_size": cfg.bottleneck_size, "placement": cfg.placement,
                                         "non_linearity": cfg.non_linearity, "points": list(cfg.points)}


def _attach_prompt(opts, model, task, tokenizer):
    """PEFT prompt tuning (a soft prompt) or prefix tuning (the per-layer key/value prefix itself, or through
    PEFT's MLP), both started from real tokens: ``--prompt-init`` text, else tokens sampled from the vocabulary."""
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    if task == "classification":  # the runner refuses this before any weights load; a guard for the API
        raise TrainError(f"{opts.method} is exported for decoders only", hint="use --method bottleneck or lora")
    n = opts.virtual_tokens
    if opts.method == "prefix-tuning":
        cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                 prefix_projection=opts.prefix_projection)
        if opts.prefix_projection:
            cfg.encoder_hidden_size = model.config.hidden_size
        try:
            peft_model = get_peft_model(model, cfg)
        except ValueError as exc:  # e.g. a base that keeps no per-layer key/value cache
            raise TrainError(f"cannot attach prefix tuning to {model.config.model_type}: {exc}",
                             hint="use --method prompt-tuning or lora") from exc
        if not opts.prefix_projection:
            _init_prefix(peft_model, _init_ids(tokenizer, opts.prompt_init, n, model.config.vocab_size, opts.seed))
        return peft_model, {"virtual_tokens": n, "prefix_projection": opts.prefix_projection,
                            "init": opts.prompt_init or ("sampled vocabulary" if not opts.prefix_projection
                                                         else "random (PEFT)")}
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                                          prompt_tuning_init=PromptTuningInit.RANDOM))
    ids = _init_ids(tokenizer, opts.prompt_init, n, model.config.vocab_size, opts.seed)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(peft_model.word_embeddings(ids))
    return peft_model, {"virtual_tokens": n, "init": opts.prompt_init or "sampled vocabulary"}


def _init_ids(tokenizer, text: str | None, n: int, vocab: int, seed: int):
    """``n`` token ids to start a soft prompt or prefix from: ``text``'s tokens, repeated or cut to ``n``, or
    (no text) tokens sampled from the vocabulary, as PEFT's SAMPLE_VOCAB init does. Raises :class:`TrainError`."""
    import torch

    if text is None:
        return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TrainError(f"--prompt-init {text!r} encodes to no tokens", hint="give a few words of text")
    return torch.tensor((ids * (n // len(ids) + 1))[:n])


def _init_prefix(peft_model, ids) -> None:
    """Start a prefix from the key/values the base computes for real tokens (Li & Liang 2021 found this far
    more stable than random values: PEFT's random init started SmolLM2's Northwind run at a training loss of
    9.6, where the base is at 4.3, and 30 steps ended above the base), laid out as PEFT's ``get_prompt``
    reads them: [tokens, layers * 2 (key, value), kv_heads * head_dim]."""
    import torch

    base = peft_model.get_base_model()
    with torch.no_grad():
        cache = base(input_ids=ids[None], use_cache=True).past_key_values
        rows = []
        for layer in range(len(cache.layers) if hasattr(cache, "layers") else len(cache)):
            k, v = (cache.layers[layer].keys, cache.layers[layer].values) if hasattr(cache, "layers") else cache[layer]
            for t in (k, v):  # [1, kv_heads, n, head_dim] -> [n, kv_heads * head_dim]
                rows.append(t[0].permute(1, 0, 2).reshape(t.shape[2], -1))
        weight = peft_model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.cat(rows, dim=1).to(weight.dtype))


def _no_checkpointing(model) -> None:
    """PEFT refuses prefix tuning on a model with gradient checkpointing on; a base whose saved config
    turned it on gets it off (the prefix lives in the key/value cache, which recomputation would extend)."""
    if getattr(model, "is_gradient_checkpointing", False) or any(
            getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        model.gradient_checkpointing_disable()


def load_initial_adapter(model, path, fingerprint: str, opts: TrainOptions) -> None:
    """Start from an existing adapter's weights, so the run trains its next version.

    Raises :class:`TrainError` when the adapter was trained on another base, with another
    method, or its size or modules differ from this run's (the weights would not fit).
    """
    import json
    from pathlib import Path

    d = Path(path)
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise TrainError(f"--init-adapter {d} is not an adapter directory (adapter_config.json + "
                         "adapter_model.safetensors)", hint="pass the --out of an earlier `edgepeft train`")
    cfg = json.loads(cfg_path.read_text())
    record = d / "edgepeft_training.json"
    trained_on = (json.loads(record.read_text()).get("base") or {}).get("fingerprint") if record.is_file() else None
    if trained_on and trained_on != fingerprint:
        raise TrainError(f"--init-adapter {d} was trained on another base ({trained_on[:19]}...)",
                         hint="continue it on the base it was trained on (--base)")
    ptype = str(cfg.get("peft_type", "")).upper()
    want = {"lora": "LORA", "qlora": "LORA", "prompt-tuning": "PROMPT_TUNING", "prefix-tuning": "PREFIX_TUNING",
            "bottleneck": "BOTTLENECK"}[opts.method]
    if ptype != want:
        raise TrainError(f"--init-adapter {d} is a {ptype or 'unknown'} adapter, this run trains {opts.method}",
                         hint="continue it with the --method it was trained with")
    if opts.method == "bottleneck":
        _init_bottleneck(model, d)
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if want == "LORA" and int(cfg.get("r", 0)) != opts.rank:
        raise TrainError(f"--init-adapter {d} has rank {cfg.get('r')}, this run uses rank {opts.rank}",
                         hint=f"pass --rank {cfg.get('r')}")
    if want != "LORA" and int(cfg.get("num_virtual_tokens", 0)) != opts.virtual_tokens:
        raise TrainError(f"--init-adapter {d} has {cfg.get('num_virtual_tokens')} virtual tokens, this run "
                         f"uses {opts.virtual_tokens}", hint=f"pass --virtual-tokens {cfg.get('num_virtual_tokens')}")
    if want == "PREFIX_TUNING" and bool(cfg.get("prefix_projection")) != opts.prefix_projection:
        raise TrainError(f"--init-adapter {d} was trained {'with' if cfg.get('prefix_projection') else 'without'} "
                         "--prefix-projection", hint="continue it with the same setting")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    tag = "lora_" if want == "LORA" else "prompt_encoder"
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if tag in k]
    missing = [k for k in getattr(result, "missing_keys", []) if tag in k]
    if unexpected or missing:
        raise TrainError(f"--init-adapter {d} does not fit this run's modules "
                         f"({len(missing)} missing, {len(unexpected)} unexpected tensors)",
                         hint="train with the same --target-modules as the adapter you continue")


def _init_bottleneck(model, d) -> None:
    from safetensors.torch import load_file

    from ..errors import AdapterError
    from .bottleneck import WEIGHTS_NAME, read_config

    try:
        old = read_config(d)
        mine = model.bottleneck_config
        for attr in ("bottleneck_size", "non_linearity", "placement", "points"):
            if getattr(old, attr) != getattr(mine, attr):
                raise TrainError(f"--init-adapter {d} has {attr} {getattr(old, attr)!r}, this run "
                                 f"{getattr(mine, attr)!r}", hint="continue it with the same bottleneck options")
        model.load_adapter_state_dict(load_file(str(d / WEIGHTS_NAME)), str(d))
    except AdapterError as exc:
        raise TrainError(f"--init-adapter {d}: {exc.message}", hint=exc.hint) from exc


def _load_4bit(source, task, num_labels, id2label, device, heads):
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    on_gpu = getattr(device, "type", str(device)) == "cuda"
    compute = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=list(heads or []) or None)
    model = load_model(source, task=task, num_labels=num_labels, id2label=id2label,
                       dtype=torch.float32, quantization_config=bnb, quiet=True)
    if on_gpu and str(model.device) == "cpu":
        model.to(device)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
