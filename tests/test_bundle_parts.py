"""Bundle pieces that need no export: adapter pre-checks, target fit, archive pack/unpack."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from edgepeft.bundle.adapters_in import parse_adapter_arg, read_adapter
from edgepeft.bundle.archive import pack_bundle
from edgepeft.bundle.fit import check_fit
from edgepeft.errors import AdapterError, BundleError, TargetFitError
from edgepeft.spec.archive import unpack_bundle
from edgepeft.spec.target import load_target


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
    info = {"task": "causal-lm", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "max_context": 8192}
    phone = load_target("android-arm64")
    ok = check_fit(phone, bundle_bytes=80 << 20, weight_bytes=78 << 20, adapter_bytes=1 << 20, model_info=info,
                   max_rank=8)
    assert ok.context == 1024 and 40 < ok.kv_cache_mib < 50
    with pytest.raises(TargetFitError) as err:
        check_fit(phone, bundle_bytes=600 << 20, weight_bytes=500 << 20, adapter_bytes=0, model_info=info, max_rank=32)
    msg = str(err.value)
    assert "600.0 MiB" in msg and "storage budget is 512 MiB" in msg and "memory budget is 384 MiB" in msg
    assert "rank 32" in msg


def test_archive_round_trip_is_deterministic(tmp_path):
    src = tmp_path / "bundle"
    (src / "adapters").mkdir(parents=True)
    (src / "manifest.json").write_text("{}")
    (src / "model.onnx").write_bytes(b"m" * 1000)
    (src / "adapters" / "a-1.onnx_adapter").write_bytes(b"a" * 10)
    first = pack_bundle(src, tmp_path / "one.epb").read_bytes()
    assert pack_bundle(src, tmp_path / "two.epb").read_bytes() == first
    with tarfile.open(tmp_path / "one.epb") as tar:
        assert tar.getnames()[0] == "manifest.json"
    out = unpack_bundle(tmp_path / "one.epb", tmp_path / "unpacked")
    assert (out / "adapters" / "a-1.onnx_adapter").read_bytes() == b"a" * 10
    with pytest.raises(BundleError, match="already exists"):
        unpack_bundle(tmp_path / "one.epb", out)


def test_unpack_refuses_hostile_and_truncated_archives(tmp_path):
    evil = tmp_path / "evil.epb"
    with tarfile.open(evil, "w") as tar:
        data = b"pwned"
        info = tarfile.TarInfo("../escape.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match="unsafe entry"):
        unpack_bundle(evil, tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dest").exists()
    src = tmp_path / "b"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"m" * 100000)
    good = pack_bundle(src, tmp_path / "good.epb").read_bytes()
    (tmp_path / "cut.epb").write_bytes(good[:50000])
    with pytest.raises(BundleError):
        unpack_bundle(tmp_path / "cut.epb", tmp_path / "dest2")
    assert not (tmp_path / "dest2").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".unpack-")]
    assert leftovers == []
