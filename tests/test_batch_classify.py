"""Mixed classify/embed batches (issue 28): texts for different adapters, one per text, run together and each
gets the answer it gets alone. Built here with torch (tiny BERT, two LoRA classifiers with 3 and 2 labels and
different ranks, a bottleneck classifier with 4); the runtime under test stays torch-free."""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from edgepeft.errors import AdapterError, AdapterInUseError, EngineError, UnknownAdapterError
from edgepeft.runtime import Engine, start_server

TEXTS = ["the product was very good", "awful service", "the thing is bad bad bad", "great", "ship it",
         "never again never"]
MIXED = ["a", "b", "bn", "a", "bn", "b"]
LABELS = {"a": ["billing", "shipping", "other"], "b": ["negative", "positive"], "bn": ["w", "x", "y", "z"]}
THRESHOLDS = {"a": 0.34, "b": 0.9, "bn": 0.5}
TOL = {"fp32": 1e-4, "int4": 1e-4}  # probabilities, a text in a mixed batch against the same text alone


def _build(root, key, quant: str, row_slots: bool = True) -> dict:
    from test_export_support import make_bottleneck_adapter, make_peft_adapter, tiny_bert_dir
    from test_runtime_support import training_record, wordpiece_tokenizer

    import edgepeft.export.encoder_graph as eg
    from edgepeft.bundle.build import build_bundle

    base = tiny_bert_dir(root / "base")
    wordpiece_tokenizer(base)
    dirs = {n: root / f"adapter-{n}" for n in LABELS}
    make_peft_adapter(base, dirs["a"], task="classification", r=4, alpha=8, targets=("query", "value"), seed=41,
                      num_labels=3)
    make_peft_adapter(base, dirs["b"], task="classification", r=2, alpha=4, targets=("query", "key"), seed=42,
                      num_labels=2)
    make_bottleneck_adapter(base, dirs["bn"], task="classification", size=4, seed=43, num_labels=4)
    for n, d in dirs.items():
        training_record(d, labels=LABELS[n], review_threshold=THRESHOLDS[n])
    orig = eg.build_encoder
    if not row_slots:  # a graph as edgepeft built it before per-row slots
        eg.build_encoder = functools.partial(orig, row_slots=False)
    try:
        res = build_bundle(base=str(base), adapters=list(dirs.items()), target="x86-64-gateway", key=key,
                           out=root / "bundle", quant=quant, slot_rank=4, task="classification")
    finally:
        eg.build_encoder = orig
    return {"bundle": res.bundle_dir, "model_info": res.manifest["model"]}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, keypair):
    root = tmp_path_factory.mktemp("batch-classify")
    out = {q: _build(root / q, keypair[0], q) for q in ("fp32", "int4", "int8")}
    out["old"] = _build(root / "old", keypair[0], "fp32", row_slots=False)
    return out


class _Counting:
    """The engine's session, counting runs (and calling ``during`` inside each)."""

    def __init__(self, session, during=None):
        self._s, self.runs, self.during = session, 0, during

    def run(self, *args, **kw):
        self.runs += 1
        if self.during is not None:
            self.during()
        return self._s.run(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._s, name)


def _open(bundles, kind, keypair):
    return Engine(bundles[kind]["bundle"], [keypair[1]], threads=2)


def _runs(engine, call, during=None) -> tuple:
    counting = _Counting(engine.session, during)
    engine.session = counting
    try:
        return call(), counting.runs
    finally:
        engine.session = counting._s


def _check_alone(engine, texts, names, tol) -> float:
    """Classify ``texts`` with one adapter per text in one call; each result must be what the text gets alone.
    Returns the largest probability difference."""
    got = engine.classify(texts, adapter=names)
    worst = 0.0
    for t, n, r in zip(texts, names, got):
        alone = engine.classify([t], adapter=n)[0]
        assert (r.adapter, r.adapter_version) == (n, 1)
        assert list(r.probabilities) == LABELS[n] and r.threshold == THRESHOLDS[n]
        diff = max(abs(r.probabilities[k] - alone.probabilities[k]) for k in LABELS[n])
        worst = max(worst, diff)
        assert diff <= tol, (n, t, diff)
        assert r.label == alone.label and r.needs_review == (r.score < THRESHOLDS[n])
    return worst


