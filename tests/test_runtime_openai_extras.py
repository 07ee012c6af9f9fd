"""What OpenAI clients send beyond the basics (issue 26, item 10): `stream_options.include_usage` ends a
stream with a usage chunk (the numbers a non-streamed answer reports); `response_format` other than text
and `tools` are refused with a 400 that says so instead of being ignored."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from test_runtime_support import cached_bundle, require_fixtures  # noqa: E402

require_fixtures()

from edgepeft.runtime import Engine, start_server  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
MSGS = [{"role": "user", "content": "héllo ☃"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    built = cached_bundle("decoder", tmp_path_factory)
    engine = Engine(built["bundle"], [built["public_key"]])
    srv, thread = start_server(engine, "127.0.0.1", 0, token=TOKEN)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)
    engine.close()


def _post(srv, path, payload):
    req = urllib.request.Request(srv.url + path, json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_stream_ends_with_usage_when_asked(server):
    ask = {"model": "alpha", "messages": MSGS, "max_tokens": 6}
    status, body = _post(server, "/v1/chat/completions", ask)
    assert status == 200
    want = json.loads(body)["usage"]
    status, body = _post(server, "/v1/chat/completions", ask | {"stream": True,
                                                                "stream_options": {"include_usage": True}})
    assert status == 200
    chunks = [json.loads(x[6:]) for x in body.decode().split("\n\n") if x.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == want
    assert all("usage" not in c for c in chunks[:-1])
    # n choices of one prompt count the prompt once, as the non-streamed answer does
    many = {"prompt": "the tin", "max_tokens": 4, "n": 2, "temperature": 0.0}
    want = json.loads(_post(server, "/v1/completions", many)[1])["usage"]
    body = _post(server, "/v1/completions", many | {"stream": True, "stream_options": {"include_usage": True}})[1]
    last = [json.loads(x[6:]) for x in body.decode().split("\n\n") if x.startswith("data: {")][-1]
    assert last["usage"] == want
    status, body = _post(server, "/v1/chat/completions", ask | {"stream_options": {"include_usage": True}})
    assert status == 400 and "only allowed with" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("extra, word", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_what_is_not_supported_is_refused_not_ignored(server, extra, word):
    status, body = _post(server, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2} | extra)
    err = json.loads(body)["error"]
    assert status == 400 and word in err["message"] and "not supported" in err["message"], err
    ok = _post(server, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2,
                                                "response_format": {"type": "text"}})
    assert ok[0] == 200
