"""``edgepeft push FILE --to URL``: send a signed update to a device and wait for its health check."""

from __future__ import annotations

import json
import sys

import click

from ..transport.open import open_link


@click.command("push")
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "to", required=True, help="http://HOST:PORT of an agent, or serial:///dev/ttyUSB0?baud=115200.")
@click.option("--token", default=None, envvar="EDGEPEFT_DEVICE_TOKEN", help="The device token (HTTP). Default: $EDGEPEFT_DEVICE_TOKEN.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="Read the token from a file (an agent's STATE/token; waited for if the agent is just starting).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait for the device to finish.")
@click.option("--no-wait", is_flag=True, help="Return once the device has received it (do not wait for the health check).")
@click.option("--json", "as_json", is_flag=True, help="Print the device's final status as JSON.")
def command(package, to, token, token_file, timeout, no_wait, as_json):
    """Send PACKAGE (.epu) to a device; resume after drops; exit 0 only when the device reports healthy."""
    import time

    from ..transport.link import Package, push

    pkg = Package.read(package)
    started = time.time()
    link = open_link(to, token, token_file)
    bar = None
    if not as_json and sys.stderr.isatty():
        bar = click.progressbar(length=pkg.size, label=f"push {pkg.path.name}", file=sys.stderr, show_eta=True)
    state = {"done": 0}

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(max(0, done - state["done"]))
        state["done"] = max(state["done"], done)

    def event(msg: str) -> None:
        if not as_json:
            click.echo(f"\n{msg}" if bar is not None else msg, err=True)

    try:
        st = push(pkg, link, progress=progress, wait=not no_wait, timeout=timeout, on_event=event)
    finally:
        if bar is not None:
            bar.render_finish()
        link.close()
    if as_json:
        click.echo(json.dumps(st, indent=2, ensure_ascii=False))
    else:
        name, version = st.get("name", "?"), st.get("version")
        what = f"{name} v{version}" if version is not None else f"update {pkg.id[:12]}"  # refused before it was read
        finished = st.get("finished")
        if isinstance(finished, (int, float)) and finished < started:  # the device's answer from its history
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(finished))
            line = f"{what}: already installed, nothing sent (this package was {st.get('status')} on the device " \
                f"at {when})" if st.get("status") == "healthy" else \
                f"{what}: not sent again: this package was {st.get('status')} on the device at {when}"
            click.echo(line + (f" ({st['reason']})" if st.get("reason") and st.get("status") != "healthy" else ""))
        else:
            line = f"{what}: {st.get('status')}"
            if st.get("reason"):
                line += f" ({st['reason']})"
            steps = " -> ".join(s["status"] for s in st.get("steps", []))
            click.echo(line + (f"  [{steps}]" if steps else ""))
    ok = st.get("status") == "healthy" or (no_wait and st.get("status") not in ("rejected", "rolled-back"))
    raise SystemExit(0 if ok else 5)
