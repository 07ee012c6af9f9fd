"""The one name rule, the one id rule and the one SHA-256 helper of every contract.

Adapter names, versions' file names and bundle paths travel into file names on
a device, so they follow a single tame alphabet, checked in one place. Ids
(update packages, uploads, index entries, refused targets) are lowercase hex
SHA-256. Both rules are full matches (``re.fullmatch``): a ``$``-anchored
pattern also passes a trailing newline ("alpha\n" made a folder with a newline).
Anything that becomes a path under a device folder goes through
:func:`path_inside`. Digests are lowercase hex SHA-256 everywhere (manifests,
update packages, the store, the audit log); only user-facing text may prefix
them with ``sha256:``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import SpecError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
ID_RE = re.compile(r"[0-9a-f]{64}")
ID_RULE = "64 lowercase hex digits (a SHA-256)"


def is_name(value) -> bool:
    """True when ``value`` is a string that may become a file name on a device."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None and value not in (".", "..")


def is_id(value) -> bool:
    """True when ``value`` is an id (lowercase hex SHA-256): the only form an id may take on a device."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def path_inside(folder, name: str, suffix: str = "") -> Path:
    """``folder/<name><suffix>`` for a ``name`` that follows the name or id rule, checked to resolve inside
    ``folder`` (no separators, no links out). Raises :class:`SpecError` naming the value."""
    if not (is_name(name) or is_id(name)) or "/" in suffix or "\\" in suffix:
        raise SpecError("path", "name", f"{str(name)[:80]!r} cannot name a file on a device",
                        hint=f"use {NAME_RULE}, or an id of {ID_RULE}")
    folder = Path(folder)
    path = folder / f"{name}{suffix}"
    if path.resolve().parent != folder.resolve():
        raise SpecError("path", "name", f"{name!r} leads outside {folder}", hint="remove the link in that folder")
    return path


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
