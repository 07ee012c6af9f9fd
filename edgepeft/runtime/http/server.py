"""A local HTTP endpoint so apps in any language can use the engine (stdlib only).

OpenAI-style routes, so existing client libraries work against the device:

- ``GET  /v1/models``: the base and every served adapter (an adapter's name is its model id),
  plus the engine's ``warnings``;
- ``POST /v1/chat/completions``: ``{"model", "messages", "max_tokens", "temperature", "top_p",
  "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty", "stop", "seed", "n",
  "logprobs", "top_logprobs", "stream"}``; with ``"stream": true`` the answer comes as
  server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``; ``"stream_options":
  {"include_usage": true}`` adds a last chunk with no choices and the usage); ``tools`` and a
  ``response_format`` other than text are refused (400), not ignored;
- ``POST /v1/completions``: the same with a raw ``"prompt"`` (a string or a list of them;
  ``"logprobs": N`` gives N alternatives per token);
- ``POST /v1/classify``: ``{"model", "input": [texts]}`` -> labels, probabilities, ``needs_review``;
  ``"adapters": [name or null, ...]`` instead of ``model`` names one adapter per input (one run for all);
- ``POST /v1/embeddings``: ``{"model", "input": text or [texts]}`` (encoder bundles; ``adapters`` too);
- ``GET  /v1/adapters`` and ``POST /v1/adapters/<name>/unload``;
- ``GET  /health`` (no token: liveness only).

Who may call it. Every route but ``/health`` needs ``Authorization: Bearer <token>`` (on a
phone every app can reach 127.0.0.1). The ``Host`` header must name the address the server is
bound to (a DNS-rebinding page sends its own name), a browser request carrying an ``Origin`` is
refused unless that origin was allowed, and request bodies must be ``application/json`` (a web
page can send ``text/plain`` without asking). Binding beyond loopback takes ``expose=True``.

What it holds. :class:`Limits` bounds every resource a client could hold: connections that
showed the token (more are answered 429), connections that have not yet (a budget of their own
and a short deadline for their headers, so they never take a token holder's place), body size (413), inputs per request, stop strings, choices, the time a request
may take to arrive (a slowloris client gets 408 and its connection back), the time a client may
leave an answer unread (a stalled or vanished reader is dropped and its decode slot freed), and
the wait for a free decode slot (503). Every failure is a JSON ``{"error": {...}}`` with its
status; once a stream has started, a failure is one last ``data: {"error": ...}`` event.

More routes. ``EngineServer(..., routes=[Route("GET", r"/v1/device", handler)])`` adds routes behind
the same guards (the device agent's update API is added this way); a handler gets a :class:`Request`
(``headers``, ``json()``, ``read(limit)``, ``send(status, payload)``) and the path's groups.
"""

from __future__ import annotations

import base64
import functools
import io
import itertools
import json
import math
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ...contracts.fields import check_choice
from ...contracts.jsontext import loads_untrusted
from ...errors import AdapterError, AdapterInUseError, EdgePeftError, UnknownAdapterError, UsageError
from . import openai
from .guards import (
    LOOPBACK_NAMES,
    ApiError,
    DeadlineReader,
    Evicted,
    Limits,
    check_host,
    check_json,
    check_origin,
    check_token,
    content_length,
    host_allowed,
    host_names,
    is_loopback,
)

__all__ = ["ApiError", "ApiHandler", "EngineServer", "Limits", "Request", "Route", "start_server"]

_UNLOAD = re.compile(r"/v1/adapters/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/(unload|load)")


