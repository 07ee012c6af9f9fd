"""Classification on a tiny exported encoder bundle: per-adapter heads and labels, probabilities,
``needs_review`` under the adapter's threshold, parity with ORT's own LoraAdapter path, HTTP route."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_runtime_support import cached_bundle, require_fixtures

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.errors import AdapterError, EngineError  # noqa: E402
from edgepeft.runtime import Engine, start_server  # noqa: E402

TEXTS = ["the product was very good", "awful service", "the thing is bad bad bad", "great"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return cached_bundle("encoder", tmp_path_factory)


@pytest.fixture(scope="module")
def engine(built, tmp_path_factory):
    return Engine(built["bundle"], [built["public_key"]], audit=tmp_path_factory.mktemp("a") / "audit.jsonl")


def _reference(engine, built, texts, adapter):
    import onnxruntime as ort

    from edgepeft.runtime.classify import _batch

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(built["bundle"] / "model.onnx"), so, providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(built["bundle"] / f"adapters/{adapter}-1.onnx_adapter"))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    logits = sess.run(["logits"], _batch(engine, texts), ro)[0]
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def test_each_adapter_brings_its_labels_and_probabilities(engine, built):
    for name, labels in (("sentiment", ["negative", "positive"]), ("topic", ["billing", "shipping", "other"])):
        results = engine.classify(TEXTS, adapter=name)
        ref = _reference(engine, built, TEXTS, name)
        assert len(results) == len(TEXTS)
        for r, row in zip(results, ref):
            assert list(r.probabilities) == labels
            assert abs(sum(r.probabilities.values()) - 1) < 1e-5
            assert np.allclose(list(r.probabilities.values()), row, atol=1e-5)
            assert r.label == labels[int(np.argmax(row))] and r.score == max(r.probabilities.values())
            assert r.adapter == name and r.adapter_version == 1
    # one text alone gets the same answer as inside a padded batch
    single = engine.classify(TEXTS[1], adapter="topic")[0]
    assert np.allclose(list(single.probabilities.values()),
                       list(engine.classify(TEXTS, adapter="topic")[1].probabilities.values()), atol=1e-5)


def test_texts_for_different_adapters_in_one_call_answer_as_alone(engine):
    """One adapter per text (issue 28): each result carries its own adapter, labels and threshold, and the
    probabilities each text gets alone (the device run checks this on its own CPU, from the prebuilt bundle)."""
    names = ["topic", "sentiment", "sentiment", "topic"]
    got = engine.classify(TEXTS, adapter=names)
    for t, n, r in zip(TEXTS, names, got):
        alone = engine.classify([t], adapter=n)[0]
        assert (r.adapter, r.threshold, list(r.probabilities)) == (n, alone.threshold, list(alone.probabilities))
        assert r.label == alone.label
        assert np.allclose(list(r.probabilities.values()), list(alone.probabilities.values()), atol=1e-4)
    emb = engine.embed(TEXTS, adapter=[None, "topic", "sentiment", None])
    assert emb.adapter == [None, "topic", "sentiment", None]
    for i, n in enumerate(emb.adapter):
        assert np.allclose(emb.vectors[i], engine.embed(TEXTS[i], adapter=n).vectors[0], atol=1e-5)


def test_low_confidence_is_marked_for_review(engine):
    sent = engine.classify(TEXTS, adapter="sentiment")  # threshold 0.9
    topic = engine.classify(TEXTS, adapter="topic")  # threshold 0.34
    for r in sent + topic:
        assert r.needs_review == (r.score < r.threshold)
    assert {r.threshold for r in sent} == {0.9} and {r.threshold for r in topic} == {0.34}
    assert any(r.needs_review for r in sent)  # a random 2-class head is rarely 90 % sure
    entries = engine.audit.entries()
    assert entries[-1]["kind"] == "classify" and entries[-1]["needs_review"] == [r.needs_review for r in topic]


def test_bad_classification_requests(engine):
    with pytest.raises(AdapterError, match="no classification head") as ei:
        engine.classify(TEXTS)
    assert "sentiment" in ei.value.hint
    for bad, match in (([], "non-empty list"), (["ok", "  "], "text 1 is empty"), (["word " * 80], "longer than")):
        with pytest.raises(EngineError, match=match):
            engine.classify(bad, adapter="sentiment")
    with pytest.raises(EngineError, match="cannot generate"):
        engine.generate("hello")
    with pytest.raises(AdapterError, match="unknown adapter"):
        engine.classify(TEXTS, adapter="nope")
    assert engine.classify(TEXTS[:1], adapter="sentiment")[0].label in ("negative", "positive")


def _call(srv, path, payload, token):
    req = urllib.request.Request(srv.url + path, method="POST", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_classify_and_embeddings_routes(engine):
    srv, thread = start_server(engine, "127.0.0.1", 0, token="t" * 32)
    try:
        status, data = _call(srv, "/v1/classify", {"model": "topic", "input": TEXTS[:2]}, "t" * 32)
        assert status == 200
        want = engine.classify(TEXTS[:2], adapter="topic")
        assert [d["label"] for d in data["data"]] == [w.label for w in want]
        assert [d["needs_review"] for d in data["data"]] == [w.needs_review for w in want]
        status, data = _call(srv, "/v1/embeddings", {"model": "topic", "input": TEXTS}, "t" * 32)
        assert status == 200 and data["object"] == "list" and [d["index"] for d in data["data"]] == [0, 1, 2, 3]
        got = np.array([d["embedding"] for d in data["data"]], np.float32)
        np.testing.assert_allclose(got, engine.embed(TEXTS, adapter="topic").vectors, atol=1e-6)
        assert data["usage"]["prompt_tokens"] == engine.embed(TEXTS).tokens > len(TEXTS)
        status, b64 = _call(srv, "/v1/embeddings", {"input": "great", "encoding_format": "base64"}, "t" * 32)
        vec = np.frombuffer(__import__("base64").b64decode(b64["data"][0]["embedding"]), "<f4")
        np.testing.assert_allclose(vec, engine.embed("great").vectors[0], atol=1e-7)
        status, err = _call(srv, "/v1/embeddings", {"input": "great", "encoding_format": "f" * 5000}, "t" * 32)
        assert status == 400 and "encoding_format" in err["error"]["message"] and len(err["error"]["message"]) < 200
        status, err = _call(srv, "/v1/embeddings", {"input": [""]}, "t" * 32)
        assert status == 400 and "empty" in err["error"]["message"]
        status, err = _call(srv, "/v1/classify", {"input": ["x"] * 65}, "t" * 32)
        assert status == 413 and "limit is 64" in err["error"]["message"]  # batches are bounded
        status, _ = _call(srv, "/v1/classify", {"input": ["x"]}, "wrong-token-wrong-token")
        assert status == 401
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_embeddings_are_normalized_sentence_vectors_each_adapter_its_own(engine):
    base, topic = engine.embed(TEXTS), engine.embed(TEXTS, adapter="topic")
    assert base.vectors.shape == (4, engine.model_info["dims"]["hidden"]) and base.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(base.vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(base.vectors, topic.vectors, atol=1e-4)  # LoRA on the encoder changes the vectors
    raw = engine.embed(TEXTS, normalize=False).vectors
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), base.vectors, atol=1e-6)
    assert topic.adapter == "topic" and topic.adapter_version == 1
    assert [e["kind"] for e in engine.audit.entries()][-1] == "embed"


@pytest.mark.host_only
def test_embeddings_match_pytorch_mean_pooling_with_and_without_the_adapter(engine, built):
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModel, AutoModelForSequenceClassification

    tok = Tokenizer.from_file(str(built["bundle"] / "tokenizer.json"))
    enc = tok.encode_batch(TEXTS)
    n = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (n - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in enc])

    def pooled(model):
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(v, dim=1).numpy()

    base = AutoModel.from_pretrained(built["base"]).eval()
    np.testing.assert_allclose(engine.embed(TEXTS).vectors, pooled(base), atol=1e-5)
    cls = AutoModelForSequenceClassification.from_pretrained(built["base"], num_labels=2)
    lora = PeftModel.from_pretrained(cls, built["root"] / "peft-sentiment").eval()
    assert not np.allclose(pooled(lora), pooled(base), atol=1e-4)  # the adapter was really loaded
    np.testing.assert_allclose(engine.embed(TEXTS, adapter="sentiment").vectors, pooled(lora), atol=1e-5)


def test_cli_classify(built, engine):
    from click.testing import CliRunner

    from edgepeft.cli.cmd_run import command

    res = CliRunner().invoke(command, [str(built["bundle"]), "--trusted-key", str(built["public_key"]),
                                       "--adapter", "sentiment", "--classify", TEXTS[0], "--classify", TEXTS[1]])
    assert res.exit_code == 0, res.output
    want = engine.classify(TEXTS[:2], adapter="sentiment")
    header, *lines = res.output.strip().splitlines()
    assert header.split() == ["label", "probability", "review", "text"]
    assert [ln.split()[0] for ln in lines] == [w.label for w in want]
    assert [ln.split()[2] == "yes" for ln in lines] == [w.needs_review for w in want]