def test_encoder_graph_takes_per_row_slots_for_two_nodes_more(bundles):
    import onnx

    new, old = (onnx.load(str(bundles[k]["bundle"] / "model.onnx"), load_external_data=False) for k in ("fp32", "old"))
    assert {p.key: p.value for p in new.metadata_props}.get("edgepeft.row_slots") == "1"
    assert "edgepeft.row_slots" not in {p.key for p in old.metadata_props}
    slots = set(bundles["fp32"]["model_info"]["slots"])
    assert {"head.classifier.weight", "head.classifier.bias"} <= slots
    assert any("bottleneck" in s for s in slots)
    for i in new.graph.input:  # declared without a shape: per-row tensors of another rank may be bound
        if i.name in slots:
            assert not i.type.tensor_type.HasField("shape"), i.name
    assert len(new.graph.node) == len(old.graph.node) + 2  # the head's Unsqueeze and Squeeze


def test_a_mixed_batch_is_one_run_and_each_text_answers_as_alone(bundles, keypair):
    with _open(bundles, "fp32", keypair) as engine:
        got, runs = _runs(engine, lambda: engine.classify(TEXTS, adapter=MIXED))
        assert runs == 1
        assert [r.adapter for r in got] == MIXED
        assert [len(r.probabilities) for r in got] == [len(LABELS[n]) for n in MIXED]  # widest head cut back
        _check_alone(engine, TEXTS, MIXED, TOL["fp32"])
        # a single adapter for all texts takes its own tensors, as before: also one run
        _, runs = _runs(engine, lambda: engine.classify(TEXTS, adapter="bn"))
        assert runs == 1
        # a list naming one adapter answers as that adapter named once
        same = engine.classify(TEXTS[:3], adapter=["a"] * 3)
        assert [r.probabilities for r in same] == [r.probabilities for r in engine.classify(TEXTS[:3], adapter="a")]


def test_mixed_embeddings_with_bare_rows_equal_each_text_alone(bundles, keypair):
    names = ["a", None, "bn", "b", None, "a"]
    with _open(bundles, "fp32", keypair) as engine:
        emb, runs = _runs(engine, lambda: engine.embed(TEXTS, adapter=names))
        assert runs == 1 and emb.adapter == names and emb.adapter_version == [None if n is None else 1 for n in names]
        for i, (t, n) in enumerate(zip(TEXTS, names)):
            np.testing.assert_allclose(emb.vectors[i], engine.embed([t], adapter=n).vectors[0], atol=1e-5)
        bare = engine.embed(TEXTS[:1]).vectors[0]
        assert np.abs(emb.vectors[0] - bare).max() > 1e-3  # row 0 really used its adapter


def test_an_older_graph_without_row_slots_runs_one_adapter_per_run(bundles, keypair):
    with _open(bundles, "old", keypair) as engine:
        _, runs = _runs(engine, lambda: engine.classify(TEXTS, adapter=MIXED))
        assert runs == 3
        _check_alone(engine, TEXTS, MIXED, TOL["fp32"])
        emb, runs = _runs(engine, lambda: engine.embed(TEXTS, adapter=["a", None, None, "b", "a", None]))
        assert runs == 3
        np.testing.assert_allclose(emb.vectors[1], engine.embed(TEXTS[1]).vectors[0], atol=1e-5)


def test_int4_graph_batches_adapters_and_each_text_answers_as_alone(bundles, keypair):
    """MatMulNBits' int8 compute quantizes activations per row (block by block along K): no row moves
    with its neighbours, so int4 graphs batch rows of different adapters."""
    with _open(bundles, "int4", keypair) as engine:
        _, runs = _runs(engine, lambda: engine.classify(TEXTS, adapter=MIXED))
        assert runs == 1
        _check_alone(engine, TEXTS, MIXED, TOL["int4"])


def test_int8_graph_runs_one_adapter_per_run(bundles, keypair):
    """int8 encoder layers are ``DynamicQuantizeMatMul``: one activation scale for every row of a run, so
    rows of different adapters do not share a run; each adapter's texts run together, as one request's texts
    always did, and answer exactly as a request naming that adapter for them."""
    with _open(bundles, "int8", keypair) as engine:
        got, runs = _runs(engine, lambda: engine.classify(TEXTS, adapter=MIXED))
        assert runs == 3
        for n in LABELS:
            idx = [i for i, m in enumerate(MIXED) if m == n]
            want = engine.classify([TEXTS[i] for i in idx], adapter=n)
            assert [got[i].probabilities for i in idx] == [w.probabilities for w in want]


