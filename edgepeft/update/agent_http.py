"""The device agent's HTTP API: the inference routes plus updates, status and rollback.

Update routes (all need ``Authorization: Bearer <device token>``):

- ``GET  /v1/device``: what the device runs (base, bundle, adapters and versions, floors,
  failed versions, recent results, partial uploads);
- ``GET  /v1/updates/<id>``: one package's status (offset held, received, verified,
  installed, healthy / rejected / rolled-back with the reason);
- ``PUT  /v1/updates/<id>``: a chunk of the package at ``Upload-Offset`` (``Upload-Length``:
  the package's size); answers the new status, 409 with the offset held when the chunk is
  not where the device is, 422 when the package is refused (with the reason);
- ``POST /v1/adapters/<name>/rollback`` (``bundle`` rolls back the bundle).

The id is the SHA-256 of the package's envelope (see :mod:`edgepeft.spec.update`). A
``Host`` header that names another host is refused (DNS rebinding), and so are browser
requests from any origin: update clients are programs, not web pages.
"""

from __future__ import annotations

import hmac
import re

from ..errors import EdgePeftError, StoreError, TransportError
from ..runtime.server import ApiHandler, EngineServer
from .receiver import MAX_CHUNK, Busy, Conflict

_UPDATE = re.compile(r"^/v1/updates/([0-9a-f]{64})$")
_ROLLBACK = re.compile(r"^/v1/adapters/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/rollback$")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class AgentHandler(ApiHandler):
    timeout = 60  # seconds a client may stay silent mid-request (a stalled upload frees its thread)

    # -- guards --------------------------------------------------------------------------------
    def _authorized(self) -> bool:
        """Token, Host and Origin checks for the update routes; sends the error and returns False."""
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        allowed = self.server.allowed_hosts
        if allowed and host not in allowed:
            self._error(403, f"Host {host!r} is not this device's address", "forbidden",
                        "call the agent by the address it listens on")
            return False
        if self.headers.get("Origin"):
            self._error(403, "browser requests are not accepted on the update API", "forbidden",
                        "use `edgepeft push` or an HTTP client, not a web page")
            return False
        got = self.headers.get("Authorization", "")
        want = "Bearer " + self.server.token
        if not hmac.compare_digest(got.encode("utf-8", "replace"), want.encode("utf-8")):
            self._error(401, "missing or wrong device token" if got else "this route needs the device token",
                        "unauthorized", "pass --token (the agent printed where its token file is)")
            return False
        return True

    def _drain(self) -> None:
        """Read and drop a request body we refuse, so the connection stays usable."""
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = 0
        if 0 < n <= MAX_CHUNK:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    # -- routes --------------------------------------------------------------------------------
    def do_GET(self):
        m = _UPDATE.match(self.path)
        if self.path == "/v1/device" or m:
            if not self._authorized():
                return None
            if m is None:
                return self._send(200, self.server.device.status())
            st = self.server.device.receiver.status(m.group(1))
            if st is None:
                return self._error(404, "this device has no update with that id", "not_found",
                                   "send it from offset 0")
            return self._send(200, st)
        return super().do_GET()

    def do_PUT(self):
        m = _UPDATE.match(self.path)
        if m is None:
            self._drain()
            return self._error(404, f"no route {self.path}", "not_found")
        if not self._authorized():
            self._drain()
            return None
        try:
            offset = int(self.headers.get("Upload-Offset", ""))
            n = int(self.headers.get("Content-Length", ""))
            total = self.headers.get("Upload-Length")
            total = int(total) if total is not None else None
        except ValueError:
            self._drain()
            return self._error(400, "Upload-Offset and Content-Length must be whole numbers", "invalid_request_error")
        if n < 0 or n > MAX_CHUNK or offset < 0:
            self.close_connection = True
            return self._error(413 if n > MAX_CHUNK else 400, f"chunks must be 0-{MAX_CHUNK} bytes at offset >= 0",
                               "invalid_request_error", "send smaller chunks")
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            return None  # the client went away mid-chunk; the device keeps what it had before this chunk
        try:
            st = self.server.device.receiver.write(m.group(1), offset, data, total)
        except Conflict as exc:
            return self._send(409, {"error": {"message": exc.message, "type": "conflict", "hint": exc.hint},
                                    "offset": exc.offset})
        except Busy as exc:
            return self._error(503, exc.message, "busy", exc.hint)
        except TransportError as exc:
            return self._error(400, exc.message, "invalid_request_error", exc.hint)
        return self._send(422 if st.get("status") == "rejected" else 200, st)

    def do_POST(self):
        m = _ROLLBACK.match(self.path)
        if m is None:
            return super().do_POST()
        self._drain()
        if not self._authorized():
            return None
        try:
            return self._send(200, self.server.device.rollback(m.group(1), "requested over the agent API"))
        except StoreError as exc:
            return self._error(409, exc.message, "conflict", exc.hint)
        except EdgePeftError as exc:
            return self._error(400, exc.message, type(exc).__name__, exc.hint)


class AgentServer(EngineServer):
    """The agent's HTTP server: inference on the device's current engine, plus the update API."""

    def __init__(self, device, token: str, host: str = "127.0.0.1", port: int = 0):
        self.device, self.token = device, token
        super().__init__(device.engine, host, port, handler=AgentHandler)
        bound = self.server_address[0]
        # on loopback, only loopback names; on a LAN address, that address or loopback names
        self.allowed_hosts = None if bound in ("0.0.0.0", "::") else LOOPBACK | {bound}

    def get_engine(self):
        return self.device.engine

