"""A local HTTP endpoint so apps in any language can use the engine (stdlib only).

OpenAI-style routes, so existing client libraries work against the device:

- ``GET  /v1/models``: the base and every served adapter (an adapter's name is its model id),
  plus the engine's ``warnings``;
- ``POST /v1/chat/completions``: ``{"model", "messages", "max_tokens", "temperature", "top_p",
  "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty", "stop", "seed", "n",
  "logprobs", "top_logprobs", "stream", "stream_options"}``; with ``"stream": true`` the answer comes as
  server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``; ``"stream_options":
  {"include_usage": true}`` adds a last chunk with no choices and the usage); ``tools`` and a
  ``response_format`` other than text are refused (400), not ignored;
- ``POST /v1/completions``: the same with a raw ``"prompt"`` (a string or a list of them;
  ``"logprobs": N`` gives N alternatives per token);
- ``POST /v1/classify``: ``{"model", "input": [texts]}`` -> labels, probabilities, ``needs_review``;
- ``POST /v1/embeddings``: ``{"model", "input": text or [texts]}`` (encoder bundles);
- ``GET  /v1/adapters`` and ``POST /v1/adapters/<name>/unload``;
- ``GET  /health`` (no token: liveness only).

Who may call it. Every route but ``/health`` needs ``Authorization: Bearer <token>`` (on a
phone every app can reach 127.0.0.1). The ``Host`` header must name the address the server is
bound to (a DNS-rebinding page sends its own name), a browser request carrying an ``Origin`` is
refused unless that origin was allowed, and request bodies must be ``application/json`` (a web
page can send ``text/plain`` without asking). Binding beyond loopback takes ``expose=True``.

What it holds. :class:`Limits` bounds every resource a client could hold: connections (more are
answered 429), body size (413), inputs per request, stop strings, choices, the time a request
may take to arrive (a slowloris client gets 408 and its connection back), the time a client may
leave an answer unread (a stalled or vanished reader is dropped and its decode slot freed), and
the wait for a free decode slot (503). Every failure is a JSON ``{"error": {...}}`` with its
status; once a stream has started, a failure is one last ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import json
import math
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import AdapterError, EdgePeftError, UsageError

_UNLOAD = re.compile(r"^/v1/adapters/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/(unload|load)$")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class Limits:
    """What one server lets its clients hold. Raises :class:`UsageError` for a value out of range.

    - ``max_connections``: connections served at once (one thread each); more are answered 429;
    - ``max_body_bytes``: largest request body (413 beyond it);
    - ``max_inputs``: texts per ``/v1/classify`` or ``/v1/embeddings`` request, prompts per
      ``/v1/completions`` request; ``max_n``: choices per prompt; ``max_stops``/``max_stop_chars``;
    - ``request_timeout``: seconds a request (line, headers and body) may take to arrive (408),
      plus one second per ``min_body_rate`` bytes of its body (a large upload on a slow link);
    - ``write_timeout``: seconds a client may leave the answer unread before it is dropped
      (with ``send_buffer`` bytes of socket buffer, so a stalled reader is noticed early);
    - ``queue_timeout``: seconds a request waits for a free decode slot (503 after it);
    - ``max_json_depth``: nesting of the request body.
    """

    max_connections: int = 16
    max_body_bytes: int = 1 << 20
    max_inputs: int = 64
    max_n: int = 4
    max_stops: int = 4
    max_stop_chars: int = 256
    request_timeout: float = 30.0
    write_timeout: float = 30.0
    queue_timeout: float = 60.0
    send_buffer: int = 64 << 10
    max_json_depth: int = 32
    min_body_rate: int = 8 << 10

    def __post_init__(self):
        for name in ("max_connections", "max_body_bytes", "max_inputs", "max_n", "max_stops", "max_stop_chars",
                     "send_buffer", "max_json_depth", "min_body_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"server limit {name} must be a whole number >= 1, got {v!r}")
        for name in ("request_timeout", "write_timeout", "queue_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise UsageError(f"server limit {name} must be a positive number of seconds, got {v!r}")


class ApiError(Exception):
    """An HTTP error answer: raised anywhere in a handler, sent once as JSON."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", hint: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.hint, self.headers = status, message, kind, hint, headers or {}


