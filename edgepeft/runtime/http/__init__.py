"""The device's local HTTP API (stdlib only): OpenAI-style inference routes, plus routes others add.

- :mod:`.guards`: limits, deadlines, request bodies, and who may call (token, ``Host``, ``Origin``);
- :mod:`.openai`: OpenAI's request and response shapes (choices, log-probabilities, streamed chunks, usage);
- :mod:`.server`: :class:`EngineServer`, its handler, and the public route hook (:class:`Route`,
  :class:`Request`) that the device agent's update API uses; a handler subclass serving other paths (the
  fleet dashboard's) runs them through ``ApiHandler.dispatch`` and answers with ``send_json``/``send_body``.
"""

from __future__ import annotations

from .guards import ApiError, Limits, is_loopback
from .server import ApiHandler, EngineServer, Request, Route, start_server

__all__ = ["ApiError", "ApiHandler", "EngineServer", "Limits", "Request", "Route", "is_loopback", "start_server"]
