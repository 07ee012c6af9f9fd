"""The smaller things a new user tripped on (issue 26, item 11): pushing the same package twice says it was
already installed; EDGEPEFT_DEBUG=0 keeps tracebacks off; the top-level help names the five methods; a
Python error phrases its hint for Python too; a continued adapter's summary shows the previous version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agent_support import AgentProcess  # noqa: E402
from test_runtime_support import require_fixtures, resign_bundle  # noqa: E402

require_fixtures()

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=os.environ | {"EDGEPEFT_DEBUG": ""} | (env or {}))



def test_pushing_the_same_package_twice_says_already_installed(built, tmp_path):
    agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "state")
    try:
        dev = ["--to", agent.url, "--token-file", agent.state / "token"]
        first = _cli("push", built["package"], *dev)
        assert first.returncode == 0 and "alpha v2: healthy" in first.stdout, first.stdout + first.stderr
        again = _cli("push", built["package"], *dev)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "alpha v2: already installed, nothing sent" in again.stdout, again.stdout
    finally:
        agent.stop()


def test_debug_zero_keeps_tracebacks_off_and_help_names_every_method(tmp_path):
    r = _cli("inspect", tmp_path, env={"EDGEPEFT_DEBUG": "0"})
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.startswith("error:"), r.stderr
    r = _cli("inspect", tmp_path, env={"EDGEPEFT_DEBUG": "1"})
    assert "Traceback" in r.stderr
    helped = " ".join(_cli("--help").stdout.split())
    assert "LoRA, QLoRA, prompt or prefix tuning, bottleneck" in helped and "LoRA or QLoRA" not in helped


def test_an_error_raised_in_python_phrases_its_hint_for_python(built, tmp_path):
    from edgepeft.errors import BundleError
    from edgepeft.runtime import Engine

    bad = resign_bundle(built, tmp_path / "bad", health_checks=[
        {"input": "hi", "expect": {"equals": "certainly not this"}, "max_new_tokens": 4}])
    with pytest.raises(BundleError) as refused:
        Engine(bad, [built["public_key"]])
    assert "health_checks=False" in refused.value.hint


def test_a_continued_adapter_shows_the_previous_versions_figures(tmp_path):
    from edgepeft.train.tiny import tiny_llama

    base = tiny_llama(tmp_path / "llama")
    data = tmp_path / "voice.jsonl"
    data.write_text("".join((EXAMPLES / "northwind_support" / "train.jsonl").read_text().splitlines(True)[:12]))
    common = ["--data", data, "--eval-data", EXAMPLES / "northwind_support" / "eval.jsonl", "--base", base,
              "--steps", "2", "--no-progress", "--eval-generate", "0"]
    assert _cli("train", *common, "--out", tmp_path / "v1").returncode == 0
    r = _cli("train", *common, "--out", tmp_path / "v2", "--init-adapter", tmp_path / "v1")
    assert r.returncode == 0, r.stderr
    assert f"continuing from {tmp_path / 'v1'} (--init-adapter)" in r.stderr
    v1 = json.loads((tmp_path / "v1" / "edgepeft_training.json").read_text())["metrics"]["eval"]
    assert f"(previous version {tmp_path / 'v1'}: {v1['loss']:.4g})" in r.stdout, r.stdout
