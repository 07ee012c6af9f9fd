"""Prefix tuning, prompt tuning and bottleneck adapters on the server side: training (tiny bases), export
parity against PyTorch+PEFT (or the bottleneck module) for every decoder family the exporter supports and
for classifiers, the prompt-tuning prefix compiled by the quantized graph itself, and what build and
update create refuse. The device side of the same families is tests/test_runtime_families.py.

Tolerances: fp32 graphs, max |logit diff| < 1e-4 against PyTorch (measured ~1e-6); int4, the compiled
prefix against the same int4 graph fed the soft prompt itself < 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_export_support import (
    DECODER_FAMILIES,
    load_family_model,
    make_bottleneck_adapter,
    make_peft_adapter,
    make_prompt_adapter,
    session,
    tiny_bert_dir,
    tiny_decoder_dir,
    tiny_llama_dir,
)

from edgepeft.errors import AdapterError, TrainError, UsageError

ATOL = 1e-4
IDS = np.array([[5, 9, 17, 33, 4, 8, 100]])


def _feeds(info, ids, slots=None, prefix=None):
    """Decoder feeds for a prompt after an optional ``prefix`` (prefix.{i}.key/value arrays)."""
    nl, kv, hd = info["num_layers"], info["num_kv_heads"], info["head_dim"]
    p = next(iter(prefix.values())).shape[1] if prefix else 0
    f = {"input_ids": ids, "attention_mask": np.ones((1, p + ids.shape[1]), np.int64)}
    for i in range(nl):
        for w in ("key", "value"):
            f[f"past_key_values.{i}.{w}"] = prefix[f"prefix.{i}.{w}"][None] if prefix else \
                np.zeros((1, kv, 0, hd), np.float32)
    return f | (slots or {})


def _torch_logits(model, ids):
    x = torch.tensor(ids)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.numpy()
    return out[:, -ids.shape[1]:]  # prompt tuning also returns its virtual positions


@pytest.mark.parametrize("family", sorted(DECODER_FAMILIES))
def test_every_decoder_family_runs_each_adapter_family_like_pytorch(family, tmp_path):
    """One export per architecture with bottleneck slots; the bare graph, a bottleneck adapter, a prefix and
    a compiled soft prompt each give PyTorch's logits (Gemma's scaled embeddings, Granite's multipliers,
    sliding windows and soft-caps included: the prefix takes the first positions there too)."""
    from edgepeft.export.adapters import family_tensors
    from edgepeft.export.api import export_model

    base = tiny_decoder_dir(family, tmp_path / "base")
    res = export_model(str(base), tmp_path / "onnx", quant="fp32",
                       bottleneck={"points": ["attn_out", "mlp_out"], "activation": "silu"})
    from transformers import AutoModelForCausalLM

    info, sess = res.model_info, session(res.model_path)
    # LongRoPE switches factors when a forward pass grows past original_max_position_embeddings (8 here): a soft
    # prompt compiled on its own keeps the short ones (as any cached conversation does in transformers)
    ids = IDS[:, :5] if family == "phi3" else IDS
    bare = sess.run(["logits"], _feeds(info, ids))[0]
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert np.abs(bare - _torch_logits(plain, ids)).max() < ATOL  # empty bottleneck slots are the identity
    cases = {"bottleneck": make_bottleneck_adapter(base, tmp_path / "bn", size=4, non_linearity="silu", scale=0.1),
             "prefix": make_prompt_adapter(base, tmp_path / "pre", kind="prefix-tuning", tokens=3, scale=0.5),
             "prompt": make_prompt_adapter(base, tmp_path / "prm", kind="prompt-tuning", tokens=3, scale=0.5)}
    for name, model in cases.items():
        tensors, ai = family_tensors(tmp_path / {"bottleneck": "bn", "prefix": "pre", "prompt": "prm"}[name], info,
                                     graph_path=res.model_path)
        feeds = _feeds(info, ids, prefix=tensors) if ai.virtual_tokens else _feeds(info, ids, slots=tensors)
        got = sess.run(["logits"], feeds)[0]
        want = _torch_logits(model, ids)
        assert np.abs(got - want).max() < ATOL, (family, name, float(np.abs(got - want).max()))
        assert np.abs(got - bare).max() > 1e-3, (family, name)  # the adapter does something


def test_the_prompt_prefix_is_what_the_int4_graph_computes_from_the_soft_prompt_itself(tmp_path):
    """Compiling on the server with the device's int4 graph is exact: prefix + prompt through the device graph
    equals one pass of [soft prompt; the prompt's own embeddings] through the same int4 weights."""
    import onnx

    from edgepeft.export.api import export_model
    from edgepeft.export.decoder_graph import EMBEDS
    from edgepeft.export.prefix import prompt_tensors, read_peft_prompt
    from edgepeft.export.prompt_kv import embeds_graph

    base = tiny_llama_dir(tmp_path / "base")
    res = export_model(str(base), tmp_path / "onnx", quant="int4")
    info = res.model_info
    make_prompt_adapter(base, tmp_path / "prm", kind="prompt-tuning", tokens=4, scale=0.5)
    p = read_peft_prompt(tmp_path / "prm")
    prefix = prompt_tensors(p, info, res.model_path)
    device = session(res.model_path).run(["logits"], _feeds(info, IDS, prefix=prefix))[0]
    model = onnx.load(str(res.model_path))  # the same graph with its embeddings as an extra output
    model.graph.output.append(onnx.helper.make_tensor_value_info(EMBEDS, onnx.TensorProto.FLOAT, None))
    path = tmp_path / "with-embeds.onnx"
    onnx.save(model, str(path))
    emb = session(path).run([EMBEDS], _feeds(info, IDS))[0]
    cut = tmp_path / "embeds.onnx"
    onnx.save(embeds_graph(res.model_path, info["hidden_size"]), str(cut))
    whole = np.concatenate([p.embeddings[None], emb], axis=1)
    feeds = {k: v for k, v in _feeds(info, IDS).items() if k != "input_ids"}
    feeds |= {EMBEDS: whole, "attention_mask": np.ones((1, whole.shape[1]), np.int64)}
    one_pass = session(cut).run(["logits"], feeds)[0][:, p.virtual_tokens:]
    assert np.abs(device - one_pass).max() < ATOL


def test_a_classifier_bottleneck_adapter_classifies_like_pytorch(tmp_path, keypair):
    from test_runtime_support import wordpiece_tokenizer

    from edgepeft.bundle.build import build_bundle
    from edgepeft.runtime import Engine

    base = tiny_bert_dir(tmp_path / "base")
    wordpiece_tokenizer(base)
    model = make_bottleneck_adapter(base, tmp_path / "bn", task="classification", size=8, placement="pfeiffer",
                                    non_linearity="gelu", num_labels=3)
    (tmp_path / "bn" / "labels.json").write_text(json.dumps(["billing", "shipping", "other"]))
    make_peft_adapter(base, tmp_path / "lora", task="classification", r=4, targets=("query", "value"),
                      num_labels=2)
    res = build_bundle(base=str(base), adapters=[("topic", tmp_path / "bn"), ("sent", tmp_path / "lora")],
                       target="x86-64-gateway", key=keypair[0], out=tmp_path / "bundle", quant="fp32",
                       task="classification", bottleneck_slots="houlsby")
    assert res.manifest["model"]["bottleneck"] == {"points": ["attn_out", "mlp_out"], "activation": "gelu"}
    engine = Engine(res.bundle_dir, [keypair[1]])
    texts = ["the service was very good", "bad product"]
    for text, got in zip(texts, engine.classify(texts, adapter="topic")):
        enc = engine.codec.encode(text, add_special_tokens=True)  # [CLS] ... [SEP], as classify() encodes
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([enc])).logits, -1)[0].numpy()
        assert np.abs(np.array([got.probabilities[k] for k in ("billing", "shipping", "other")]) - probs).max() < 1e-5
        assert len(engine.classify(text, adapter="sent")[0].probabilities) == 2


