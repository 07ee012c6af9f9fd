"""A local HTTP endpoint so apps in any language can use the engine (stdlib only).

OpenAI-style routes, so existing client libraries work against the device:

- ``GET  /v1/models``: the base and every loaded adapter (an adapter's name is its model id);
- ``POST /v1/chat/completions``: ``{"model", "messages", "max_tokens", "temperature", "top_p",
  "stop", "seed", "stream"}``; with ``"stream": true`` the answer comes as server-sent events
  (``data: {chunk}`` lines, then ``data: [DONE]``);
- ``POST /v1/completions``: the same with a raw ``"prompt"``;
- ``POST /v1/classify``: ``{"model", "input": [texts]}`` -> labels, probabilities, ``needs_review``;
- ``GET  /health``.

Binds 127.0.0.1 unless told otherwise: the engine has no authentication, so exposing
it beyond the device is a deliberate choice. Errors are JSON ``{"error": {...}}``
with status 400 (bad request), 404 (unknown adapter/route) or 500.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import AdapterError, EdgePeftError

MAX_BODY = 1 << 20


class ApiHandler(BaseHTTPRequestHandler):
    """The inference routes; the device agent's handler extends it with its update routes."""

    server_version = "edgepeft"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep stderr quiet; the audit log records requests
        pass

    # -- plumbing --------------------------------------------------------------------------
    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str, hint: str | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "hint": hint}})

    def _body(self) -> dict | None:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY:
            self._error(413 if n > MAX_BODY else 400, "missing or oversized request body", "invalid_request_error")
            return None
        try:
            data = json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            self._error(400, "the request body is not valid JSON", "invalid_request_error")
            return None
        if not isinstance(data, dict):
            self._error(400, "the request body must be a JSON object", "invalid_request_error")
            return None
        return data

    @property
    def engine(self):
        return self.server.get_engine()

    def _adapter(self, data: dict):
        model = data.get("model")
        return None if model in (None, "", self.server.base_id) else model

    # -- routes ----------------------------------------------------------------------------
    def do_GET(self):
        if self.path == "/health":
            return self._send(200, {"status": "ok", "task": self.engine.task})
        if self.path == "/v1/models":
            now = int(time.time())
            data = [{"id": self.server.base_id, "object": "model", "created": now, "owned_by": "edgepeft"}]
            data += [{"id": a["name"], "object": "model", "created": now, "owned_by": "edgepeft",
                      "version": a["version"], "task": a["task"]} for a in self.engine.adapters()]
            return self._send(200, {"object": "list", "data": data})
        self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._chat, "/v1/classify": self._classify}
        route = routes.get(self.path)
        if route is None:
            return self._error(404, f"no route {self.path}", "not_found")
        data = self._body()
        if data is None:
            return None
        try:
            return route(data)
        except AdapterError as exc:
            status = 404 if exc.message.startswith("unknown adapter") else 400
            return self._error(status, exc.message, "adapter_error", exc.hint)
        except EdgePeftError as exc:
            return self._error(400, exc.message, type(exc).__name__, exc.hint)
        except (TypeError, ValueError) as exc:
            return self._error(400, f"bad request: {exc}", "invalid_request_error")

    def _chat(self, data: dict):
        chat = self.path.endswith("chat/completions")
        kw = {"messages": data.get("messages")} if chat else {"prompt": data.get("prompt")}
        if chat and not isinstance(data.get("messages"), list):
            return self._error(400, "'messages' must be a list", "invalid_request_error",
                               'e.g. [{"role": "user", "content": "hi"}]')
        max_tokens = data.get("max_tokens", data.get("max_completion_tokens"))
        stream = bool(data.get("stream", False))
        result = self.engine.generate(**kw, adapter=self._adapter(data), max_new_tokens=max_tokens,
                                      temperature=data.get("temperature"), top_p=data.get("top_p"),
                                      stop=data.get("stop"), seed=data.get("seed"), stream=stream)
        model = data.get("model") or self.server.base_id
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not stream:
            choice = ({"index": 0, "message": {"role": "assistant", "content": result.text},
                       "finish_reason": result.finish_reason} if chat else
                      {"index": 0, "text": result.text, "finish_reason": result.finish_reason})
            return self._send(200, {
                "id": f"chatcmpl-{result.request_id}", "object": obj, "created": created, "model": model,
                "choices": [choice], "adapter_version": result.adapter_version,
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "total_tokens": result.prompt_tokens + result.completion_tokens}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(delta: dict | str, finish=None):
            choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat else
                      {"index": 0, "text": delta, "finish_reason": finish})
            chunk = {"id": f"chatcmpl-{result.request_id}", "object": f"{obj}.chunk", "created": created, "model": model,
                     "choices": [choice]}
            self.wfile.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode("utf-8") + b"\n\n")
            self.wfile.flush()

        try:
            if chat:
                event({"role": "assistant", "content": ""})
            for piece in result:
                event({"content": piece} if chat else piece)
            event({} if chat else "", finish=result.result.finish_reason)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: stop generating
        finally:
            result.close()

    def _classify(self, data: dict):
        texts = data.get("input")
        results = self.engine.classify(texts, adapter=self._adapter(data))
        return self._send(200, {"object": "list", "model": data.get("model") or self.server.base_id,
                                "data": [r.to_dict() for r in results]})


class EngineServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer bound to one engine; each request runs in its own thread."""

    daemon_threads = True

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8080, handler=ApiHandler):
        self.engine = engine
        super().__init__((host, port), handler)

    def get_engine(self):
        """The engine requests run on (the agent's changes when a bundle update is committed)."""
        return self.engine

    @property
    def base_id(self) -> str:
        return str(self.get_engine().manifest.base.get("name") or "base")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def start_server(engine, host: str = "127.0.0.1", port: int = 0) -> tuple[EngineServer, threading.Thread]:
    """Start serving in a background thread (port 0 picks a free port); stop with ``server.shutdown()``."""
    server = EngineServer(engine, host, port)
    thread = threading.Thread(target=server.serve_forever, name="edgepeft-http", daemon=True)
    thread.start()
    return server, thread
