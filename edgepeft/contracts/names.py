"""The one name rule and the one SHA-256 helper of every contract.

Adapter names, versions' file names and bundle paths travel into file names on
a device, so they follow a single tame alphabet, checked in one place.
Digests are lowercase hex SHA-256 everywhere (manifests, update packages, the
store, the audit log); only user-facing text may prefix them with ``sha256:``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import SpecError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_name(value) -> bool:
    """True when ``value`` is a string that may become a file name on a device."""
    return isinstance(value, str) and bool(NAME_RE.match(value)) and value not in (".", "..")


def check_name(value, source: str, field_name: str) -> str:
    """Return ``value`` if it follows the name rule; raise :class:`SpecError` naming source and field."""
    if not is_name(value):
        raise SpecError(source, field_name, f"{value!r} is not a valid name", hint=f"use {NAME_RULE}")
    return value


def sha256_bytes(data) -> str:
    """Hex SHA-256 of a bytes-like object."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (bundles can be larger than memory on a device)."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
