"""``edgepeft update create|inspect``: make a signed update package, or look inside one."""

from __future__ import annotations

import json
import time

import click

from ..errors import UsageError


@click.group("update")
def command():
    """Signed update packages (.epu) for devices that already run a bundle."""


@command.command("create")
@click.option("--bundle", "bundle", type=click.Path(exists=True), default=None,
              help="The bundle the devices run (its directory or .epb): the adapter is exported for its base and "
                   "slots, and the health checks run on it before anything is signed.")
@click.option("--adapter", "adapter", metavar="NAME=DIR", default=None,
              help="The adapter update: its name on the device and the PEFT directory of the new version.")
@click.option("--new-bundle", "new_bundle", type=click.Path(exists=True), default=None,
              help="Ship a whole new bundle (a new base) instead: its directory or .epb. Its own health checks and "
                   "--health-check's run on it before anything is signed.")
@click.option("--version", "version", type=int, required=True,
              help="Version number; must be above every version the devices have (versions only go up).")
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Private signing key (`edgepeft keygen`).")
@click.option("--expires", default="30d", show_default=True,
              help="After this the package is refused: a duration (30d, 12h, 2w), a UTC time "
                   "(2026-12-31T00:00:00Z) or 'never'.")
@click.option("--health-check", "health_checks", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON Lines of {input, expect: {contains|equals|label}} the device runs before it commits.")
@click.option("--adapter-dtype", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default=None,
              help="Adapter payload type [default: the bundle's].")
@click.option("--min-runtime", default=None, help="Oldest edgepeft a device may run to install it [default: 0.2.0].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The package file to write (.epu).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary for scripts.")
def create(bundle, adapter, new_bundle, version, key, expires, health_checks, adapter_dtype, min_runtime, out,
           as_json):
    """Create a signed update package: a new adapter version (--bundle + --adapter) or a new bundle
    (--new-bundle). An adapter that does not fit the bundle's base is refused with the reason."""
    from ..release.package import create_adapter_update, create_bundle_update

    start = time.monotonic()

    def progress(msg: str) -> None:
        if not as_json:
            click.echo(f"[{time.monotonic() - start:6.1f}s] {msg}", err=True)

    if new_bundle is not None:
        if bundle is not None or adapter is not None:
            raise UsageError("--new-bundle ships a whole bundle; it does not take --bundle or --adapter",
                             hint="make two packages: one for the bundle, one per adapter")
        res = create_bundle_update(bundle=new_bundle, version=version, key=key, out=out, expires=expires,
                                   health_checks=health_checks, min_runtime=min_runtime, progress=progress)
    else:
        if bundle is None or adapter is None:
            raise UsageError("an adapter update needs --bundle DIR and --adapter NAME=DIR",
                             hint="or pass --new-bundle to ship a whole bundle")
        from ..bundle.adapters_in import parse_adapter_arg

        name, path = parse_adapter_arg(adapter)
        res = create_adapter_update(bundle=bundle, name=name, adapter=path, version=version, key=key, out=out,
                                    expires=expires, health_checks=health_checks, adapter_dtype=adapter_dtype,
                                    min_runtime=min_runtime, progress=progress)
    s = res.summary()
    for note in res.warnings:
        click.echo(f"warning: {note}", err=True)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"update  {s['update']}  ({s['bytes'] / 1024:.0f} KiB)")
    checks = f"{s['health_checks']} health check(s)" if s["health_checks"] or s["type"] != "adapter" else \
        "the bundle's own health checks"
    click.echo(f"        {s['type']} {s['name']} v{s['version']} for base {s['base_fingerprint'][:16]}..., "
               f"expires {s['expires'] or 'never'}, {checks} run on install")
    click.echo(f"id      {s['id']}")


@command.command("inspect")
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@click.option("--trusted-key", "trusted_key", multiple=True, type=click.Path(dir_okay=False),
              help="Verify the signature and payload with this public key (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(package, trusted_key, as_json):
    """Show what an update package carries; with --trusted-key, verify it as a device would."""
    from pathlib import Path

    from ..contracts.methods import describe_size
    from ..contracts.names import sha256_bytes
    from ..contracts.update import envelope_length, read_metadata_unverified, read_update

    data = Path(package).read_bytes()
    n = envelope_length(data, package)
    if n is None or len(data) < n:
        raise UsageError(f"{package} is truncated", hint="recreate it with `edgepeft update create`")
    verified = None
    if trusted_key:
        envelope, _ = read_update(data, trusted_key, source=package)
        meta, verified = envelope.meta, envelope.key_id
    else:
        meta = read_metadata_unverified(data, package)
    info = {"id": sha256_bytes(data[:n]), "bytes": len(data), "verified_by": verified} | meta.to_dict()
    if as_json:
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    click.echo(f"{meta.type} {meta.name} v{meta.version}  ({len(data) / 1024:.0f} KiB, id {info['id'][:16]}...)")
    click.echo(f"base      {meta.base_fingerprint}")
    click.echo(f"created   {meta.created}   expires {meta.expires or 'never'}   min runtime {meta.min_runtime}")
    if meta.adapter is not None:
        a = meta.adapter
        where = f", modules {', '.join(a.target_modules)}" if a.method == "lora" else ""
        click.echo(f"adapter   {a.method} {describe_size(a.method, a.to_dict())}, {a.dtype}{where}")
    if meta.health_checks or meta.type != "adapter":
        click.echo(f"checks    {len(meta.health_checks)} health check(s), run on install")
    else:
        click.echo(f"checks    none of its own: on install a device runs its bundle's health checks for {meta.name}")
    click.echo("signature " + (f"verified (key {verified})" if verified else "not checked (pass --trusted-key)"))
