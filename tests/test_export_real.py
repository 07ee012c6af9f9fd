"""Real models (slow): SmolLM2-135M-Instruct int4 size and answers, fp32 parity; all-MiniLM-L6-v2 parity."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime")
pytest.importorskip("peft")

from test_export_support import decoder_feeds, make_peft_adapter, run_options, session  # noqa: E402


@pytest.fixture(scope="module")
def smol():
    from edgepeft.basemodel import load_tokenizer, resolve_base

    src = resolve_base(None)
    return src, load_tokenizer(src)


def _greedy(sess, info, tok, question, n=24):
    ids = np.array([tok(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                tokenize=False))["input_ids"]])
    out, past, new = None, None, []
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for _ in range(n):
        outs = sess.run(None, decoder_feeds(info, ids, past))
        tok_id = int(outs[0][0, -1].argmax())
        if tok_id == end:
            break
        new.append(tok_id)
        ids, past = np.array([[tok_id]]), outs[1:]
    return tok.decode(new)


def test_smollm2_int4_fits_and_answers(smol, tmp_path):
    from edgepeft.export import export_model

    src, tok = smol
    res = export_model(src, tmp_path, quant="int4", slot_rank=16)
    info = res.model_info
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"], info["vocab_size"]) == (30, 3, 64, 49152)
    assert res.model_path.stat().st_size <= 80 * 2**20
    assert "Paris" in _greedy(session(res.model_path), info, tok, "What is the capital of France?")


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

    from edgepeft.basemodel import load_tokenizer, resolve_base
    from edgepeft.export import export_model, write_adapter

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
