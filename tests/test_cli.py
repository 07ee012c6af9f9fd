"""The CLI: help for every verb, one-line errors with exit codes, no traceback for user mistakes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgepeft.cli.main import VERBS, main


def test_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "build", "keygen", "run", "agent", "push", "rollout"):
        assert verb in out


def test_console_script_help_runs_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "edgepeft", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Commands" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_has_help_or_says_not_available(verb, capsys):
    code = main([verb, "--help"])
    captured = capsys.readouterr()
    if code == 0:
        assert "Usage" in captured.out
    else:
        assert code == 3 and "not available yet" in captured.err and "Traceback" not in captured.err


def test_unknown_verb_and_bad_option(capsys):
    assert main(["frobnicate"]) == 2
    assert "No such command" in capsys.readouterr().err
    assert main(["targets", "--nope"]) == 2


def test_user_error_is_one_line_with_hint(capsys):
    assert main(["targets", "no-such-device"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no-such-device: is not a known target")
    assert "hint:" in err and "Traceback" not in err


def test_keygen_writes_pair_and_refuses_overwrite(tmp_path, capsys):
    stem = tmp_path / "keys" / "fleet"
    assert main(["keygen", "--out", str(stem)]) == 0
    assert (stem.with_suffix(".key")).stat().st_mode & 0o777 == 0o600
    assert "key id" in capsys.readouterr().out
    assert main(["keygen", "--out", str(stem)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keygen", "--out", str(stem), "--force"]) == 0


def test_targets_list_and_show(capsys):
    assert main(["targets"]) == 0
    assert "serial@921600" in capsys.readouterr().out
    assert main(["targets", "jetson-orin-nano", "--json"]) == 0
    assert '"CUDAExecutionProvider"' in capsys.readouterr().out
