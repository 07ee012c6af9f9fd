"""Bundles of other architectures through ``build_bundle`` and the device ``Engine``: the runtime's decode
loop (IOBinding, shared key/value buffers) and classifier need nothing per architecture.

Gemma 2 (soft-caps, local/global windows on the shared buffer) and Phi-3 (fused modules, LongRoPE switching
tables mid-answer) generate greedily with an adapter; the ids equal transformers + PEFT's greedy choice
except at near-ties (torch's two scores within ``NEAR_TIE``). ModernBERT and DeBERTa-v3 classify a padded
batch with the probabilities of transformers + PEFT (within 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_export_support import ENCODER_FAMILIES, ENCODER_TARGETS, make_peft_adapter, tiny_decoder_dir, tiny_encoder_dir
from test_runtime_support import VOCAB, byte_level_tokenizer, wordpiece_tokenizer

from edgepeft.runtime import Engine

NEAR_TIE = 1e-4
TARGETS = {"gemma2": ("q_proj", "v_proj", "down_proj"), "phi3": ("qkv_proj", "gate_up_proj")}


def _torch_follow(model, prompt_ids, ids):
    """Check each id the engine produced against torch's greedy pick on the same prefix (with a KV cache,
    as the device decodes: LongRoPE picks its table per forward from the longest position)."""
    import torch

    ties = 0
    with torch.no_grad():
        res = model(torch.tensor([list(prompt_ids)]), use_cache=True)
        for tok in ids:
            z = res.logits[0, -1].numpy()
            best = int(z.argmax())
            if best != tok:
                assert z[best] - z[tok] < NEAR_TIE, (tok, best, float(z[best] - z[tok]))
                ties += 1
            res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return ties


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_decoder_bundle_generates_like_peft(family, tmp_path, keypair):
    from transformers import AutoTokenizer

    from edgepeft.bundle.build import build_bundle

    base = tiny_decoder_dir(family, tmp_path / "base", vocab_size=VOCAB, initializer_range=0.2)
    byte_level_tokenizer(base)
    peft = make_peft_adapter(base, tmp_path / "peft", r=4, alpha=8, targets=TARGETS[family], seed=5)
    res = build_bundle(base=str(base), adapters=[("a", tmp_path / "peft")], target="x86-64-gateway",
                       key=keypair[0], out=tmp_path / "bundle", quant="fp32", slot_rank=4)
    assert res.manifest["base"]["architecture"] == family
    engine = Engine(res.bundle_dir, [keypair[1]])
    prompt = engine.encode_prompt("the tin hen ran in the ant")
    assert prompt == AutoTokenizer.from_pretrained(base)("the tin hen ran in the ant").input_ids  # as training
    out = engine.generate("the tin hen ran in the ant", adapter="a", max_new_tokens=10)
    assert out.token_ids and len(prompt) + len(out.token_ids) > 8  # Phi-3's original context (8) is crossed
    ties = _torch_follow(peft, prompt, out.token_ids)
    assert ties <= 1


@pytest.mark.parametrize("family", ["modernbert", "deberta-v2"])
def test_encoder_bundle_classifies_like_peft(family, tmp_path, keypair):
    import torch

    from edgepeft.bundle.build import build_bundle
    from edgepeft.runtime.classify import _batch

    base = tiny_encoder_dir(family, tmp_path / "base")
    wordpiece_tokenizer(base)
    peft = make_peft_adapter(base, tmp_path / "peft", task="classification", r=4, alpha=8, num_labels=2,
                             targets=ENCODER_TARGETS[family], seed=6, **ENCODER_FAMILIES[family][2])
    res = build_bundle(base=str(base), adapters=[("s", tmp_path / "peft")], target="x86-64-gateway",
                       key=keypair[0], out=tmp_path / "bundle", quant="fp32", slot_rank=4, task="classification")
    engine = Engine(res.bundle_dir, [keypair[1]])
    texts = ["the product was very good", "awful service"]
    got = engine.classify(texts, adapter="s")
    feeds = _batch(engine, texts)
    with torch.no_grad():
        z = peft(**{k: torch.tensor(v) for k, v in feeds.items()}).logits.numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for row, r in zip(p, got):
        assert np.abs(np.array([r.probabilities[f"LABEL_{j}"] for j in range(2)]) - row).max() < 1e-5
