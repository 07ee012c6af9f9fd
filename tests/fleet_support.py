"""A real MQTT broker (Debian's mosquitto) on 127.0.0.1 for fleet tests (no tests here).

`make test` installs mosquitto (apt) when it is missing; if it still cannot be found, the fleet tests skip with
a loud reason rather than pretend.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """``mosquitto -c CONF`` listening on 127.0.0.1:PORT, anonymous, no persistence. Stop with :meth:`stop`."""

    def __init__(self, workdir: Path, extra: str = "", tls: bool = False):
        """``extra``: more configuration lines; with ``tls``, ``{tls_port}`` in them is a second free port."""
        exe = find_mosquitto()
        if exe is None:
            raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        if tls:
            extra = extra.replace("{tls_port}", str(self.tls_port))
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        f"max_queued_messages 100000\nmax_inflight_messages 1000\nlog_type error\n{extra}")
        self.log = open(workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=self.log, stderr=self.log)
        deadline = time.time() + 15
        for port in [p for p in (self.port, self.tls_port) if p]:
            while time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"mosquitto exited: see {workdir / 'mosquitto.log'}") from None
                    time.sleep(0.05)
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