@dataclass(frozen=True)
class Route:
    """A route added to the API: ``method``, a ``pattern`` that must match the whole path (its groups
    are passed on), and ``handler(request, *groups)``, run behind the host and origin checks and,
    with ``token`` (the default), the token check. Raises :class:`UsageError` for a bad pattern."""

    method: str
    pattern: str
    handler: Callable[..., None]
    token: bool = True

    def __post_init__(self):
        try:
            object.__setattr__(self, "_regex", re.compile(self.pattern))
        except re.error as exc:
            raise UsageError(f"route pattern {self.pattern!r} is not a regular expression: {exc}",
                             hint="write it as Python's re module reads it") from None

    def match(self, method: str, path: str):
        return self._regex.fullmatch(path) if method == self.method else None


class Request:
    """What a :class:`Route` handler sees of one request: ``method``, ``path``, ``headers``, ``server``,
    the body (:meth:`read`, :meth:`json`) and one answer (:meth:`send`). Every method raises
    :class:`ApiError` for a request it refuses (the server answers it)."""

    def __init__(self, handler: ApiHandler):
        self._handler = handler
        self.method, self.path, self.headers, self.server = handler.command, handler.path, handler.headers, handler.server

    @property
    def unread(self) -> int:
        """Bytes of body the client declared and nobody has read yet."""
        return self._handler.unread

    def read(self, limit: int) -> bytes:
        """The body (at most ``limit`` bytes: 413 beyond), within the request's deadline."""
        return self._handler.read_body(limit)

    def json(self) -> dict:
        """The body as a JSON object (application/json, within ``max_body_bytes`` and ``max_json_depth``)."""
        return self._handler.read_json()

    def send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        """Answer ``payload`` as JSON with ``status`` (once per request)."""
        self._handler.send_json(status, payload, headers)


