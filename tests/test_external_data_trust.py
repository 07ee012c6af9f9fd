"""A graph over 2 GiB keeps its weights in ``model.onnx.data`` (ONNX external data). Those weights must be
the verified ones: a data file swapped or rewritten after the bundle's hashes were checked, before (or
while) ONNX Runtime reads it, must never be computed with (docs/threat-model.md, "Weights of a graph
over 2 GiB"). The limit is lowered here so a tiny model takes that form.
"""

from __future__ import annotations

import os
import threading

import onnxruntime
import pytest
from test_export_support import tiny_llama_dir
from test_runtime_support import byte_level_tokenizer

from edgepeft.bundle.build import build_bundle
from edgepeft.contracts.verify import BundleFiles
from edgepeft.errors import BundleError
from edgepeft.runtime import Engine
from edgepeft.runtime.external_data import external_tensors


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, keypair):
    """(single-file bundle, external-data bundle) of the same tiny base, int4."""
    import edgepeft.export.onnx_builder as ob

    root = tmp_path_factory.mktemp("ext")
    decoder_base = tiny_llama_dir(root / "base", vocab_size=300)
    byte_level_tokenizer(decoder_base)
    one = build_bundle(base=str(decoder_base), adapters=[], target="raspberry-pi-5", key=keypair[0],
                       out=root / "one", quant="int4")
    mp = pytest.MonkeyPatch()
    mp.setattr(ob, "_MAX_PROTO", 1 << 16)
    try:
        ext = build_bundle(base=str(decoder_base), adapters=[], target="raspberry-pi-5", key=keypair[0],
                           out=root / "ext", quant="int4")
    finally:
        mp.undo()
    assert (ext.bundle_dir / "model.onnx.data").is_file()
    return one, ext


def _tokens(bundle, pub) -> list[int]:
    with Engine(bundle, [pub]) as eng:
        return list(eng.generate("hello there", max_new_tokens=6, temperature=0).token_ids)


def _swap_when_session_starts(monkeypatch, data, how: str):
    """When onnxruntime is asked for a session, wait until the engine's parallel file check has finished
    (every listed file verified), then swap ``data``'s weights for zeros, before ONNX Runtime reads anything."""
    checked = threading.Event()
    real_check, real_session = BundleFiles.check, onnxruntime.InferenceSession

    def check(self, *a, **k):
        try:
            return real_check(self, *a, **k)
        finally:
            checked.set()

    class Swapping(real_session):
        def __init__(self, *a, **k):
            assert checked.wait(30)
            size = data.stat().st_size
            if how == "replace":  # a new file renamed over the verified one
                tmp = data.with_name(".swap")
                tmp.write_bytes(bytes(size))
                os.replace(tmp, data)
            else:  # the verified file rewritten in place (what a memory mapping of it would see)
                with open(data, "r+b") as fh:
                    fh.write(bytes(size))
            super().__init__(*a, **k)

    monkeypatch.setattr(BundleFiles, "check", check)
    monkeypatch.setattr(onnxruntime, "InferenceSession", Swapping)


@pytest.mark.parametrize("how", ["replace", "rewrite"])
def test_a_data_file_swapped_after_the_check_is_never_used(bundles, keypair, tmp_path, monkeypatch, how):
    import shutil

    one, ext = bundles
    want = _tokens(one.bundle_dir, keypair[1])
    assert _tokens(ext.bundle_dir, keypair[1]) == want  # the two forms answer alike
    victim = tmp_path / "b"
    shutil.copytree(ext.bundle_dir, victim)
    _swap_when_session_starts(monkeypatch, victim / "model.onnx.data", how)
    got = _tokens(victim, keypair[1])
    monkeypatch.undo()
    assert (victim / "model.onnx.data").read_bytes() == bytes((victim / "model.onnx.data").stat().st_size)  # swapped
    assert got == want  # computed with the verified weights, not the zeros


def test_a_data_file_changed_before_open_is_refused(bundles, keypair, tmp_path):
    import shutil

    from edgepeft.errors import IntegrityError

    victim = tmp_path / "b"
    shutil.copytree(bundles[1].bundle_dir, victim)
    data = bytearray((victim / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 1
    (victim / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.onnx.data"):
        Engine(victim, [keypair[1]])


def test_a_bundle_with_external_data_opens_from_its_archive(bundles, keypair):
    one, ext = bundles
    assert _tokens(ext.archive, keypair[1]) == _tokens(one.bundle_dir, keypair[1])


def test_the_graph_names_every_external_weight_within_the_data_file(bundles):
    """The device-side reader finds what onnx finds: every external initializer, its shape and its bytes."""
    import onnx
    from onnx import numpy_helper

    _, ext = bundles
    got = external_tensors((ext.bundle_dir / "model.onnx").read_bytes(), "model.onnx.data")
    model = onnx.load(str(ext.bundle_dir / "model.onnx"), load_external_data=False)
    want = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert [t.name for t in got] == [t.name for t in want] and len(got) > 3
    assert all(t.dims == tuple(w.dims) and t.data_type == w.data_type for t, w in zip(got, want))
    data = (ext.bundle_dir / "model.onnx.data").read_bytes()
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ext.bundle_dir / "model.onnx")).graph.initializer}
    for t in got:
        assert data[t.offset:t.offset + t.length] == loaded[t.name].tobytes(), t.name


def test_a_graph_whose_external_weight_lies_outside_its_data_is_refused(bundles):
    from edgepeft.runtime.external_data import initializers_from

    _, ext = bundles
    tensors = external_tensors((ext.bundle_dir / "model.onnx").read_bytes(), "model.onnx.data")
    short = memoryview(bytes(tensors[-1].offset + tensors[-1].length - 1))
    with pytest.raises(BundleError, match="outside"):
        initializers_from(tensors, short)


def test_the_fit_estimate_counts_the_verified_copy_of_the_data_file(bundles):
    """The engine keeps the verified copy of model.onnx.data for its session's life: the estimate adds it."""
    import json

    from edgepeft.bundle.fit import MIB, manifest_estimate

    one, ext = bundles
    m_one, m_ext = (json.loads((b.bundle_dir / "manifest.json").read_text()) for b in (one, ext))
    size = {b: {f["path"]: f["size"] for f in m["files"]} for b, m in (("one", m_one), ("ext", m_ext))}
    data = size["ext"]["model.onnx.data"]
    graph_delta = size["ext"]["model.onnx"] + data - size["one"]["model.onnx"]  # the same weights, split in two
    a, b = manifest_estimate(m_one, concurrency=1), manifest_estimate(m_ext, concurrency=1)
    assert b.memory_mib - a.memory_mib == pytest.approx((data + 2 * graph_delta) / MIB, abs=1e-6)