class _DeadlineReader(io.RawIOBase):
    """The socket's read side, bounded by the handler's deadline for the whole request: a client
    that trickles bytes (slowloris) runs out of time however often it sends one."""

    def __init__(self, sock: socket.socket, handler: ApiHandler):
        self._sock, self._handler = sock, handler
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        n = self._sock.recv_into(buf)
        self.received += n
        return n


def _depth(value, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` levels (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


class ApiHandler(BaseHTTPRequestHandler):
    """The inference routes; the device agent's handler extends it with its update routes."""

    server_version = "edgepeft"
    protocol_version = "HTTP/1.1"
    error_content_type = "application/json"
    deadline = math.inf

    def log_message(self, fmt, *args):  # keep stderr quiet; the audit log records requests
        pass

    # -- connection plumbing ---------------------------------------------------------------
    def setup(self):
        super().setup()
        lim = self.server.limits
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, lim.send_buffer)
        except OSError:
            pass
        self._reader = _DeadlineReader(self.connection, self)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)

    def handle_one_request(self):
        """One request with a deadline for its arrival; a client too slow to send it gets 408 and
        loses the connection, one that stops reading its answer loses it without one."""
        self.deadline = time.monotonic() + self.server.limits.request_timeout
        self._reader.received, self._responded, self._unread, self._cors = 0, False, 0, None
        self.command, self.request_version = None, self.default_request_version
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "", ""
                self.close_connection = True
                return self._error(414, "the request line is too long", hint="send a shorter URL")
            if not self.raw_requestline:
                self.close_connection = True
                return None
            if not self.parse_request():
                return None
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                return self._error(405, f"method {self.command} is not supported on {self.path}",
                                   hint="see the API routes in the README")
            method()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
            if self._reader.received and not self._responded and self.deadline <= time.monotonic():
                self._late()
        except (ConnectionError, OSError):
            self.close_connection = True

    def _late(self) -> None:
        try:
            self.connection.settimeout(1.0)
            self._error(408, f"the request did not arrive within {self.server.limits.request_timeout:g} s",
                        "timeout", "send the whole request at once")
        except OSError:
            pass

    def _write_mode(self) -> None:
        """From here on the socket is written: a client that leaves the answer unread is dropped."""
        self.deadline = math.inf
        self.connection.settimeout(self.server.limits.write_timeout)

    def send_response(self, code, message=None):
        self._responded = True
        super().send_response(code, message)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, too many headers) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a garbled request line: answer in HTTP/1.1, with headers
            self.request_version = "HTTP/1.1"
        self._error(int(code), message or "bad request", "invalid_request_error", explain)

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._write_mode()
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._cors_headers()
        if self._unread or self.close_connection:
            self.close_connection = True  # an unread body would be taken for the next request
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", hint: str | None = None,
               headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "hint": hint, "code": status}}, headers)

    def _cors_headers(self) -> None:
        if self._cors:
            self.send_header("Access-Control-Allow-Origin", self._cors)
            self.send_header("Vary", "Origin")

    # -- guards ----------------------------------------------------------------------------
    def _check_host(self) -> None:
        host = self.headers.get("Host")
        if host is None:
            raise ApiError(400, "the request has no Host header", hint="send HTTP/1.1 with a Host header")
        if not self.server.host_allowed(host):
            raise ApiError(403, f"Host {host!r} is not this server's address", "forbidden",
                           "call the API by the address it listens on (a page that rebinds its own name to "
                           "this device is refused)")

    def _check_origin(self) -> None:
        origin = self.headers.get("Origin")
        if origin is None:
            return
        if origin not in self.server.allowed_origins:
            raise ApiError(403, f"requests from the web origin {origin!r} are not accepted", "forbidden",
                           "start the server with --allow-origin ORIGIN to let that web app call it")
        self._cors = origin

    def _check_token(self) -> None:
        token = self.server.token
        if token is None:
            return
        got = self.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode("utf-8", "replace"), ("Bearer " + token).encode("utf-8")):
            raise ApiError(401, "wrong API token" if got else "this route needs the API token", "unauthorized",
                           f"send Authorization: Bearer <token>; the token is in {self.server.token_source}",
                           headers={"WWW-Authenticate": 'Bearer realm="edgepeft"'})

    def _guard(self, token: bool = True) -> None:
        self._check_host()
        self._check_origin()
        if token:
            self._check_token()

    def _dispatch(self, route, *args, token: bool = True) -> None:
        """Run ``route`` behind the guards; every failure becomes one JSON error (or, once an answer
        has started, a closed connection: never a second status line)."""
        try:
            self._unread = self._content_length(required=False)  # until read, answers close the connection
            self._guard(token)
            route(*args)
        except ApiError as exc:
            self._fail(exc.status, exc.message, exc.kind, exc.hint, exc.headers)
        except AdapterError as exc:
            self._fail(404 if exc.message.startswith("unknown adapter") else 400, exc.message, "adapter_error",
                       exc.hint)
        except EdgePeftError as exc:
            self._fail(400, exc.message, type(exc).__name__, exc.hint)
        except (TimeoutError, ConnectionError):
            raise
        except Exception as exc:  # a bug: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            self._fail(500, f"internal error: {type(exc).__name__}", "internal_error",
                       "this is a bug in edgepeft; the server's stderr has the details")

    def _fail(self, status, message, kind, hint=None, headers=None) -> None:
        if self._responded:
            self.close_connection = True
            return
        self._error(status, message, kind, hint, headers)

    # -- request bodies --------------------------------------------------------------------
    def _content_length(self, required: bool = True) -> int:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not accepted", hint="send a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            if required:
                raise ApiError(411, "the request has no Content-Length", hint="send the body with its length")
            return 0
        if not raw.strip().isdigit():
            self.close_connection = True
            raise ApiError(400, f"Content-Length {raw[:20]!r} is not a length")
        return int(raw)

    def _read(self, limit: int) -> bytes:
        """The request body (at most ``limit`` bytes), read within the request's deadline."""
        n = self._content_length()
        if n > limit:
            raise ApiError(413, f"the request body is {n} bytes; the limit is {limit}", "too_large",
                           "send less per request")
        self.deadline += n / self.server.limits.min_body_rate
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise ApiError(400, f"the body ended after {len(data)} of its {n} bytes", hint="send the whole body")
        self._unread = 0
        return data

    def _json(self) -> dict:
        """The request body as a JSON object; raises :class:`ApiError` (411/413/415/400)."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"the request body must be application/json, not {ctype or 'unlabelled'}",
                           "unsupported_media_type", "send Content-Type: application/json")
        raw = self._read(self.server.limits.max_body_bytes)
        try:
            data = json.loads(raw.decode("utf-8") if raw else "{}")
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        except ValueError:
            raise ApiError(400, "the request body is not valid UTF-8 JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if not _depth(data, self.server.limits.max_json_depth):
            raise ApiError(400, f"the request body nests deeper than {self.server.limits.max_json_depth} levels")
        return data

    # -- routes ----------------------------------------------------------------------------
    @property
    def engine(self):
        return self.server.get_engine()

    def do_OPTIONS(self):
        """CORS preflight: answered for allowed origins only (no token: browsers send none here)."""
        def preflight():
            if self._cors is None:
                raise ApiError(403, "only web apps started with --allow-origin may call this API", "forbidden")
            self.send_response(204)
            self._cors_headers()
            self.send_header("Access-Control-Allow-Methods", "GET, POST, PUT, OPTIONS")
            self.send_header("Access-Control-Allow-Headers",
                             "Authorization, Content-Type, Upload-Offset, Upload-Length")
            self.send_header("Access-Control-Max-Age", "600")
            self.send_header("Content-Length", "0")
            self.end_headers()

        self._dispatch(preflight, token=False)

    def do_GET(self):
        if self.path == "/health":
            return self._dispatch(lambda: self._send(200, {"status": "ok"}), token=False)
        routes = {"/v1/models": self._models, "/v1/adapters": self._adapters}
        return self._dispatch(routes.get(self.path, self._no_route))

    def do_POST(self):
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completions,
                  "/v1/classify": self._classify, "/v1/embeddings": self._embeddings}
        m = _UNLOAD.match(self.path)
        if m is not None:
            return self._dispatch(self._unload, m.group(1), m.group(2))
        return self._dispatch(routes.get(self.path, self._no_route))

    def do_PUT(self):
        self._dispatch(self._no_route)

    def do_DELETE(self):
        self._dispatch(self._no_route)

    def _no_route(self):
        raise ApiError(404, f"no route {self.command} {self.path}", "not_found", "see the API routes in the README")

    def _models(self):
        now = int(time.time())
        eng = self.engine
        data = [{"id": self.server.base_id, "object": "model", "created": now, "owned_by": "edgepeft",
                 "task": eng.task}]
        data += [{"id": a["name"], "object": "model", "created": now, "owned_by": "edgepeft",
                  "version": a["version"], "task": a["task"]} for a in eng.adapters()]
        self._send(200, {"object": "list", "data": data, "warnings": list(eng.warnings)})

    def _adapters(self):
        eng = self.engine
        self._send(200, {"object": "list", "data": eng.adapters(), "warnings": list(eng.warnings)})

    def _unload(self, name: str, action: str):
        if self._unread:
            self._read(self.server.limits.max_body_bytes)  # any body is ignored
        try:
            result = self.server.adapter_action(name, action)
        except AdapterError as exc:
            code = 409 if "in use" in exc.message else 404 if "unknown" in exc.message or "no " in exc.message else 400
            raise ApiError(code, exc.message, "adapter_error", exc.hint) from exc
        self._send(200, result)

    # -- generation ------------------------------------------------------------------------
    def _completions(self):
        self._generate(self._json(), chat=False)

    def _chat(self):
        self._generate(self._json(), chat=True)

    def _model(self, data: dict) -> str | None:
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string (an adapter's name, or the base's)")
        return None if model in (None, "", self.server.base_id) else model

    def _generate(self, data: dict, chat: bool) -> None:
        lim = self.server.limits
        adapter = self._model(data)
        if chat:
            if not isinstance(data.get("messages"), list):
                raise ApiError(400, "'messages' must be a list", hint='e.g. [{"role": "user", "content": "hi"}]')
            prompts = [{"messages": data["messages"]}]
        else:
            prompts = [{"prompt": p} for p in self._texts(data, "prompt", '"Once upon a time" or ["one", "two"]')]
        n = data.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= lim.max_n:
            raise ApiError(400, f"'n' must be a whole number from 1 to {lim.max_n}, got {n!r}")
        stop = data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "'stop' must be a string or a list of strings")
        if len(stops) > lim.max_stops or any(len(s) > lim.max_stop_chars for s in stops):
            raise ApiError(400, f"at most {lim.max_stops} stop strings of up to {lim.max_stop_chars} characters")
        top = self._logprobs(data, chat)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false")
        usage = _unsupported_and_usage(data, stream)
        kw = {"adapter": adapter, "max_new_tokens": data.get("max_tokens", data.get("max_completion_tokens")),
              "stop": stops or None, "logprobs": top}
        for key in ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty",
                    "seed"):
            kw[key] = data.get(key)
        jobs = [(i * n + j, p, None if kw["seed"] is None or j == 0 else kw["seed"] + j)
                for i, p in enumerate(prompts) for j in range(n)]  # OpenAI's order: choices of prompt 0 first
        meta = {"model": data.get("model") or self.server.base_id, "created": int(time.time()),
                "object": "chat.completion" if chat else "text_completion"}
        engine = self.engine  # one engine for the whole request (the agent may swap in a new bundle)
        with self.server.decode_slot():
            if stream:
                return self._stream(engine, jobs, kw, chat, meta, top, usage)
            results = [engine.generate(**p, **(kw | ({"seed": seed} if seed is not None else {})))
                       for _, p, seed in jobs]
        choices = [self._choice(i, r, chat, top) for (i, _, _), r in zip(jobs, results)]
        usage_prompt = sum(r.prompt_tokens for r in results[::n])
        usage_done = sum(r.completion_tokens for r in results)
        self._send(200, {"id": f"{'chatcmpl' if chat else 'cmpl'}-{results[0].request_id}", **meta,
                         "choices": choices,
                         "adapter_version": results[0].adapter_version,
                         "usage": {"prompt_tokens": usage_prompt, "completion_tokens": usage_done,
                                   "total_tokens": usage_prompt + usage_done}})

    @staticmethod
    def _logprobs(data: dict, chat: bool) -> int | None:
        """How many alternatives per token the request asks for (None: no log-probabilities)."""
        lp = data.get("logprobs")
        if chat:
            if lp in (None, False):
                return None
            if lp is not True:
                raise ApiError(400, "'logprobs' must be true or false on /v1/chat/completions")
            top = data.get("top_logprobs", 0)
            if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
                raise ApiError(400, "'top_logprobs' must be a whole number from 0 to 20")
            return top
        if lp is None:
            return None
        if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5:
            raise ApiError(400, "'logprobs' must be a whole number from 0 to 5 on /v1/completions")
        return lp

    @staticmethod
    def _lp_chat(records: list) -> dict:
        def one(r):
            return {"token": r["token"], "logprob": r["logprob"], "bytes": list(r["token"].encode("utf-8"))}

        return {"content": [one(r) | {"top_logprobs": [one(t) for t in r["top"]]} for r in records]}

    @staticmethod
    def _lp_text(records: list, offset: int = 0) -> dict:
        offsets, at = [], offset
        for r in records:
            offsets.append(at)
            at += len(r["token"])
        return {"tokens": [r["token"] for r in records], "token_logprobs": [r["logprob"] for r in records],
                "top_logprobs": [{t["token"]: t["logprob"] for t in r["top"]} for r in records],
                "text_offset": offsets}

    def _choice(self, index: int, result, chat: bool, top) -> dict:
        lp = None if top is None else (self._lp_chat if chat else self._lp_text)(result.logprobs or [])
        if chat:
            return {"index": index, "message": {"role": "assistant", "content": result.text}, "logprobs": lp,
                    "finish_reason": result.finish_reason}
        return {"index": index, "text": result.text, "logprobs": lp, "finish_reason": result.finish_reason}

    def _stream(self, engine, jobs, kw, chat: bool, meta: dict, top, usage: bool = False) -> None:
        """Server-sent events. The first piece of the first choice is computed before the status
        line, so a request the engine refuses still gets its proper HTTP error."""
        streams = []

        def start(seed, p):
            s = engine.generate(**p, **(kw | ({"seed": seed} if seed is not None else {})), stream=True)
            streams.append(s)
            return s

        first_job = jobs[0]
        first = start(first_job[2], first_job[1])
        try:
            head = [next(first)]
        except StopIteration:
            head = []
        except BaseException:
            first.close()
            raise
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{first.request_id}"
        obj = f"{meta['object']}.chunk" if chat else meta["object"]

        def event(index, delta=None, finish=None, logprobs=None, error=None, counts=None):
            if error is not None:
                payload = {"error": error}
            elif counts is not None:  # stream_options.include_usage: a last chunk with no choices
                payload = {"id": rid, "object": obj, "created": meta["created"], "model": meta["model"],
                           "choices": [], "usage": counts}
            else:
                choice = ({"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
                          if chat else {"index": index, "text": delta or "", "logprobs": logprobs,
                                        "finish_reason": finish})
                payload = {"id": rid, "object": obj, "created": meta["created"], "model": meta["model"],
                           "choices": [choice]}
            self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")

        self._write_mode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self._cors_headers()
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for k, (index, p, seed) in enumerate(jobs):
                s = first if k == 0 else start(seed, p)
                pieces = iter(head) if k == 0 else iter(())
                if chat:
                    event(index, {"role": "assistant", "content": ""})
                offset = 0
                for piece in _chain(pieces, s):
                    lp = None
                    if top is not None:
                        recs = s.new_logprobs()
                        lp = self._lp_chat(recs) if chat else self._lp_text(recs, offset)
                    offset += len(piece)
                    event(index, {"content": piece} if chat else piece, logprobs=lp)
                lp = None
                if top is not None:
                    recs = s.new_logprobs()
                    lp = (self._lp_chat(recs) if chat else self._lp_text(recs, offset)) if recs else None
                event(index, {} if chat else "", finish=s.result.finish_reason, logprobs=lp)
            if usage:
                once = {id(p): s for s, (_, p, _) in reversed(list(zip(streams, jobs)))}  # n choices, one prompt
                prompt = sum(s.result.prompt_tokens for s in once.values())
                done = sum(s.result.completion_tokens for s in streams)
                event(0, counts={"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (TimeoutError, ConnectionError, OSError):
            pass  # the client stopped reading or went away: stop generating, free the slot
        except EdgePeftError as exc:
            self._last_event(event, {"message": exc.message, "type": type(exc).__name__, "hint": exc.hint})
        except Exception as exc:  # a bug: tell the client in the stream, keep serving others
            traceback.print_exc(file=sys.stderr)
            self._last_event(event, {"message": f"internal error: {type(exc).__name__}", "type": "internal_error",
                                     "hint": "this is a bug in edgepeft; the server's stderr has the details"})
        finally:
            for s in streams:
                s.close()

    @staticmethod
    def _last_event(event, error: dict) -> None:
        try:
            event(0, error=error)
        except OSError:
            pass

    # -- encoders --------------------------------------------------------------------------
    def _texts(self, data: dict, key: str = "input", example: str = '["great product", "never again"]') -> list[str]:
        """``data[key]``: a string or a non-empty list of them, at most ``max_inputs`` (413 beyond)."""
        texts = data.get(key)
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, f"'{key}' must be a string or a non-empty list of strings", hint=f"e.g. {example}")
        lim = self.server.limits.max_inputs
        if len(texts) > lim:
            raise ApiError(413, f"{len(texts)} {key}s in one request; the limit is {lim}", "too_large",
                           f"send at most {lim} per request")
        return texts

    def _classify(self):
        data = self._json()
        texts, adapter = self._texts(data), self._model(data)
        threshold = data.get("review_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ApiError(400, "'review_threshold' must be a number from 0 to 1")
        with self.server.decode_slot():
            results = self.engine.classify(texts, adapter=adapter, review_threshold=threshold)
        self._send(200, {"object": "list", "model": data.get("model") or self.server.base_id,
                         "data": [r.to_dict() for r in results]})

    def _embeddings(self):
        data = self._json()
        texts, adapter = self._texts(data), self._model(data)
        fmt = data.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be \"float\" or \"base64\"")
        with self.server.decode_slot():
            emb = self.engine.embed(texts, adapter=adapter)
        rows = [v.tolist() if fmt == "float" else base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                for v in emb.vectors]
        self._send(200, {"object": "list", "model": data.get("model") or self.server.base_id,
                         "adapter_version": emb.adapter_version,
                         "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
                         "usage": {"prompt_tokens": emb.tokens, "total_tokens": emb.tokens}})


def _unsupported_and_usage(data: dict, stream: bool) -> bool:
    """Refuse (400) what this server would otherwise ignore: tools and function calling, and a
    ``response_format`` other than text; returns whether a stream should end with a usage chunk."""
    for key in ("tools", "tool_choice", "functions", "function_call"):
        if data.get(key) not in (None, [], "none"):
            raise ApiError(400, f"'{key}' is not supported: this server does not call tools",
                           hint="leave it out, and describe the answer you want in the messages")
    fmt = data.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported: answers are not "
                       "constrained to JSON", hint="leave it out, ask for JSON in the messages and parse the answer")
    opts = data.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}")
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with \"stream\": true")
    return bool(opts.get("include_usage"))


def _chain(head, rest):
    yield from head
    yield from rest


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def host_names(bound: str, extra=()) -> set[str] | None:
    """The names a ``Host`` header may carry for a server bound to ``bound``: loopback names on
    loopback; that address (and loopback names) on one address; None (any IP literal, this
    machine's names) on a wildcard address."""
    if bound in ("0.0.0.0", "::", ""):
        return None
    return {bound.lower()} | {x.lower() for x in extra} | LOOPBACK_NAMES


class EngineServer(ThreadingHTTPServer):
    """A bounded HTTP server bound to one engine (see the module docstring).

    ``token``: the bearer token every route but ``/health`` needs (None: a fresh random one,
    readable as ``server.token``; ``""`` turns authentication off, loopback only).
    ``allowed_origins``: web origins (``http://localhost:3000``) whose browser requests are
    accepted; ``allowed_hosts``: more names the ``Host`` header may carry; ``expose``: allow a
    non-loopback address. Raises :class:`UsageError` for a refused combination, ``OSError``
    when the address cannot be bound.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8080, handler=ApiHandler, *,
                 token: str | None = None, token_source: str = "the server's configuration",
                 allowed_origins=(), allowed_hosts=(), limits: Limits | None = None, expose: bool = False):
        self.engine = engine
        self.limits = limits or Limits()
        if not _is_loopback(host) and not expose:
            raise UsageError(f"{host} is reachable from other machines",
                             hint="pass --expose (with a firewall and the token) to serve beyond this device, "
                                  "or bind 127.0.0.1")
        if token == "" and not _is_loopback(host):
            raise UsageError("an API without a token is allowed on loopback only", hint="drop --no-token")
        if token is not None and token != "" and (len(token) < 16 or any(c.isspace() for c in token)):
            raise UsageError("the API token is too short or has spaces", hint="use at least 16 characters")
        self.token = secrets.token_urlsafe(32) if token is None else (token or None)
        self.token_source = token_source
        for o in allowed_origins:
            if not re.fullmatch(r"https?://[^/\s]+", o or ""):
                raise UsageError(f"--allow-origin {o!r} is not an origin", hint="e.g. http://localhost:3000")
        self.allowed_origins = frozenset(allowed_origins)
        self._conn_slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._decode = threading.BoundedSemaphore(getattr(engine, "max_concurrent", 4))
        super().__init__((host, port), handler)
        self.allowed_hosts = host_names(self.server_address[0], allowed_hosts)
        me = socket.gethostname().lower()
        self._machine_names = LOOPBACK_NAMES | {me, f"{me}.local"} | {x.lower() for x in allowed_hosts}

    # -- who may connect ---------------------------------------------------------------------
    def host_allowed(self, header: str) -> bool:
        """Whether a ``Host`` header names this server (its port too, when one is given)."""
        m = re.fullmatch(r"\[?([^\[\]]*?)\]?(?::(\d+))?", header.strip().lower())
        if m is None:
            return False
        name, port = m.group(1), m.group(2)
        if port is not None and int(port) != self.server_address[1]:
            return False
        if self.allowed_hosts is None:  # wildcard: an address literal (what rebinding cannot fake) or our name
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return name in self._machine_names
        return name in self.allowed_hosts

    def process_request(self, request, client_address):
        """One thread per connection, at most ``max_connections``; the rest get 429 at once."""
        if not self._conn_slots.acquire(blocking=False):
            return self._refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._conn_slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._conn_slots.release()

    def _refuse(self, request) -> None:
        body = json.dumps({"error": {"message": "too many connections", "type": "busy", "code": 429,
                                     "hint": "retry in a moment"}}).encode()
        head = (f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(0.05)
            request.sendall(head + body)
            request.shutdown(socket.SHUT_WR)
            request.recv(1 << 16)  # take what the client sent, so closing does not reset the answer away
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    # -- what requests share -----------------------------------------------------------------
    def decode_slot(self):
        """Hold one of the engine's decode slots for a request; 503 after ``queue_timeout``."""
        from contextlib import contextmanager

        @contextmanager
        def slot():
            if not self._decode.acquire(timeout=self.limits.queue_timeout):
                raise ApiError(503, f"all decode slots stayed busy for {self.limits.queue_timeout:g} s", "busy",
                               "retry later", headers={"Retry-After": "5"})
            try:
                yield
            finally:
                self._decode.release()

        return slot()

    def get_engine(self):
        """The engine requests run on (the agent's changes when a bundle update is committed)."""
        return self.engine

    def adapter_action(self, name: str, action: str) -> dict:
        """Unload (or, on an agent, load again) adapter ``name``; raises :class:`AdapterError`."""
        if action != "unload":
            raise AdapterError(f"no {action} here: this server serves a bundle without a state folder",
                               hint="`edgepeft agent` can load adapters again")
        self.get_engine().unload_adapter(name)
        return {"name": name, "status": "unloaded"}

    @property
    def base_id(self) -> str:
        return str(self.get_engine().manifest.base.get("name") or "base")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start_server(engine, host: str = "127.0.0.1", port: int = 0, **options) -> tuple[EngineServer, threading.Thread]:
    """Start serving in a background thread (port 0 picks a free port); stop with ``server.shutdown()``.
    ``options`` are :class:`EngineServer`'s (``token``, ``limits``, ``allowed_origins`` ...)."""
    server = EngineServer(engine, host, port, **options)
    thread = threading.Thread(target=server.serve_forever, name="edgepeft-http", daemon=True)
    thread.start()
    return server, thread
