"""``edgepeft publish FILE... --repo DIR --key KEY``: put update packages into a TUF repository for devices to pull."""

from __future__ import annotations

import json

import click

from ..errors import UsageError


@click.command("publish")
@click.argument("packages", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--repo", required=True, type=click.Path(file_okay=False),
              help="Repository folder (created on first use); serve it with any static web server or CDN.")
@click.option("--key", required=True, type=click.Path(dir_okay=False),
              help="Fleet signing key: signs the packages' repository metadata (every TUF role by default).")
@click.option("--role-key", "role_keys", multiple=True, metavar="ROLE=KEY",
              help="Give a TUF role (root, targets, snapshot, timestamp) its own key; repeatable.")
@click.option("--refresh", is_flag=True,
              help="Only re-sign snapshot and timestamp (run at least daily: devices refuse stale metadata).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(packages, repo, key, role_keys, refresh, as_json):
    """Publish signed update packages (.epu) into a TUF repository (python-tuf) that devices
    poll with `edgepeft agent --pull URL`."""
    from ..release.tuf_repo import publish

    roles = {}
    for rk in role_keys:
        role, sep, path = rk.partition("=")
        if not sep:
            raise UsageError(f"--role-key {rk!r} is not ROLE=KEY", hint="e.g. --role-key timestamp=keys/online.key")
        roles[role] = path
    added = publish(list(packages), repo=repo, key=key, role_keys=roles, refresh_only=refresh)
    if as_json:
        click.echo(json.dumps({"repo": repo, "published": added}, indent=2))
        return
    for a in added:
        click.echo(f"published {a['path']}  ({a['type']} {a['name']} v{a['version']})")
    click.echo(f"repository {repo}: serve it over HTTP(S); devices: edgepeft agent ... --pull URL")
