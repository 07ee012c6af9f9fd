"""Every supported architecture, on a tiny random model from its transformers config (2 layers, hidden 64).

Decoders: the fp32 graph with a plain-PEFT LoRA adapter on every adaptable projection decodes greedily
through its KV cache next to transformers + PEFT (with its own cache): logits within ``TOL`` of the largest
logit, the same ids except at near-ties (torch's scores for the two ids within ``NEAR_TIE``); the bare graph
(empty slots) matches the base; int4 matches torch running the graph's dequantized weights within
``INT4_IMPL`` of the largest logit. Encoders: a padded batch through the fp32 graph with a SEQ_CLS adapter
(head included) gives transformers + PEFT's logits and probabilities; int8/int4 stay within stated bounds.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_export_support import (
    DECODER_FAMILIES,
    ENCODER_FAMILIES,
    ENCODER_TARGETS,
    fake_quant_dir,
    greedy_ids_check,
    make_peft_adapter,
    run_options,
    session,
    tiny_decoder_dir,
    tiny_encoder_dir,
)

TOL = 2e-5          # fp32: max |logit diff| / max |logit|
NEAR_TIE = 1e-4     # ids may differ only where torch's two scores are this close (absolute)
INT4_IMPL = 0.06    # int4 vs torch on the dequantized weights, / max |logit| (MatMulNBits' int8 activations)
# classifier probabilities, max abs difference: fp32 vs PEFT; "impl": int8/int4 vs torch on the graph's
# dequantized weights (MatMulNBits' int8 activations); int8/int4 vs fp32 PEFT (random weights: int4's worst case)
PROB_TOL = {"fp32": 1e-5, "impl": 0.02, "int8": 0.03, "int4": 0.25}
PROMPT = np.array([[3, 17, 42, 99, 5, 250, 7]])


class _Case:
    pass


@pytest.fixture(scope="module", params=sorted(DECODER_FAMILIES))
def dec(request, tmp_path_factory):
    from edgepeft.export import export_model
    from edgepeft.models.arch import DECODERS

    c = _Case()
    c.family = request.param
    d = tmp_path_factory.mktemp(c.family)
    c.base = tiny_decoder_dir(c.family, d / "base")
    c.fp32 = export_model(str(c.base), d / "fp32", quant="fp32", slot_rank=8)
    c.targets = tuple(DECODERS[c.fp32.model_info["architecture"]].adaptable)
    c.peft_dir = d / "peft"
    c.peft = make_peft_adapter(c.base, c.peft_dir, r=4, alpha=8, targets=c.targets)
    c.tmp = d
    return c


def _adapter_file(case, result, name):
    from edgepeft.export import write_adapter

    path = case.tmp / f"{name}.onnx_adapter"
    info = write_adapter(case.peft_dir, result.model_info, path)
    return info, run_options(path)


def test_decoder_family_matches_peft(dec):
    info, ro = _adapter_file(dec, dec.fp32, "fp32")
    assert sorted(info.target_modules) == sorted(dec.targets)
    sess = session(dec.fp32.model_path)
    diffs, ties = greedy_ids_check(sess, dec.fp32.model_info, dec.peft, PROMPT, steps=5, ro=ro, near_tie=NEAR_TIE)
    scale = _scale(sess, dec.fp32.model_info, ro)
    assert max(diffs) / scale < TOL, (dec.family, diffs, scale, ties)
    with dec.peft.disable_adapter():  # empty slots are the bare base
        diffs, _ = greedy_ids_check(sess, dec.fp32.model_info, dec.peft, PROMPT, steps=3, near_tie=NEAR_TIE)
    assert max(diffs) / _scale(sess, dec.fp32.model_info) < TOL, (dec.family, diffs)


def _scale(sess, info, ro=None):
    from test_export_support import decoder_feeds

    return max(1.0, float(np.abs(sess.run(["logits"], decoder_feeds(info, PROMPT), ro)[0]).max()))


def test_decoder_family_int4_within_tolerance(dec):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgepeft.export import WeightQuant, export_model

    # fp32 LoRA B slots: this checks each family's int4 weights; the int8 B slots of the default build have
    # their own parity tests against PEFT (test_export_lora_int8.py)
    res = export_model(str(dec.base), dec.tmp / "int4", quant=WeightQuant("int4", lora_b="fp32"), slot_rank=8)
    _, ro = _adapter_file(dec, res, "int4")
    fq = fake_quant_dir(dec.base, dec.tmp / "fq", "int4")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fq, dtype=torch.float32), dec.peft_dir).eval()
    sess = session(res.model_path)
    diffs, _ = greedy_ids_check(sess, res.model_info, ref, PROMPT, steps=2, ro=ro, near_tie=1.0)
    scale = _scale(sess, res.model_info, ro)
    assert max(diffs) / scale < INT4_IMPL, (dec.family, diffs, scale)


def test_decoder_family_facts(dec):
    info = dec.fp32.model_info
    fam = {"llama3-rope": "llama"}.get(dec.family, dec.family)
    assert info["architecture"] == fam and info["num_layers"] == 2
    att = info["attention"]
    expect = {"mistral": ("sliding_window", [4, 4]), "gemma2": ("sliding_window", [4, 0]),
              "gemma3_text": ("sliding_window", [4, 0]), "smollm3": ("no_rope_layers", [1])}
    if dec.family in expect:
        key, value = expect[dec.family]
        assert att[key] == value
    if dec.family == "gemma2":
        assert (att["attn_softcap"], att["final_softcap"]) == (2.0, 3.0)
    if dec.family == "phi3":  # PEFT trains the checkpoint's fused modules; slots follow them
        assert set(info["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
        assert info["slots"]["layers.0.qkv.lora_B"] == ["rank", 64 + 2 * 32]
        assert info["attention"].get("sliding_window") is None


# -- encoders ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(ENCODER_FAMILIES))
def enc(request, tmp_path_factory):
    from edgepeft.export import export_model

    c = _Case()
    c.family = request.param
    d = tmp_path_factory.mktemp(c.family)
    c.base = tiny_encoder_dir(c.family, d / "base")
    c.peft_dir = d / "peft"
    extra = ENCODER_FAMILIES[c.family][2]
    c.peft = make_peft_adapter(c.base, c.peft_dir, task="classification", r=4, alpha=8,
                               targets=ENCODER_TARGETS[c.family], num_labels=3, **extra)
    c.fp32 = export_model(str(c.base), d / "fp32", task="classification", quant="fp32", slot_rank=8)
    c.tmp = d
    return c


def _enc_batch(case, info):
    pad = int(case.peft.config.pad_token_id or 0)
    ids = np.array([[5, 7, 8, 9, 10, 11, 12, 6], [5, 55, 66, 6, pad, pad, pad, pad]], np.int64)
    mask = (np.arange(8)[None, :] < np.array([[8], [4]])).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in feeds.items() if k in info["io"]["inputs"]}


def _torch_logits(model, feeds):
    import torch

    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in feeds.items()}).logits.numpy()


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_encoder_family_matches_peft(enc):
    info, ro = _adapter_file(enc, enc.fp32, "fp32")
    assert info.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    feeds = _enc_batch(enc, enc.fp32.model_info)
    sess = session(enc.fp32.model_path)
    got = sess.run(["logits"], feeds, ro)[0]
    ref = _torch_logits(enc.peft, feeds)
    assert got.shape == (2, 3)
    assert np.abs(got - ref).max() < 1e-4, (enc.family, got, ref)
    assert np.abs(_softmax(got) - _softmax(ref)).max() < PROB_TOL["fp32"]
    bare = sess.run(["logits"], feeds)[0]
    assert bare.shape == (2, 0)  # no adapter, no head: the bare base cannot classify


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_encoder_family_quantized_probabilities(enc, kind):
    from test_export_support import fake_quant_classifier

    from edgepeft.export import export_model

    res = export_model(str(enc.base), enc.tmp / kind, task="classification", quant=kind, slot_rank=8)
    _, ro = _adapter_file(enc, res, kind)
    feeds = _enc_batch(enc, res.model_info)
    got = _softmax(session(res.model_path).run(["logits"], feeds, ro)[0])
    impl = _softmax(_torch_logits(fake_quant_classifier(enc.base, enc.peft_dir, kind, enc.family), feeds))
    assert np.abs(got - impl).max() < PROB_TOL["impl"], (enc.family, kind, got, impl)
    ref = _softmax(_torch_logits(enc.peft, feeds))
    assert np.abs(got - ref).max() < PROB_TOL[kind], (enc.family, kind, got, ref)


def test_encoder_family_merged_matches_peft(enc):
    from edgepeft.export import export_model

    merged = export_model(str(enc.base), enc.tmp / "merged", task="classification", quant="fp32",
                          merge_adapter=enc.peft_dir)
    assert merged.model_info["slots"] == {}
    feeds = _enc_batch(enc, merged.model_info)
    got = session(merged.model_path).run(["logits"], feeds)[0]
    assert np.abs(got - _torch_logits(enc.peft, feeds)).max() < 1e-4
