"""``edgepeft adapters list|install|rollback|unload|load``: manage a device's adapters without Python.

Against a running agent (``--device http://HOST:PORT`` with its token; ``list``, ``install``
and ``rollback`` also over ``serial:///dev/ttyX``, rollback with the token), or against a
device's state folder while no agent runs (``--state DIR``; the bundle it was shipped is
remembered there by the agent, or given with
``--bundle``). Both go through the same :class:`~edgepeft.update.device.Device` rules: signed
packages only, versions only go up, a health check before anything serves.
"""

from __future__ import annotations

import json

import click

from ..errors import UsageError


def _target(f):
    for opt in reversed([
        click.option("--device", "to", default=None,
                     help="A running agent: http://HOST:PORT (or serial:///dev/ttyUSB0?baud=115200 for "
                          "list/install/rollback)."),
        click.option("--token", default=None, envvar="EDGEPEFT_DEVICE_TOKEN",
                     help="The agent's token (HTTP; serial rollback). [default: $EDGEPEFT_DEVICE_TOKEN]"),
        click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                     help="Read the agent's token from a file (its STATE/token)."),
        click.option("--state", type=click.Path(file_okay=False), default=None,
                     help="A device's state folder, used directly (no agent may be running on it)."),
        click.option("--bundle", type=click.Path(exists=True), default=None,
                     help="With --state: the bundle the device was shipped. [default: the one its agent last ran]"),
        click.option("--trusted-key", "trusted_key", multiple=True, type=click.Path(dir_okay=False),
                     help="With --state: the device's trusted public key(s). [default: $EDGEPEFT_TRUSTED_KEYS]"),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]):
        f = opt(f)
    return f


class _Target:
    """Either an HTTP/serial link to an agent or a Device opened on a state folder."""

    def __init__(self, to, token, token_file, state, bundle, trusted_key):
        if (to is None) == (state is None):
            raise UsageError("say which device: --device URL (a running agent) or --state DIR (its state folder)",
                             hint="e.g. --device http://127.0.0.1:8731 --token-file STATE/token")
        self.link = self.device = None
        if to is not None:
            from .cmd_push import open_link

            self.link = open_link(to, token, token_file)
            self.serial = to.startswith("serial:")
        else:
            from pathlib import Path

            from ..update.device import Device, shipped_bundle
            from .keys import trusted_keys

            bundle = bundle or shipped_bundle(Path(state))
            if bundle is None:
                raise UsageError(f"{state} does not say which bundle the device was shipped",
                                 hint="pass --bundle (the bundle directory or .epb the agent runs)")
            self.device = Device(bundle, trusted_keys(trusted_key), state)

    def close(self):
        if self.link is not None:
            self.link.close()
        if self.device is not None:
            self.device.close()

    def http_only(self, what: str):
        if self.link is not None and self.serial:
            raise UsageError(f"{what} is not available over a serial line", hint="use --device http://HOST:PORT")


@click.group("adapters")
def command():
    """Adapters on a device: what serves, install a signed update, roll back, unload, load again."""


@command.command("list")
@_target
def list_(to, token, token_file, state, bundle, trusted_key, as_json):
    """Show each adapter's serving version, where it came from, its floor and failed versions."""
    t = _Target(to, token, token_file, state, bundle, trusted_key)
    try:
        if t.device is not None:
            info = t.device.adapters()
        elif t.serial:
            st = t.link.device()
            info = {"adapters": st.get("adapters", []), "unloaded": st.get("unloaded", []),
                    "warnings": st.get("notes", [])}
        else:
            st = t.link.device()
            info = {"adapters": st.get("adapters", []), "unloaded": st.get("unloaded", []),
                    "warnings": t.link.adapters().get("warnings", [])}
    finally:
        t.close()
    if as_json:
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    rows = [("adapter", "version", "source", "previous", "floor", "failed")]
    for a in info["adapters"]:
        rows.append((a["name"], "-" if a.get("version") is None else f"v{a['version']}", a.get("source") or "-",
                     "-" if a.get("previous") is None else f"v{a['previous']}", f"v{a.get('floor')}",
                     ", ".join(f"v{k}" for k in (a.get("failed") or {})) or "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    for name in info.get("unloaded", []):
        click.echo(f"unloaded  {name} (`edgepeft adapters load {name}` serves it again)")
    for w in info.get("warnings", []):
        click.echo(f"warning: {w}", err=True)


@command.command("install")
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@_target
def install(package, to, token, token_file, state, bundle, trusted_key, as_json):
    """Install PACKAGE (a signed .epu): verified, staged, health-checked, then served; exit 0 only when healthy."""
    t = _Target(to, token, token_file, state, bundle, trusted_key)
    try:
        if t.device is not None:
            st = t.device.install_file(package).to_dict()
        else:
            from ..transport.link import Package, push

            st = push(Package.read(package), t.link, wait=True, timeout=600.0,
                      on_event=lambda msg: None if as_json else click.echo(msg, err=True))
    finally:
        t.close()
    _result(st, as_json)
    raise SystemExit(0 if st.get("status") == "healthy" else 5)


def _result(st: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(st, indent=2, ensure_ascii=False))
        return
    line = f"{st.get('name', '?')} v{st.get('version')}: {st.get('status')}"
    click.echo(line + (f" ({st['reason']})" if st.get("reason") else ""))


def _action(action: str, name: str, to, token, token_file, state, bundle, trusted_key, as_json) -> None:
    t = _Target(to, token, token_file, state, bundle, trusted_key)
    try:
        if action != "rollback":  # rollback also goes over serial (with the token)
            t.http_only(action)
        if t.device is not None:
            out = {"rollback": t.device.rollback, "unload": t.device.unload, "load": t.device.load}[action](name)
        else:
            out = t.link.adapter_action(name, action)
    finally:
        t.close()
    if as_json:
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
    elif action == "rollback":
        click.echo(f"{name}: v{out.get('rolled_back_from')} -> " +
                   (f"v{out['version']}" if out.get("version") is not None else "the bundle's version"))
    else:
        click.echo(f"{name}: {out.get('status')}" + (f" (v{out['version']})" if out.get("version") else ""))


@command.command("rollback")
@click.argument("name")
@_target
def rollback(name, to, token, token_file, state, bundle, trusted_key, as_json):
    """Serve NAME's previous version again (NAME "bundle": the previous bundle); the newer one is never reinstalled."""
    _action("rollback", name, to, token, token_file, state, bundle, trusted_key, as_json)


@command.command("unload")
@click.argument("name")
@_target
def unload(name, to, token, token_file, state, bundle, trusted_key, as_json):
    """Stop serving NAME (remembered across restarts; refused while a request uses it)."""
    _action("unload", name, to, token, token_file, state, bundle, trusted_key, as_json)


@command.command("load")
@click.argument("name")
@_target
def load(name, to, token, token_file, state, bundle, trusted_key, as_json):
    """Serve an unloaded NAME again (its installed version, else the bundle's)."""
    _action("load", name, to, token, token_file, state, bundle, trusted_key, as_json)
