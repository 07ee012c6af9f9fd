"""``edgepeft status --device URL``: what a device runs and what happened to its last updates."""

from __future__ import annotations

import json

import click


@click.command("status")
@click.option("--device", "to", required=True, help="http://HOST:PORT of an agent, or serial:///dev/ttyUSB0?baud=115200.")
@click.option("--token", default=None, envvar="EDGEPEFT_DEVICE_TOKEN", help="The device token (HTTP).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None, help="Read the token from a file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(to, token, token_file, as_json):
    """Show a device's base, bundle, adapters with versions, and its recent update results."""
    from ..transport.open import open_link

    link = open_link(to, token, token_file)
    try:
        st = link.device()
    finally:
        link.close()
    if as_json:
        click.echo(json.dumps(st, indent=2, ensure_ascii=False))
        return
    base = st.get("base", {})
    b = st.get("bundle", {})
    click.echo(f"base     {base.get('name')} ({base.get('fingerprint', '')[:16]}...), {st.get('task')}, "
               f"edgepeft {st.get('edgepeft_version')}")
    click.echo(f"bundle   {'v' + str(b.get('version')) if b.get('version') else 'as shipped'}")
    ident = st.get("identity") or {}
    if ident.get("public_key"):
        click.echo(f"identity {ident['public_key']} (key id {ident.get('key_id')})")
    for a in st.get("adapters", []):
        click.echo(f"adapter  {a['name']:<20} v{a.get('version')}  ({a.get('source')}; floor {a.get('floor')}"
                   + (f"; failed {', '.join('v' + k for k in a['failed'])}" if a.get("failed") else "") + ")")
    for r in st.get("recent", [])[-5:]:
        what = f"{r.get('name')} v{r.get('version')}" if r.get("version") is not None else \
            f"package {str(r.get('id') or '?')[:12]} (refused before its name was trusted)"
        reason = str(r.get("reason") or "")
        click.echo(f"update   {what}: {r.get('status')}"
                   + (f" ({reason[:99] + '…' if len(reason) > 100 else reason})" if reason else ""))
    for n in st.get("notes", []):
        click.echo(f"note     {n}")
