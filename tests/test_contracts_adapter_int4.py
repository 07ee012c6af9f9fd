"""The int4 adapter payload on the device side: the codec's error bound, its zero-group saving, and what a
hostile file can and cannot make the receiver do (numpy + onnxruntime only: runs on the device too)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgepeft.contracts.adapter_payload import (
    INT4_CODES,
    INT4_MASK,
    INT4_META,
    INT4_SCALE,
    expand_arrays,
    int4_decode,
    int4_encode,
    write_adapter_file,
)
from edgepeft.errors import AdapterError


def _groups(x, group, transposed):
    m = x.T if transposed else x.reshape(-1, x.shape[-1])
    pad = -m.shape[1] % group
    return np.pad(m, ((0, 0), (0, pad))).reshape(-1, group)


@pytest.mark.parametrize("shape,transposed", [((96, 8), True), ((8, 100), False), ((3, 5, 64), False)])
def test_each_value_within_its_groups_step(shape, transposed):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    parts = int4_encode(x, transposed=transposed)
    back = int4_decode(parts)
    assert back.shape == x.shape and back.dtype == np.float32
    err, ref = _groups(np.abs(back - x), 32, transposed), _groups(np.abs(x), 32, transposed)
    scale = parts[INT4_SCALE].astype(np.float32)
    # round-to-nearest inside the clipped range, the clipped tail at most its distance to the range
    bound = np.maximum(scale / 2, ref.max(axis=1) - 7 * scale) * (1 + 1e-3) + 1e-6
    assert (err.max(axis=1) <= bound).all()


def test_zero_groups_are_not_stored_and_int8_comes_back_int8():
    b = np.zeros((24, 96), np.int8)  # a packed q|k|v B: one block per module
    b[:8, :32], b[8:16, 32:64], b[16:, 64:] = 50, -30, 127
    parts = int4_encode(b)
    assert parts[INT4_SCALE].size == 24  # 24 rows x 3 groups, one in three non-zero
    assert parts[INT4_CODES].size == 24 * 32 // 2
    back = int4_decode(parts)
    assert back.dtype == np.int8 and np.array_equal(back, b)


def _parts(x=None):
    x = np.arange(1, 65, dtype=np.float32).reshape(2, 32) if x is None else x
    return int4_encode(x)


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p.__setitem__(INT4_MASK, np.zeros(2, np.uint8)), "q4mask must be 1 bytes"),
    (lambda p: p.__setitem__(INT4_MASK, np.array([0xFF], np.uint8)), "beyond the tensor"),
    (lambda p: p.__setitem__(INT4_SCALE, p[INT4_SCALE][:1]), "2 finite"),
    (lambda p: p.__setitem__(INT4_SCALE, np.array([1.0, np.nan], np.float32)), "finite"),
    (lambda p: p.__setitem__(INT4_CODES, p[INT4_CODES][:-1]), "must hold 32 bytes"),
    (lambda p: p.__setitem__(INT4_META, np.array([32, 0, 0, 2, 32], np.int32)), "int64"),
    (lambda p: p.__setitem__(INT4_META, np.array([33, 0, 0, 2, 32], np.int64)), "groups are one of"),
    (lambda p: p.__setitem__(INT4_META, np.array([32, 1, 0, 2, 32, 1], np.int64)), "impossible shape"),
    (lambda p: p.__setitem__(INT4_META, np.array([32, 0, 0, 0, 32], np.int64)), "impossible shape"),
    (lambda p: p.__setitem__(INT4_CODES, np.zeros_like(p[INT4_CODES])), "code 0"),
    (lambda p: p.__setitem__(INT4_SCALE, np.array([1.0, 3e38], np.float32)), "at most"),
])
def test_parts_that_disagree_are_refused(mutate, message):
    parts = _parts()
    mutate(parts)
    with pytest.raises(ValueError, match=message):
        int4_decode(parts)


def test_scales_stay_fp16_only_while_normal_and_bad_values_are_refused():
    tiny = np.full((2, 32), 1e-6, np.float32)  # scales ~1.4e-7: fp16's subnormal step (6e-8) is 40 % of them
    parts = int4_encode(tiny)
    assert parts[INT4_SCALE].dtype == np.float32
    assert np.abs(int4_decode(parts) - tiny).max() <= 1e-6 / 14 * 1.01
    assert int4_encode(tiny * 30)[INT4_SCALE].dtype == np.float16  # ~4e-6: subnormal, yet within 1/64
    assert int4_encode(np.ones((2, 32), np.float32))[INT4_SCALE].dtype == np.float16
    with pytest.raises(ValueError, match="NaN"):
        int4_encode(np.array([[1.0, np.nan] * 16], np.float32))


def test_expand_refuses_missing_and_orphan_parts():
    parts = {"w" + k: v for k, v in _parts().items()}
    del parts["w" + INT4_SCALE]
    with pytest.raises(ValueError, match="lacks its .q4scale"):
        expand_arrays(parts)
    with pytest.raises(ValueError, match="does not describe"):
        expand_arrays({"w" + INT4_CODES: np.zeros(4, np.uint8)})


@settings(max_examples=200, deadline=None)
@given(meta=st.lists(st.integers(-2 ** 40, 2 ** 40), min_size=0, max_size=8), mask=st.binary(max_size=8),
       scales=st.lists(st.floats(width=16), max_size=8), codes=st.binary(max_size=64))
def test_fuzzed_parts_only_raise_value_error(meta, mask, scales, codes):
    parts = {INT4_META: np.array(meta, np.int64), INT4_MASK: np.frombuffer(mask, np.uint8),
             INT4_SCALE: np.array(scales, np.float16), INT4_CODES: np.frombuffer(codes, np.uint8)}
    try:
        out = int4_decode(parts)
    except ValueError:
        return
    assert out.size <= 3 * 2 ** 24  # what decodes is what the (bounded) metadata says, nothing larger


def _registry():
    from edgepeft.runtime.registry import AdapterRegistry
    from edgepeft.runtime.slots import SlotSpec

    slots = {"layers.0.o.lora_A": SlotSpec("layers.0.o.lora_A", (64, "rank"), "tensor(float)"),
             "layers.0.o.lora_B": SlotSpec("layers.0.o.lora_B", ("rank", 64), "tensor(int8)")}
    return AdapterRegistry(slots, "sha256:x", slot_rank=8)


def _file(tmp_path, arrays) -> bytes:
    path = tmp_path / "a.onnx_adapter"
    write_adapter_file(path, arrays)
    return path.read_bytes()


def test_registry_prepares_int4_into_the_slots_dtypes(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((64, 8)).astype(np.float32)
    b = rng.integers(-127, 128, (8, 64)).astype(np.int8)
    arrays = {f"layers.0.o.lora_A{k}": v for k, v in int4_encode(a, transposed=True).items()}
    arrays |= {f"layers.0.o.lora_B{k}": v for k, v in int4_encode(b).items()}
    loaded = _registry().prepare(_file(tmp_path, arrays), {"name": "a", "base_fingerprint": "sha256:x", "version": 1})
    assert loaded.rank == 8
    assert loaded.arrays["layers.0.o.lora_A"].dtype == np.float32
    assert loaded.arrays["layers.0.o.lora_B"].dtype == np.int8
    assert np.abs(loaded.arrays["layers.0.o.lora_A"] - a).max() < 0.25 * np.abs(a).max()


def test_registry_checks_the_claimed_shape_before_expanding(tmp_path):
    """A tiny file claiming a huge tensor is refused against the slot, never expanded."""
    huge = _parts()
    huge[INT4_META] = np.array([32, 0, 0, 1 << 24, 1 << 24], np.int64)
    arrays = {f"layers.0.o.lora_A{k}": v for k, v in huge.items()}
    with pytest.raises(AdapterError, match="layers.0.o.lora_A.*shape"):
        _registry().prepare(_file(tmp_path, arrays), {"name": "a", "base_fingerprint": "sha256:x", "version": 1})


def test_a_width_above_the_layer_is_refused_before_expanding(tmp_path):
    """A bottleneck width (or rank) larger than the slot's own size: no adapter, and a small int4 file must not
    expand into it."""
    wide = np.zeros((64, 65), np.float32)
    wide[0, 0] = 1.0
    arrays = {f"layers.0.o.lora_A{k}": v for k, v in int4_encode(wide).items()}
    with pytest.raises(AdapterError, match="exceeds the slot's fixed size 64"):
        _registry().prepare(_file(tmp_path, arrays), {"name": "a", "base_fingerprint": "sha256:x", "version": 1})


def test_registry_names_malformed_int4_metadata(tmp_path):
    bad = _parts()
    bad[INT4_META] = np.array([7, 0, 0, 2, 32], np.int64)
    arrays = {f"layers.0.o.lora_A{k}": v for k, v in bad.items()}
    with pytest.raises(AdapterError, match="layers.0.o.lora_A: .*groups are one of"):
        _registry().prepare(_file(tmp_path, arrays), {"name": "a", "base_fingerprint": "sha256:x", "version": 1})