def test_bad_adapter_lists_are_refused_before_anything_runs(bundles, keypair):
    with _open(bundles, "fp32", keypair) as engine:
        for names, error, words in ((["a"], EngineError, "1 adapters for 2 texts"),
                                    (["a", 3], EngineError, "adapter 1 is int"),
                                    (["a", "nope"], UnknownAdapterError, "unknown adapter 'nope'"),
                                    (["a", None], AdapterError, "no classification head")):
            with pytest.raises(error, match=words):
                _runs(engine, lambda names=names: engine.classify(TEXTS[:2], adapter=names))
            counting = _Counting(engine.session)
            engine.session, saved = counting, engine.session
            try:
                with pytest.raises(error):
                    engine.classify(TEXTS[:2], adapter=names)
            finally:
                engine.session = saved
            assert counting.runs == 0
        with pytest.raises(EngineError, match="1 adapters for 2 texts"):
            engine.embed(TEXTS[:2], adapter=["a"])
        assert all(a["in_use"] == 0 for a in engine.adapters())


def test_adapters_of_a_mixed_request_stay_in_use_until_it_ends(bundles, keypair):
    """Unloading an adapter a running mixed request uses is refused; one replaced meanwhile (an update) serves
    the next request, while the running one finishes on the version it started with."""
    with _open(bundles, "fp32", keypair) as engine:
        refused = []
        newer = engine.bundled_adapter("b")
        newer.version = 2

        def meanwhile():
            for n in ("a", "bn"):
                with pytest.raises(AdapterInUseError):
                    engine.unload_adapter(n)
                refused.append(n)
            engine.serve_adapter(newer)

        got, _ = _runs(engine, lambda: engine.classify(TEXTS, adapter=MIXED), during=meanwhile)
        assert refused == ["a", "bn"] and [r.adapter for r in got] == MIXED
        assert {r.adapter_version for r in got} == {1}
        assert [r.adapter_version for r in engine.classify(TEXTS[:2], adapter=["a", "b"])] == [1, 2]
        engine.unload_adapter("a")  # free once the request is done
        with pytest.raises(UnknownAdapterError):
            engine.classify(TEXTS[:2], adapter=["a", "b"])


def _call(srv, path, payload):
    req = urllib.request.Request(srv.url + path, method="POST", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer " + "t" * 32})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_per_input_adapters(bundles, keypair):
    with _open(bundles, "fp32", keypair) as engine:
        srv, thread = start_server(engine, "127.0.0.1", 0, token="t" * 32)
        try:
            status, data = _call(srv, "/v1/classify", {"input": TEXTS, "adapters": MIXED})
            assert status == 200
            want = engine.classify(TEXTS, adapter=MIXED)
            assert [d["adapter"] for d in data["data"]] == MIXED
            assert [d["label"] for d in data["data"]] == [w.label for w in want]
            assert [list(d["probabilities"]) for d in data["data"]] == [LABELS[n] for n in MIXED]
            names = ["a", None, "b"]
            status, data = _call(srv, "/v1/embeddings", {"input": TEXTS[:3], "adapters": names})
            assert status == 200 and [d["adapter"] for d in data["data"]] == names
            np.testing.assert_allclose([d["embedding"] for d in data["data"]],
                                       engine.embed(TEXTS[:3], adapter=names).vectors, atol=1e-6)
            status, data = _call(srv, "/v1/embeddings", {"input": TEXTS[:2], "adapters": [srv.base_id, "b"],
                                                         "model": srv.base_id})  # the base's id: no adapter
            assert status == 200 and [d["adapter"] for d in data["data"]] == [None, "b"]
            for path in ("/v1/classify", "/v1/embeddings"):
                for body, code, words in (({"input": TEXTS[:2], "adapters": ["a"]}, 400, "1 adapters for 2 texts"),
                                          ({"input": TEXTS[:2], "adapters": ["a", 7]}, 400, "adapter 1 is int"),
                                          ({"input": TEXTS[:2], "adapters": "a"}, 400, "must be a list"),
                                          ({"input": TEXTS[:2], "adapters": ["a", "b"], "model": "a"}, 400,
                                           "not both"),
                                          ({"input": TEXTS[:2], "adapters": ["a", "nope"]}, 404, "nope")):
                    status, err = _call(srv, path, body)
                    assert status == code and words in err["error"]["message"], (path, body, err)
        finally:
            srv.shutdown()
            srv.server_close()
            thread.join(5)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "deberta-v2", "modernbert"])
