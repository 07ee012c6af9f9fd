"""The device agent's HTTP API: the inference routes plus updates, status and rollback.

Update routes (all need ``Authorization: Bearer <device token>``):

- ``GET  /v1/device``: what the device runs (base, bundle, adapters and versions, floors,
  failed versions, recent results, partial uploads);
- ``GET  /v1/updates/<id>``: one package's status (offset held, received, verified,
  installed, healthy / rejected / rolled-back with the reason);
- ``PUT  /v1/updates/<id>``: a chunk of the package at ``Upload-Offset`` (``Upload-Length``:
  the package's size); answers the new status, 409 with the offset held when the chunk is
  not where the device is, 422 when the package is refused (with the reason);
- ``POST /v1/adapters/<name>/rollback`` (``bundle`` rolls back the bundle);
- ``POST /v1/adapters/<name>/unload`` and ``.../load``: stop serving an adapter (remembered
  across restarts) and serve it again.

The id is the SHA-256 of the package's envelope (see :mod:`edgepeft.contracts.update`). The guards
are the inference API's (:mod:`edgepeft.runtime.server`): the same token, a ``Host`` header that
names another host is refused (DNS rebinding), and browser requests are refused unless their
origin was allowed. An upload chunk may take ``request_timeout`` plus one second per
``min_body_rate`` bytes to arrive.
"""

from __future__ import annotations

import re

from ..errors import AdapterError, EdgePeftError, StoreError, TransportError
from ..runtime.server import ApiError, ApiHandler, EngineServer
from .link import MAX_CHUNK, Busy, Conflict

_UPDATE = re.compile(r"^/v1/updates/([0-9a-f]{64})$")
_ROLLBACK = re.compile(r"^/v1/adapters/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/rollback$")


class AgentHandler(ApiHandler):
    """The inference routes plus the update API, behind the same guards."""

    def do_GET(self):
        m = _UPDATE.match(self.path)
        if self.path == "/v1/device":
            return self._dispatch(lambda: self._send(200, self.server.device.status()))
        if m is not None:
            return self._dispatch(self._update_status, m.group(1))
        return super().do_GET()

    def do_PUT(self):
        m = _UPDATE.match(self.path)
        if m is None:
            return super().do_PUT()
        return self._dispatch(self._put, m.group(1))

    def do_POST(self):
        m = _ROLLBACK.match(self.path)
        if m is None:
            return super().do_POST()
        return self._dispatch(self._rollback, m.group(1))

    # -- routes --------------------------------------------------------------------------------
    def _update_status(self, id: str):
        st = self.server.device.receiver.status(id)
        if st is None:
            raise ApiError(404, "this device has no update with that id", "not_found", "send it from offset 0")
        self._send(200, st)

    def _put(self, id: str):
        try:
            offset = int(self.headers.get("Upload-Offset", ""))
            total = self.headers.get("Upload-Length")
            total = int(total) if total is not None else None
        except ValueError:
            raise ApiError(400, "Upload-Offset and Upload-Length must be whole numbers") from None
        if offset < 0:
            raise ApiError(400, f"Upload-Offset {offset} is negative")
        data = self._read(MAX_CHUNK)
        try:
            st = self.server.device.receiver.write(id, offset, data, total)
        except Conflict as exc:
            return self._send(409, {"error": {"message": exc.message, "type": "conflict", "hint": exc.hint,
                                              "code": 409}, "offset": exc.offset})
        except Busy as exc:
            raise ApiError(503, exc.message, "busy", exc.hint) from exc
        except TransportError as exc:
            raise ApiError(400, exc.message, "invalid_request_error", exc.hint) from exc
        self._send(422 if st.get("status") == "rejected" else 200, st)

    def _rollback(self, name: str):
        if self._unread:
            self._read(self.server.limits.max_body_bytes)  # any body is ignored
        try:
            self._send(200, self.server.device.rollback(name, "requested over the agent API"))
        except StoreError as exc:
            raise ApiError(409, exc.message, "conflict", exc.hint) from exc
        except EdgePeftError as exc:
            raise ApiError(400, exc.message, type(exc).__name__, exc.hint) from exc


class AgentServer(EngineServer):
    """The agent's HTTP server: inference on the device's current engine, plus the update API.
    ``options`` are :class:`~edgepeft.runtime.server.EngineServer`'s (limits, origins, expose)."""

    def __init__(self, device, token: str, host: str = "127.0.0.1", port: int = 0, **options):
        self.device = device
        options.setdefault("token_source", str(device.state_dir / "token"))
        super().__init__(device.engine, host, port, handler=AgentHandler, token=token, **options)

    def get_engine(self):
        return self.device.engine

    def adapter_action(self, name: str, action: str) -> dict:
        """Unload or load again through the device, which remembers it across restarts."""
        try:
            return self.device.unload(name) if action == "unload" else self.device.load(name)
        except StoreError as exc:
            raise AdapterError(exc.message, hint=exc.hint) from exc
