"""Training on tiny random Llama and BERT bases: loss falls, the adapter reloads in plain PEFT.

Each run is a handful of optimizer steps on a 2-layer, 64-wide model, so the
file stays fast on two busy cores.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch

from edgepeft.errors import TrainError
from edgepeft.models.base import BaseSource, load_model, weights_fingerprint
from edgepeft.train import TrainingInterrupted, train
from edgepeft.train.tiny import tiny_bert, tiny_llama

ANSWER = "please restart the device and try again. cheers"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"llama": str(tiny_llama(root / "llama")), "bert": str(tiny_bert(root / "bert"))}


@pytest.fixture(scope="module")
def decoder_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"my router keeps dropping the connection {i}", "completion": ANSWER} for i in range(30)]
    return write_jsonl(root / "support.jsonl", rows)


@pytest.fixture(scope="module")
def classifier_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    rows = []
    for i in range(48):
        fraud = i % 2 == 0
        text = rng.choice(["transfer money to an unknown account", "send money to unknown account now"]) if fraud \
            else rng.choice(["what is the weather like", "order status and delivery time"])
        rows.append({"text": f"{text} {i}", "label": "fraud" if fraud else "legit", "slice": "web" if i % 3 else "app"})
    return write_jsonl(root / "fraud.jsonl", rows)


def fast(**kw):
    base = dict(progress=False, dropout=0.0, learning_rate=1e-2, batch_size=4, eval_generate=2,
                max_new_tokens=4, max_length=64, warmup=0.0)
    base.update(kw)
    return base


def test_decoder_lora_trains_saves_and_reloads(bases, decoder_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    result = train(**fast(data=decoder_data, out=str(out), base=bases["llama"], max_steps=12, eval_before=True))
    m = result.metrics
    assert set(m) == {"schema", "task", "train", "eval", "baseline"} and m["task"] == "causal-lm"
    assert m["train"]["loss_last10"] < m["train"]["loss_first"]
    assert m["eval"]["loss"] < m["baseline"]["loss"]
    assert set(m["eval"]) >= {"examples", "loss", "perplexity", "answer_match", "samples"}
    assert m["eval"]["answer_match"]["generated"] == 2
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "edgepeft_training.json", "loss_curve.png"} <= names
    assert not (tmp_path / "adapter.partial").exists()
    rec = json.loads((out / "edgepeft_training.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(bases["llama"], dtype=torch.float32)
    assert rec["base"]["fingerprint"] == weights_fingerprint(base.state_dict())
    assert rec["data"]["sha256"].startswith("sha256:") and rec["options"]["rank"] == 8
    assert rec["adapter"]["target_modules"][0] == "q_proj"

    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    with torch.no_grad():
        bare = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
        trained = result.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)
    assert (reloaded - bare).abs().max() > 1e-3  # the adapter does something


def test_classifier_lora_labels_slices_and_reload(bases, classifier_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "clf"
    result = train(**fast(data=classifier_data, out=str(out), base=bases["bert"], max_steps=16, eval_split=0.25,
                          batch_size=8, eval_before=True))
    m = result.metrics
    assert m["train"]["loss_last10"] < m["train"]["loss_first"]
    ev = m["eval"]
    assert ev["task"] == "classification" and ev["examples"] == 12
    assert set(ev["per_label"]) == {"fraud", "legit"} and set(ev["per_label"]["fraud"]) == {
        "precision", "recall", "f1", "support"}
    assert set(ev["slices"]) == {"app", "web"}
    assert sum(s["examples"] for s in ev["slices"].values()) == 12
    labels = json.loads((out / "edgepeft_labels.json").read_text())
    assert labels["labels"] == ["fraud", "legit"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "classifier" in cfg["modules_to_save"] and cfg["task_type"] == "SEQ_CLS"

    src = BaseSource("bert", bases["bert"])
    base = load_model(src, task="classification", num_labels=2, id2label=dict(enumerate(labels["labels"])))
    enc = {"input_ids": torch.tensor([[2, 10, 20, 30, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()(**enc).logits
        trained = result.model.eval()(**enc).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)


def test_qlora_runs_on_cpu(bases, decoder_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    result = train(**fast(data=decoder_data, out=str(out), base=bases["llama"], method="qlora", max_steps=4,
                          eval_split=0.0, rank=4))
    rec = result.record
    assert rec["method"] == "qlora" and rec["metrics"]["eval"] is None
    base = AutoModelForCausalLM.from_pretrained(bases["llama"], dtype=torch.float32)
    assert rec["base"]["fingerprint"] == weights_fingerprint(base.state_dict())  # fp32 base, not the 4-bit one
    model = PeftModel.from_pretrained(base, str(out))  # a QLoRA adapter loads on the full-precision base
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_ctrl_c_checkpoints_and_resume_matches_uninterrupted(bases, decoder_data, tmp_path):
    opts = fast(data=decoder_data, base=bases["llama"], max_steps=6, eval_split=0.0, dropout=0.1, batch_size=8)
    reference = train(**opts, out=str(tmp_path / "ref"))

    out = tmp_path / "run"

    def press_ctrl_c(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        train(**opts, out=str(out), on_step=press_ctrl_c)
    assert "--resume" in info.value.hint
    assert not out.exists() and (tmp_path / "run.partial" / "checkpoint.pt").is_file()
    with pytest.raises(TrainError, match="interrupted run"):
        train(**opts, out=str(out))
    with pytest.raises(TrainError, match="options changed"):
        train(**{**opts, "learning_rate": 1e-3}, out=str(out), resume=True)

    resumed = train(**opts, out=str(out), resume=True)
    assert not (tmp_path / "run.partial").exists()
    assert resumed.record["loss_curve"] == reference.record["loss_curve"]
    a = dict(reference.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[name], atol=1e-6, rtol=1e-5)


def test_init_adapter_continues_from_an_earlier_version(bases, decoder_data, tmp_path):
    """v2 starts from v1's weights (the version devices run) and keeps training; a rank or base
    that does not fit is refused before training."""
    from safetensors.torch import load_file

    v1 = tmp_path / "v1"
    r1 = train(**fast(data=decoder_data, out=str(v1), base=bases["llama"], max_steps=6, eval_generate=0))
    same = tmp_path / "same"
    train(**fast(data=decoder_data, out=str(same), base=bases["llama"], max_steps=1, learning_rate=1e-12,
                 eval_generate=0, init_adapter=str(v1)))
    a, b = load_file(str(v1 / "adapter_model.safetensors")), load_file(str(same / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    v2 = tmp_path / "v2"
    r2 = train(**fast(data=decoder_data, out=str(v2), base=bases["llama"], max_steps=4, eval_generate=0,
                      init_adapter=str(v1)))
    assert r2.metrics["train"]["loss_first"] < r1.metrics["train"]["loss_first"]  # it starts where v1 ended
    with pytest.raises(TrainError, match="rank 8, this run uses rank 4") as ei:
        train(**fast(data=decoder_data, out=str(tmp_path / "bad"), base=bases["llama"], max_steps=1, rank=4,
                     init_adapter=str(v1)))
    assert "--rank 8" in ei.value.hint
