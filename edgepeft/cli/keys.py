"""The trusted public keys a device-side command verifies with: ``--trusted-key`` or ``$EDGEPEFT_TRUSTED_KEYS``."""

from __future__ import annotations

import os

from ..errors import UsageError


def trusted_keys(given) -> list[str]:
    """Paths of the trusted keys; raises :class:`UsageError` when there are none."""
    keys = list(given or ())
    env = os.environ.get("EDGEPEFT_TRUSTED_KEYS")
    if not keys and env:
        keys = [k for k in env.split(os.pathsep) if k]
    if not keys:
        raise UsageError("no trusted public key given, so nothing can be verified",
                         hint="pass --trusted-key KEY.pub (from `edgepeft keygen`) or set EDGEPEFT_TRUSTED_KEYS")
    return keys
