"""The CLI: help for every verb, one-line errors with exit codes, no traceback for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgepeft.cli.main import VERBS, main
from edgepeft.errors import SpecError


def test_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "build", "keygen", "run", "agent", "push", "rollout"):
        assert verb in out


def test_console_script_help_runs_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "edgepeft", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Commands" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_has_its_own_help(verb, capsys):
    assert main([verb, "--help"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"Usage: edgepeft {verb} ") and "--help" in captured.out, captured.out
    assert captured.err == ""


def test_an_os_error_is_one_line_with_the_path_the_reason_and_a_hint():
    """No raw traceback for what the operating system refuses (here: a folder /proc will not make)."""
    proc = subprocess.run([sys.executable, "-m", "edgepeft", "keygen", "--out", "/proc/x/k"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, EDGEPEFT_DEBUG="0"))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 2, proc.stderr
    assert lines[0].startswith("error: /proc/x: ") and "no such file" in lines[0].lower(), lines
    assert lines[1].startswith("hint: ")


@pytest.mark.parametrize("value, traceback", [("", False), ("0", False), ("no", False), ("1", True), ("true", True),
                                              ("YES", True)])
def test_edgepeft_debug_shows_a_traceback_only_when_it_says_yes(value, traceback, monkeypatch, capsys):
    monkeypatch.setenv("EDGEPEFT_DEBUG", value)
    if traceback:
        with pytest.raises(SpecError):
            main(["targets", "no-such-device"])
    else:
        assert main(["targets", "no-such-device"]) == 1
        assert capsys.readouterr().err.startswith("error: no-such-device")


def test_unknown_verb_and_bad_option(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such command 'frobnicate'") and "hint: commands: train, build" in err
    assert main(["targets", "--nope"]) == 2


@pytest.mark.parametrize("argv, message, hint", [
    (["run", ".", "--promt", "hi"], "error: no such option '--promt'", "hint: did you mean --prompt"),
    (["train", "--out", "x"], "error: missing option '--data'", "hint: see `edgepeft train --help`"),
    (["build", "--quant", "int3", "--target", "t", "--key", "k", "--out", "o"],
     "error: invalid value for '--quant': 'int3' is not one of", "hint: see `edgepeft build --help`"),
])
def test_option_errors_are_one_error_line_and_one_hint(argv, message, hint, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 2 and captured.out == "", captured.err
    assert lines[0].startswith(message) and lines[1].startswith(hint)


def test_errors_are_json_under_json(capsys):
    assert main(["targets", "no-such-device", "--json"]) == 1
    captured = capsys.readouterr()
    err = json.loads(captured.out)["error"]
    assert err["type"] == "SpecError" and "no-such-device" in err["message"] and err["hint"] and err["exit_code"] == 1
    assert captured.err == ""
    assert main(["targets", "--json", "--nope"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["message"] == "no such option '--nope'"


def test_help_gives_every_verb_its_one_line_summary(capsys):
    assert main(["--help"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    for verb, summary in VERBS.items():
        assert summary.split()[0] in rows[verb], rows.get(verb)


def test_user_error_is_one_line_with_hint(capsys):
    assert main(["targets", "no-such-device"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no-such-device: is not a known target")
    assert "hint:" in err and "Traceback" not in err


def test_keygen_writes_pair_and_refuses_overwrite(tmp_path, capsys):
    stem = tmp_path / "keys" / "fleet"
    assert main(["keygen", "--out", str(stem)]) == 0
    assert (stem.with_suffix(".key")).stat().st_mode & 0o777 == 0o600
    out = capsys.readouterr().out
    assert "key id" in out and f"created folder {stem.parent}/" in out
    assert main(["keygen", "--out", str(stem)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keygen", "--out", str(stem), "--force"]) == 0


def test_keygen_creates_only_the_last_folder_and_says_so(tmp_path, capsys):
    deep = tmp_path / "some" / "new" / "dir" / "x"
    assert main(["keygen", "--out", str(deep)]) == 2
    assert "would create several folders" in capsys.readouterr().err
    assert not (tmp_path / "some").exists()
    assert main(["keygen", "--out", str(tmp_path / "k"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["created_folders"] == [] and len(info["key_id"]) == 16 and info["private_key"].endswith("k.key")


def test_targets_list_and_show(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "serial@921600" in out
    assert out.splitlines()[0].split() == ["name", "device", "arch", "weights", "memory", "rank<=", "updates",
                                           "providers"]
    assert main(["targets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in listed} >= {"raspberry-pi-5", "serial-gateway"}
    assert main(["targets", "jetson-orin-nano", "--json"]) == 0
    assert '"CUDAExecutionProvider"' in capsys.readouterr().out
