"""Helpers shared by the exporter tests (no tests here): tiny models, PEFT adapters, ORT runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)
TINY_BERT = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)


def tiny_llama_dir(path, seed=0, **over):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **over})).eval()
    model.save_pretrained(path)
    return path


def tiny_bert_dir(path, seed=0):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(**TINY_BERT), add_pooling_layer=True).eval().save_pretrained(path)
    return path


def make_peft_adapter(base_dir, out_dir, *, task="causal-lm", r=4, alpha=8, targets=("q_proj", "v_proj"),
                      seed=1, num_labels=3, **lora_kw):
    """A PEFT LoRA adapter saved with save_pretrained, with random NONZERO B (so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "causal-lm":
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type="CAUSAL_LM", **lora_kw)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels,
                                                                  dtype=torch.float32)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type="SEQ_CLS", **lora_kw)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.normal_(0, 0.2)
            elif "classifier" in name and p.requires_grad:
                p.normal_(0, 0.3)
    model.eval()
    model.save_pretrained(out_dir)
    return model


def session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


_KEEP: list = []


def run_options(adapter_path=None):
    import onnxruntime as ort

    ro = ort.RunOptions()
    if adapter_path is not None:
        ad = ort.LoraAdapter()
        ad.Load(str(adapter_path))
        ro.add_active_adapter(ad)
        _KEEP.append(ad)  # keep loaded adapters alive while options may use them
    return ro


def decoder_feeds(info, ids, past=None):
    """Feeds for the decoder contract; ``past`` is the previous run's present list or None."""
    nl, kvh, hd = info["num_layers"], info["num_kv_heads"], info["head_dim"]
    total = ids.shape[1] + (0 if past is None else past[0].shape[2])
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((ids.shape[0], total), np.int64)}
    for i in range(nl):
        for j, w in enumerate(("key", "value")):
            feeds[f"past_key_values.{i}.{w}"] = (np.zeros((ids.shape[0], kvh, 0, hd), np.float32) if past is None
                                                 else past[2 * i + j])
    return feeds


def greedy_check(sess, info, torch_model, prompt, steps, ro=None):
    """Prefill + ``steps`` decode steps through the KV cache; max |logit diff| vs torch per step."""
    import torch

    outs = sess.run(None, decoder_feeds(info, prompt), ro)
    seq = torch.tensor(prompt)
    with torch.no_grad():
        ref = torch_model(seq).logits.numpy()
    diffs = [float(np.abs(outs[0] - ref).max())]
    for _ in range(steps):
        nxt = np.array([[int(outs[0][0, -1].argmax())]])
        seq = torch.cat([seq, torch.tensor(nxt)], 1)
        outs = sess.run(None, decoder_feeds(info, nxt, outs[1:]), ro)
        with torch.no_grad():
            ref = torch_model(seq).logits.numpy()[:, -1:]
        diffs.append(float(np.abs(outs[0] - ref).max()))
    return diffs


# -- one tiny random model per supported architecture (tests/test_export_families.py) -----------------------------

_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.1)
# family -> (config class, overrides). Windows of 4 tokens and small soft-caps make those paths matter on a
# 7-token prompt; rope variants are each family's own (llama3 scaling, LongRoPE past a 16-token original context).
DECODER_FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                         "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                original_max_position_embeddings=8,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5,
                                                 "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                 "long_factor": [2.0 + 0.5 * i for i in range(8)],
                                                 "original_max_position_embeddings": 8})),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=4, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0, query_pre_attn_scalar=24)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                             layer_types=["sliding_attention", "full_attention"])),
    "granite": ("GraniteConfig", dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.1,
                                      logits_scaling=4.0, attention_bias=True)),
    "olmo2": ("Olmo2Config", {}),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0])),
}


def tiny_decoder_dir(family, path, seed=0, **extra):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls, over = DECODER_FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**{**_SMALL, **over, **extra})
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().save_pretrained(path)
    return path


ENCODER_FAMILIES = {
    "bert": ("BertConfig", {}, {}),
    "roberta": ("RobertaConfig", dict(type_vocab_size=1, pad_token_id=1), {}),
    "xlm-roberta": ("XLMRobertaConfig", dict(type_vocab_size=1, pad_token_id=1), {}),
    "distilbert": ("DistilBertConfig", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128), {}),
    # DeBERTa-v3's published config: relative attention (c2p|p2c, 256 log buckets, shared keys), no absolute
    # positions, no token types; its pooler is not in the checkpoint, so adapters save it (modules_to_save)
    "deberta-v2": ("DebertaV2Config", dict(relative_attention=True, pos_att_type=["p2c", "c2p"],
                                           position_buckets=16, max_relative_positions=-1, norm_rel_ebd="layer_norm",
                                           share_att_key=True, position_biased_input=False, type_vocab_size=0,
                                           pooler_hidden_act="gelu"),
                   {"modules_to_save": ["pooler"]}),
    "modernbert": ("ModernBertConfig", dict(local_attention=4, global_attn_every_n_layers=2, classifier_pooling="mean",
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                            sep_token_id=2), {}),
}
ENCODER_TARGETS = {
    "bert": ("query", "value", "dense"),
    "roberta": ("query", "key", "value", "intermediate.dense"),
    "xlm-roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin", "lin1", "lin2", "out_lin"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "intermediate.dense"),
    "modernbert": ("Wqkv", "Wo", "Wi", "dense"),
}


