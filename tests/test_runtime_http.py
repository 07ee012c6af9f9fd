"""The local HTTP endpoint (OpenAI-style, SSE streaming) and `edgepeft run` through click's CliRunner.

The hardening is tested the way an attacker or a broken client would meet it: real sockets on
127.0.0.1, a slowloris client, a reader that stops reading, a client that disconnects mid-stream,
oversized and truncated bodies, a web page's requests, and a burst of clients; every time other
clients keep being served and the engine ends with no request running.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_runtime_support import require_fixtures

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.errors import UsageError  # noqa: E402
from edgepeft.runtime import Engine, start_server  # noqa: E402
from edgepeft.runtime.http import EngineServer, Limits  # noqa: E402

MSGS = [{"role": "user", "content": "héllo ☃"}]
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def engine(built):
    return Engine(built["bundle"], [built["public_key"]])


def _serve(engine, **options):
    options.setdefault("token", TOKEN)
    srv, thread = start_server(engine, "127.0.0.1", 0, **options)
    return srv, thread


def _stop(srv, thread):
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def server(engine):
    srv, thread = _serve(engine)
    yield srv
    _stop(srv, thread)


def _post(url, payload, raw: bytes | None = None, headers: dict | None = None):
    h = {"Content-Type": "application/json"} | AUTH | (headers or {})
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(payload).encode(),
                                 headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read()


def _get(url, headers: dict | None = None):
    req = urllib.request.Request(url, headers=AUTH | (headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def _raw(srv, data: bytes, *, read: bool = True, timeout: float = 30.0) -> bytes:
    """Send raw bytes on a fresh connection; return everything the server answers until it closes."""
    host, port = srv.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def _idle(engine, timeout: float = 30.0) -> dict:
    """Wait until no request runs on the engine (a dropped client's generation is stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = engine.stats()
        if st["running"] == 0:
            return st
        time.sleep(0.05)
    return engine.stats()


def _chat_ok(srv, max_tokens=4):
    status, _, body = _post(srv.url + "/v1/chat/completions", {"messages": MSGS, "max_tokens": max_tokens})
    return status, json.loads(body)


def test_binds_loopback_and_lists_models(server, engine):
    assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0
    status, _, data = _get(server.url + "/v1/models")
    ids = [m["id"] for m in data["data"]]
    assert status == 200 and ids[0] == engine.manifest.base["name"] and {"alpha", "beta"} <= set(ids)
    assert data["warnings"] == engine.warnings
    with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:  # liveness needs no token
        assert json.loads(resp.read())["status"] == "ok"
    status, _, listed = _get(server.url + "/v1/adapters")
    assert status == 200 and {a["name"] for a in listed["data"]} == {"alpha", "beta"}


def test_models_list_bundled_adapters_unread_and_a_tampered_one_fails_its_first_request(built, tmp_path):
    """/v1/models and /v1/adapters list the bundle's adapters from its manifest before any request reads
    them; an adapter file changed after open is refused (its hash) when a request first names it."""
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(built["bundle"], copy)
    eng = Engine(copy, [built["public_key"]])
    srv, thread = _serve(eng)
    try:
        status, _, data = _get(srv.url + "/v1/models")
        assert status == 200 and {(m["id"], m.get("version")) for m in data["data"][1:]} == {("alpha", 1), ("beta", 1)}
        status, _, listed = _get(srv.url + "/v1/adapters")
        assert status == 200 and [(a["name"], a["loaded"]) for a in listed["data"]] == [("alpha", False),
                                                                                        ("beta", False)]
        path = copy / "adapters/alpha-1.onnx_adapter"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        status, _, body = _post(srv.url + "/v1/chat/completions", {"model": "alpha", "messages": MSGS, "max_tokens": 4})
        err = json.loads(body)["error"]
        assert status == 400 and err["type"] == "IntegrityError" and "does not match its SHA-256" in err["message"]
        assert _post(srv.url + "/v1/chat/completions", {"model": "beta", "messages": MSGS, "max_tokens": 4})[0] == 200
        status, _, data = _get(srv.url + "/v1/models")
        assert any("alpha-1.onnx_adapter" in w for w in data["warnings"])
        status, _, listed = _get(srv.url + "/v1/adapters")
        assert [(a["name"], a["loaded"]) for a in listed["data"]] == [("alpha", False), ("beta", True)]
    finally:
        _stop(srv, thread)
        eng.close()


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


def test_list_prompts_n_choices_sampling_options_and_logprobs(server, engine):
    prompts = ["the tin", "hello how can i help"]
    status, _, body = _post(server.url + "/v1/completions", {"prompt": prompts, "max_tokens": 5, "n": 2,
                                                             "temperature": 0.9, "top_k": 20, "seed": 7,
                                                             "repetition_penalty": 1.2, "logprobs": 2})
    assert status == 200, body
    data = json.loads(body)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]  # OpenAI's order: prompt 0's choices first
    for c in data["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) > 0
        assert all(len(t) <= 2 for t in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    # choice j of a seeded request uses seed + j: the same request again gives the same choices
    again = json.loads(_post(server.url + "/v1/completions", {"prompt": prompts, "max_tokens": 5, "n": 2,
                                                              "temperature": 0.9, "top_k": 20, "seed": 7,
                                                              "repetition_penalty": 1.2, "logprobs": 2})[2])
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in data["choices"]]
    want = engine.generate(prompts[1], max_new_tokens=5, temperature=0.9, top_k=20, seed=8, repetition_penalty=1.2)
    assert data["choices"][3]["text"] == want.text
    assert data["usage"]["prompt_tokens"] == sum(len(engine.codec.encode(p)) for p in prompts)
    status, _, body = _post(server.url + "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4,
                                                                  "logprobs": True, "top_logprobs": 3})
    content = json.loads(body)["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert content[0]["token"] == content[0]["top_logprobs"][0]["token"]  # greedy picks the likeliest


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
    # streamed log-probabilities and list prompts
    _, _, body = _post(server.url + "/v1/completions", {"prompt": ["the tin", "hi"], "max_tokens": 5,
                                                        "stream": True, "logprobs": 1})
    chunks = [json.loads(x[6:]) for x in body.decode().split("\n\n") if x.startswith("data: {")]
    for i, p in enumerate(["the tin", "hi"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == engine.generate(p, max_new_tokens=5).text
        assert sum(len(c["logprobs"]["tokens"]) for c in mine if c["logprobs"]) == 5


def test_errors_are_json_with_the_right_status_and_the_server_keeps_serving(server, engine):
    # (payload, status, what the message names, what the hint says to do): every refusal says what to do
    cases = [
        ({"model": "nope", "messages": MSGS}, 404, "unknown adapter", "loaded adapters: alpha, beta"),
        ({"messages": [{"role": "user", "content": ""}]}, 400, "empty", "send at least one message"),
        ({"messages": "hi"}, 400, "must be a list", '"role": "user"'),
        ({"messages": MSGS, "temperature": -3}, 400, "temperature", "0 for greedy"),
        ({"messages": [{"role": "user", "content": "x" * 400}]}, 400, "longer than the context", "shorten it"),
        ({"messages": MSGS, "max_tokens": 1e400}, 400, "max_new_tokens", "1 or more"),
        ({"messages": MSGS, "max_tokens": "12"}, 400, "max_new_tokens", "1 or more"),
        ({"messages": MSGS, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop strings", "fewer"),
        ({"messages": MSGS, "stop": ["x" * 300]}, 400, "at most 4 stop strings", "fewer"),
        ({"messages": MSGS, "n": 50}, 400, "'n'", "ask for"),
        ({"messages": MSGS, "top_logprobs": 3, "logprobs": 3}, 400, "logprobs", "true"),
        ({"messages": MSGS, "model": ["alpha"]}, 400, "'model' must be a string", "/v1/models"),
        ({"messages": MSGS, "seed": -1}, 400, "seed", "whole number >= 0"),
        ({"messages": MSGS, "stream": "yes"}, 400, "'stream'", "true"),
    ]
    for payload, code, match, hint in cases:
        status, ctype, body = _post(server.url + "/v1/chat/completions", payload)
        err = json.loads(body)["error"]
        assert status == code and err["code"] == code and ctype == "application/json", (payload, status, err)
        assert match in err["message"] and err["hint"] and hint in err["hint"], (payload, err)
    raw_cases = [
        (b"{not json", 400, "not valid UTF-8 JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "nest"),
        (b'{"messages": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "nests deeper than 32"),
        (b"\xff\xfe{}", 400, "UTF-8"),
    ]
    for raw, code, match in raw_cases:
        status, _, body = _post(server.url + "/v1/chat/completions", None, raw=raw)
        assert status == code and match in json.loads(body)["error"]["message"], (raw[:20], body[:200])
    status, _, body = _post(server.url + "/v1/nothing", {})
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found"
    status, _, body = _post(server.url + "/v1/classify", {"input": ["x"]})
    err = json.loads(body)["error"]
    assert status == 400 and "cannot classify" in err["message"]
    assert "/v1/chat/completions" in err["hint"] and "()" not in err["hint"]  # names routes, not Python methods
    status, _, body = _post(server.url + "/v1/embeddings", {"input": "x"})
    assert status == 400 and "encoder bundles" in json.loads(body)["error"]["message"]
    # http.server's own refusals (a method it has no handler for, a broken request line) are JSON too
    answer = _raw(server, b"PATCH /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
                          b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405") and b'"type": "invalid_request_error"' in answer
    answer = _raw(server, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b'"error"' in answer
    assert _chat_ok(server)[0] == 200


def test_token_host_origin_and_content_type_guards(server, engine):
    url = server.url + "/v1/chat/completions"
    body = {"messages": MSGS, "max_tokens": 2}
    status, _, data = _post(url, body, headers={"Authorization": ""})
    assert status == 401 and "needs the API token" in json.loads(data)["error"]["message"]
    status, _, data = _post(url, body, headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert status == 401 and json.loads(data)["error"]["hint"]
    assert _get(server.url + "/v1/models", {"Authorization": ""})[0] == 401
    # DNS rebinding: a page at evil.example resolves its own name to 127.0.0.1; its requests carry its Host
    status, _, data = _post(url, body, headers={"Host": "evil.example"})
    assert status == 403 and "Host" in json.loads(data)["error"]["message"]
    assert _post(url, body, headers={"Host": f"127.0.0.1:{server.server_address[1] + 1}"})[0] == 403  # another port
    assert _post(url, body, headers={"Host": f"localhost:{server.server_address[1]}"})[0] == 200
    # a web page's request (it carries an Origin), and the text/plain form that needs no CORS preflight
    status, _, data = _post(url, body, headers={"Origin": "http://evil.example"})
    assert status == 403 and "origin" in json.loads(data)["error"]["message"]
    status, _, data = _post(url, body, headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(data)["error"]["message"]
    status, _, _ = _post(url, body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415


def test_an_allowed_origin_gets_cors_and_no_token_is_loopback_only(engine):
    srv, thread = _serve(engine, allowed_origins=["http://localhost:3000"])
    try:
        url = srv.url + "/v1/chat/completions"
        req = urllib.request.Request(url, method="OPTIONS", headers={"Origin": "http://localhost:3000",
                                                                     "Access-Control-Request-Method": "POST"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        req = urllib.request.Request(url, method="OPTIONS", headers={"Origin": "http://evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 403
        h = {"Content-Type": "application/json", "Origin": "http://localhost:3000"} | AUTH
        req = urllib.request.Request(url, json.dumps({"messages": MSGS, "max_tokens": 2}).encode(), h)
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    finally:
        _stop(srv, thread)
    with pytest.raises(UsageError, match="reachable from other machines"):
        EngineServer(engine, "0.0.0.0", 0, token=TOKEN)
    with pytest.raises(UsageError, match="too short"):
        EngineServer(engine, "127.0.0.1", 0, token="short")
    srv, thread = _serve(engine, token="")  # explicitly no token, loopback only
    try:
        assert _post(srv.url + "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2},
                     headers={"Authorization": ""})[0] == 200
    finally:
        _stop(srv, thread)
    generated = EngineServer(engine, "127.0.0.1", 0)  # the default is a fresh random token, not none
    try:
        assert generated.token and len(generated.token) >= 32
    finally:
        generated.server_close()


def test_adapter_error_statuses_come_from_their_types_not_their_wording(built, engine):
    """404 for an unknown adapter, 409 for one in use, 400 for any other adapter error: chosen by the
    error's type, so rewording a message (or a message that happens to say "in use") changes nothing."""
    from edgepeft.errors import AdapterError, AdapterInUseError, UnknownAdapterError

    srv, thread = _serve(engine)
    try:
        url = srv.url + "/v1/adapters/{}/unload"
        status, _, body = _post(url.format("nope"), {})
        assert status == 404 and json.loads(body)["error"]["hint"].startswith("loaded adapters")
        stream = engine.generate("the tin", adapter="beta", max_new_tokens=50, stream=True)
        try:
            next(stream)  # beta is in use by a running request
            status, _, body = _post(url.format("beta"), {})
            assert status == 409 and "retry" in json.loads(body)["error"]["hint"]
        finally:
            stream.close()
    finally:
        _stop(srv, thread)

    reworded = {"a": UnknownAdapterError("who is that?"), "b": AdapterInUseError("busy, try later"),
                "c": AdapterError("adapter 'c' is in use and unknown, no doubt")}

    class Reworded(EngineServer):
        def adapter_action(self, name, action):
            raise reworded[name]

    srv = Reworded(engine, "127.0.0.1", 0, token=TOKEN)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        got = {n: _post(srv.url + f"/v1/adapters/{n}/unload", {})[0] for n in reworded}
        assert got == {"a": 404, "b": 409, "c": 400}
        status, _, body = _post(srv.url + "/v1/chat/completions", {"model": "nope", "messages": MSGS})
        assert status == 404 and json.loads(body)["error"]["type"] == "adapter_error"
    finally:
        _stop(srv, thread)


def test_added_routes_run_behind_the_same_guards(engine):
    """The public route hook (what the device agent's update API uses): a Route's handler gets a
    Request (headers, json(), read(), send()) and the path's groups, after the host, origin and token checks."""
    from edgepeft.runtime.http import Route

    seen = []

    def echo(req, name):
        data = req.json()
        seen.append((req.method, req.path, name, req.headers.get("X-Note")))
        req.send(201, {"name": name, "got": data})

    def peek(req):
        req.send(200, {"open": True})

    srv, thread = _serve(engine, routes=[Route("POST", r"/v1/echo/([a-z]+)", echo),
                                         Route("GET", "/v1/peek", peek, token=False)])
    try:
        status, _, body = _post(srv.url + "/v1/echo/abc", {"x": [1, "☃"]}, headers={"X-Note": "n"})
        assert status == 201 and json.loads(body) == {"name": "abc", "got": {"x": [1, "☃"]}}
        assert seen == [("POST", "/v1/echo/abc", "abc", "n")]
        assert _post(srv.url + "/v1/echo/abc", {}, headers={"Authorization": ""})[0] == 401
        assert _post(srv.url + "/v1/echo/abc", {}, headers={"Host": "evil.example"})[0] == 403
        assert _post(srv.url + "/v1/echo/ABC", {})[0] == 404  # the pattern must match the whole path
        assert _post(srv.url + "/v1/echo/abc", None, raw=b'{"x": "\\ud800"}')[0] == 400
        assert _get(srv.url + "/v1/peek", {"Authorization": ""})[0] == 200
        assert len(seen) == 1 and _chat_ok(srv)[0] == 200  # the inference routes are still there
    finally:
        _stop(srv, thread)
    with pytest.raises(UsageError, match="not a regular expression"):
        Route("GET", "/v1/(", peek)


def test_oversized_truncated_and_chunked_bodies(engine):
    srv, thread = _serve(engine, limits=Limits(max_body_bytes=4096, request_timeout=2.0))
    try:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: application/json\r\n")
        answer = _raw(srv, (head + "Content-Length: 999999\r\n\r\n").encode() + b"{" * 1000)
        assert answer.startswith(b"HTTP/1.1 413") and b"Connection: close" in answer and b"limit is 4096" in answer
        # the body never comes: 408 once the request's time is up, and the connection is given back
        t0 = time.monotonic()
        answer = _raw(srv, (head + "Content-Length: 1000\r\n\r\n").encode() + b'{"messages":')
        assert answer.startswith(b"HTTP/1.1 408") and b'"type": "timeout"' in answer
        assert time.monotonic() - t0 < 15
        # the client closes its side mid-body
        host, port = srv.server_address
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall((head + "Content-Length: 1000\r\n\r\n").encode() + b'{"messages":')
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400") and b"ended after 12 of its 1000 bytes" in answer
        answer = _raw(srv, (head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 411")
        answer = _raw(srv, (head + "\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 411") and b"no Content-Length" in answer
        answer = _raw(srv, (head + "Content-Length: -5\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 400")
        assert _chat_ok(srv)[0] == 200
    finally:
        _stop(srv, thread)
    assert _idle(engine)["running"] == 0


def test_a_lone_surrogate_in_a_message_is_400_not_500(server):
    """Issue 23 item 15: JSON may spell a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can
    take; it is refused as bad input, and the server keeps serving."""
    for route, raw in [("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'),
                       ("/v1/completions", b'{"prompt": ["fine", "\\udfff x"], "max_tokens": 2}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
                                                b'"stop": ["\\ud800"]}')]:
        status, ctype, body = _post(server.url + route, None, raw=raw)
        err = json.loads(body)["error"]
        assert status == 400 and ctype == "application/json", (route, status, err)
        assert "surrogate" in err["message"] and "UTF-8" in err["hint"], err
    assert _chat_ok(server)[0] == 200


def _half_sent(address, n: int) -> list:
    """``n`` connections that send a request line and one header, then nothing: no token, never finished."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(address, timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    return socks


def _answer(s) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


def test_half_sent_requests_without_a_token_do_not_take_authenticated_clients_capacity(engine):
    """Issue 23 item 14: twice as many half-sent, unauthenticated requests as the server has connection
    slots; a client with the token is still answered (before: 429 for as long as the sockets lived), and
    every half-sent connection is answered and closed (408 at the header deadline, or 429 when newer
    unauthenticated connections push it out), not held."""
    srv, thread = _serve(engine)  # the default limits
    socks = _half_sent(srv.server_address[:2], 2 * srv.limits.max_connections)
    try:
        assert _chat_ok(srv)[0] == 200  # measured during the attack: a real request is answered
        assert _get(srv.url + "/v1/models")[0] == 200
        answers = [_answer(s) for s in socks]
        assert all(a.startswith((b"HTTP/1.1 408", b"HTTP/1.1 429")) for a in answers), {a[:12] for a in answers}
        assert any(a.startswith(b"HTTP/1.1 408") for a in answers)  # the last ones wait out the header deadline
    finally:
        for s in socks:
            s.close()
        _stop(srv, thread)


def test_slowloris_gets_408_and_others_keep_being_served(engine):
    srv, thread = _serve(engine, limits=Limits(request_timeout=1.5))
    closed = {}

    def slowloris(i):
        host, port = srv.server_address
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            t0 = time.monotonic()
            answer = b""
            try:
                for _ in range(200):  # one header byte every 0.1 s: each read is quick, the whole never ends
                    s.sendall(b"X")
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                s.settimeout(5)
                answer = s.recv(65536)
            except OSError:
                pass
            closed[i] = (time.monotonic() - t0, answer)

    try:
        threads = [threading.Thread(target=slowloris, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        served = [_chat_ok(srv)[0] for _ in range(3)]  # meanwhile, others are answered
        for t in threads:
            t.join(60)
        assert served == [200, 200, 200]
        for seconds, answer in closed.values():
            assert seconds < 15, seconds  # cut after about 1.5 s, not after the 20 s the client would take
            assert answer.startswith(b"HTTP/1.1 408") or answer == b""
        assert any(a.startswith(b"HTTP/1.1 408") for _, a in closed.values())
    finally:
        _stop(srv, thread)


def test_a_reader_that_stops_reading_loses_its_slot(engine):
    srv, thread = _serve(engine, limits=Limits(write_timeout=1.0, send_buffer=4096))
    host, port = srv.server_address
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.settimeout(10)
        s.connect((host, port))
        body = json.dumps({"prompt": ["the tin", "hi"], "max_tokens": 100, "n": 2, "stream": True,
                           "logprobs": 5}).encode()
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        deadline = time.monotonic() + 10
        while engine.stats()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        # the client reads nothing; the server notices within write_timeout and stops generating
        assert _idle(engine, 60)["running"] == 0
        assert _chat_ok(srv)[0] == 200
    finally:
        s.close()
        _stop(srv, thread)


def test_a_client_that_disconnects_mid_stream_stops_its_generation(engine):
    srv, thread = _serve(engine)
    try:
        host, port = srv.server_address
        for _ in range(3):
            c = http.client.HTTPConnection(host, port, timeout=30)
            c.request("POST", "/v1/completions", json.dumps({"prompt": "the tin", "max_tokens": 120,
                                                            "stream": True}),
                      {"Content-Type": "application/json"} | AUTH)
            resp = c.getresponse()
            assert resp.status == 200 and resp.fp.readline().startswith(b"data: {")
            resp.close()  # the app was killed: its socket closes
            c.close()
        assert _idle(engine)["running"] == 0
        assert _chat_ok(srv)[0] == 200
    finally:
        _stop(srv, thread)


def test_a_failure_mid_stream_is_one_last_event_never_a_second_status_line(built, tmp_path):
    eng = Engine(built["bundle"], [built["public_key"]], audit=tmp_path / "audit" / "log.jsonl")
    srv, thread = _serve(eng)
    try:
        host, port = srv.server_address
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.request("POST", "/v1/completions", json.dumps({"prompt": "the tin", "max_tokens": 60, "stream": True}),
                  {"Content-Type": "application/json"} | AUTH)
        resp = c.getresponse()
        assert resp.status == 200 and resp.fp.readline().startswith(b"data: {")
        log = tmp_path / "audit" / "log.jsonl"  # the storage behind the audit log goes away mid-answer
        log.unlink(missing_ok=True)
        log.mkdir()
        rest = resp.read().decode()
        c.close()
        assert "HTTP/1.1" not in rest
        events = [e for e in rest.split("\n\n") if e.startswith("data: ")]
        last = json.loads(events[-1][6:])
        assert "audit log" in last["error"]["message"] and "[DONE]" not in rest
        assert _idle(eng)["running"] == 0
    finally:
        _stop(srv, thread)
        eng.close()


def test_a_burst_of_clients_is_bounded_and_leaves_every_slot_free(engine):
    srv, thread = _serve(engine, limits=Limits(max_connections=6, queue_timeout=60))
    results, lock = [], threading.Lock()

    def client(i):
        payload = {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 6, "stream": i % 3 == 0}
        try:
            status, ctype, body = _post(srv.url + "/v1/chat/completions", payload)
        except (urllib.error.URLError, ConnectionError) as exc:  # the 429 came before the request was sent
            status, ctype, body = 429, "application/json", json.dumps({"error": {"message": str(exc)}}).encode()
        with lock:
            results.append((status, ctype, body))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = sorted(s for s, _, _ in results)
        assert len(results) == 24 and set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 6  # at least one full round of connections was served
        for status, _ctype, body in results:
            if status == 429:
                assert json.loads(body)["error"]
        assert _idle(engine)["running"] == 0
        assert _chat_ok(srv)[0] == 200
    finally:
        _stop(srv, thread)


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
    sampled = runner.invoke(command, [str(built["bundle"]), "--trusted-key", str(built["public_key"]), "--raw",
                                      "--no-stream", "--prompt", "the tin", "--max-new-tokens", "6",
                                      "--temperature", "0.8", "--top-k", "10", "--seed", "3",
                                      "--repetition-penalty", "1.2", "--max-concurrent", "1", "--no-spinning"])
    assert sampled.exit_code == 0, sampled.output
    assert sampled.stdout == engine.generate("the tin", max_new_tokens=6, temperature=0.8, top_k=10, seed=3,
                                             repetition_penalty=1.2).text + "\n"
    # the .epb the device was shipped runs as it is, read in place
    epb = runner.invoke(command, [str(built["bundle"].with_name("bundle.epb")), "--trusted-key",
                                  str(built["public_key"]), "--raw", "--no-stream", "--prompt", "the tin",
                                  "--max-new-tokens", "6"])
    assert epb.exit_code == 0 and epb.stdout == raw.stdout
    # library errors become one line with a hint through the CLI group
    code = main(["run", str(built["bundle"]), "--trusted-key", str(built["public_key"]), "--prompt", "hi",
                 "--adapter", "nope"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: unknown adapter 'nope'") and "hint: loaded adapters" in err
    code = main(["run", str(built["bundle"]), "--prompt", "hi"])
    assert code == 2 and "no trusted public key" in capsys.readouterr().err
    code = main(["run", str(built["bundle"]), "--trusted-key", str(built["public_key"]), "--serve",
                 "--host", "0.0.0.0", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "reachable from other machines" in err and "--expose" in err
