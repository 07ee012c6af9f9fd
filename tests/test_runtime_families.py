"""Every adapter family on the device runtime: prefix tuning, prompt tuning and bottleneck adapters beside LoRA
in one bundle, against PyTorch+PEFT (recorded on the host), concurrently, through signed updates, and refused
where the graph cannot apply them.

Tolerance: fp32 bundle, log-probabilities of the reference's greedy tokens within 1e-4 of PyTorch's (measured
~1e-6); greedy ids identical. Compact payloads are lossy: fp16 within 5e-3 (measured ~1e-3), int8 (one scale
per head and position) within 0.05.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_runtime_support import FAMILY_ADAPTERS, FAMILY_PROMPT, FAMILY_STEPS, cached_bundle, require_fixtures
from update_support import forge

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.errors import AdapterError, EngineError  # noqa: E402
from edgepeft.runtime import Engine  # noqa: E402

LOGPROB_ATOL = 1e-4
FP16_ATOL = 5e-3
LOSSY_ATOL = 0.05


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return cached_bundle("families", tmp_path_factory)


@pytest.fixture(scope="module")
def engine(built):
    return Engine(built["bundle"], [built["public_key"]], threads=1)


def _logprobs(rows, tokens) -> np.ndarray:
    z = np.asarray(rows, np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z[np.arange(len(tokens)), tokens] - np.log(np.exp(z).sum(axis=1))


def _check(engine, built, name, ref, atol=LOGPROB_ATOL, exact=True):
    """Greedy ids equal the reference's (up to an end-of-text id the engine stops at), and the engine's
    log-probabilities of the reference tokens equal PyTorch's."""
    eos = set(engine.codec.eos_ids)
    res = engine.generate(FAMILY_PROMPT, adapter=name, max_new_tokens=FAMILY_STEPS)
    assert res.prompt_tokens == len(built["prompt_ids"])
    n = len(res.token_ids)
    if exact:
        assert res.token_ids == ref["tokens"][:n], name
        assert n == FAMILY_STEPS or ref["tokens"][n] in eos, name
    ids = list(built["prompt_ids"]) + ref["tokens"]
    got = np.asarray(engine.token_logprobs(ids, adapter=name)[len(built["prompt_ids"]) - 1:])
    want = _logprobs(ref["logits"], ref["tokens"])
    assert np.abs(got - want).max() < atol, (name, np.abs(got - want).max())
    return res.token_ids


def test_each_family_matches_pytorch_peft_greedy_ids_and_logprobs(engine, built):
    answers = {}
    for name in (None, *FAMILY_ADAPTERS):
        answers[name] = tuple(_check(engine, built, name, built["torch"][name or ""]))
    assert len(set(answers.values())) == len(answers)  # every family really changes the answer
    described = {a["name"]: a for a in engine.adapters()}
    assert {n: described[n]["method"] for n in FAMILY_ADAPTERS} == FAMILY_ADAPTERS
    assert described["pre"]["virtual_tokens"] == 6 and described["prm"]["virtual_tokens"] == 5
    assert described["bn"]["bottleneck_size"] == 8 and described["voice"]["rank"] == 4


def test_concurrent_requests_use_different_families(engine):
    names = [None, *FAMILY_ADAPTERS]
    want = {n: engine.generate(FAMILY_PROMPT, adapter=n, max_new_tokens=FAMILY_STEPS).token_ids for n in names}
    got, errors = {}, []

    def worker(i):
        try:
            for k in range(3):
                n = names[(i + k) % len(names)]
                got.setdefault(n, []).append(engine.generate(FAMILY_PROMPT, adapter=n,
                                                             max_new_tokens=FAMILY_STEPS).token_ids)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(all(a == want[n] for a in got[n]) for n in got) and set(got) == set(names)


def test_a_context_holds_a_prefix_until_another_request_overwrites_it(engine):
    """One context serves in turn: the prefix stays in the cache between requests with the same prefix
    and is copied again after a request that wrote over it (bare, another prefix, a slot adapter)."""
    want = {n: engine.generate(FAMILY_PROMPT, adapter=n, max_new_tokens=6).token_ids
            for n in ("pre", "prm", None, "bn")}
    for n in ("pre", "pre", None, "pre", "prm", "pre", "bn", "prm", "prm"):
        assert engine.generate(FAMILY_PROMPT, adapter=n, max_new_tokens=6).token_ids == want[n], n


def test_a_prefix_combines_with_slot_adapters_but_not_with_another_prefix(engine):
    both = engine.generate(FAMILY_PROMPT, adapter=["pre", "bn"], max_new_tokens=8).token_ids
    assert both not in (engine.generate(FAMILY_PROMPT, adapter=n, max_new_tokens=8).token_ids for n in ("pre", "bn"))
    with pytest.raises(AdapterError, match="one key/value prefix"):
        engine.generate(FAMILY_PROMPT, adapter=["pre", "prm"])


def test_a_prompt_that_fits_only_without_the_prefix_is_refused_before_anything_runs(engine):
    text = "the" + " the" * (engine.max_context - 6)  # " the" is one token of the fixture's tokenizer
    n = len(engine.codec.encode(text))
    assert n == engine.max_context - 4  # fine without a prefix ...
    assert engine.generate(text, max_new_tokens=1).finish_reason in ("length", "stop")
    with pytest.raises(EngineError, match="after the adapter's prefix of 6"):  # ... not after 6 virtual tokens
        engine.generate(text, adapter="pre", stream=True)
    with pytest.raises(EngineError, match="prefix of 6"):
        engine.token_logprobs(engine.codec.encode(text + " the the"), adapter="pre")


