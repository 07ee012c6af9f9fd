"""JSON this process did not write (a peer's message, a device's answer, a file from elsewhere).

One parse whose every failure is a ``ValueError``: ``json.loads`` raises ``RecursionError`` for a
nesting deeper than the interpreter's recursion limit (30,000 ``[`` fit in 30 KB), which an
``except ValueError`` does not catch; on a server thread it became an HTTP 500, on a listener a crash.
"""

from __future__ import annotations

import json
from typing import Any


def loads_untrusted(raw: str | bytes | bytearray, **options: Any) -> Any:
    """``json.loads(raw, **options)``; malformed JSON, bytes that are not text and a too-deep nesting all
    raise ``ValueError`` (callers decode bytes themselves where they require UTF-8)."""
    try:
        return json.loads(raw, **options)
    except RecursionError:
        raise ValueError("it nests too deeply to be a message of this project") from None
