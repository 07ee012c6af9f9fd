"""What the HTTP API checks before a route runs: limits, deadlines, request bodies, who may call.

Stdlib only. Why each guard: on a phone every app can reach 127.0.0.1 (the token), a web page can
rebind its own name to this device (the ``Host`` check) or post ``text/plain`` without asking (the
body must be JSON, and its ``Origin`` allowed), and a client can hold a socket while sending nothing
(deadlines; connections that have not shown the token get a shorter one and a budget of their own).
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import math
import re
import socket
import time
from dataclasses import dataclass

from ...errors import UsageError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class Limits:
    """What one server lets its clients hold. Raises :class:`UsageError` for a value out of range.

    - ``max_connections``: connections that showed the token, served at once (one thread each);
      more are answered 429;
    - ``max_unauthenticated``: connections that have not shown the token yet (their own budget, so
      they never take a token holder's); when it is full the one waiting longest is answered 429
      and closed to make room;
    - ``header_timeout``: seconds a connection that has not shown the token may take to send its
      request line and headers (408);
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
    max_unauthenticated: int = 16
    header_timeout: float = 5.0

    def __post_init__(self):
        for name in ("max_connections", "max_body_bytes", "max_inputs", "max_n", "max_stops", "max_stop_chars",
                     "send_buffer", "max_json_depth", "min_body_rate", "max_unauthenticated"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"server limit {name} must be a whole number >= 1, got {v!r}")
        for name in ("request_timeout", "write_timeout", "queue_timeout", "header_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise UsageError(f"server limit {name} must be a positive number of seconds, got {v!r}")


class ApiError(Exception):
    """An HTTP error answer: raised anywhere in a handler, sent once as JSON (``close``: and the
    connection closed after it, when what follows on the socket cannot be trusted to be a request)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", hint: str | None = None,
                 headers: dict | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.kind, self.hint, self.headers = status, message, kind, hint, headers or {}
        self.close = close


class Evicted(Exception):
    """A connection that had not shown the token was closed to make room for a newer one."""


class DeadlineReader(io.RawIOBase):
    """The socket's read side, bounded by ``owner.deadline`` (monotonic seconds) for the whole request:
    a client that trickles bytes (slowloris) runs out of time however often it sends one. Raises
    ``TimeoutError`` past the deadline and :class:`Evicted` once ``owner.evicted`` is set."""

    def __init__(self, sock: socket.socket, owner):
        self._sock, self._owner = sock, owner
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self._owner.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        try:
            n = self._sock.recv_into(buf)
        except OSError:
            if self._owner.evicted:
                raise Evicted() from None
            raise
        if self._owner.evicted:
            raise Evicted()
        self.received += n
        return n


def check_json(value, depth: int) -> None:
    """Refuse a parsed body that nests deeper than ``depth`` or holds a string no UTF-8 text can be
    (a lone surrogate: JSON can spell ``"\\ud800"``, no tokenizer takes it). Iterative: no recursion
    to exhaust. Raises :class:`ApiError` (400)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, str):
            _check_text(v)
        elif isinstance(v, (dict, list)):
            if d > depth:
                raise ApiError(400, f"the request body nests deeper than {depth} levels",
                               hint=f"send at most {depth} levels of nested lists and objects")
            if isinstance(v, dict):
                stack.extend((k, d) for k in v)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(s[exc.start])
        raise ApiError(400, f"the request body holds a lone UTF-16 surrogate (\\u{bad:04x}) at character "
                            f"{exc.start} of a string", hint="send text that is valid UTF-8: a surrogate is only "
                                                              "valid as half of a \\ud83d\\ude00-style pair") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, ``[v6]``, or ``localhost``) is this machine's loopback only."""
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


def host_allowed(header: str, port: int, allowed: set[str] | None, machine_names: set[str]) -> bool:
    """Whether a ``Host`` header names a server on ``port`` known as ``allowed`` (None: a wildcard
    bind, where an address literal, which rebinding cannot fake, or one of ``machine_names`` passes)."""
    m = re.fullmatch(r"\[?([^\[\]]*?)\]?(?::(\d+))?", header.strip().lower())
    if m is None:
        return False
    name, given = m.group(1), m.group(2)
    if given is not None and int(given) != port:
        return False
    if allowed is None:
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in machine_names
    return name in allowed


def check_host(headers, server) -> None:
    """Refuse a request whose ``Host`` does not name ``server`` (DNS rebinding). Raises :class:`ApiError`."""
    host = headers.get("Host")
    if host is None:
        raise ApiError(400, "the request has no Host header", hint="send HTTP/1.1 with a Host header")
    if not server.host_allowed(host):
        raise ApiError(403, f"Host {host!r} is not this server's address", "forbidden",
                       "call the API by the address it listens on (a page that rebinds its own name to "
                       "this device is refused)")


def check_origin(headers, allowed_origins) -> str | None:
    """The request's web origin when it is allowed (None without one). Raises :class:`ApiError` (403)."""
    origin = headers.get("Origin")
    if origin is None:
        return None
    if origin not in allowed_origins:
        raise ApiError(403, f"requests from the web origin {origin!r} are not accepted", "forbidden",
                       "start the server with --allow-origin ORIGIN to let that web app call it")
    return origin


def check_token(headers, token: str | None, source: str) -> None:
    """Refuse a request without ``Authorization: Bearer <token>`` (None: no token needed), compared in
    constant time. Raises :class:`ApiError` (401)."""
    if token is None:
        return
    got = headers.get("Authorization", "")
    if not hmac.compare_digest(got.encode("utf-8", "replace"), ("Bearer " + token).encode("utf-8")):
        raise ApiError(401, "wrong API token" if got else "this route needs the API token", "unauthorized",
                       f"send Authorization: Bearer <token>; the token is in {source}",
                       headers={"WWW-Authenticate": 'Bearer realm="edgepeft"'})


def content_length(headers, required: bool = True) -> int:
    """The declared body length (0 when none and not ``required``). Raises :class:`ApiError` (411/400,
    with ``close`` set where the body's end cannot be known)."""
    if headers.get("Transfer-Encoding"):
        raise ApiError(411, "chunked request bodies are not accepted", hint="send a Content-Length", close=True)
    raw = headers.get("Content-Length")
    if raw is None:
        if required:
            raise ApiError(411, "the request has no Content-Length", hint="send the body with its length")
        return 0
    if not raw.strip().isdigit():
        raise ApiError(400, f"Content-Length {raw[:20]!r} is not a length", hint="send a decimal byte count",
                       close=True)
    return int(raw)