def test_every_encoder_family_batches_adapters_with_their_own_heads(family, tmp_path, keypair):
    """Two-stage heads (RoBERTa's dense + out_proj), a pooler the adapters save (DeBERTa), a base head stage
    with a LoRA and a norm (ModernBERT), DeBERTa's relative table projected with each row's adapter."""
    from test_export_support import ENCODER_FAMILIES, ENCODER_TARGETS, make_peft_adapter, tiny_encoder_dir
    from test_runtime_support import training_record, wordpiece_tokenizer

    from edgepeft.bundle.build import build_bundle

    base = tiny_encoder_dir(family, tmp_path / "base")
    wordpiece_tokenizer(base)
    labels = {"a": ["x", "y", "z"], "b": ["no", "yes"]}
    dirs = {n: tmp_path / n for n in labels}
    for seed, (n, d) in enumerate(dirs.items()):
        extra = {k: list(v) for k, v in ENCODER_FAMILIES[family][2].items()}
        make_peft_adapter(base, d, task="classification", targets=ENCODER_TARGETS[family], seed=51 + seed,
                          num_labels=len(labels[n]), r=4 - 2 * seed, **extra)
        training_record(d, labels=labels[n])
    res = build_bundle(base=str(base), adapters=list(dirs.items()), target="x86-64-gateway", key=keypair[0],
                       out=tmp_path / "bundle", quant="fp32", slot_rank=4, task="classification")
    names = ["a", "b", "b", "a"]
    with Engine(res.bundle_dir, [keypair[1]], threads=2) as engine:
        got, runs = _runs(engine, lambda: engine.classify(TEXTS[:4], adapter=names))
        assert runs == 1
        for t, n, r in zip(TEXTS, names, got):
            alone = engine.classify([t], adapter=n)[0]
            assert list(r.probabilities) == labels[n] and r.label == alone.label
            assert max(abs(r.probabilities[k] - alone.probabilities[k]) for k in labels[n]) <= TOL["fp32"]
        emb_names = ["a", None, "b", None]
        emb = engine.embed(TEXTS[:4], adapter=emb_names)
        for i, (t, n) in enumerate(zip(TEXTS, emb_names)):
            np.testing.assert_allclose(emb.vectors[i], engine.embed([t], adapter=n).vectors[0], atol=1e-5)


def test_bare_texts_on_a_fine_tuned_checkpoint_keep_its_own_head(tmp_path, keypair):
    """The checkpoint's head is the slot's default: a per-row tensor would hold zeros for a bare row, so bare
    rows run apart from rows whose adapter brings a head, and each answers as alone."""
    from test_export_support import finetuned_classifier_dir, make_peft_adapter
    from test_runtime_support import training_record

    from edgepeft.bundle.build import build_bundle

    ft = finetuned_classifier_dir("bert", tmp_path / "finetuned", ["p", "q", "r"])
    make_peft_adapter(ft, tmp_path / "x", task="classification", targets=("query", "value"), seed=61, num_labels=3)
    training_record(tmp_path / "x", labels=["u", "v", "w"])
    res = build_bundle(base=str(ft), adapters=[("x", tmp_path / "x")], target="x86-64-gateway", key=keypair[0],
                       out=tmp_path / "bundle", quant="fp32", slot_rank=4, task="classification")
    names = [None, "x", None, "x"]
    with Engine(res.bundle_dir, [keypair[1]], threads=2) as engine:
        got, runs = _runs(engine, lambda: engine.classify(TEXTS[:4], adapter=names))
        assert runs == 2
        for t, n, r in zip(TEXTS, names, got):
            alone = engine.classify([t], adapter=n)[0]
            assert r.adapter == n and list(r.probabilities) == list(alone.probabilities)
            assert max(abs(r.probabilities[k] - alone.probabilities[k]) for k in r.probabilities) <= TOL["fp32"]
