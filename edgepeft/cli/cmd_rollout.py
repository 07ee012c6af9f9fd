"""``edgepeft rollout start|status|resume|abort``: move a fleet to an update in waves, from a plan file."""

from __future__ import annotations

import json
import os

import click

DB_HELP = "Rollout state (SQLite) [default: $EDGEPEFT_ROLLOUT_DB or ./edgepeft-rollouts.sqlite]."


def _db(path):
    from ..fleet.state import RolloutDB

    return RolloutDB(path or os.environ.get("EDGEPEFT_ROLLOUT_DB") or "edgepeft-rollouts.sqlite")


def _print_report(rep: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rep, indent=2, default=str))
        return
    counts = ", ".join(f"{k} {v}" for k, v in sorted(rep["counts"].items()))
    click.echo(f"rollout {rep['id']}: {rep['status']}" + (f" ({rep['reason']})" if rep.get("reason") else ""))
    click.echo(f"devices: {counts}; {rep['waves']} wave(s), last rate {rep['rate_per_minute']:.0f}/min")
    if rep.get("refused"):
        click.echo("ignored MQTT messages: " + ", ".join(f"{k} {v}" for k, v in sorted(rep["refused"].items()))
                   + " (only reports signed by a device's enrolled key count)")
    rows = [("device", "link", "group", "status", "tries", "wave", "reason")]
    for d in rep["devices"]:
        rows.append((d["device"], d["link"], d.get("group") or "-", d["status"], str(d["attempts"]),
                     "-" if d["wave"] is None else str(d["wave"]), _cut(d.get("reason") or "", 100)))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6])


@click.group("rollout")
def command():
    """Fleet rollouts: waves with a canary, abort thresholds, health-gated success, rollback; state in SQLite."""


@command.command("start")
@click.argument("plan", type=click.Path(exists=True, dir_okay=False))
@click.option("--db", default=None, help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
def start(plan, db, as_json):
    """Check PLAN (eval gate, devices, packages), start the rollout and drive it to its end.
    Exit code 0 when every device succeeded, 6 otherwise (the report says why for each)."""
    from ..fleet.controller import start_rollout

    rollout = start_rollout(plan, _db(db).path)
    rep = rollout.run()
    _print_report(rep, as_json)
    raise SystemExit(0 if rep["status"] == "SUCCEEDED" else 6)


@command.command("resume")
@click.argument("rollout_id")
@click.option("--db", default=None, help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
def resume(rollout_id, db, as_json):
    """Continue a rollout whose controller stopped (killed, rebooted): nothing is installed twice."""
    from ..fleet.controller import Rollout

    rep = Rollout(_db(db), rollout_id).run()
    _print_report(rep, as_json)
    raise SystemExit(0 if rep["status"] == "SUCCEEDED" else 6)


@command.command("status")
@click.argument("rollout_id", required=False)
@click.option("--device", default=None, help="Show this device's log (every status change, with reasons).")
@click.option("--db", default=None, help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(rollout_id, device, db, as_json):
    """List rollouts, or show one: per-device status, attempts, wave and reason."""
    store = _db(db)
    if rollout_id is None:
        items = store.rollouts()
        if as_json:
            click.echo(json.dumps(items, indent=2))
            return
        for r in items:
            click.echo(f"{r['id']}  {r['status']}" + (f"  ({r['reason']})" if r.get("reason") else ""))
        return
    if device:
        events = store.events(rollout_id, device)
        if as_json:
            click.echo(json.dumps(events, indent=2))
            return
        import time

        for ev in events:
            click.echo(f"{time.strftime('%H:%M:%S', time.localtime(ev['at']))}  {ev['status']:<12} {ev['message']}")
        return
    row = store.rollout(rollout_id)
    ex = store.executions(rollout_id)
    counts: dict = {}
    for e in ex.values():
        counts[e.status] = counts.get(e.status, 0) + 1
    rep = {"id": rollout_id, "name": row["name"], "status": row["status"], "reason": row["reason"],
           "counts": counts, "rate_per_minute": row["rate"] or 0, "waves": row["wave"] or 0,
           "devices": [e.to_dict() | {"group": None} for _, e in sorted(ex.items())]}
    _print_report(rep, as_json)


@command.command("abort")
@click.argument("rollout_id")
@click.option("--rollback", is_flag=True, help="Also roll back the devices this rollout already updated.")
@click.option("--db", default=None, help=DB_HELP)
def abort(rollout_id, rollback, db):
    """Stop a rollout: no new installs; with --rollback, devices already updated go back to their previous
    version. A running controller picks it up within a tick; otherwise this command carries it out."""
    from ..fleet.controller import Rollout

    store = _db(db)
    row = store.rollout(rollout_id)
    if row["status"] in ("SUCCEEDED", "COMPLETED", "ABORTED", "FAILED"):
        click.echo(f"rollout {rollout_id} already ended: {row['status']}")
        if not rollback:
            return
    store.set_rollout(rollout_id, status="ABORT_REQUESTED", reason="aborted by request", rollback=int(rollback))
    pid = row.get("controller_pid")
    if pid and _alive(pid) and pid != os.getpid():
        click.echo(f"abort requested; the controller (pid {pid}) carries it out")
        return
    from ..errors import EdgePeftError

    try:
        rep = Rollout(store, rollout_id).run()
    except EdgePeftError:  # its plan can no longer be read: recorded as ABORTED with the reason
        row = store.rollout(rollout_id)
        click.echo(f"rollout {rollout_id}: {row['status']} ({row['reason']})")
        return
    _print_report(rep, False)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@command.command("serve")
@click.option("--db", default=None, help=DB_HELP)
@click.option("--listen", default="127.0.0.1:8790", show_default=True, help="HOST:PORT of the page (loopback by default).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="Read the page's bearer token from FILE [default: a fresh random token, printed in the URL].")
@click.option("--expose", is_flag=True, help="Allow a non-loopback --listen address (put a firewall in front).")
def serve(db, listen, token_file, expose):
    """A read-only web page over the rollout database: rollouts, each device's status, attempts and reason,
    and progress over time, refreshing while a rollout runs. Opens the database read-only; the data needs
    the token (the printed URL carries it in its #fragment, which browsers never send)."""
    from ..fleet.dashboard import DashboardServer
    from ..update.agent import load_token, parse_listen
    from .serve_options import serve_until_interrupted

    path = db or os.environ.get("EDGEPEFT_ROLLOUT_DB") or "edgepeft-rollouts.sqlite"
    host, port = parse_listen(listen)
    token, source = (None, "the URL printed at start")
    if token_file:
        token, where = load_token(os.path.dirname(token_file) or ".", token_file)
        source = str(where)
    try:
        server = DashboardServer(path, host, port, token=token, token_source=source, expose=expose)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    if token_file:  # a file's token stays in its file (stdout may be a log), as `run --serve` does
        click.echo(f"dashboard of {server.db_path}: {server.url.split('#')[0]}")
        click.echo(f"read-only; open it with #token=<the token in {source}> after the address; Ctrl-C stops it",
                   err=True)
    else:
        click.echo(f"dashboard of {server.db_path}: {server.url}")
        click.echo("read-only; Ctrl-C stops it", err=True)
    serve_until_interrupted(server)
