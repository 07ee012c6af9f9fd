"""The example scripts run end to end: on tiny bases here, on the real ones under -m slow (make demo)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgepeft.train.tiny import tiny_bert, tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    return {"llama": str(tiny_llama(root / "llama")), "bert": str(tiny_bert(root / "bert"))}


def test_support_voice_script_on_tiny_base(tiny, tmp_path, capsys):
    summary = load("train_support_voice").main(["--base", tiny["llama"], "--steps", "2", "--eval-generate", "2",
                                                "--max-new-tokens", "4", "--quiet", "--out", str(tmp_path / "a"),
                                                "--results", str(tmp_path / "r.json")])
    assert "sign-off" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["steps"] == 2 == summary["steps"]


def test_bank_intents_script_on_tiny_base(tiny, tmp_path, capsys):
    summary = load("train_bank_intents").main(["--base", tiny["bert"], "--steps", "2", "--quiet",
                                               "--out", str(tmp_path / "a"), "--results", str(tmp_path / "r.json")])
    assert "slice sms" in capsys.readouterr().out
    assert (tmp_path / "a" / "edgepeft_labels.json").is_file() and summary["labels"][0] == "balance"
    # --from reports on an adapter trained elsewhere (the README's command, in make demo) without training again
    again = load("train_bank_intents").main(["--from", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                                             "--results", str(tmp_path / "r2.json")])
    assert again["after"] == summary["after"] and (tmp_path / "b" / "adapter_config.json").is_file()
    assert "slice sms" in capsys.readouterr().out


def test_adapter_families_script_on_tiny_base(tiny, tmp_path, capsys):
    args = ["--base", tiny["llama"], "--steps", "2", "--eval-generate", "2", "--max-new-tokens", "4", "--quiet",
            "--out", str(tmp_path / "a"), "--results", str(tmp_path / "r.json")]
    summary = load("train_adapter_families").main(args)
    assert set(summary["after"]) == {"prompt-tuning", "prefix-tuning", "bottleneck"}
    assert "trained numbers" in capsys.readouterr().out
    assert summary["trainable_params"]["prompt-tuning"] == 20 * 64  # 20 virtual tokens x hidden 64
    # --from reports on adapters trained elsewhere; the bare base comes from the one trained with --eval-before
    again = load("train_adapter_families").main(["--from", f"bottleneck={tmp_path / 'a' / 'bottleneck'}",
                                                 "--from", f"prompt-tuning={tmp_path / 'a' / 'prompt-tuning'}",
                                                 "--out", str(tmp_path / "b"), "--results", str(tmp_path / "r2.json")])
    assert again["after"]["bottleneck"] == summary["after"]["bottleneck"]
    assert again["before"] == summary["before"]
    with pytest.raises(SystemExit, match="eval-before"):
        load("train_adapter_families").main(["--from", f"bottleneck={tmp_path / 'a' / 'bottleneck'}",
                                             "--out", str(tmp_path / "c"), "--results", str(tmp_path / "r3.json")])


@pytest.mark.slow
def test_adapter_families_change_behaviour_on_the_real_model(tmp_path):
    """Each family moves SmolLM2 towards the Northwind voice on held-out questions (~25 CPU-minutes)."""
    s = load("train_adapter_families").main(["--quiet", "--out", str(tmp_path / "a"),
                                             "--results", str(tmp_path / "r.json")])
    for method, after in s["after"].items():
        assert after["perplexity of reference answers"] < s["before"]["perplexity of reference answers"] / 3, method
        assert after["greeting 'Hi there!'"] >= 0.5 > s["before"]["greeting 'Hi there!'"], method


@pytest.mark.slow
@pytest.mark.parametrize("name, check", [
    ("train_bank_intents", lambda s: s["after"]["accuracy"] > s["before"]["accuracy"] + 0.3),
    ("train_support_voice", lambda s: s["after"]["sign-off 'Happy surfing! — Nora'"] >= 0.5
     and s["before"]["sign-off 'Happy surfing! — Nora'"] == 0.0),
])
def test_examples_on_real_models(name, check, tmp_path):
    summary = load(name).main(["--quiet", "--out", str(tmp_path / "a"), "--results", str(tmp_path / "r.json")])
    assert check(summary), summary
