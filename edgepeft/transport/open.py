"""Open a link to a device from its address: ``http://HOST:PORT`` (with the device token) or
``serial:///dev/X?baud=N``. Used by ``edgepeft push``/``status`` and the fleet controller."""

from __future__ import annotations

import sys

from ..errors import UsageError


def read_token_file(path: str, wait: float = 60.0) -> str:
    """The device token from ``path``. An agent started a moment ago writes it on its first start,
    so a missing file is waited for (up to ``wait`` seconds) before it is an error."""
    import time
    from pathlib import Path

    p, deadline, said = Path(path), time.monotonic() + wait, False
    while not p.is_file():
        if time.monotonic() > deadline:
            raise UsageError(f"token file {p} does not exist",
                             hint="the agent writes STATE/token on its first start; or pass --token")
        if not said:
            print(f"waiting for {p} (is the agent starting?)", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.2)
    try:
        return p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read token file {p}: {exc.strerror or exc}", hint="check its permissions") from exc


def open_link(to: str, token: str | None, token_file: str | None):
    """An HTTP or serial link from ``--to`` (http://HOST:PORT or serial:///dev/ttyX?baud=N). HTTP needs the
    token; serial takes it when given (for rollback). Raises :class:`UsageError`, :class:`TransportError`."""
    from urllib.parse import parse_qs, urlsplit

    if to.startswith("serial:"):
        from .serial_link import SerialLink

        u = urlsplit(to)
        q = parse_qs(u.query)
        try:
            baud = int(q.get("baud", ["115200"])[0])
        except ValueError as exc:
            raise UsageError(f"--to {to!r}: baud must be a number", hint="e.g. serial:///dev/ttyUSB0?baud=115200") from exc
        if not u.path:
            raise UsageError(f"--to {to!r} names no serial port", hint="e.g. serial:///dev/ttyUSB0?baud=115200")
        # pushes need no token (packages are signed); a rollback proves it without sending it
        return SerialLink(u.path, baud, token=read_token_file(token_file) if token_file else token or None)
    if token_file:
        token = read_token_file(token_file)
    if not token:
        raise UsageError("the device's update API needs its token", hint="pass --token T or --token-file FILE")
    from .http import HttpLink

    return HttpLink(to, token)
