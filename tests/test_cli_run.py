"""`edgepeft run` as a user meets it: defaults in --help, JSON for scripts, a visible notice when an answer is
cut, --system, --review-threshold, classification in clean columns, and one-line errors for a busy port or a
prompt sent to a classifier. Tiny signed bundles from test_runtime_support; real processes where it matters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import click
import pytest

from edgepeft.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(built, *args):
    return main(["run", str(built["bundle"]), "--trusted-key", str(built["public_key"]), *args])


def test_help_documents_every_option_with_its_default():
    from edgepeft.cli.cmd_run import command

    ctx = click.Context(command)
    for opt in command.params:
        if not isinstance(opt, click.Option) or opt.is_flag or opt.name in ("prompt", "texts"):  # the inputs
            continue
        record = opt.get_help_record(ctx)
        assert "default" in record[1], f"{record[0]} does not say its default"
    assert any(o.name == "system" for o in command.params) and any(o.name == "review_threshold" for o in command.params)


def test_prompt_as_json_says_when_the_token_limit_cut_the_answer(decoder_bundle, capsys):
    assert run(decoder_bundle, "--prompt", "the tin", "--max-new-tokens", "3", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completion_tokens"] == 3 and out["finish_reason"] == "length" and out["truncated"] is True
    assert out["request_id"] and isinstance(out["text"], str)


def test_a_cut_answer_gets_a_visible_notice(decoder_bundle, capsys):
    assert run(decoder_bundle, "--prompt", "the tin", "--max-new-tokens", "2") == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "[answer cut at the limit of 2 new tokens; pass --max-new-tokens 4 for more]"
    assert run(decoder_bundle, "--prompt", "the tin", "--max-new-tokens", "2", "--no-stream") == 0
    assert "answer cut" in capsys.readouterr().err


def test_system_message_goes_through_the_chat_template(decoder_bundle, capsys):
    assert run(decoder_bundle, "--prompt", "hi", "--max-new-tokens", "1", "--json") == 0
    bare = json.loads(capsys.readouterr().out)["prompt_tokens"]
    assert run(decoder_bundle, "--prompt", "hi", "--system", "be brief", "--max-new-tokens", "1", "--json") == 0
    with_system = json.loads(capsys.readouterr().out)["prompt_tokens"]
    # <|im_start|>system\nbe brief<|im_end|>\n adds the role line, the text and two specials
    assert with_system > bare + 4
    assert run(decoder_bundle, "--prompt", "hi", "--system", "x", "--raw") == 2
    assert "--system needs the chat template" in capsys.readouterr().err


def test_classify_prints_clean_columns_and_honours_review_threshold(encoder_bundle, capsys):
    texts = ["the product was very good", "awful service"]
    assert run(encoder_bundle, "--adapter", "topic", "--classify", texts[0], "--classify", texts[1]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["label", "probability", "review", "text"]
    for line, text in zip(lines[1:], texts):
        label, prob, review, rest = line.split(None, 3)
        assert label in ("billing", "shipping", "other") and 0 < float(prob) <= 1 and review in ("yes", "no")
        assert rest == text
    for threshold, flag in (("0", "no"), ("1", "yes")):
        assert run(encoder_bundle, "--adapter", "topic", "--review-threshold", threshold, "--classify", texts[0]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[2] == flag
    assert run(encoder_bundle, "--adapter", "sentiment", "--classify", texts[0], "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["text"] == texts[0] and set(row["probabilities"]) == {"negative", "positive"}
    assert row["threshold"] == 0.9 and row["needs_review"] == (row["score"] < 0.9)


def test_a_prompt_sent_to_a_classifier_gets_a_cli_hint_not_a_python_method(encoder_bundle, decoder_bundle, capsys):
    assert run(encoder_bundle, "--prompt", "hello") == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: this bundle is a classifier; it cannot answer a prompt",
                   "hint: pass --classify TEXT (repeatable) instead of --prompt"]
    assert run(decoder_bundle, "--classify", "hello") == 2
    assert "()" not in capsys.readouterr().err
    from edgepeft.errors import EngineError
    from edgepeft.runtime import Engine

    with pytest.raises(EngineError) as info:
        Engine(encoder_bundle["bundle"], [encoder_bundle["public_key"]]).generate("hello")
    assert "()" not in info.value.hint and "/v1/classify" in info.value.hint


def test_a_port_in_use_is_one_line_with_a_hint(decoder_bundle, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert run(decoder_bundle, "--serve", "--port", str(port)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert err[1].startswith("hint: another program uses that port: pass --port N") and len(err) == 2


def test_serve_json_prints_the_url_once_listening(decoder_bundle):
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "edgepeft", "run", str(decoder_bundle["bundle"]), "--trusted-key",
                             str(decoder_bundle["public_key"]), "--serve", "--port", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:") and info["adapters"] == ["alpha", "beta"]
        with urllib.request.urlopen(info["url"] + "/health", timeout=30) as r:
            assert json.load(r)["status"] == "ok"
        # a new token, shown once; every other route needs it
        assert len(info["token"]) >= 32 and info["token_file"] is None
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(info["url"] + "/v1/models", timeout=30)
        assert refused.value.code == 401
        req = urllib.request.Request(info["url"] + "/v1/models", headers={"Authorization": f"Bearer {info['token']}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert [m["id"] for m in json.load(r)["data"]][1:] == ["alpha", "beta"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_serve_token_file_is_created_private_and_reused(decoder_bundle, tmp_path):
    import stat

    env = {**os.environ, "PYTHONPATH": ROOT}
    token_file = tmp_path / "app" / "api.token"
    tokens = []
    for _ in range(2):  # the second start reads the token the first one created
        proc = subprocess.Popen([sys.executable, "-m", "edgepeft", "run", str(decoder_bundle["bundle"]), "--trusted-key",
                                 str(decoder_bundle["public_key"]), "--serve", "--port", "0", "--json", "--token-file",
                                 str(token_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            info = json.loads(proc.stdout.readline())
            assert info["token"] is None and info["token_file"] == str(token_file)  # never printed
            token = token_file.read_text().strip()
            tokens.append(token)
            req = urllib.request.Request(info["url"] + "/v1/models", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()
    assert tokens[0] == tokens[1] and stat.S_IMODE(token_file.stat().st_mode) == 0o600
