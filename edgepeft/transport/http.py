"""The HTTP link to a device agent (stdlib ``http.client``; keep-alive, one connection)."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from ..contracts.jsontext import loads_untrusted
from ..errors import TransportError, UsageError
from .link import Conflict, LinkDown

CHUNK = 1 << 20


class HttpLink:
    """``HttpLink("http://127.0.0.1:8731", token)``: talks to ``edgepeft agent``'s update API.

    Raises :class:`LinkDown` for a dropped or refused connection (the push resumes),
    :class:`Conflict` when the device holds another offset, :class:`TransportError` for
    answers that mean the request itself is wrong (bad token, unknown route).
    """

    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0, chunk: int = CHUNK):
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise UsageError(f"--to {url!r} is not an http://HOST:PORT address",
                             hint="e.g. --to http://127.0.0.1:8731 (serial devices: --to serial:///dev/ttyUSB0)")
        self.url, self.host, self.port = url, u.hostname, u.port or 80
        self.token, self.timeout, self.chunk = token, timeout, chunk
        self._conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        h = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        h |= headers or {}
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=h)
                resp = self._conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2 or isinstance(exc, (ConnectionRefusedError, socket.timeout)):
                    raise LinkDown(f"{self.url}: {exc or type(exc).__name__}") from exc
        try:
            payload = loads_untrusted(data or b"{}")
        except ValueError:  # also too deep a nesting: a device's answer must not crash a push or a rollout
            payload = None
        if not isinstance(payload, dict):
            payload = {"error": {"message": data[:200].decode("utf-8", "replace")}}
        return resp.status, payload

    @staticmethod
    def _fail(status: int, payload: dict):
        err = payload.get("error") if isinstance(payload.get("error"), dict) else {}
        raise TransportError(f"the device answered {status}: {err.get('message', payload)}", hint=err.get("hint"))

    def status(self, id: str) -> dict | None:
        code, payload = self._request("GET", f"/v1/updates/{id}")
        if code == 404:
            return None
        if code != 200:
            self._fail(code, payload)
        return payload

    def send(self, id: str, data: bytes, offset: int, progress: Callable[[int], None]) -> dict:
        """PUT the package from ``offset`` in chunks (the first ends at the envelope, so a refusal comes early)."""
        from ..contracts.update import envelope_length
        from ..errors import BundleError

        try:
            env = envelope_length(data) or 0
        except BundleError:  # not a package: let the device say so
            env = 0
        st: dict = {}
        while offset < len(data):
            end = env if offset < env else min(len(data), offset + self.chunk)
            code, st = self._request("PUT", f"/v1/updates/{id}", body=data[offset:end],
                                     headers={"Upload-Offset": str(offset), "Upload-Length": str(len(data)),
                                              "Content-Type": "application/offset+octet-stream"})
            if code == 409:
                raise Conflict(int(st.get("offset", 0)))
            if code == 422:
                return st
            if code == 503:
                raise LinkDown(f"the device is busy: {(st.get('error') or {}).get('message')}")
            if code != 200:
                self._fail(code, st)
            offset = int(st.get("offset", end))
            progress(offset)
            if st.get("status") not in (None, "receiving"):
                break
        return st

    def device(self) -> dict:
        code, payload = self._request("GET", "/v1/device")
        if code != 200:
            self._fail(code, payload)
        return payload

    def rollback(self, name: str) -> dict:
        return self.adapter_action(name, "rollback")

    def adapters(self) -> dict:
        """What the agent serves: ``{"data": [adapters], "warnings": [...]}``."""
        code, payload = self._request("GET", "/v1/adapters")
        if code != 200:
            self._fail(code, payload)
        return payload

    def adapter_action(self, name: str, action: str) -> dict:
        """POST ``/v1/adapters/<name>/<action>`` (rollback, unload, load); raises :class:`TransportError`."""
        from urllib.parse import quote

        code, payload = self._request("POST", f"/v1/adapters/{quote(name, safe='')}/{action}", body=b"")
        if code != 200:
            self._fail(code, payload)
        return payload

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
