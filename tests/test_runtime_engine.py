"""Engine on a tiny exported decoder bundle: parity with a plain ORT loop, streaming, adapters in
threads, overlap and in-use refusals, bad input, installs with health-check rollback, the audit log."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from test_runtime_support import reference_greedy, require_fixtures
from update_support import forge

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.errors import AdapterError, BundleError, EngineError, IntegrityError, SignatureError  # noqa: E402
from edgepeft.runtime import Engine  # noqa: E402

PROMPT = "the tin ünï ☃"


@pytest.fixture(scope="module")
def engine(built, tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    return Engine(built["bundle"], [built["public_key"]], audit=d / "audit.jsonl")


def test_greedy_equals_reference_loop_bare_and_with_each_adapter(engine, built):
    ids = engine.codec.encode(PROMPT)
    bundle, manifest = built["bundle"], built["manifest"]
    answers = {}
    for name in (None, "alpha", "beta"):
        res = engine.generate(PROMPT, adapter=name, max_new_tokens=12)
        adapter_file = None if name is None else bundle / f"adapters/{name}-1.onnx_adapter"
        assert res.token_ids == reference_greedy(bundle, manifest, ids, 12, adapter_file), name
        assert res.prompt_tokens == len(ids) and res.adapter == name
        answers[name] = res.token_ids
    assert len({tuple(v) for v in answers.values()}) == 3  # each adapter really changes the answer
    # switching back and forth reuses bound contexts and still gives the same answers
    for name in ("beta", None, "alpha", "beta"):
        assert engine.generate(PROMPT, adapter=name, max_new_tokens=12).token_ids == answers[name]


def test_streaming_pieces_join_to_the_full_text(engine):
    msgs = [{"role": "user", "content": "héllo ☃ wörld"}]
    full = engine.generate(messages=msgs, adapter="beta", max_new_tokens=16)
    stream = engine.generate(messages=msgs, adapter="beta", max_new_tokens=16, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == full.text == stream.result.text
    if "\ufffd" not in full.text:  # no half characters ever reach the stream
        assert all("\ufffd" not in p for p in pieces)
    assert stream.result.token_ids == full.token_ids and stream.result.finish_reason == full.finish_reason


def test_seeded_sampling_repeats_and_logprobs_match_a_prefill(engine):
    kw = dict(adapter="alpha", max_new_tokens=12, temperature=1.3, top_k=40, top_p=0.95, seed=1234)
    a, b = engine.generate(PROMPT, **kw), engine.generate(PROMPT, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    others = {tuple(engine.generate(PROMPT, **(kw | {"seed": s})).token_ids) for s in range(6)}
    assert len(others) > 1  # the seed really drives the draws
    # the reported log-probabilities are the model's: the same as scoring prompt + answer in one prefill
    res = engine.generate(PROMPT, adapter="alpha", max_new_tokens=8, logprobs=3)
    assert len(res.logprobs) == len(res.token_ids)
    ids = engine.codec.encode(PROMPT)
    scored = engine.token_logprobs(ids + res.token_ids, adapter="alpha")[len(ids) - 1:]
    assert [r["logprob"] for r in res.logprobs] == pytest.approx(scored, abs=1e-3)
    for r in res.logprobs:
        assert r["id"] == r["top"][0]["id"] and len(r["top"]) == 3  # greedy: the chosen token is the likeliest
        assert r["top"][0]["logprob"] >= r["top"][1]["logprob"] >= r["top"][2]["logprob"]
        assert isinstance(r["token"], str)
    streamed = engine.generate(PROMPT, adapter="alpha", max_new_tokens=8, logprobs=0, stream=True)
    got = []
    for _ in streamed:
        got += streamed.new_logprobs()
    got += streamed.new_logprobs()
    assert [g["id"] for g in got] == res.token_ids and all(g["top"] == [] for g in got)
    penalized = engine.generate(PROMPT, adapter="alpha", max_new_tokens=12, repetition_penalty=1.5)
    assert penalized.token_ids != engine.generate(PROMPT, adapter="alpha", max_new_tokens=12).token_ids
    for bad, match in [({"top_k": -2}, "top_k"), ({"presence_penalty": 9}, "presence_penalty"),
                       ({"max_new_tokens": float("inf")}, "max_new_tokens"), ({"seed": -1}, "seed"),
                       ({"stop": [""]}, "stop")]:
        with pytest.raises(EngineError, match=match):
            engine.generate(PROMPT, **bad)


def test_stop_strings_cut_the_answer(engine):
    full = engine.generate(PROMPT, max_new_tokens=12).text
    assert len(full) >= 3
    stop = full[2:4]
    cut = engine.generate(PROMPT, max_new_tokens=12, stop=[stop])
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    assert "".join(engine.generate(PROMPT, max_new_tokens=12, stop=stop, stream=True)) == cut.text


def test_concurrent_requests_each_get_their_own_adapter(engine):
    expected = {n: engine.generate(PROMPT, adapter=n, max_new_tokens=10).token_ids for n in (None, "alpha", "beta")}
    got, errors = [], []

    def worker(i):
        name = (None, "alpha", "beta")[i % 3]
        try:
            for _ in range(3):
                got.append((name, engine.generate(PROMPT, adapter=name, max_new_tokens=10).token_ids))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(got) == 18
    assert all(ids == expected[name] for name, ids in got)


def test_overlapping_adapters_are_refused_disjoint_ones_combine(engine, built):
    engine.load_adapter(built["package"], name="alpha-next")
    try:
        with pytest.raises(AdapterError, match="both set 'layers.0.qkv.lora_A'") as ei:
            engine.generate(PROMPT, adapter=["alpha", "alpha-next"], max_new_tokens=4)
        assert ei.value.hint
        both = engine.generate(PROMPT, adapter=["alpha", "beta"], max_new_tokens=8)
        assert both.adapter == "alpha+beta"
        assert both.token_ids != engine.generate(PROMPT, adapter="alpha", max_new_tokens=8).token_ids
    finally:
        engine.unload_adapter("alpha-next")


def test_unload_is_refused_while_a_request_uses_the_adapter(engine, built):
    engine.load_adapter(built["package"], name="tmp")
    stream = engine.generate(PROMPT, adapter="tmp", max_new_tokens=40, stream=True)
    next(stream)
    with pytest.raises(AdapterError, match="in use by 1"):
        engine.unload_adapter("tmp")
    stream.close()
    engine.unload_adapter("tmp")
    with pytest.raises(AdapterError, match="unknown adapter 'tmp'") as ei:
        engine.generate(PROMPT, adapter="tmp")
    assert "alpha" in ei.value.hint


def test_switching_reuses_kept_bindings_and_unload_drops_them(engine, built):
    """A context keeps one IOBinding per adapter it served: switching back binds nothing (O(1));
    unloading an adapter removes its bindings from every context (they hold its memory map)."""
    engine.load_adapter(built["package"], name="tmp2")
    want = {n: engine.generate(PROMPT, adapter=n, max_new_tokens=6).token_ids for n in ("alpha", "tmp2", None)}
    kept = {(id(c), k): b for c in engine.runner._all for k, b in c.bindings.items()}
    made = []
    real = engine.session.io_binding
    engine.session.io_binding = lambda: made.append(1) or real()
    try:
        for n in ("tmp2", "alpha", None, "tmp2", "alpha"):
            assert engine.generate(PROMPT, adapter=n, max_new_tokens=6).token_ids == want[n]
    finally:
        del engine.session.io_binding
    assert not made  # every switch picked a binding made before
    assert all(kept[id(c), k] is b for c in engine.runner._all for k, b in c.bindings.items())
    gone = engine.registry.get("tmp2").key
    engine.unload_adapter("tmp2")
    assert not any(gone in k for c in engine.runner._all for k in list(c.bindings) + [c.adapter_key])
    assert engine.generate(PROMPT, adapter="alpha", max_new_tokens=6).token_ids == want["alpha"]


def test_bad_requests_fail_clearly_and_the_engine_keeps_serving(engine, built):
    before = engine.generate(PROMPT, adapter="alpha", max_new_tokens=8).token_ids
    cases = [
        (dict(prompt=""), EngineError, "empty"),
        (dict(prompt="   "), EngineError, "empty"),
        (dict(prompt="x" * 500), EngineError, "longer than the context"),
        (dict(prompt="hi", adapter="nope"), AdapterError, "unknown adapter"),
        (dict(prompt="hi", temperature=-1), EngineError, "temperature"),
        (dict(prompt="hi", max_new_tokens=0), EngineError, "max_new_tokens"),
        (dict(messages=[{"role": "user"}]), EngineError, "content"),
    ]
    for kw, exc_type, match in cases:
        with pytest.raises(exc_type, match=match) as ei:
            engine.generate(**kw)
        assert ei.value.hint, kw
    good = built["package"].read_bytes()

    def other_base(m):
        m["base_fingerprint"] = m["adapter"]["base_fingerprint"] = "0" * 64

    with pytest.raises(AdapterError, match="built for base 0000") as ei:
        engine.load_adapter(forge(good, built["private_key"], mutate=other_base), name="foreign")
    assert ei.value.hint
    with pytest.raises(BundleError, match="not an edgepeft update package"):
        engine.load_adapter(built["update"], name="raw")  # an adapter file without its signed envelope
    from edgepeft.contracts.signing import generate_keypair

    stranger, _ = generate_keypair(built["root"] / "keys" / "stranger", force=True)
    with pytest.raises(SignatureError, match="does not trust"):
        engine.load_adapter(forge(good, stranger), name="unsigned-by-us")
    assert not {"foreign", "raw", "unsigned-by-us"} & {a["name"] for a in engine.adapters()}
    assert engine.generate(PROMPT, adapter="alpha", max_new_tokens=8).token_ids == before


def test_adapter_with_wrong_shapes_is_refused(engine, built, tmp_path):
    import numpy as np
    import onnxruntime as ort

    keep = {"layers.0.qkv.lora_A": np.ones((7, 12), np.float32)}
    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in keep.items()})
    fmt.export_adapter(str(tmp_path / "bad.onnx_adapter"))
    good, key = built["package"].read_bytes(), built["private_key"]

    def load(path, name):
        return engine.load_adapter(forge(good, key, payload=path.read_bytes()), name=name)

    with pytest.raises(AdapterError, match="has shape \\[7, 12\\], the slot is"):
        load(tmp_path / "bad.onnx_adapter", "bad")
    fmt = ort.AdapterFormat()
    odd = {"not.a.slot": np.ones((2, 2), np.float32)}
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in odd.items()})
    fmt.export_adapter(str(tmp_path / "odd.onnx_adapter"))
    with pytest.raises(AdapterError, match="matches no adapter slot"):
        load(tmp_path / "odd.onnx_adapter", "odd")
    (tmp_path / "cut.onnx_adapter").write_bytes(built["update"].read_bytes()[:300])
    with pytest.raises(AdapterError, match="truncated|not a readable"):
        load(tmp_path / "cut.onnx_adapter", "cut")


def test_tampered_or_untrusted_bundles_are_refused(built, tmp_path):
    from edgepeft.contracts.signing import generate_keypair

    src = built["bundle"]
    flipped = tmp_path / "flipped"
    shutil.copytree(src, flipped)
    data = bytearray((flipped / "adapters/alpha-1.onnx_adapter").read_bytes())
    data[-5] ^= 0xFF
    (flipped / "adapters/alpha-1.onnx_adapter").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="alpha-1.onnx_adapter"):
        Engine(flipped, [built["public_key"]])
    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["generation"]["max_new_tokens"] = 9999
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SignatureError, match="does not match"):
        Engine(edited, [built["public_key"]])
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="does not trust") as ei:
        Engine(src, [other_pub])
    assert isinstance(ei.value, BundleError) and ei.value.hint


def test_bundled_adapters_serve_from_open_and_load_on_first_use(built, tmp_path):
    """Opening reads no adapter tensors: the manifest entries list and serve them, the first request
    naming one reads, hashes and loads it (once, with concurrent first requests), with the answers of
    an engine that loaded everything at open; .epb archives the same."""
    from edgepeft.bundle.archive import pack_bundle
    from edgepeft.runtime.registry import DeferredAdapter, LoadedAdapter

    eager = Engine(built["bundle"], [built["public_key"]], lazy_adapters=False)
    want = {n: eager.generate(PROMPT, adapter=n, max_new_tokens=8).token_ids for n in ("alpha", "beta")}
    assert all(a["loaded"] and a["bytes"] for a in eager.adapters())
    for source in (built["bundle"], pack_bundle(built["bundle"], tmp_path / "b.epb")):
        eng = Engine(source, [built["public_key"]])
        listed = {a["name"]: a for a in eng.adapters()}
        assert set(listed) == {"alpha", "beta"} and not any(a["loaded"] for a in listed.values())
        for name, a in listed.items():  # what the manifest says, before any byte of the file is read
            full = {x["name"]: x for x in eager.adapters()}[name]
            assert {k: a[k] for k in ("version", "rank", "task", "method", "sha256", "base_fingerprint")} == \
                {k: full[k] for k in ("version", "rank", "task", "method", "sha256", "base_fingerprint")}
        assert isinstance(eng.registry.peek("alpha"), DeferredAdapter)
        loads = []
        real = eng.bundled_adapter
        eng.bundled_adapter = lambda name: loads.append(name) or real(name)
        got = []
        threads = [threading.Thread(target=lambda: got.append(eng.registry.get("alpha"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert loads == ["alpha"] and len({id(a) for a in got}) == 1 and isinstance(got[0], LoadedAdapter)
        assert {n: eng.generate(PROMPT, adapter=n, max_new_tokens=8).token_ids for n in want} == want
        assert all(a["loaded"] and a["bytes"] for a in eng.adapters()) and loads == ["alpha", "beta"]
        eng.close()
    eager.close()


def test_a_bundled_adapter_tampered_after_open_is_refused_when_first_used(built, tmp_path):
    """The adapter is hashed again when it loads: a file changed after the bundle was opened never
    reaches the session; every request naming it gets the same clear error, a warning says so, and
    everything else keeps serving. Unloading a deferred adapter works without reading it."""
    copy = tmp_path / "b"
    shutil.copytree(built["bundle"], copy)
    eng = Engine(copy, [built["public_key"]])
    bare = eng.generate(PROMPT, max_new_tokens=6).token_ids
    path = copy / "adapters/alpha-1.onnx_adapter"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    for _ in range(2):
        with pytest.raises(IntegrityError, match="alpha-1.onnx_adapter does not match its SHA-256") as ei:
            eng.generate(PROMPT, adapter="alpha", max_new_tokens=6)
        assert ei.value.hint
    with pytest.raises(IntegrityError, match="alpha-1.onnx_adapter"):
        eng.token_logprobs(eng.codec.encode(PROMPT), adapter="alpha")
    assert any("alpha" in w and "SHA-256" in w for w in eng.info()["warnings"])
    assert {a["name"]: a["loaded"] for a in eng.adapters()} == {"alpha": False, "beta": False}
    assert eng.generate(PROMPT, max_new_tokens=6).token_ids == bare
    assert eng.generate(PROMPT, adapter="beta", max_new_tokens=6).finish_reason in ("length", "stop")
    eng.unload_adapter("alpha")
    assert [a["name"] for a in eng.adapters()] == ["beta"]
    with pytest.raises(AdapterError, match="unknown adapter 'alpha'"):
        eng.generate(PROMPT, adapter="alpha", max_new_tokens=6)
    eng.close()


def test_audit_log_records_each_request(engine):
    before = len(engine.audit.entries())
    res = engine.generate(PROMPT, adapter="beta", max_new_tokens=5)
    entries = engine.audit.entries()
    assert len(entries) == before + 1
    last = entries[-1]
    assert last["request_id"] == res.request_id and last["status"] == "ok" and last["kind"] == "generate"
    assert last["adapters"][0]["name"] == "beta" and last["adapters"][0]["version"] == 1
    assert len(last["adapters"][0]["sha256"]) == 64
    assert last["base_fingerprint"] == engine.base_fingerprint and PROMPT not in json.dumps(last)
    assert last["input_digest"] == engine.audit.digest(PROMPT) == engine.digest(PROMPT)  # keyed, findable by the owner
