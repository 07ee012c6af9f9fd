"""The prompt cache (edgepeft.runtime.prompt_cache): a prompt that starts like an earlier one with the same
adapters prefills only the rest, and gets what it gets without the cache.

Without the cache means an engine opened with ``prompt_cache_mb=0``. Tolerance: fp32 bundles, every step's logits
within 1e-4 (the attention over a cached start sums in another order) and greedy ids identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_runtime_support import cached_bundle, require_fixtures

require_fixtures()

from edgepeft.errors import UsageError  # noqa: E402
from edgepeft.runtime import Engine  # noqa: E402
from edgepeft.runtime.prompt_cache import MIN_TOKENS, PromptCache  # noqa: E402

FP32_ATOL = 1e-4
LONG = "the tin ünï ☃ hello how can i help you today "


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """The families bundle: LoRA "voice", prefix "pre", prompt "prm", bottleneck "bn"."""
    return cached_bundle("families", tmp_path_factory)


def _generate(engine, names, ids, n_new=8):
    rows = []

    def pick(z):
        rows.append(z.copy())
        return int(np.argmax(z))

    with engine.registry.activate(names) as chosen:
        toks = list(engine.runner.generate(ids, pick=pick, max_new_tokens=n_new, stop_ids=(),
                                           adapter_key=tuple(a.key for a in chosen),
                                           adapter_values=[v for a in chosen for v in a.values],
                                           prefix=engine.registry.prefix_of(chosen), adapters=chosen))
    return toks, rows


def _same(a, b):
    assert a[0] == b[0]
    assert max(float(np.abs(x - y).max()) for x, y in zip(a[1], b[1])) <= FP32_ATOL


@pytest.fixture(scope="module")
def engines(families):
    cached = Engine(families["bundle"], [families["public_key"]], threads=2)
    plain = Engine(families["bundle"], [families["public_key"]], threads=2, prompt_cache_mb=0)
    yield cached, plain
    cached.close()
    plain.close()


@pytest.mark.parametrize("names", [None, ["voice"], ["pre"], ["prm"], ["bn"], ["voice", "bn"]],
                         ids=lambda n: "+".join(n) if n else "bare")
def test_a_repeated_or_extended_prompt_reuses_its_start_and_answers_as_without_cache(engines, names):
    cached, plain = engines
    assert "prompt_cache" not in plain.stats()
    first = cached.encode_prompt(LONG + "first question")
    second = cached.encode_prompt(LONG + "another, longer question")
    before = cached.stats()["prompt_cache"]
    _same(_generate(cached, names, first), _generate(plain, names, first))
    again = _generate(cached, names, first)
    mid = cached.stats()["prompt_cache"]
    assert mid["hits"] == before["hits"] + 1
    assert mid["reused_tokens"] - before["reused_tokens"] == len(first) - 1  # all but the last token
    _same(again, _generate(plain, names, first))
    other = _generate(cached, names, second)
    after = cached.stats()["prompt_cache"]
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert after["hits"] == mid["hits"] + 1 and after["reused_tokens"] - mid["reused_tokens"] == common
    _same(other, _generate(plain, names, second))


def test_another_adapter_setting_never_reuses_an_entry(engines):
    cached, plain = engines
    ids = cached.encode_prompt("quoth a zephyr: " + LONG)  # a start no earlier test stored
    _generate(cached, ["voice"], ids)
    hits = cached.stats()["prompt_cache"]["hits"]
    bare = _generate(cached, None, ids)  # the voice LoRA changes q and v: its cache would be wrong here
    assert cached.stats()["prompt_cache"]["hits"] == hits
    _same(bare, _generate(plain, None, ids))


def test_an_unloaded_adapters_entries_go_with_it(families, tmp_path):
    from test_export_support import make_peft_adapter

    from edgepeft.release.package import create_adapter_update

    make_peft_adapter(families["base"], tmp_path / "peft", r=2, alpha=4, targets=("q_proj", "v_proj"), seed=43)
    create_adapter_update(bundle=families["bundle"], name="late", adapter=tmp_path / "peft", version=1,
                          key=families["private_key"], out=tmp_path / "late.epu")
    with Engine(families["bundle"], [families["public_key"]], threads=2) as engine:
        engine.load_adapter(tmp_path / "late.epu")
        ids = engine.encode_prompt(LONG)
        _generate(engine, ["late"], ids)
        _generate(engine, None, ids)
        assert engine.stats()["prompt_cache"]["entries"] == 2
        engine.unload_adapter("late")
        assert engine.stats()["prompt_cache"]["entries"] == 1


def test_one_entry_per_setting_cut_to_what_its_prompts_share_and_the_budget_bounds_the_rest():
    cache = PromptCache(3000)
    arr = [np.arange(2 * 20 * 8, dtype=np.float32).reshape(2, 20, 8)]  # 1280 bytes
    ids = list(range(20))
    cache.store(("a",), ids, arr)
    assert cache.reuse(("a",), ids)[0] == 19  # a whole repeat: all but the last token
    cache.store(("a",), list(range(12)) + [99] * 8, [a.copy() for a in arr])  # shares 12: the entry is cut to them
    assert cache.stats()["entries"] == 1
    n, kept = cache.reuse(("a",), ids)
    assert n == 12 and kept[0].shape == (2, 12, 8) and np.array_equal(kept[0], arr[0][:, :12])
    cache.store(("a",), [7] * 20, arr)  # shares nothing: replaces it
    assert cache.reuse(("a",), ids + [1])[0] == 0 and cache.reuse(("a",), [7] * 21)[0] == 20
    cache.store(("b",), [8] * 20, arr)
    cache.store(("c",), [9] * 20, arr)  # over the budget: the least recently used setting ("a") goes
    assert cache.stats()["entries"] == 2 and cache.reuse(("a",), [7] * 21)[0] == 0
    assert cache.reuse(("b",), [8] * 21)[0] == 20 and cache.reuse(("c",), [9] * 21)[0] == 20
    cache.store(("d",), [5] * (MIN_TOKENS - 1), [np.ones((1, MIN_TOKENS - 1, 1), np.float32)])  # too short to keep
    cache.store(("e",), list(range(40)), [np.ones((2, 40, 80), np.float32)])  # larger than the whole budget
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] <= 3000
    assert PromptCache(0).stats()["max_bytes"] == 0


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "32", True])
def test_a_bad_budget_is_refused_by_name(families, bad):
    with pytest.raises(UsageError, match="prompt_cache_mb"):
        Engine(families["bundle"], [families["public_key"]], threads=1, prompt_cache_mb=bad)