def test_new_versions_of_each_family_install_through_the_updater(built, tmp_path):
    from edgepeft.update.installer import Updater

    eng = Engine(built["bundle"], [built["public_key"]], threads=1)
    up = Updater(eng, tmp_path / "state")
    for name in ("pre", "prm", "bn"):
        res = up.install(built["packages"][name].read_bytes())
        assert res.status == "healthy", res.reason
        served = eng.registry.get(name)
        assert served.version == 2
    assert eng.registry.get("pre").prefix_len == 7 and eng.registry.get("prm").prefix_len == 3
    assert eng.registry.get("bn").meta["bottleneck_size"] == 12
    _check(eng, built, "prm", built["torch_v2"]["prm"], atol=FP16_ATOL)  # fp16 payload
    _check(eng, built, "bn", built["torch_v2"]["bn"])  # fp32, a Pfeiffer adapter in Houlsby slots
    _check(eng, built, "pre", built["torch_v2"]["pre"], atol=LOSSY_ATOL, exact=False)  # int8 payload
    # a restarted device serves the installed versions again, from its signed store
    again = Engine(built["bundle"], [built["public_key"]], threads=1)
    Updater(again, tmp_path / "state")
    assert {a["name"]: a["version"] for a in again.adapters()} == {"voice": 1, "pre": 2, "prm": 2, "bn": 2}


def test_a_graph_without_bottleneck_slots_refuses_a_bottleneck_update(built, tmp_path):
    from edgepeft.update.installer import Updater

    plain = Engine(built["plain"], [built["public_key"]], threads=1)
    assert plain.base_fingerprint == Engine(built["bundle"], [built["public_key"]]).base_fingerprint
    res = Updater(plain, tmp_path / "state").install(built["packages"]["bn"].read_bytes())
    assert res.status == "rejected" and "no bottleneck slots" in res.reason, res.reason
    # prefixes need no slots: the same LoRA-only graph takes the prefix update
    res = Updater(plain, tmp_path / "state2").install(built["packages"]["pre"].read_bytes())
    assert res.status == "healthy", res.reason


def _prefix_package(built, tmp_path, positions: int, **entry) -> bytes:
    """A signed prefix update whose payload holds ``positions`` zero key/values per layer (device-safe:
    written with onnxruntime's adapter format, no torch)."""
    from edgepeft.contracts.adapter_payload import write_adapter_file
    from edgepeft.contracts.methods import prefix_names

    m = built["manifest"]["model"]
    arrays = {n: np.zeros((m["num_kv_heads"], positions, m["head_dim"]), np.float32)
              for i in range(m["num_layers"]) for n in prefix_names(i)}
    path = tmp_path / f"prefix-{positions}.onnx_adapter"
    write_adapter_file(path, arrays)
    payload = path.read_bytes()

    def edit(meta):
        meta["adapter"].update({"virtual_tokens": positions, "version": 9} | entry)
        meta["slots"] = sorted(arrays)
        meta["health_checks"] = []
    return forge(built["packages"]["pre"].read_bytes(), built["private_key"], payload=payload, mutate=edit)


def test_the_device_refuses_a_prefix_longer_than_its_context(built, engine, tmp_path):
    from edgepeft.update.installer import Updater

    eng = Engine(built["bundle"], [built["public_key"]], threads=1)
    up = Updater(eng, tmp_path / "state")
    res = up.install(_prefix_package(built, tmp_path, eng.max_context - 1))
    assert res.status == "rejected" and "leaving no room for a prompt" in res.reason, res.reason
    res = up.install(_prefix_package(built, tmp_path, 4, virtual_tokens=5))
    assert res.status == "rejected" and "says 5 virtual tokens" in res.reason, res.reason
    res = up.install(_prefix_package(built, tmp_path, 4, method="ia3"))
    assert res.status == "rejected" and "ia3" in res.reason, res.reason
    res = up.install(_prefix_package(built, tmp_path, 4))
    assert res.status == "healthy", res.reason
    assert eng.registry.get("pre").prefix_len == 4


def test_a_bottleneck_adapter_named_as_lora_is_refused(built, tmp_path):
    from edgepeft.update.installer import Updater

    def as_lora(meta):
        meta["adapter"].update(method="lora", rank=4, alpha=8.0)
        for k in ("bottleneck_size", "activation"):
            meta["adapter"].pop(k, None)
        meta["adapter"]["target_modules"] = ["q_proj"]
    data = forge(built["packages"]["bn"].read_bytes(), built["private_key"], mutate=as_lora)
    eng = Engine(built["bundle"], [built["public_key"]], threads=1)
    res = Updater(eng, tmp_path / "state").install(data)
    assert res.status == "rejected" and "bottleneck slot" in res.reason, res.reason


def test_a_prefix_update_that_fails_its_health_check_rolls_back(built, tmp_path):
    """The health check runs on the prepared prefix adapter itself (not served yet); a failure leaves v1."""
    from edgepeft.update.installer import Updater

    def check(meta):
        meta["health_checks"] = [{"input": FAMILY_PROMPT, "expect": {"contains": "never-in-this-answer"},
                                  "max_new_tokens": 4}]
    eng = Engine(built["bundle"], [built["public_key"]], threads=1)
    before = eng.generate(FAMILY_PROMPT, adapter="prm", max_new_tokens=6).token_ids
    res = Updater(eng, tmp_path / "state").install(forge(built["packages"]["prm"].read_bytes(), built["private_key"],
                                                         mutate=check))
    assert res.status == "rolled-back" and "never-in-this-answer" in res.reason, res.reason
    assert eng.registry.get("prm").version == 1
    assert eng.generate(FAMILY_PROMPT, adapter="prm", max_new_tokens=6).token_ids == before