class ApiHandler(BaseHTTPRequestHandler):
    """The inference routes, plus the server's added :class:`Route`s, behind the guards."""

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
        self._reader = DeadlineReader(self.connection, self)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)
        self.authenticated = False  # this connection has shown the token (it then holds a token holder's slot)

    @property
    def evicted(self) -> bool:
        """The server closed this (unauthenticated) connection to make room for a newer one."""
        return self.server.is_evicted(self.connection)

    def handle_one_request(self):
        """One request with a deadline for its arrival (a short one for the line and headers of a
        connection that has not shown the token); a client too slow to send it gets 408 and loses the
        connection, one that stops reading its answer loses it without one."""
        lim = self.server.limits
        start = time.monotonic()
        self.deadline = start + (lim.request_timeout if self.authenticated else
                                 min(lim.header_timeout, lim.request_timeout))
        self._reader.received, self._responded, self.unread, self._cors = 0, False, 0, None
        self.command, self.request_version, self.requestline = None, self.default_request_version, ""
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
            self.deadline = start + lim.request_timeout  # the headers are in: the body has the request's time
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                return self._error(405, f"method {self.command} is not supported on {self.path}",
                                   hint="see the API routes in docs/http-api.md")
            method()
            self.wfile.flush()
        except Evicted:
            self.close_connection = True
            self._answer_late(429, "too many connections are waiting to show the API token", "busy",
                              "send the request at once, with Authorization: Bearer <token>")
        except TimeoutError:
            self.close_connection = True
            if self._reader.received and not self._responded and self.deadline <= time.monotonic():
                self._answer_late(408, f"the request did not arrive within "
                                       f"{self.deadline - start:g} s", "timeout", "send the whole request at once")
        except (ConnectionError, OSError):
            self.close_connection = True

    def _answer_late(self, status: int, message: str, kind: str, hint: str) -> None:
        try:
            self.connection.settimeout(1.0)
            self._error(status, message, kind, hint)
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

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        """Answer ``payload`` as JSON (closing the connection when a body was left unread)."""
        self.send_body(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json", headers)

    def send_body(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        """Answer ``body`` as ``content_type``, not cached, with ``headers`` (closing the connection when a
        body was left unread). For subclasses that serve more than JSON (the fleet dashboard's page)."""
        self._write_mode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")  # a browser never guesses another type
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._cors_headers()
        if self.unread or self.close_connection:
            self.close_connection = True  # an unread body would be taken for the next request
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", hint: str | None = None,
               headers: dict | None = None) -> None:
        self.send_json(status, {"error": {"message": message, "type": kind, "hint": hint, "code": status}}, headers)

    def _cors_headers(self) -> None:
        if self._cors:
            self.send_header("Access-Control-Allow-Origin", self._cors)
            self.send_header("Vary", "Origin")

    # -- guards ----------------------------------------------------------------------------
    def _guard(self, token: bool = True) -> None:
        check_host(self.headers, self.server)
        self._cors = check_origin(self.headers, self.server.allowed_origins)
        if token:
            check_token(self.headers, self.server.token, self.server.token_source)
            if not self.authenticated:
                self.server.authenticate(self.connection)  # 429 when every token holder's slot is taken
                self.authenticated = True

    def dispatch(self, route, *args, token: bool = True) -> None:
        """Run ``route(*args)`` behind the guards (the token too, unless ``token`` is False): how a subclass
        serves paths of its own; every failure becomes one JSON error (or, once an answer
        has started, a closed connection: never a second status line)."""
        try:
            try:
                self.unread = content_length(self.headers, required=False)  # until read, answers close
            except ApiError as exc:
                self.close_connection = self.close_connection or exc.close
                raise
            self._guard(token)
            route(*args)
        except ApiError as exc:
            if exc.close:
                self.close_connection = True
            self._fail(exc.status, exc.message, exc.kind, exc.hint, exc.headers)
        except AdapterError as exc:
            self._fail(404 if isinstance(exc, UnknownAdapterError) else 400, exc.message, "adapter_error", exc.hint)
        except EdgePeftError as exc:
            self._fail(400, exc.message, type(exc).__name__, exc.hint)
        except (TimeoutError, ConnectionError, Evicted):
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
    def read_body(self, limit: int) -> bytes:
        """The request body (at most ``limit`` bytes), read within the request's deadline."""
        try:
            n = content_length(self.headers)
        except ApiError as exc:
            self.close_connection = self.close_connection or exc.close
            raise
        if n > limit:
            raise ApiError(413, f"the request body is {n} bytes; the limit is {limit}", "too_large",
                           "send less per request")
        self.deadline += n / self.server.limits.min_body_rate
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise ApiError(400, f"the body ended after {len(data)} of its {n} bytes", hint="send the whole body")
        self.unread = 0
        return data

    def read_json(self) -> dict:
        """The request body as a JSON object; raises :class:`ApiError` (411/413/415/400)."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"the request body must be application/json, not {ctype or 'unlabelled'}",
                           "unsupported_media_type", "send Content-Type: application/json")
        raw = self.read_body(self.server.limits.max_body_bytes)
        try:
            data = loads_untrusted(raw.decode("utf-8") if raw else "{}")
        except ValueError as exc:  # also too deep a nesting
            raise ApiError(400, f"the request body is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        check_json(data, self.server.limits.max_json_depth)
        return data

    # -- routes ----------------------------------------------------------------------------
    @property
    def engine(self):
        return self.server.get_engine()

    def _route(self) -> bool:
        """Run the first of the server's added routes that matches; False when none does."""
        for r in self.server.routes:
            m = r.match(self.command, self.path)
            if m is not None:
                self.dispatch(r.handler, Request(self), *m.groups(), token=r.token)
                return True
        return False

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

        self.dispatch(preflight, token=False)

    def do_GET(self):
        if self._route():
            return None
        if self.path == "/health":
            return self.dispatch(lambda: self.send_json(200, {"status": "ok"}), token=False)
        routes = {"/v1/models": self._models, "/v1/adapters": self._adapters}
        return self.dispatch(routes.get(self.path, self._no_route))

    def do_POST(self):
        if self._route():
            return None
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completions,
                  "/v1/classify": self._classify, "/v1/embeddings": self._embeddings}
        m = _UNLOAD.fullmatch(self.path)
        if m is not None:
            return self.dispatch(self._unload, m.group(1), m.group(2))
        return self.dispatch(routes.get(self.path, self._no_route))

    def do_PUT(self):
        if not self._route():
            self.dispatch(self._no_route)

    def do_DELETE(self):
        if not self._route():
            self.dispatch(self._no_route)

    def _no_route(self):
        raise ApiError(404, f"no route {self.command} {self.path}", "not_found", "see the API routes in docs/http-api.md")

    def _models(self):
        now = int(time.time())
        eng = self.engine
        data = [{"id": self.server.base_id, "object": "model", "created": now, "owned_by": "edgepeft",
                 "task": eng.task}]
        data += [{"id": a["name"], "object": "model", "created": now, "owned_by": "edgepeft",
                  "version": a["version"], "task": a["task"]} for a in eng.adapters()]
        self.send_json(200, {"object": "list", "data": data, "warnings": list(eng.warnings)})

    def _adapters(self):
        eng = self.engine
        self.send_json(200, {"object": "list", "data": eng.adapters(), "warnings": list(eng.warnings)})

    def _unload(self, name: str, action: str):
        if self.unread:
            self.read_body(self.server.limits.max_body_bytes)  # any body is ignored
        try:
            result = self.server.adapter_action(name, action)
        except AdapterError as exc:  # the status comes from the error's type, never from its wording
            code = 409 if isinstance(exc, AdapterInUseError) else 404 if isinstance(exc, UnknownAdapterError) else 400
            raise ApiError(code, exc.message, "adapter_error", exc.hint) from exc
        self.send_json(200, result)

    # -- generation ------------------------------------------------------------------------
    def _completions(self):
        self._generate(self.read_json(), chat=False)

    def _chat(self):
        self._generate(self.read_json(), chat=True)

    def _generate(self, data: dict, chat: bool) -> None:
        req = openai.GenerationRequest.parse(data, chat, self.server.limits, self.server.base_id)
        engine = self.engine  # one engine for the whole request (the agent may swap in a new bundle)
        with self.server.decode_slot():
            if req.stream:
                return self._stream(engine, req)
            results = [engine.generate(**req.engine_args(p, seed)) for _, p, seed in req.jobs]
        self.send_json(200, openai.completion(req, results))

    def _stream(self, engine, req: openai.GenerationRequest) -> None:
        """Server-sent events. The first piece of the first choice is computed before the status
        line, so a request the engine refuses still gets its proper HTTP error."""
        streams = []

        def start(seed, p):
            s = engine.generate(**req.engine_args(p, seed), stream=True)
            streams.append(s)
            return s

        first_job = req.jobs[0]
        first = start(first_job[2], first_job[1])
        try:
            head = [next(first)]
        except StopIteration:
            head = []
        except BaseException:
            first.close()
            raise
        rid = req.id(first.request_id)
        chat, top = req.chat, req.top

        def event(index, delta=None, finish=None, logprobs=None, error=None):
            payload = {"error": error} if error is not None else openai.chunk(req, rid, index, delta, finish, logprobs)
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
            for k, (index, p, seed) in enumerate(req.jobs):
                s = first if k == 0 else start(seed, p)
                pieces = iter(head) if k == 0 else iter(())
                if chat:
                    event(index, {"role": "assistant", "content": ""})
                offset = 0
                for piece in itertools.chain(pieces, s):
                    lp = None
                    if top is not None:
                        lp = openai.logprobs_block(s.new_logprobs(), chat, offset)
                    offset += len(piece)
                    event(index, {"content": piece} if chat else piece, logprobs=lp)
                lp = None
                if top is not None:
                    recs = s.new_logprobs()
                    lp = openai.logprobs_block(recs, chat, offset) if recs else None
                event(index, {} if chat else "", finish=s.result.finish_reason, logprobs=lp)
            if req.include_usage:
                payload = openai.usage_chunk(req, rid, [s.result for s in streams])
                self.wfile.write(b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (TimeoutError, ConnectionError, OSError):
            pass  # the client stopped reading or went away: stop generating, free the slot
        except EdgePeftError as exc:
            _last_event(event, {"message": exc.message, "type": type(exc).__name__, "hint": exc.hint})
        except Exception as exc:  # a bug: tell the client in the stream, keep serving others
            traceback.print_exc(file=sys.stderr)
            _last_event(event, {"message": f"internal error: {type(exc).__name__}", "type": "internal_error",
                                "hint": "this is a bug in edgepeft; the server's stderr has the details"})
        finally:
            for s in streams:
                s.close()

    # -- encoders --------------------------------------------------------------------------
    def _classify(self):
        data = self.read_json()
        texts = openai.texts_of(data, "input", self.server.limits)
        adapter = openai.adapters_of(data, self.server.base_id)
        threshold = data.get("review_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ApiError(400, "'review_threshold' must be a number from 0 to 1", hint="e.g. 0.6")
        with self.server.decode_slot():
            results = self.engine.classify(texts, adapter=adapter, review_threshold=threshold)
        self.send_json(200, {"object": "list", "model": data.get("model") or self.server.base_id,
                             "data": [r.to_dict() for r in results]})

    def _embeddings(self):
        data = self.read_json()
        texts = openai.texts_of(data, "input", self.server.limits)
        adapter = openai.adapters_of(data, self.server.base_id)
        fmt = check_choice(data.get("encoding_format", "float"), ("float", "base64"), "encoding_format",
                           error=functools.partial(ApiError, 400), hint="or leave it out (float)")
        with self.server.decode_slot():
            emb = self.engine.embed(texts, adapter=adapter)
        rows = [v.tolist() if fmt == "float" else base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                for v in emb.vectors]
        self.send_json(200, {"object": "list", "model": data.get("model") or self.server.base_id,
                             "adapter_version": emb.adapter_version,
                             "data": [{"object": "embedding", "index": i, "embedding": r}
                                      | ({"adapter": emb.adapter[i], "adapter_version": emb.adapter_version[i]}
                                         if isinstance(emb.adapter, list) else {}) for i, r in enumerate(rows)],
                             "usage": {"prompt_tokens": emb.tokens, "total_tokens": emb.tokens}})


def _last_event(event, error: dict) -> None:
    try:
        event(0, error=error)
    except OSError:
        pass


class EngineServer(ThreadingHTTPServer):
    """A bounded HTTP server bound to one engine (see the module docstring).

    ``token``: the bearer token every route but ``/health`` needs (None: a fresh random one,
    readable as ``server.token``; ``""`` turns authentication off, loopback only).
    ``allowed_origins``: web origins (``http://localhost:3000``) whose browser requests are
    accepted; ``allowed_hosts``: more names the ``Host`` header may carry; ``expose``: allow a
    non-loopback address; ``routes``: :class:`Route`s added before the inference routes.
    Raises :class:`UsageError` for a refused combination, ``OSError`` when the address cannot be bound.

    Connections. Each connection starts unauthenticated, in a budget of ``max_unauthenticated``
    with ``header_timeout`` to send its headers; when that budget is full, the connection that has
    waited longest is answered 429 and closed. Once a request shows the token, its connection moves
    to the ``max_connections`` budget (429 when that is full), where the unauthenticated never get.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8080, handler=ApiHandler, *,
                 token: str | None = None, token_source: str = "the server's configuration",
                 allowed_origins=(), allowed_hosts=(), limits: Limits | None = None, expose: bool = False,
                 routes=()):
        self.engine = engine
        self.limits = limits or Limits()
        if not is_loopback(host) and not expose:
            raise UsageError(f"{host} is reachable from other machines",
                             hint="pass --expose (with a firewall and the token) to serve beyond this device, "
                                  "or bind 127.0.0.1")
        if token == "" and not is_loopback(host):
            raise UsageError("an API without a token is allowed on loopback only", hint="drop --no-token")
        if token is not None and token != "" and (len(token) < 16 or any(c.isspace() for c in token)):
            raise UsageError("the API token is too short or has spaces", hint="use at least 16 characters")
        self.token = secrets.token_urlsafe(32) if token is None else (token or None)
        self.token_source = token_source
        for o in allowed_origins:
            if not re.fullmatch(r"https?://[^/\s]+", o or ""):
                raise UsageError(f"--allow-origin {o!r} is not an origin", hint="e.g. http://localhost:3000")
        self.allowed_origins = frozenset(allowed_origins)
        self.routes = tuple(routes)
        for r in self.routes:
            if not isinstance(r, Route):
                raise UsageError(f"routes must be Route objects, got {type(r).__name__}",
                                 hint="Route(method, pattern, handler)")
        self._conn_slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._gate = threading.Lock()
        self._waiting: dict[socket.socket, None] = {}  # unauthenticated connections, oldest first
        self._evicted: set[socket.socket] = set()
        self._authenticated: set[socket.socket] = set()
        self._decode = threading.BoundedSemaphore(getattr(engine, "max_concurrent", 4))
        super().__init__((host, port), handler)
        self.allowed_hosts = host_names(self.server_address[0], allowed_hosts)
        me = socket.gethostname().lower()
        self._machine_names = LOOPBACK_NAMES | {me, f"{me}.local"} | {x.lower() for x in allowed_hosts}

    # -- who may connect ---------------------------------------------------------------------
    def host_allowed(self, header: str) -> bool:
        """Whether a ``Host`` header names this server (its port too, when one is given)."""
        return host_allowed(header, self.server_address[1], self.allowed_hosts, self._machine_names)

    def process_request(self, request, client_address):
        """One thread per connection; a new connection waits among the unauthenticated ones (pushing
        the one waiting longest out when their budget is full)."""
        with self._gate:
            if len(self._waiting) >= self.limits.max_unauthenticated:
                oldest = next(iter(self._waiting))
                del self._waiting[oldest]
                self._evicted.add(oldest)
                try:
                    oldest.shutdown(socket.SHUT_RD)  # its blocked read returns; its thread answers 429
                except OSError:
                    pass
            self._waiting[request] = None
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request) -> None:
        with self._gate:
            self._waiting.pop(request, None)
            self._evicted.discard(request)
            if request in self._authenticated:
                self._authenticated.discard(request)
                self._conn_slots.release()

    def is_evicted(self, request) -> bool:
        """Whether connection ``request`` was pushed out of the unauthenticated budget."""
        with self._gate:
            return request in self._evicted

    def authenticate(self, request) -> None:
        """Move connection ``request``, whose request showed the token, into the token holders' budget.
        Raises :class:`ApiError` 429 (closing the connection) when that budget is full."""
        with self._gate:
            if request in self._evicted:
                raise Evicted()
            if request in self._authenticated:
                return
            if not self._conn_slots.acquire(blocking=False):
                raise ApiError(429, "too many connections", "busy", "retry in a moment",
                               headers={"Retry-After": "1"}, close=True)
            self._waiting.pop(request, None)
            self._authenticated.add(request)

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
        """Unload (or, on an agent, load again) adapter ``name``; raises :class:`AdapterError`
        (:class:`UnknownAdapterError`, :class:`AdapterInUseError`) or :class:`ApiError` (404: no load here)."""
        if action != "unload":
            raise ApiError(404, f"no {action} here: this server serves a bundle without a state folder",
                           "adapter_error", "`edgepeft agent` can load adapters again")
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
    ``options`` are :class:`EngineServer`'s (``token``, ``limits``, ``allowed_origins``, ``routes`` ...)."""
    server = EngineServer(engine, host, port, **options)
    thread = threading.Thread(target=server.serve_forever, name="edgepeft-http", daemon=True)
    thread.start()
    return server, thread
