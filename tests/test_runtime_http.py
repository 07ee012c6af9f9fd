"""The local HTTP endpoint (OpenAI-style, SSE streaming) and `edgepeft run` through click's CliRunner."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

pytest.importorskip("onnxruntime")
from test_runtime_support import cached_bundle, require_fixtures  # noqa: E402

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.runtime import Engine, start_server  # noqa: E402

MSGS = [{"role": "user", "content": "héllo ☃"}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return cached_bundle("decoder", tmp_path_factory)


@pytest.fixture(scope="module")
def engine(built):
    return Engine(built["bundle"], [built["public_key"]])


@pytest.fixture(scope="module")
def server(engine):
    srv, thread = start_server(engine, "127.0.0.1", 0)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _post(url, payload, raw: bytes | None = None):
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read()


def test_binds_loopback_and_lists_models(server, engine):
    assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as resp:
        data = json.loads(resp.read())
    ids = [m["id"] for m in data["data"]]
    assert ids[0] == engine.manifest.base["name"] and {"alpha", "beta"} <= set(ids)
    with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"


def test_chat_completion_matches_the_engine(server, engine):
    want = engine.generate(messages=MSGS, adapter="alpha", max_new_tokens=10)
    status, ctype, body = _post(server.url + "/v1/chat/completions",
                                {"model": "alpha", "messages": MSGS, "max_tokens": 10, "temperature": 0})
    assert status == 200 and ctype == "application/json"
    data = json.loads(body)
    assert data["object"] == "chat.completion" and data["model"] == "alpha"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert data["choices"][0]["finish_reason"] == want.finish_reason
    assert data["usage"]["completion_tokens"] == want.completion_tokens and data["adapter_version"] == 1
    status, _, body = _post(server.url + "/v1/completions", {"prompt": "the tin", "max_tokens": 6})
    assert status == 200 and json.loads(body)["choices"][0]["text"] == engine.generate("the tin", max_new_tokens=6).text


def test_chat_completion_streams_server_sent_events(server, engine):
    want = engine.generate(messages=MSGS, adapter="beta", max_new_tokens=12)
    status, ctype, body = _post(server.url + "/v1/chat/completions",
                                {"model": "beta", "messages": MSGS, "max_tokens": 12, "stream": True})
    assert status == 200 and ctype == "text/event-stream"
    events = [line[len("data: "):] for line in body.decode("utf-8").split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # one id per request, shared by its chunks (clients group chunks by it), different for the next request
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    _, _, again = _post(server.url + "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "stream": True})
    first = json.loads(again.decode("utf-8").split("\n\n")[0][len("data: "):])
    assert first["id"] != chunks[0]["id"]


def test_errors_are_json_and_the_server_keeps_serving(server, engine):
    cases = [
        ({"model": "nope", "messages": MSGS}, 404, "unknown adapter"),
        ({"messages": [{"role": "user", "content": ""}]}, 400, "empty"),
        ({"messages": "hi"}, 400, "must be a list"),
        ({"messages": MSGS, "temperature": -3}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x" * 400}]}, 400, "longer than the context"),
    ]
    for payload, code, match in cases:
        status, ctype, body = _post(server.url + "/v1/chat/completions", payload)
        err = json.loads(body)["error"]
        assert status == code and ctype == "application/json" and match in err["message"], (payload, err)
        assert err["hint"]
    status, _, body = _post(server.url + "/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    status, _, _ = _post(server.url + "/v1/nothing", {})
    assert status == 404
    status, _, body = _post(server.url + "/v1/classify", {"input": ["x"]})
    err = json.loads(body)["error"]
    assert status == 400 and "cannot classify" in err["message"]
    assert "/v1/chat/completions" in err["hint"] and "()" not in err["hint"]  # names routes, not Python methods
    status, _, body = _post(server.url + "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4})
    assert status == 200


def test_cli_run_prompt_and_errors(built, engine, capsys):
    from click.testing import CliRunner

    from edgepeft.cli.cmd_run import command
    from edgepeft.cli.main import main

    want = engine.generate(messages=[{"role": "user", "content": "hi there"}], adapter="alpha", max_new_tokens=8)
    runner = CliRunner()
    res = runner.invoke(command, [str(built["bundle"]), "--trusted-key", str(built["public_key"]),
                                  "--prompt", "hi there", "--adapter", "alpha", "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert res.stdout == want.text + "\n"
    assert ("answer cut" in res.stderr) == (want.finish_reason == "length")
    raw = runner.invoke(command, [str(built["bundle"]), "--trusted-key", str(built["public_key"]), "--raw",
                                  "--no-stream", "--prompt", "the tin", "--max-new-tokens", "6"])
    assert raw.exit_code == 0 and raw.stdout == engine.generate("the tin", max_new_tokens=6).text + "\n"
    # library errors become one line with a hint through the CLI group
    code = main(["run", str(built["bundle"]), "--trusted-key", str(built["public_key"]), "--prompt", "hi",
                 "--adapter", "nope"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: unknown adapter 'nope'") and "hint: loaded adapters" in err
    code = main(["run", str(built["bundle"]), "--prompt", "hi"])
    assert code == 2 and "no trusted public key" in capsys.readouterr().err
