"""The device's seal on its own state files: an HMAC with a device-local secret key.

Why: the version floor and the pointer to the serving version live in plain JSON files
(``adapters/<name>/state.json``, ``bundle.json``). Signed packages stop anyone from
planting a package, but a local user who can write the state folder could lower a floor
or point ``current`` at a captured older package. Each state file therefore carries
``"mac"``: HMAC-SHA256 under ``STATE/device.key`` (32 random bytes, created on first start,
mode 0600, readable only by the agent's user) over the file's path inside the state folder
and its content. A file edited without the key, or moved from another adapter, fails the
check; the device quarantines it and reports it (see :mod:`.store`).

What it does not do: a user who can read the key (root, the agent's own user) can forge a
seal, and a whole earlier copy of a state file (with its then-valid seal) or a deleted one
cannot be told from a genuine one by software alone. :class:`MonotonicCounter` names the hook
for hardware that can (a TPM NV counter, a secure element); it is not wired in yet (see
docs/threat-model/http-store.md for how it is meant to be used).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Protocol

KEY_FILE = "device.key"


class MonotonicCounter(Protocol):
    """A counter that only goes up and that software on the device cannot roll back (a TPM 2.0 NV
    counter: TPM2_NV_Increment / TPM2_NV_Read). Intended use: one sealed record of every floor,
    advanced with the counter at each commit and refused when it records less than ``read()``."""

    def read(self) -> int: ...

    def advance(self) -> int: ...


class Seal:
    """Seals and checks the device's state files. ``adopt``: this start created the key, so files
    written before sealing existed (an upgraded device) are accepted once and sealed at their next
    write; otherwise a file without a seal is refused like a tampered one."""

    def __init__(self, state_dir: str | Path):
        from .agent import load_token

        self.root = Path(state_dir)
        self.adopt = not (self.root / KEY_FILE).exists()
        key, _ = load_token(self.root, None, name=KEY_FILE)  # 0600, written whole, one winner
        self._key = hashlib.sha256(key.encode("utf-8")).digest()

    def _mac(self, path: Path, body: dict) -> str:
        label = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        data = json.dumps([label, body], sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def seal(self, path: Path, body: dict) -> dict:
        """``body`` with its seal, for writing to ``path``."""
        return dict(body) | {"mac": self._mac(path, body)}

    def open(self, path: Path, data) -> dict:
        """The content of a sealed file read from ``path``; raises ValueError when the seal is missing
        (after the first sealed start) or wrong."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        body = {k: v for k, v in data.items() if k != "mac"}
        mac = data.get("mac")
        if mac is None and self.adopt:
            return body
        want = self._mac(path, body).encode("ascii")
        if not isinstance(mac, str) or not hmac.compare_digest(mac.encode("utf-8", "replace"), want):
            raise ValueError("its seal does not match (edited without the device key, or copied from elsewhere)")
        return body
