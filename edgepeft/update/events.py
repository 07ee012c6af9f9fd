"""The agent's event log: one line per install, rejection, rollback and request, on stderr (journald and
log shippers read it), as text or, with ``edgepeft agent --log-json``, one JSON object per line.

Lines carry what an operator needs to follow a device (names, versions, statuses, reasons, timings),
never request text: requests are logged by kind, adapter, status and time only.
"""

from __future__ import annotations

import json
import sys
import threading
import time

_WORDS = {"healthy": "installed", "rejected": "rejected", "rolled-back": "rolled back"}


class EventLog:
    """Write events to ``stream`` (default: stderr at write time); thread-safe, never raises."""

    def __init__(self, *, json_lines: bool = False, stream=None):
        self.json_lines, self.stream = json_lines, stream
        self._lock = threading.Lock()

    def emit(self, event: str, text: str, **fields) -> None:
        """One event: ``text`` for people, ``fields`` for machines (the JSON form carries both)."""
        now = time.time()
        if self.json_lines:
            line = json.dumps({"ts": round(now, 3), "event": event, **fields, "message": text},
                              ensure_ascii=False, default=str)
        else:
            line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))} {event:<10} {text}"
        try:
            with self._lock:
                stream = self.stream or sys.stderr
                stream.write(line + "\n")
                stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop an install
            pass

    def installed(self, result) -> None:
        """A finished install (an :class:`~edgepeft.update.installer.InstallResult`): installed, already
        installed, rejected or rolled back, with the reason."""
        r = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        status, reason = r.get("status"), r.get("reason") or ""
        already = status == "healthy" and reason.startswith("already installed")
        event = "already" if already else _WORDS.get(status, status or "install")
        what = f"{r.get('type', 'adapter')} {r.get('name')} v{r.get('version')}" if r.get("version") is not None \
            else f"update {str(r.get('id') or '')[:12]}"
        text = f"{what}: {'already installed' if already else event}" + \
            (f" ({reason})" if reason and not already else "") + f" in {float(r.get('seconds') or 0):.1f} s"
        self.emit(event.replace(" ", "-"), text, **{k: r.get(k) for k in ("id", "type", "name", "version",
                                                                           "status", "reason", "seconds")})

    def rolled_back(self, info: dict, reason: str) -> None:
        """A rollback asked for by an operator (``edgepeft adapters rollback``)."""
        frm = info.get("rolled_back_from")
        self.emit("rollback", f"{info.get('name')} v{frm} -> v{info.get('version')} ({reason})",
                  name=info.get("name"), version=info.get("version"), rolled_back_from=frm, reason=reason)

    def request(self, kind: str, status: str, chosen, extra: dict) -> None:
        """One inference request: its kind, the adapter versions that answered, status and time."""
        adapters = [f"{a.name} v{a.version}" for a in chosen or []]
        ms = extra.get("ms")
        self.emit("request", f"{kind} {status} with {', '.join(adapters) or 'the bare base'}"
                  + (f" in {ms:.0f} ms" if isinstance(ms, (int, float)) else ""),
                  kind=kind, status=status, adapters=adapters, ms=ms)
