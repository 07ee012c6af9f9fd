"""Classifiers as people bring them: a plain PEFT LoRA with no label list on a base whose config.json names
its labels (issue 26, item 4), and a fully fine-tuned *ForSequenceClassification checkpoint served by its own
head, its task read from its config (item 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_export_support import (  # noqa: E402
    ENCODER_FAMILIES,
    ENCODER_TARGETS,
    finetuned_classifier_dir,
    make_peft_adapter,
    tiny_encoder_dir,
)
from test_runtime_support import wordpiece_tokenizer  # noqa: E402

from edgepeft.contracts.signing import generate_keypair  # noqa: E402

NAMES = ["billing", "shipping", "other"]
TEXTS = ["the product was good", "awful service", "very bad product", "great"]


def _name_labels(base) -> None:
    cfg = json.loads((base / "config.json").read_text())
    cfg["id2label"] = {str(i): n for i, n in enumerate(NAMES)}
    cfg["label2id"] = {n: i for i, n in enumerate(NAMES)}
    (base / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("family", sorted(ENCODER_FAMILIES))
def test_a_plain_peft_classifier_answers_with_the_bases_label_names(family, tmp_path):
    from edgepeft.bundle.build import build_bundle
    from edgepeft.runtime import Engine

    priv, pub = generate_keypair(tmp_path / "k")
    base = tiny_encoder_dir(family, tmp_path / "base")
    wordpiece_tokenizer(base)
    _name_labels(base)
    extra = {k: list(v) for k, v in ENCODER_FAMILIES[family][2].items()}
    make_peft_adapter(base, tmp_path / "inbox", task="classification", targets=ENCODER_TARGETS[family],
                      num_labels=3, **extra)
    assert not (tmp_path / "inbox" / "labels.json").exists()
    res = build_bundle(base=str(base), adapters=[("inbox", tmp_path / "inbox")], target="x86-64-gateway", key=priv,
                       out=tmp_path / "bundle", quant="fp32", slot_rank=4)
    with Engine(res.bundle_dir, [pub]) as eng:
        got = eng.classify(TEXTS, adapter="inbox")
    assert {r.label for r in got} <= set(NAMES) and set(got[0].probabilities) == set(NAMES)


def test_a_fine_tuned_checkpoint_serves_its_own_head(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgepeft.runtime import Engine

    priv, pub = generate_keypair(tmp_path / "k")
    ft = finetuned_classifier_dir("roberta", tmp_path / "inbox-finetuned", NAMES)
    # no adapter, no --task: the checkpoint's architectures say it is a classifier
    r = subprocess.run([sys.executable, "-m", "edgepeft", "build", "--base", str(ft), "--target", "x86-64-gateway",
                        "--quant", "fp32", "--key", str(priv), "--out", str(tmp_path / "bundle")],
                       capture_output=True, text=True, timeout=300, env=os.environ | {"EDGEPEFT_DEBUG": ""})
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "edgepeft", "run", str(tmp_path / "bundle"), "--trusted-key", str(pub),
                        "--classify", TEXTS[0]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and any(n in r.stdout for n in NAMES), r.stdout + r.stderr
    tok = AutoTokenizer.from_pretrained(ft)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    model = AutoModelForSequenceClassification.from_pretrained(ft).eval()
    with torch.no_grad():
        want = model(**enc).logits.softmax(-1).numpy()
    with Engine(tmp_path / "bundle", [pub]) as eng:
        got = eng.classify(TEXTS)
    assert [r.label for r in got] == [NAMES[i] for i in want.argmax(1)]
    assert np.allclose([[r.probabilities[n] for n in NAMES] for r in got], want, atol=1e-4)
