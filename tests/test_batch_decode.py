"""Continuous batching (edgepeft.runtime.batching): concurrent requests with different adapters decode together
and each gets exactly what it gets alone.

Alone means the batch-1 decoder of an engine opened with ``batching=False`` (the path every bundle had before).
Tolerance: fp32 bundles, every step's logits within 1e-4 and greedy ids identical; the int4 bundle within the
int4 tolerance of tests/test_runtime_parity.py. A bundle with int8 LoRA B slots (whose activations would share one
scale across the rows of a step) is not batched.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest
from test_runtime_support import cached_bundle, require_fixtures

require_fixtures()

from edgepeft.runtime import Engine, start_server  # noqa: E402

FP32_ATOL = 1e-4
INT4_ATOL = 0.5  # tests/test_runtime_parity.py LOGIT_ATOL["decoder-int4"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """The families bundle (LoRA "voice", prefix "pre", prompt "prm", bottleneck "bn") plus a second LoRA
    ("other", rank 2, another seed) as a signed update for it."""
    from test_export_support import make_peft_adapter

    from edgepeft.release.package import create_adapter_update

    built = cached_bundle("families", tmp_path_factory)
    root = tmp_path_factory.mktemp("batch-other")
    make_peft_adapter(built["base"], root / "peft", r=2, alpha=4, targets=("q_proj", "v_proj"), seed=41)
    create_adapter_update(bundle=built["bundle"], name="other", adapter=root / "peft", version=1,
                          key=built["private_key"], out=root / "other.epu")
    return built | {"other": root / "other.epu"}


def _engines(built, package=None, **kw):
    batched = Engine(built["bundle"], [built["public_key"]], threads=2, **kw)
    alone = Engine(built["bundle"], [built["public_key"]], threads=2, batching=False, **kw)
    for e in (batched, alone):
        if package is not None:
            e.load_adapter(package)
    return batched, alone


def _run(engine, names, ids, n_new, *, started=None, stop_after=None, wait=None, barrier=None):
    """Greedy tokens and every step's logits of one request through ``engine.runner`` (batched when it
    has a batcher). ``wait``: an event to wait for before the request is made; ``barrier``: wait there once it
    is made (in line), so the requests start together; ``started``: an event set once it has 3 tokens;
    ``stop_after``: close the iterator after that many tokens (a client gone)."""
    rows = []

    def pick(z):
        rows.append(z.copy())
        return int(np.argmax(z))

    if wait is not None:
        assert wait.wait(60)
    toks = []
    with engine.registry.activate(names) as chosen:
        it = engine.runner.generate(ids, pick=pick, max_new_tokens=n_new, stop_ids=engine.codec.eos_ids,
                                    adapter_key=tuple(a.key for a in chosen),
                                    adapter_values=[v for a in chosen for v in a.values],
                                    prefix=engine.registry.prefix_of(chosen), adapters=chosen)
        if barrier is not None:
            barrier.wait(60)
        for tok in it:
            toks.append(tok)
            if started is not None and len(toks) == 3:
                started.set()
            if stop_after is not None and len(toks) == stop_after:
                it.close()
                break
    return toks, rows


def _mixed(batched, alone, cases, atol):
    """Run ``cases`` (name -> (adapter names, prompt, new tokens, options)) at once on ``batched`` and one by
    one on ``alone``; every request's tokens equal, logits within ``atol``. Returns the batcher's stats."""
    ids = {k: batched.encode_prompt(c[1]) for k, c in cases.items()}
    assert len({len(v) for v in ids.values()}) > 2, "prompts of different lengths"
    started = threading.Event()
    barrier = threading.Barrier(sum(1 for c in cases.values() if not c[3].get("late")))
    got, errors = {}, []

    def worker(key):
        names, _, n_new, opts = cases[key]
        try:
            got[key] = _run(batched, names, ids[key], n_new, started=started if opts.get("first") else None,
                            stop_after=opts.get("stop_after"), wait=started if opts.get("late") else None,
                            barrier=None if opts.get("late") else barrier)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append((key, exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for key, (names, _, n_new, opts) in cases.items():
        want_toks, want_rows = _run(alone, names, ids[key], n_new)
        toks, rows = got[key]
        if opts.get("stop_after"):
            assert toks == want_toks[:opts["stop_after"]], key
            continue
        assert toks == want_toks, key
        assert len(rows) == len(want_rows), key
        worst = max(float(np.abs(a - b).max()) for a, b in zip(rows, want_rows))
        assert worst <= atol, (key, worst)
    stats = batched.runner.batcher.stats()
    assert stats["active"] == 0 and stats["waiting"] == 0
    return stats


def test_mixed_families_decode_together_as_alone(families):
    """LoRA a, LoRA b (another rank), the bare base, a prefix, a prompt-tuning prefix, a bottleneck adapter and
    two composed requests decode together; one joins mid-decode and one is cancelled mid-decode."""
    batched, alone = _engines(families, families["other"])
    with batched, alone:
        assert batched.runner.batcher is not None and alone.runner.batcher is None
        cases = {
            "voice": (["voice"], "the tin ünï ☃", 14, {"first": True}),
            "other": (["other"], "hello how can i help you today", 12, {}),
            "bare": (None, "a", 16, {}),
            "pre": (["pre"], "the the the", 10, {}),
            "prm": (["prm"], "in an inn", 13, {"late": True}),
            "bn": (["bn"], "tin", 15, {}),
            "voice+bn": (["voice", "bn"], "an ant ran", 11, {"stop_after": 4}),
            "pre+other": (["pre", "other"], "hello", 9, {}),
        }
        stats = _mixed(batched, alone, cases, FP32_ATOL)
        assert stats["batched_steps"] > 0 and stats["most_rows"] >= 4, stats


def test_mixed_lora_groups_decode_together_as_alone(decoder_bundle):
    """The decoder bundle's adapters cover q|k|v, gate|up and down: alpha, beta, both
    composed and the bare base at once, as alone."""
    batched, alone = _engines(decoder_bundle)
    with batched, alone:
        cases = {
            "alpha": (["alpha"], "the tin ünï ☃", 12, {"first": True}),
            "beta": (["beta"], "hello how can i help", 14, {}),
            "both": (["alpha", "beta"], "in", 10, {}),
            "bare": (None, "the then thin", 13, {"late": True}),
        }
        stats = _mixed(batched, alone, cases, FP32_ATOL)
        assert stats["batched_steps"] > 0, stats


def test_int4_mixed_batch_within_int4_tolerance(tmp_path_factory):
    """int4 weights (fp32 LoRA B, the default): greedy ids as alone, logits within the int4 parity tolerance."""
    built = cached_bundle("decoder-int4", tmp_path_factory)
    batched, alone = _engines(built)
    with batched, alone:
        cases = {
            "alpha": (["alpha"], "the tin ünï ☃", 10, {"first": True}),
            "beta": (["beta"], "hello how can i help", 10, {}),
            "bare": (None, "the then thin", 10, {}),
        }
        stats = _mixed(batched, alone, cases, INT4_ATOL)
        assert stats["batched_steps"] > 0, stats


def test_gqa_writes_each_row_at_its_own_position(decoder_bundle):
    """ONNX Runtime's GroupQueryAttention with past and present sharing one buffer, two rows of different
    lengths, a right-padded mask: each row's new key/value lands at its own position and nothing else
    changes; the step's logits equal each row's own batch-1 step."""
    import onnxruntime as ort

    built = decoder_bundle
    info = built["manifest"]["model"]
    sess = ort.InferenceSession(str(built["bundle"] / "model.onnx"), providers=["CPUExecutionProvider"])
    nl, kvh, hd, max_len = info["num_layers"], info["num_kv_heads"], info["head_dim"], 32
    names = [f"{w}.{i}.{kv}" for i in range(nl) for kv in ("key", "value") for w in ("past_key_values", "present")]
    kv = {i: np.full((2, kvh, max_len, hd), 7.0, np.float32) for i in range(2 * nl)}
    prompts = [[5, 9, 11, 40, 41], [60, 61, 62]]

    def run(rows, ids, mask):
        b = sess.io_binding()
        for j in range(2 * nl):
            ov = ort.OrtValue.ortvalue_from_numpy(kv[j][rows])
            b.bind_ortvalue_input(names[2 * j], ov)
            b.bind_ortvalue_output(names[2 * j + 1], ov)
        b.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(np.asarray(ids, np.int64)))
        b.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(np.asarray(mask, np.int64)))
        out = np.empty((len(ids), len(ids[0]), info["vocab_size"]), np.float32)
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))
        sess.run_with_iobinding(b)
        return out

    for r, p in enumerate(prompts):
        run(slice(r, r + 1), [p], [[1] * len(p)])
    before = {j: kv[j].copy() for j in kv}
    # each row's batch-1 step, on copies (the reference)
    alone = []
    for r, p in enumerate(prompts):
        saved = {j: kv[j].copy() for j in kv}
        alone.append(run(slice(r, r + 1), [[77]], [[1] * (len(p) + 1)])[0, 0])
        kv.update(saved)
    mask = [[1] * 6, [1] * 4 + [0, 0]]
    both = run(slice(0, 2), [[77], [77]], mask)
    for r in range(len(prompts)):
        assert np.abs(both[r, 0] - alone[r]).max() <= FP32_ATOL
    for j in kv:
        changed = np.argwhere(np.any(kv[j] != before[j], axis=(1, 3)))  # (row, position) pairs written
        assert sorted(map(tuple, changed)) == [(0, 5), (1, 3)], (j, changed)


def test_http_concurrent_requests_with_different_adapters_answer_as_sequential(families):
    """Through the HTTP server: concurrent chat requests naming different adapters (and the base, and one
    sampled with a seed) get the answers the same requests get one at a time."""
    batched, _ = _engines(families, families["other"])
    alone = Engine(families["bundle"], [families["public_key"]], threads=2, batching=False)
    alone.load_adapter(families["other"])
    token = "test-token-0123456789abcdef"
    srv, thread = start_server(batched, "127.0.0.1", 0, token=token)
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1/chat/completions"
        base = batched.info()["base"].get("name")
        bodies = [{"model": m, "messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0}
                  for m, text, n in (("voice", "héllo ☃", 12), ("other", "hi there", 10), ("bn", "tin", 14),
                                     ("pre", "the", 9))]
        bodies.append({"messages": [{"role": "user", "content": "an inn"}], "max_tokens": 11, "temperature": 0})
        bodies.append({"model": "prm", "messages": [{"role": "user", "content": "ok"}], "max_tokens": 12,
                       "temperature": 0.9, "seed": 5})
        answers, errors = {}, []

        def post(i):
            req = urllib.request.Request(url, data=json.dumps(bodies[i]).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    answers[i] = json.loads(resp.read())["choices"][0]["message"]["content"]
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append((i, exc))

        wants = [alone.generate(messages=b["messages"], adapter=b.get("model"), max_new_tokens=b["max_tokens"],
                                temperature=b["temperature"], seed=b.get("seed")).text for b in bodies]
        for _ in range(5):  # until the requests overlapped (a loaded machine may serve them one after another)
            answers.clear()
            threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            assert not errors, errors
            assert [answers[i] for i in range(len(bodies))] == wants, base
            if batched.runner.batcher.stats()["batched_steps"] > 0:
                break
        assert batched.runner.batcher.stats()["batched_steps"] > 0
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
        batched.close()
        alone.close()


def test_a_bundle_without_per_row_slots_decodes_one_request_per_run(tmp_path, keypair, monkeypatch):
    """A graph built before per-row slots (its slots declared with shapes, no ``edgepeft.row_slots``) gets no
    batcher: concurrent requests still answer as they do one at a time, each in its own run."""
    import functools

    from test_runtime_support import build_decoder_bundle

    import edgepeft.export.decoder_graph as dg

    monkeypatch.setattr(dg, "build_decoder", functools.partial(dg.build_decoder, row_slots=False))
    built = build_decoder_bundle(tmp_path, keypair[0])
    with Engine(built["bundle"], [keypair[1]], threads=2) as engine:
        assert engine.runner.batcher is None and engine.info()["batching"] is False
        assert "batch" not in engine.stats()
        jobs = [("alpha", "the tin"), ("beta", "hello how can i help"), (None, "an")]
        want = [engine.generate(p, adapter=a, max_new_tokens=10).token_ids for a, p in jobs]
        got: dict = {}
        threads = [threading.Thread(target=lambda i=i, a=a, p=p: got.__setitem__(
            i, engine.generate(p, adapter=a, max_new_tokens=10).token_ids)) for i, (a, p) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [got[i] for i in range(len(jobs))] == want


def test_int8_lora_b_slots_are_not_batched(tmp_path_factory):
    """``lora_b = "int8"``: ``DynamicQuantizeMatMul`` would quantize every row of a step with one scale, so a row's
    answer would move with its neighbours; such a bundle decodes one request per run, and says so."""
    built = cached_bundle("decoder-int4-b8", tmp_path_factory)
    assert set(built["model_info"]["slot_dtypes"].values()) == {"int8"}
    with Engine(built["bundle"], [built["public_key"]], threads=2) as engine:
        assert engine.runner.batcher is None and engine.info()["batching"] is False
