"""Helpers for the attack tests (no tests here): a raw serial client that speaks frames, a static HTTP
server that logs what it served, a fleet-signed TUF index with any content, and a small poll loop."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def wait_for(probe, timeout: float = 60.0, every: float = 0.2):
    """Call ``probe()`` until it returns something truthy; return that (or the last value at the deadline)."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not value and time.monotonic() < deadline:
        time.sleep(every)
        value = probe()
    return value


class SerialClient:
    """The far end of a serial line, frame by frame (what an attacker or a host's own code sends)."""

    def __init__(self, port: str, baud: int):
        import serial

        from edgepeft.transport.framing import FrameDecoder

        self.ser = serial.Serial(port, baud, timeout=0.02, write_timeout=30)
        self.dec = FrameDecoder()

    def send(self, kind: int, body: bytes = b"") -> None:
        from edgepeft.transport.framing import encode_frame

        self.ser.write(encode_frame(kind, body))

    def raw(self, data: bytes) -> None:
        self.ser.write(data)

    def frames(self, wait: float) -> list[tuple[int, bytes]]:
        out, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            out += list(self.dec.feed(self.ser.read(max(1, self.ser.in_waiting))))
            if out:
                break
        return out

    def ask(self, kind: int, body: bytes = b"", timeout: float = 30.0) -> dict | None:
        """Send one request and return its JSON answer, resending once a second; None if none came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send(kind, body)
            until = min(deadline, time.monotonic() + 1.0)
            while time.monotonic() < until:
                for k, b in self.frames(0.1):
                    if k == ord("J") and b[:1] == bytes([kind]):
                        return json.loads(b[1:].decode("utf-8"))
        return None

    def close(self) -> None:
        self.ser.close()


class LoggingStaticServer:
    """``python -m http.server`` on 127.0.0.1 whose access log goes to a file, so a test can count fetches."""

    def __init__(self, root, log: Path):
        self.log_path = Path(log)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                                      "--directory", str(root)], stdout=subprocess.PIPE, stderr=self._log)
        line = self.proc.stdout.readline().decode()
        self.url = f"http://127.0.0.1:{line.split(' port ')[1].split()[0]}"

    def fetches(self, fragment: str) -> int:
        """How many GET requests named ``fragment`` (a file name part) were answered so far."""
        self._log.flush()
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines()
                   if '"GET ' in line and fragment in line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()
        self._log.close()


def repo_keys(key_path) -> dict:
    from edgepeft.contracts.signing import load_private_key
    from edgepeft.release.tuf_repo import ROLES

    return {r: load_private_key(key_path) for r in ROLES}


def sign_targets(repo: Path, key_path, files: dict[str, bytes]) -> None:
    """Put ``files`` (target path -> bytes, e.g. ``edgepeft/index.json``) into the repository as targets,
    signed with the fleet key ``key_path`` like ``edgepeft publish`` does: what a holder of the fleet key
    (or a bug on the publishing side) can make a device believe."""
    from tuf.api.metadata import Metadata, TargetFile
    from tuf.api.serialization.json import JSONSerializer

    from edgepeft.release.tuf_repo import TufRepository

    keys = repo_keys(key_path)
    meta = Path(repo) / "metadata"
    n = max(int(p.name.split(".")[0]) for p in meta.glob("*.targets.json"))
    md = Metadata.from_file(str(meta / f"{n}.targets.json"))
    for path, data in files.items():
        tf = TargetFile.from_data(path, data, ["sha256"])
        dest = Path(repo) / "targets" / Path(path).parent / f"{tf.hashes['sha256']}.{Path(path).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        md.signed.targets[path] = tf
    md.signed.version = n + 1
    md.signatures.clear()
    from securesystemslib.signer import CryptoSigner

    md.sign(CryptoSigner(keys["targets"]))
    (meta / f"{n + 1}.targets.json").write_bytes(md.to_bytes(JSONSerializer(compact=False)))
    TufRepository(repo, keys).refresh()


def index_of(repo: Path) -> dict:
    """The repository's current ``edgepeft/index.json`` (as published)."""
    from tuf.api.metadata import Metadata

    meta = Path(repo) / "metadata"
    n = max(int(p.name.split(".")[0]) for p in meta.glob("*.targets.json"))
    tf = Metadata.from_file(str(meta / f"{n}.targets.json")).signed.targets["edgepeft/index.json"]
    return json.loads((Path(repo) / "targets/edgepeft" / f"{tf.hashes['sha256']}.index.json").read_text())


def store_snapshot(state: Path) -> dict[str, bytes]:
    """Every file of a device's adapter store and bundle state, by relative path (to prove nothing changed)."""
    out = {}
    for sub in ("adapters", "bundles"):
        root = Path(state) / sub
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    out[p.relative_to(state).as_posix()] = p.read_bytes()
    for name in ("bundle.json",):
        if (Path(state) / name).is_file():
            out[name] = (Path(state) / name).read_bytes()
    return out
