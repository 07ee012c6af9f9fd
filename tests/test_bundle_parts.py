"""Bundle pieces that need no export: adapter pre-checks, target fit, archive pack/unpack."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from edgepeft.bundle.adapters_in import parse_adapter_arg, read_adapter
from edgepeft.bundle.archive import pack_bundle
from edgepeft.bundle.fit import check_fit
from edgepeft.contracts.archive import unpack_bundle
from edgepeft.contracts.target import load_target
from edgepeft.errors import AdapterError, BundleError, IntegrityError, SpecError, TargetFitError


def _adapter(tmp_path, **cfg):
    d = tmp_path / "ad"
    d.mkdir()
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "task_type": "CAUSAL_LM"}
    (d / "adapter_config.json").write_text(json.dumps(base | cfg))
    (d / "adapter_model.safetensors").write_bytes(b"x")
    return d


def test_reads_a_plain_lora_adapter(tmp_path):
    a = read_adapter("support", _adapter(tmp_path))
    assert (a.rank, a.alpha, a.task, a.target_modules, a.version) == (8, 16.0, "causal-lm", ["q_proj", "v_proj"], 1)


@pytest.mark.parametrize("cfg, match", [
    ({"peft_type": "PREFIX_TUNING"}, "num_virtual_tokens None"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "task_type": "SEQ_CLS"}, "exported for decoders"),
    ({"peft_type": "BOTTLENECK"}, "not a valid bottleneck config"),
    ({"peft_type": "IA3"}, "IA3"),
    ({"peft_type": "P_TUNING"}, "cannot ship"),
    ({"use_dora": True}, "DoRA"),
    ({"r": 0}, "rank 0"),
    ({"rank_pattern": {"q_proj": 4}}, "per-module ranks"),
    ({"task_type": "TOKEN_CLS"}, "task_type"),
])
def test_refuses_what_slots_cannot_express(tmp_path, cfg, match):
    with pytest.raises(AdapterError, match=match):
        read_adapter("x", _adapter(tmp_path, **cfg))


def test_missing_and_corrupt_adapter_dirs(tmp_path):
    with pytest.raises(AdapterError, match="not a directory"):
        read_adapter("x", tmp_path / "nope")
    d = _adapter(tmp_path)
    (d / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter("x", d)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model"):
        read_adapter("x", d)
    with pytest.raises(AdapterError, match="NAME=DIR"):
        parse_adapter_arg("just-a-path")


def test_fit_refuses_with_numbers():
    from edgepeft.bundle.session_memory import SessionMemory

    info = {"task": "causal-lm", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "max_context": 8192}
    phone = load_target("android-arm64")
    sm = SessionMemory(resident=155 << 20, peak=160 << 20)  # SmolLM2 int4 (78 MiB graph) as measured
    ok = check_fit(phone, bundle_bytes=80 << 20, weight_bytes=78 << 20, adapter_bytes=1 << 20, model_info=info,
                   max_rank=8, concurrency=1, session=sm)
    assert ok.context == 1024 and 40 + 16 < ok.kv_cache_mib < 50 + 16  # one context and the prompt cache
    with pytest.raises(TargetFitError) as err:
        check_fit(phone, bundle_bytes=600 << 20, weight_bytes=500 << 20, adapter_bytes=0, model_info=info, max_rank=32)
    msg = str(err.value)
    assert "600.0 MiB" in msg and "storage budget is 512 MiB" in msg and "memory budget is 384 MiB" in msg
    assert "rank 32" in msg


def test_fit_counts_what_the_device_holds_fp32_adapters_every_context_and_the_open_peak():
    from edgepeft.bundle.fit import MIB, PROMPT_CACHE_MIB, RUNTIME_OVERHEAD_MIB, kv_cache_bytes
    from edgepeft.bundle.session_memory import SessionMemory

    info = {"task": "causal-lm", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "max_context": 8192}
    pi = load_target("raspberry-pi-5")
    kw = dict(bundle_bytes=120 << 20, weight_bytes=100 << 20, model_info=info, max_rank=8)
    r = check_fit(pi, adapters=[(10 << 20, "fp16"), (5 << 20, "int8"), (3 << 20, "fp32")], **kw)
    assert r.adapters_mib == 20 + 20 + 3  # fp16 files double as fp32 arrays, int8 ones quadruple
    assert r.concurrency == 4 and r.kv_cache_mib == 4 * kv_cache_bytes(info, r.context) / MIB + PROMPT_CACHE_MIB  # one per request
    assert r.memory_mib == 2 * 100 + r.kv_cache_mib + 43 + RUNTIME_OVERHEAD_MIB  # unmeasured: twice the file
    assert not r.measured and r.open_peak_mib == r.memory_mib + 100  # the verified bytes beside the session
    big = kw | {"weight_bytes": 400 << 20}  # 800 + 360 KV + 16 + adapters + 112, and 400 more while it opens
    assert check_fit(pi, adapters=[(150 << 20, "fp32")], **big).open_peak_mib == 800 + 360 + 16 + 150 + 112 + 400
    with pytest.raises(TargetFitError, match="adapters 600.0 as fp32.*while it opens"):  # counted as files: fits
        check_fit(pi, adapters=[(150 << 20, "int8")], **big)
    # measured: what the session holds replaces the file, its measured opening peak the extra copy
    s = SessionMemory(resident=230 << 20, peak=250 << 20)
    m = check_fit(pi, adapters=[(5 << 20, "int8")], session=s, **kw)
    assert m.measured and m.session_mib == 230
    assert m.memory_mib == 230 + m.kv_cache_mib + 20 + RUNTIME_OVERHEAD_MIB
    assert m.open_peak_mib == max(m.memory_mib, 250 + 20 + RUNTIME_OVERHEAD_MIB)
    with pytest.raises(TargetFitError, match=r"the graph's session 230.0 \(measured; the file is 100.0\)"):
        check_fit(load_target("android-arm64"), adapters=[(30 << 20, "int8")], session=s, **kw)
    # a phone decodes one request at a time (its profile says so): one cache is counted, and its engine holds one
    phone = load_target("android-arm64")
    assert phone.budgets.max_concurrent == 1
    assert check_fit(phone, adapters=[], session=SessionMemory(150 << 20, 150 << 20), **kw).concurrency == 1


def test_archive_round_trip_is_deterministic(tmp_path, keypair):
    from test_contracts_manifest import _write_bundle

    src = tmp_path / "bundle"
    _write_bundle(src, keypair[0])
    first = pack_bundle(src, tmp_path / "one.epb").read_bytes()
    assert pack_bundle(src, tmp_path / "two.epb").read_bytes() == first
    with tarfile.open(tmp_path / "one.epb") as tar:
        assert tar.getnames()[0] == "manifest.json"
    out = unpack_bundle(tmp_path / "one.epb", tmp_path / "unpacked")
    assert (out / "adapters" / "support-1.onnx_adapter").read_bytes() == b"\x01\x02" * 50
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["adapters/support-1.onnx_adapter", "manifest.json", "model.onnx"]
    with pytest.raises(BundleError, match="already exists"):
        unpack_bundle(tmp_path / "one.epb", out)


def _tar(path, members):
    """A tar from (name, bytes | None for a folder | ("link", target)) in order, as a hostile tool writes it."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_refuses_hostile_inconsistent_and_truncated_archives(tmp_path, keypair):
    from test_contracts_manifest import _write_bundle

    src = tmp_path / "b"
    _write_bundle(src, keypair[0])
    manifest = (src / "manifest.json").read_bytes()
    model, adapter = (src / "model.onnx").read_bytes(), (src / "adapters/support-1.onnx_adapter").read_bytes()
    good = [("manifest.json", manifest), ("model.onnx", model), ("adapters/support-1.onnx_adapter", adapter)]
    cases = {
        "escape": (good + [("../escape.txt", b"pwned")], BundleError, "unsafe entry"),
        "absolute": (good + [("/etc/x", b"x")], BundleError, "unsafe entry"),
        "dot": ([(".", None)] + good, BundleError, "not a regular file"),
        "dot-file": (good + [("./model.onnx", model)], BundleError, "unsafe entry"),
        "empty-part": (good + [("adapters//x", b"x")], BundleError, "unsafe entry"),
        "backslash": (good + [("adapters\\x", b"x")], BundleError, "unsafe entry"),
        "file-then-folder": ([("manifest.json", manifest), ("model.onnx", model), ("model.onnx/x", b"x")],
                             BundleError, "both a file and a folder"),
        "folder-then-file": ([("manifest.json", manifest), ("a/b", b"x"), ("a", b"y")], BundleError,
                             "both a file and a folder"),
        "duplicate": (good + [("model.onnx", model)], BundleError, "twice"),
        "symlink": (good + [("adapters/link", ("link", "/etc/passwd"))], BundleError, "not a regular file"),
        "not-listed": (good + [("extra.bin", b"x")], IntegrityError, "does not list"),
        "missing": (good[:2], IntegrityError, "lacks adapters/support-1.onnx_adapter"),
        "resized": ([good[0], ("model.onnx", model + b"!"), good[2]], IntegrityError, "the manifest says"),
        "altered": ([good[0], ("model.onnx", model[:-1] + b"!"), good[2]], IntegrityError, "SHA-256"),
        "no-manifest": (good[1:], BundleError, "has no manifest.json"),
        "manifest-list": ([("manifest.json", b"[1, 2]")] + good[1:], SpecError, "expected a JSON object"),
        "manifest-bad-field": ([("manifest.json", manifest.replace(b'"size": 500', b'"size": [500]'))] + good[1:],
                               SpecError, "files\\[0\\].size: expected an integer"),
    }
    for name, (members, error, match) in cases.items():
        archive = _tar(tmp_path / f"{name}.epb", members)
        with pytest.raises(error, match=match):
            unpack_bundle(archive, tmp_path / f"dest-{name}")
        assert not (tmp_path / f"dest-{name}").exists(), name
    assert not (tmp_path / "escape.txt").exists()
    # the same refusals when the archive is read in place
    from edgepeft.contracts.verify import verify_bundle

    for name in ("file-then-folder", "duplicate", "not-listed", "altered", "symlink"):
        with pytest.raises((BundleError, SpecError)):
            verify_bundle(tmp_path / f"{name}.epb", [keypair[1]])
    assert verify_bundle(_tar(tmp_path / "good.epb", good), [keypair[1]]).adapters[0].name == "support"
    # truncated anywhere: refused, nothing left behind
    packed = pack_bundle(src, tmp_path / "packed.epb").read_bytes()
    with tarfile.open(tmp_path / "packed.epb") as tar:
        last = tar.getmembers()[-1].offset_data
    for cut in (100, 1500, last + 10):
        (tmp_path / "cut.epb").write_bytes(packed[:cut])
        with pytest.raises(BundleError):
            unpack_bundle(tmp_path / "cut.epb", tmp_path / "dest-cut")
        assert not (tmp_path / "dest-cut").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".unpack-")]
    assert leftovers == []


def test_the_session_memory_of_a_real_graph_is_measured_at_build_time(tmp_path, keypair):
    """ONNX Runtime holds more than a graph's file (pre-packed weights, fp32 copies of fp16 constants): the
    fit check opens the built graph and counts what its session holds, and says that it measured it."""
    from test_export_support import tiny_llama_dir
    from test_runtime_support import byte_level_tokenizer

    from edgepeft.bundle.build import build_bundle
    from edgepeft.bundle.session_memory import measure_session

    base = tiny_llama_dir(tmp_path / "base")
    byte_level_tokenizer(base)
    res = build_bundle(base=str(base), adapters=[], target="raspberry-pi-5", key=keypair[0], out=tmp_path / "b",
                       quant="int4")
    assert res.fit["measured"] and res.fit["session_mib"] > 0
    s = measure_session(res.bundle_dir / "model.onnx")
    assert s is not None and 0 < s.resident <= s.peak
    assert measure_session(tmp_path / "missing.onnx") is None  # cannot be opened here: not measured
