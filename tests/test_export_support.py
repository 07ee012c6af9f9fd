"""Helpers shared by the exporter tests (no tests here): tiny models, PEFT adapters, ORT runs."""

from __future__ import annotations

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