def test_train_each_family_on_a_tiny_decoder(tmp_path):
    from edgepeft.train import train
    from edgepeft.train.tiny import tiny_llama

    base = str(tiny_llama(tmp_path / "base"))
    rows = [{"prompt": f"my router keeps dropping the connection {i}",
             "completion": "please restart the device and try again. cheers"} for i in range(24)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    for method, extra in (("prompt-tuning", {"prompt_init": "please restart"}), ("prefix-tuning", {}),
                          ("bottleneck", {"placement": "pfeiffer", "bottleneck_size": 8})):
        out = tmp_path / method
        result = train(data=str(data), out=str(out), base=base, method=method, max_steps=8, batch_size=4,
                       virtual_tokens=4, progress=False, eval_generate=1, max_new_tokens=4, max_length=64,
                       warmup=0.0, eval_before=True, **extra)
        m = result.metrics
        assert m["eval"]["loss"] < m["baseline"]["loss"], method
        rec = json.loads((out / "edgepeft_training.json").read_text())
        assert rec["method"] == method and rec["adapter"]["method"] == method
        assert rec["options"]["learning_rate"] == {"prompt-tuning": 3e-2, "prefix-tuning": 1e-2,
                                                   "bottleneck": 1e-3}[method]
        reloaded = load_family_model(base, out)
        with torch.no_grad():
            a = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -6:]
            b = result.model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -6:]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    cfg = json.loads((tmp_path / "bottleneck" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["points"] == ["mlp_out"] and cfg["edgepeft_version"]
    # the next version starts from this one's weights
    nxt = train(data=str(data), out=str(tmp_path / "bn2"), base=base, method="bottleneck", max_steps=1,
                batch_size=4, progress=False, eval_split=0.0, placement="pfeiffer", bottleneck_size=8,
                init_adapter=str(tmp_path / "bottleneck"), learning_rate=1e-9)
    with torch.no_grad():
        first = load_family_model(base, tmp_path / "bottleneck")(input_ids=ids).logits
        torch.testing.assert_close(nxt.model.eval()(input_ids=ids).logits, first, atol=1e-4, rtol=1e-4)
    with pytest.raises(TrainError, match="bottleneck_size 8, this run 16"):
        train(data=str(data), out=str(tmp_path / "bn3"), base=base, method="bottleneck", max_steps=1,
              progress=False, placement="pfeiffer", bottleneck_size=16, init_adapter=str(tmp_path / "bottleneck"))


def test_training_refuses_what_cannot_work_before_loading_weights(tmp_path):
    from edgepeft.train import TrainOptions, train
    from edgepeft.train.tiny import tiny_bert

    with pytest.raises(TrainError, match="gradient checkpointing"):
        TrainOptions(data="d", out="o", method="prefix-tuning", gradient_checkpointing=True)
    with pytest.raises(UsageError, match="placement"):
        TrainOptions(data="d", out="o", method="bottleneck", placement="middle")
    rows = [{"text": f"transfer money {i}", "label": "fraud" if i % 2 else "ok"} for i in range(8)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bert = str(tiny_bert(tmp_path / "bert"))
    for method in ("prompt-tuning", "prefix-tuning"):
        with pytest.raises(TrainError, match="decoders only"):
            train(data=str(data), out=str(tmp_path / method), base=bert, method=method, progress=False)
        assert not (tmp_path / method).exists()


@pytest.fixture(scope="module")
def families_bundle(tmp_path_factory, keypair):
    root = tmp_path_factory.mktemp("fam")
    base = tiny_llama_dir(root / "base")
    from test_runtime_support import byte_level_tokenizer

    byte_level_tokenizer(base)
    make_peft_adapter(base, root / "lora", r=4, targets=("q_proj", "v_proj"))
    make_prompt_adapter(base, root / "pre", kind="prefix-tuning", tokens=4)
    make_bottleneck_adapter(base, root / "bn-relu", size=8)
    make_bottleneck_adapter(base, root / "bn-silu", size=8, non_linearity="silu")
    return root


def test_build_and_update_create_refuse_what_devices_could_not_apply(families_bundle, keypair, tmp_path):
    from dataclasses import replace

    from edgepeft.bundle.build import build_bundle
    from edgepeft.contracts.target import load_target
    from edgepeft.release.package import create_adapter_update

    root = families_bundle
    common = dict(base=str(root / "base"), target="x86-64-gateway", key=keypair[0], quant="fp32")
    with pytest.raises(AdapterError, match="disagree on their non-linearity"):
        build_bundle(adapters=[("a", root / "bn-relu"), ("b", root / "bn-silu")], out=tmp_path / "x", **common)
    with pytest.raises(UsageError, match="only LoRA merges"):
        build_bundle(adapters=[("p", root / "pre")], merge="p", out=tmp_path / "x", **common)
    target = load_target("x86-64-gateway")
    short = replace(target, budgets=replace(target.budgets, max_context=5))
    with pytest.raises(AdapterError, match="4 virtual tokens before every prompt"):
        build_bundle(adapters=[("p", root / "pre")], out=tmp_path / "x", **(common | {"target": short}))
    assert not (tmp_path / "x").exists()
    plain = build_bundle(adapters=[("l", root / "lora")], out=tmp_path / "plain", **common)
    assert "bottleneck" not in plain.manifest["model"]
    with pytest.raises(AdapterError, match="no bottleneck slots at attn_out, mlp_out"):
        create_adapter_update(bundle=plain.bundle_dir, name="bn", adapter=root / "bn-relu", version=1,
                              key=keypair[0], out=tmp_path / "bn.epu")
    slots = build_bundle(adapters=[("l", root / "lora")], out=tmp_path / "slots", bottleneck_slots="pfeiffer",
                         **common)
    with pytest.raises(AdapterError, match="no bottleneck slots at attn_out"):  # a houlsby adapter, pfeiffer slots
        create_adapter_update(bundle=slots.bundle_dir, name="bn", adapter=root / "bn-relu", version=1,
                              key=keypair[0], out=tmp_path / "bn.epu")
    ok = create_adapter_update(bundle=plain.bundle_dir, name="pre", adapter=root / "pre", version=1,
                               key=keypair[0], out=tmp_path / "pre.epu")
    assert ok.meta["adapter"]["method"] == "prefix-tuning" and ok.meta["adapter"]["virtual_tokens"] == 4
    assert ok.meta["slots"] == sorted(f"prefix.{i}.{w}" for i in range(2) for w in ("key", "value"))


@pytest.mark.slow
def test_each_family_on_the_real_smollm2_answers_as_pytorch_peft(tmp_path, keypair):
    """SmolLM2-135M-Instruct fp32 bundle with a prefix, a compiled soft prompt and a bottleneck adapter (made
    from real tokens / small random weights, untrained): the device's greedy ids equal PyTorch+PEFT's."""
    from edgepeft.bundle.build import build_bundle
    from edgepeft.models.base import resolve_base
    from edgepeft.runtime import Engine

    base = resolve_base(None).path
    make_prompt_adapter(base, tmp_path / "pre", kind="prefix-tuning", tokens=8, scale=0.05)
    make_prompt_adapter(base, tmp_path / "prm", kind="prompt-tuning", tokens=8, scale=0.02)
    make_bottleneck_adapter(base, tmp_path / "bn", size=16, scale=0.02)
    res = build_bundle(base=None, adapters=[(n, tmp_path / n) for n in ("pre", "prm", "bn")],
                       target="raspberry-pi-5", key=keypair[0], out=tmp_path / "bundle", quant="fp32",
                       adapter_dtype="fp32")  # fp32 SmolLM2 needs 1.3 GiB with 4 contexts: the Pi, not the gateway
    engine = Engine(res.bundle_dir, [keypair[1]])
    msgs = [{"role": "user", "content": "My Wi-Fi keeps dropping every evening. What should I do?"}]
    ids = engine.encode_prompt(messages=msgs)
    x = torch.tensor([ids])
    for name in ("pre", "prm", "bn"):
        got = engine.generate(messages=msgs, adapter=name, max_new_tokens=24).token_ids
        with torch.no_grad():
            ref = load_family_model(base, tmp_path / name).generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)[0, len(ids):]
        assert got == ref.tolist()[:len(got)] and len(got) >= 8, name


@pytest.mark.slow
def test_a_bottleneck_classifier_on_the_real_minilm_learns_and_scores_the_same_on_the_device(tmp_path, keypair):
    """all-MiniLM-L6-v2 + a Pfeiffer bottleneck on the bank intents (40 steps, about 10 s): held-out accuracy
    rises from chance, and the int8 device bundle scores exactly what training recorded."""
    from pathlib import Path

    from edgepeft.bundle.build import build_bundle
    from edgepeft.runtime import Engine
    from edgepeft.runtime.evaluate import classifier_metrics
    from edgepeft.train import train

    data = Path(__file__).resolve().parents[1] / "examples" / "bank_intents"
    result = train(data=str(data / "train.jsonl"), eval_data=str(data / "eval.jsonl"), out=str(tmp_path / "bn"),
                   method="bottleneck", placement="pfeiffer", max_steps=40, batch_size=8, learning_rate=3e-3,
                   max_length=64, warmup=0.1, eval_before=True, progress=False)
    m = result.metrics
    assert m["eval"]["accuracy"] >= m["baseline"]["accuracy"] + 0.3
    res = build_bundle(base=None, adapters=[("intents", tmp_path / "bn")], target="x86-64-gateway",
                       key=keypair[0], out=tmp_path / "bundle")
    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines() if line.strip()]
    device = classifier_metrics(Engine(res.bundle_dir, [keypair[1]]), rows, adapter="intents",
                                labels=result.record["labels"])
    assert device["accuracy"] == m["eval"]["accuracy"]


@pytest.mark.parametrize("method", ["prefix-tuning", "bottleneck"])
def test_ctrl_c_and_resume_give_the_uninterrupted_run_for_the_other_families(method, tmp_path):
    import os
    import signal

    from edgepeft.train import TrainingInterrupted, train
    from edgepeft.train.tiny import tiny_llama

    base = str(tiny_llama(tmp_path / "base"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reset my password {i}", "completion": "cheers"}) + "\n"
                            for i in range(16)))
    opts = dict(data=str(data), base=base, method=method, max_steps=4, batch_size=4, eval_split=0.0,
                virtual_tokens=3, progress=False, warmup=0.0, max_length=32)
    reference = train(**opts, out=str(tmp_path / "ref"))

    def press_ctrl_c(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(**opts, out=str(tmp_path / "run"), on_step=press_ctrl_c)
    resumed = train(**opts, out=str(tmp_path / "run"), resume=True)
    assert resumed.record["loss_curve"] == reference.record["loss_curve"]
    ref = dict(reference.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ref[name], atol=1e-6, rtol=1e-5)
