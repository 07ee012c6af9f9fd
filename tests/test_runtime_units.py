"""Runtime pieces without a model: incremental detokenization, stop strings, the adapter file
header reader, sampling, audit-log rotation, and the torch-free import guarantee."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepeft.errors import AdapterError, EngineError
from edgepeft.runtime.audit import AuditLog
from edgepeft.runtime.detok import IncrementalDetokenizer, StopMatcher
from edgepeft.runtime.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    from test_runtime_support import byte_level_tokenizer
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    byte_level_tokenizer(d)
    return Tokenizer.from_file(str(d / "tokenizer.json"))


@pytest.mark.parametrize("text", ["héllo wörld", "雪 ☃ 🎉 the end", "ascii only", "🎉🎉", "a\u0301 é"])
def test_incremental_detok_never_splits_a_character(byte_tok, text):
    ids = byte_tok.encode(text).ids
    assert len(ids) > len(text.encode("utf-8")) // 2  # multi-byte characters span several tokens
    det = IncrementalDetokenizer(lambda x: byte_tok.decode(x, skip_special_tokens=True))
    pieces = [det.add(i) for i in ids]
    pieces.append(det.flush())
    assert "".join(pieces) == text == det.text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces[:-1]) == any(ord(c) > 127 for c in text)  # held back mid-character


def test_incremental_detok_releases_a_truly_invalid_byte(byte_tok):
    ids = byte_tok.encode("é").ids[:1] + byte_tok.encode("abc").ids  # a lone lead byte, never completed
    det = IncrementalDetokenizer(lambda x: byte_tok.decode(x))
    out = "".join(det.add(i) for i in ids) + det.flush()
    assert out == byte_tok.decode(ids)


def test_stop_matcher_holds_back_only_possible_stops():
    m = StopMatcher(["</s>", "\n\n"])
    assert m.feed("hello <") == "hello "
    assert m.feed("/") == ""
    assert m.feed("x") == "</x"
    assert m.feed(" a\n") == " a"
    assert m.feed("\nrest") == "" and m.stopped
    assert m.feed("more") == "" and m.flush() == ""
    m2 = StopMatcher(["END"])
    assert m2.feed("the E") == "the " and m2.flush() == "E"
    assert StopMatcher([]).feed("abc") == "abc"


def test_adapter_header_matches_onnxruntime_and_maps_without_copy(tmp_path):
    import onnxruntime as ort

    from edgepeft.runtime.adapter_file import map_arrays, read_header

    arrays = {"layers.0.qkv.lora_A": np.arange(24, dtype=np.float32).reshape(4, 6),
              "head.classifier.bias": np.ones(3, np.float32), "x.fp16": np.ones((2, 2), np.float16)}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(7)
    fmt.set_model_version(3)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(tmp_path / "a.onnx_adapter"))
    h = read_header(tmp_path / "a.onnx_adapter")
    assert (h.adapter_version, h.model_version) == (7, 3)
    ref = ort.AdapterFormat.read_adapter(str(tmp_path / "a.onnx_adapter")).get_parameters()
    assert {k: (list(p.shape), p.dtype) for k, p in h.params.items()} == \
        {k: (v.shape(), v.data_type()) for k, v in ref.items()}
    data = (tmp_path / "a.onnx_adapter").read_bytes()
    assert read_header(data) == h
    mapped = map_arrays(data, h)
    for k, v in arrays.items():  # views over the verified bytes themselves: no copy
        assert np.array_equal(mapped[k], v) and not mapped[k].flags.writeable
        assert np.shares_memory(mapped[k], np.frombuffer(data, np.uint8))
    (tmp_path / "cut.onnx_adapter").write_bytes((tmp_path / "a.onnx_adapter").read_bytes()[:60])
    with pytest.raises(AdapterError, match="truncated|not a readable"):
        read_header(tmp_path / "cut.onnx_adapter")


def test_sampling_greedy_top_p_and_seeds():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert Sampler(SamplingParams())(logits) == 1
    assert Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=0))(logits) == 1
    a = [Sampler(SamplingParams(temperature=1.0, seed=5))(logits) for _ in range(5)]
    s = Sampler(SamplingParams(temperature=1.0, seed=5))
    assert a[0] == s(logits)
    draws = {Sampler(SamplingParams(temperature=2.0, seed=i))(logits) for i in range(50)}
    assert len(draws) > 1
    with pytest.raises(EngineError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(EngineError, match="temperature"):
        SamplingParams(temperature=-0.5)


def test_top_k_keeps_only_the_likeliest_tokens():
    logits = np.array([5.0, 4.9, 4.8, 4.7, 0.0, -1.0], np.float32)
    draws = {Sampler(SamplingParams(temperature=5.0, top_k=2, seed=i))(logits) for i in range(200)}
    assert draws == {0, 1}
    wide = {Sampler(SamplingParams(temperature=5.0, seed=i))(logits) for i in range(200)}
    assert len(wide) >= 4  # without top_k the flat tail is drawn too
    both = {Sampler(SamplingParams(temperature=5.0, top_k=3, top_p=0.5, seed=i))(logits) for i in range(200)}
    assert both <= {0, 1, 2} and len(both) >= 2


def test_repetition_penalty_counts_prompt_and_answer_frequency_presence_count_the_answer():
    logits = np.array([2.0, 1.9, -0.5, -0.4], np.float32)
    assert Sampler(SamplingParams())(logits) == 0
    # transformers' convention: a seen positive logit is divided, a seen negative one multiplied
    s = Sampler(SamplingParams(repetition_penalty=1.2), prompt_ids=[0, 3])
    assert s(logits) == 1  # 2.0 / 1.2 < 1.9
    z = s._penalize(logits)
    np.testing.assert_allclose(z, [2.0 / 1.2, 1.9 / 1.2, -0.5, -0.4 * 1.2], rtol=1e-6)  # 1 was just picked
    assert logits[0] == np.float32(2.0)  # the decode loop's buffer is never written
    # a 135M model loops under greedy decoding; the penalty breaks the loop
    loop = np.array([3.0, 2.0, 1.5, 1.0], np.float32)
    plain = Sampler(SamplingParams())
    assert [plain(loop) for _ in range(4)] == [0, 0, 0, 0]
    pen = Sampler(SamplingParams(repetition_penalty=2.5))
    assert [pen(loop) for _ in range(3)] == [0, 1, 2]
    # OpenAI's: the answer's counts lower a logit by frequency * count + presence; the prompt does not count
    f = Sampler(SamplingParams(frequency_penalty=0.6), prompt_ids=[1, 1, 1])
    assert [f(loop) for _ in range(3)] == [0, 0, 1]  # 3.0, 2.4, 1.8 < 2.0
    pr = Sampler(SamplingParams(presence_penalty=1.6))
    assert [pr(loop) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(EngineError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(EngineError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=3)
    with pytest.raises(EngineError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(EngineError, match="must be a number"):
        SamplingParams(temperature="hot")
    with pytest.raises(EngineError, match="out of range"):
        SamplingParams(temperature=float("inf"))


def test_logprobs_are_the_model_distribution_with_the_top_alternatives():
    logits = np.array([1.0, 3.0, 2.0, -4.0], np.float32)
    s = Sampler(SamplingParams(logprobs=2, repetition_penalty=1.5, temperature=0.0))
    assert s(logits) == 1
    want = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    tok, lp, top = s.records[0]
    assert tok == 1 and lp == pytest.approx(want[1])
    assert [i for i, _ in top] == [1, 2] and [v for _, v in top] == pytest.approx([want[1], want[2]])
    assert Sampler(SamplingParams()).records == []
    with pytest.raises(EngineError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_audit_log_appends_json_lines_and_rotates_by_size(tmp_path):
    log = AuditLog(tmp_path / "audit" / "log.jsonl", max_bytes=400, backups=2)
    for i in range(30):
        log.record(request_id=f"r{i}", adapters=[{"name": "a", "version": "2"}], status="ok")
    files = sorted(p.name for p in (tmp_path / "audit").iterdir())
    assert files == ["log.jsonl", "log.jsonl.1", "log.jsonl.2", "log.jsonl.key"]
    for p in (tmp_path / "audit").glob("log.jsonl*[0-9l]"):
        assert p.stat().st_size <= 400
        for line in p.read_text().splitlines():
            assert json.loads(line)["status"] == "ok"
    ids = [e["request_id"] for e in log.entries()]
    assert ids == sorted(ids, key=lambda x: int(x[1:])) and ids[-1] == "r29"  # oldest first, newest kept
    with pytest.raises(EngineError):
        AuditLog(tmp_path / "x.jsonl", max_bytes=10)


def test_audit_digest_is_keyed_per_device_so_short_prompts_cannot_be_looked_up(tmp_path):
    import hashlib
    import os
    import stat

    log = AuditLog(tmp_path / "a" / "audit.jsonl")
    key_file = tmp_path / "a" / "audit.jsonl.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    d = log.digest("yes")
    assert d.startswith("hmac-sha256:")
    # a dictionary of plain hashes finds nothing: the digest is not a hash of the text alone
    plain = {hashlib.sha256(w.encode()).hexdigest()[: len(d) - 12] for w in ("yes", "no", "1234", "hi")}
    assert d[12:] not in plain and d[12:] != hashlib.sha256(b"yes").hexdigest()[:32]
    # the same device (key file) gives the same digest after a restart; another device another one
    assert AuditLog(tmp_path / "a" / "audit.jsonl").digest("yes") == d
    other = AuditLog(tmp_path / "b" / "audit.jsonl")
    assert other.digest("yes") != d and other.key_id != log.key_id
    assert log.record(request_id="r")["key_id"] == log.key_id
    key_file.write_text("zz")
    with pytest.raises(EngineError, match="audit key"):
        AuditLog(tmp_path / "a" / "audit.jsonl")


def test_runtime_modules_import_with_server_libraries_blocked():
    from conftest import run_python

    code = """
import importlib, importlib.abc, json, pkgutil, sys
BLOCKED = {"torch", "transformers", "peft", "bitsandbytes", "onnx", "safetensors", "accelerate"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import edgepeft.runtime as rt
mods = [i.name for i in pkgutil.walk_packages(rt.__path__, "edgepeft.runtime.")]
for m in mods + ["edgepeft.cli.cmd_run"]:
    importlib.import_module(m)
for name in rt.__all__:
    getattr(rt, name)
print(json.dumps({"mods": mods, "leaked": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""
    proc = run_python(code, timeout=900)  # every runtime module: minutes on an emulated aarch64 device
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    assert {"edgepeft.runtime.engine", "edgepeft.runtime.decoder", "edgepeft.runtime.http.server",
            "edgepeft.runtime.http.guards", "edgepeft.runtime.http.openai", "edgepeft.runtime.slots"} <= set(out["mods"])