def finetuned_classifier_dir(family, path, names, seed=3):
    """A tiny fine-tuned classifier checkpoint: the bare ``family`` encoder with a random classification head of
    ``names`` (its id2label), saved to ``path`` with a word-piece tokenizer; returns ``path``."""
    import torch
    from test_runtime_support import wordpiece_tokenizer
    from transformers import AutoModelForSequenceClassification

    bare = tiny_encoder_dir(family, Path(path).with_name(Path(path).name + "-bare"))
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        bare, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("classifier"):
                p.normal_(0, 0.5)
    model.eval().save_pretrained(path)
    wordpiece_tokenizer(path)
    return Path(path)


def tiny_encoder_dir(family, path, seed=0):
    """The bare encoder (no head), saved the way the family's pretrained checkpoints are (MLM head for ModernBERT)."""
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForMaskedLM

    cls, over, _ = ENCODER_FAMILIES[family]
    torch.manual_seed(seed)
    base = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64, initializer_range=0.1)
    config = getattr(transformers, cls)(**{**base, **over})
    builder = AutoModelForMaskedLM if family == "modernbert" else AutoModel
    builder.from_config(config).eval().save_pretrained(path)
    return path


def greedy_ids_check(sess, info, torch_model, prompt, steps, ro=None, near_tie=1e-3):
    """Greedy decode through both KV caches (ORT's and transformers'); per step the max |logit diff|, and
    the ids picked.

    A step where ORT and torch pick different ids passes only when torch's own scores for the two ids are
    within ``near_tie`` (a near-tie that fp32 rounding may flip); torch's id is fed to both, so one tie does
    not derail the rest. Returns ``(diffs, tie_steps)``.
    """
    import torch

    outs = sess.run(None, decoder_feeds(info, prompt), ro)
    with torch.no_grad():
        res = torch_model(torch.tensor(prompt), use_cache=True)
    diffs, ties = [], []
    for step in range(steps + 1):
        got, ref = outs[0][:, -1:] if step else outs[0], res.logits.numpy()
        diffs.append(float(np.abs(got - ref).max()))
        a, b = int(got[0, -1].argmax()), int(ref[0, -1].argmax())
        if a != b:
            gap = float(ref[0, -1, b] - ref[0, -1, a])
            assert gap < near_tie, f"step {step}: onnx picks {a}, torch {b} (torch gap {gap:.2e})"
            ties.append(step)
        if step == steps:
            break
        nxt = np.array([[b]])
        outs = sess.run(None, decoder_feeds(info, nxt, outs[1:]), ro)
        with torch.no_grad():
            res = torch_model(torch.tensor(nxt), past_key_values=res.past_key_values, use_cache=True)
    return diffs, ties


_ROLE = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "qkv_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
         "up_proj": "gate_up", "gate_up_proj": "gate_up", "down_proj": "down"}


def fake_quant_dir(base, out, kind):
    """``base`` with every weight the graph quantizes replaced by the value the graph computes with."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepeft.export import WeightQuant
    from edgepeft.export.quantize import fake_quantize

    q = WeightQuant(kind)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2:
                continue
            if "embed_tokens" in name:
                role = "embed"
            elif name.startswith("lm_head"):
                role = "embed" if tied else "lm_head"
            else:
                role = "l0." + _ROLE[name.split(".")[-2]]
            p.copy_(torch.from_numpy(fake_quantize(p.numpy(), q, role)))
    model.save_pretrained(out)
    return out


_ENC_ROLE = {"q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv", "o": "attn_out", "up": "up", "gate_up": "up",
             "down": "down"}


def fake_quant_classifier(base, peft_dir, kind, family, num_labels=3):
    """transformers + PEFT classifier whose base weights are what the ``kind`` graph computes with."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from edgepeft.export import WeightQuant
    from edgepeft.export.quantize import fake_quantize
    from edgepeft.models.arch import ENCODERS

    arch, q = ENCODERS[family], WeightQuant(kind)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=num_labels, dtype=torch.float32), peft_dir).eval()
    base_heads = [s.module for s in arch.head if s.source == "base"]
    with torch.no_grad():
        for name, mod in model.named_modules():
            if "lora_" in name or "modules_to_save" in name or "original_module" in name:
                continue
            path = name.replace(".base_layer", "")
            if isinstance(mod, torch.nn.Embedding) and path.endswith(arch.embeddings["word"]):
                role = "embed"
            elif isinstance(mod, torch.nn.Linear):
                role = next((f"l0.{_ENC_ROLE[r]}" for m, r in arch.proj if path.endswith("." + m)), None)
                role = role or next((h.split(".")[0] for h in base_heads if path.endswith(h)), None)
            else:
                role = None
            if role:
                mod.weight.copy_(torch.from_numpy(fake_quantize(mod.weight.numpy(), q, role, per_channel=True)))
    return model


