"""The engine on the shipped configurations: int4 and int8 graphs with fp16 and int8 adapter payloads,
against PyTorch + PEFT on the same base.

4 of the 5 targets ship a quantized graph with a compact adapter payload, so the engine is held to
PyTorch here in those combinations (tiny random Llama, built through `build_bundle` as a device
gets it). The reference is the base with every weight replaced by the value the graph stores
(dequantized: what an exact int4/int8 kernel computes) plus the PEFT adapter as trained. What
remains is the kernels' own rounding (MatMulNBits quantizes activations to int8 at
accuracy_level 4) and the payload's rounding (fp16: 2^-11 relative; int8: per-row scale, 1/254
of the row's largest value). Stated tolerance, on the log-probability of each next token of a
40-token text (the quantity perplexity and sampling use): 0.15 nats in every combination, about
3x the largest difference measured here (x86-64, onnxruntime 1.32; weights initialized with
std 0.05):

    graph  payload  max |log p - log p_ref|, bare base / with the adapter
    int8   fp16     0.028 / 0.013
    int8   int8     0.028 / 0.057
    int4   fp16     0.018 / 0.020
    int4   int8     0.018 / 0.024

The adapter moves the log-probabilities by about 2.2 nats, so a payload that was ignored or
mis-scaled fails: the test demands an effect of at least 5x the tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.host_only  # needs PyTorch and PEFT for the reference

TOL = 0.15
COMBINATIONS = [("int8", "fp16"), ("int8", "int8"), ("int4", "fp16"), ("int4", "int8")]
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from test_export_support import tiny_llama_dir
    from test_runtime_support import VOCAB, byte_level_tokenizer

    d = tiny_llama_dir(tmp_path_factory.mktemp("qbase") / "base", seed=3, vocab_size=VOCAB, hidden_size=128,
                       intermediate_size=256, initializer_range=0.05)
    byte_level_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    from test_export_support import make_peft_adapter

    d = tmp_path_factory.mktemp("qpeft") / "peft"
    make_peft_adapter(base, d, r=4, alpha=8, targets=TARGETS, seed=5)
    return d


def _reference(base, adapter, kind, out, ids):
    """log p(ids[i+1] | ids[:i+1]) from PyTorch: the dequantized base, without and with the PEFT adapter."""
    import torch
    from peft import PeftModel
    from test_export_quant import _fake_quant_dir
    from transformers import AutoModelForCausalLM

    fq = _fake_quant_dir(base, out, kind)
    model = AutoModelForCausalLM.from_pretrained(fq, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def logprobs(m):
        with torch.no_grad():
            lp = torch.log_softmax(m(x).logits[0].double(), dim=-1)
        return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()

    bare = logprobs(model)
    with_adapter = logprobs(PeftModel.from_pretrained(model, adapter).eval())
    return bare, with_adapter


@pytest.mark.parametrize("quant,payload", COMBINATIONS)
def test_quantized_graph_with_compact_payload_matches_pytorch_peft(base, adapter, tmp_path, keypair, quant, payload):
    from edgepeft.bundle.build import build_bundle
    from edgepeft.runtime import Engine

    res = build_bundle(base=str(base), adapters=[("a", adapter)], target="x86-64-gateway", key=keypair[0],
                       out=tmp_path / "bundle", quant=quant, adapter_dtype=payload, slot_rank=4)
    assert res.manifest["quantization"]["weights"] == quant
    assert res.manifest["adapters"][0]["dtype"] == payload
    rng = np.random.default_rng(0)
    with Engine(res.bundle_dir, [keypair[1]]) as engine:
        ids = engine.codec.encode("the tin ünï ☃ hello") + [int(t) for t in rng.integers(3, 250, 24)]
        got_bare = np.array(engine.token_logprobs(ids))
        got = np.array(engine.token_logprobs(ids, adapter="a"))
        held = engine.registry.get("a").arrays  # expanded to the fp32 slots; int8 B slots take theirs as stored
        int8_slots = {k for k, v in res.manifest["model"].get("slot_dtypes", {}).items() if v == "int8"}
        assert all(v.dtype == (np.int8 if k in int8_slots else np.float32) for k, v in held.items())
    ref_bare, ref = _reference(base, adapter, quant, tmp_path / "fq", ids)
    assert np.abs(got_bare - ref_bare).max() < TOL, (quant, np.abs(got_bare - ref_bare).max())
    err = np.abs(got - ref).max()
    assert err < TOL, (quant, payload, err)
    assert np.abs(ref - ref_bare).max() > 5 * TOL  # the adapter matters far more than the tolerance
