"""Run real `edgepeft agent` processes on 127.0.0.1 for tests (no tests here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class AgentProcess:
    """``edgepeft agent`` in a subprocess; ``url`` and ``token`` once it is listening. Stop it with
    :meth:`stop` (SIGTERM) or :meth:`kill` (SIGKILL, a power cut for the process)."""

    def __init__(self, bundle, pub, state, *extra, env=None, timeout: float = 60.0, wait: bool = True):
        self.state = Path(state)
        self.state.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "edgepeft", "agent", str(bundle), "--trusted-key", str(pub),
               "--state", str(state), "--listen", "127.0.0.1:0", *map(str, extra)]
        self.log = open(self.state.parent / f"{self.state.name}.agent.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        self.timeout = timeout
        if wait:
            self.wait_ready()

    def wait_ready(self) -> AgentProcess:
        """Block until the agent prints its address (start several, then wait for each: they load in parallel)."""
        deadline = time.time() + self.timeout
        line = b""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(b"listening ") or not line and self.proc.poll() is not None:
                break
        if not line.startswith(b"listening "):
            self.kill()
            raise RuntimeError(f"the agent did not start: {self.logtext()[-2000:]}")
        self.url = line.split()[1].decode()
        self.token = (self.state / "token").read_text().strip()
        return self

    def device(self) -> dict:
        """GET /v1/device with the token: what it runs and its recent update results."""
        req = urllib.request.Request(self.url + "/v1/device", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def logtext(self) -> str:
        if not self.log.closed:  # kill() closes it; the file still holds what the agent said
            self.log.flush()
        return (self.state.parent / f"{self.state.name}.agent.log").read_text(errors="replace")

    def chat(self, adapter: str, text: str, max_tokens: int = 8) -> dict:
        body = {"model": adapter, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}
        req = urllib.request.Request(self.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()
        self.log.close()


def run_cli(*args, env=None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