# -- adapters of the other families (prefix tuning, prompt tuning, bottleneck) ------------------------------------

def make_prompt_adapter(base_dir, out_dir, *, kind="prefix-tuning", tokens=5, seed=2, scale=1.0):
    """A PEFT prefix- or prompt-tuning adapter (causal LM) saved with save_pretrained, with random weights
    large enough to change greedy answers. Returns the PeftModel."""
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = (PrefixTuningConfig if kind == "prefix-tuning" else PromptTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=tokens)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, scale)
    model.eval()
    model.save_pretrained(out_dir)
    return model


def make_bottleneck_adapter(base_dir, out_dir, *, task="causal-lm", size=8, placement="houlsby",
                            non_linearity="relu", seed=3, num_labels=3, scale=0.3, heads=("classifier",)):
    """An edgepeft bottleneck adapter (random NONZERO up-projections) saved in its format; classifiers
    also get a random head. Returns the wrapped model (PyTorch reference)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from edgepeft.train import bottleneck

    torch.manual_seed(seed)
    if task == "causal-lm":
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        heads = None
    else:
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels,
                                                                  dtype=torch.float32)
        heads = list(heads)
    cfg = bottleneck.config_for(base, size=size, non_linearity=non_linearity, placement=placement, task=task,
                                heads=heads, base_name=str(base_dir))
    model = bottleneck.wrap(base, cfg)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, scale)
    model.eval()
    model.save_pretrained(out_dir)
    return model


def load_family_model(base_dir, adapter_dir, *, task="causal-lm", num_labels=None):
    """The PyTorch reference of a saved adapter of any family: PEFT's model, or the bottleneck module."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from edgepeft.train import bottleneck

    if task == "causal-lm":
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels,
                                                                  dtype=torch.float32)
    ptype = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["peft_type"]
    if ptype == "BOTTLENECK":
        return bottleneck.load(base, adapter_dir).eval()
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf row permutation of q/k weights (its rotary layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(qtype, rows, cols, seed=0):
    """Valid GGUF blocks of a K-quant (Q4_K, Q5_K, Q6_K) built by hand from the documented layout, as uint8
    [rows, row bytes]: gguf-py can dequantize K-quants but not quantize to them. Codes, 6-bit sub-scales
    and sub-minimums are random bytes (every bit pattern is valid); the fp16 super-block scales are set to
    small positive values."""
    import gguf

    rng = np.random.default_rng(seed)
    per = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]  # bytes per super-block of 256
    raw = rng.integers(0, 256, (rows, cols // 256, per), dtype=np.uint8)
    d = lambda: rng.uniform(0.002, 0.02, (rows, cols // 256, 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype == "Q6_K":  # ql, qh, 16 int8 scales, then d
        raw[..., per - 2:] = d()
    else:  # d, dmin, 12 bytes of 6-bit scales and minimums, (qh,) qs
        raw[..., 0:2], raw[..., 2:4] = d(), d()
    return raw.reshape(rows, -1)


def tiny_gguf(hf_dir, path, types):
    """Write the tiny llama at ``hf_dir`` as a GGUF file the way llama.cpp's converter does.

    ``types`` maps a GGUF tensor role ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output",
    "ffn_gate", "ffn_up", "ffn_down") to a GGUF type ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0" quantized
    with gguf-py, "Q4_K", "Q5_K", "Q6_K" as :func:`random_k_blocks`) or "F32"; norms stay F32.
    q/k rows are permuted as llama.cpp does. Returns the path.
    """
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem = names.get_name(hf_name.rsplit(".", 1)[0])
        arr = t.detach().numpy().astype(np.float32)
        role = stem.split(".")[-1]
        if role == "attn_q":
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif role == "attn_k":
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        qtype = types.get(role, "F32") if arr.ndim == 2 else "F32"
        if qtype == "F32":
            w.add_tensor(f"{stem}.weight", arr)
        elif qtype.endswith("_K"):  # the weight becomes the blocks' dequantization (random, of its shape)
            seed = sum(map(ord, stem))
            w.add_tensor(f"{stem}.weight", random_k_blocks(qtype, *arr.shape, seed=seed),
                         raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(f"{stem}.weight", gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
