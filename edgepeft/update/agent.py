"""The device agent: one process that serves inference and takes updates over every configured link.

``Agent(device, ...)`` starts the HTTP API (inference + updates, see
:mod:`edgepeft.transport.http_agent`), and, when configured, a serial listener
(:mod:`edgepeft.transport.serial_agent`), a pull loop on a TUF repository
(:mod:`edgepeft.transport.tuf_pull`) and an MQTT job client for devices behind NAT
(:mod:`edgepeft.transport.mqtt_agent`).
All links hand packages to the same :class:`~edgepeft.update.device.Device`,
so the same checks and the same install transaction apply whichever way an
update came.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
from pathlib import Path

from ..errors import UsageError
from ..fsio import write_atomic
from ..runtime.http.guards import is_loopback

TOKEN_FILE = "token"


def load_token(state_dir: Path, token_file: str | os.PathLike | None = None, *, name: str = TOKEN_FILE
               ) -> tuple[str, Path]:
    """The device token: read from ``token_file``, or generated on first start into the state
    folder as ``name`` (mode 0600). Raises :class:`UsageError` for an unreadable or too short token."""
    path = Path(token_file) if token_file else Path(state_dir) / name
    if token_file is None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, secrets.token_urlsafe(32) + "\n", mode=0o600, keep_existing=True)  # of two starts, one token wins
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the device token {path}: {exc.strerror or exc}",
                         hint="pass --token-file FILE holding the token") from exc
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UsageError(f"the device token in {path} is too short or has spaces",
                         hint="use at least 16 characters, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token, path


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); raises :class:`UsageError`."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r} is not HOST:PORT", hint="e.g. --listen 127.0.0.1:8731")
    return host.strip("[]") or "127.0.0.1", int(port)


class Agent:
    """The agent's links around one :class:`Device`. ``start()`` returns once all are listening."""

    def __init__(self, device, *, token: str, listen: tuple[str, int] = ("127.0.0.1", 0), serial: dict | None = None,
                 pull: dict | None = None, mqtt: dict | None = None, http: dict | None = None,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True)):
        """``http``: options of the HTTP API (:class:`~edgepeft.runtime.http.EngineServer`'s
        ``limits``, ``allowed_origins``, ``allowed_hosts``, ``expose``)."""
        self.device, self.token, self.listen, self.log = device, token, listen, log
        self.http_options = dict(http or {})
        self.serial_options, self.pull_options, self.mqtt_options = serial, pull, mqtt
        self.http = None
        self.serial = None
        self.puller = None
        self.mqtt = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def start(self) -> Agent:
        from ..transport.http_agent import AgentServer

        host, port = self.listen
        self.http = AgentServer(self.device, self.token, host, port, **self.http_options)
        if not is_loopback(host):
            self.log(f"WARNING: the agent listens on {host}, beyond this device: anyone who can reach it "
                     "and holds the token can install updates and use the model; put a firewall and TLS in front")
        t = threading.Thread(target=self.http.serve_forever, name="edgepeft-agent-http", daemon=True)
        t.start()
        self._threads.append(t)
        if self.serial_options:
            from ..transport.serial_agent import SerialAgent

            self.serial = SerialAgent(self.device, **self.serial_options, token=self.token, log=self.log)
            self.device.links["serial"] = self.serial.describe
            self._threads.append(self.serial.start())
        if self.pull_options:
            from ..transport.tuf_pull import Puller

            self.puller = Puller(self.device, **self.pull_options, log=self.log)
            self.device.links["pull"] = self.puller.describe
            self._threads.append(self.puller.start())
        if self.mqtt_options:
            from ..transport.mqtt_agent import MqttAgent

            self.mqtt = MqttAgent(self.device, **self.mqtt_options, log=self.log)
            self._threads.append(self.mqtt.start())
        return self

    @property
    def url(self) -> str:
        return self.http.url

    def wait(self) -> None:
        """Block until :meth:`stop` (or Ctrl-C / SIGTERM in the CLI)."""
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.puller is not None:
            self.puller.stop()
        if self.serial is not None:
            self.serial.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.device.close()
