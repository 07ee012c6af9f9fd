"""``edgepeft keygen``: create the Ed25519 key pair that signs bundles and updates."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UsageError


@click.command("keygen")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Path stem: writes STEM.key (private, keep it on the server) and STEM.pub (give it to devices). "
                   "A missing last folder is created (and reported); deeper missing folders are refused.")
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths and key id as JSON.")
def command(out: str, force: bool, as_json: bool) -> None:
    """Create an Ed25519 key pair for signing bundles and updates."""
    from ..contracts.signing import generate_keypair
    from ..contracts.verify import key_id, load_public_key

    folder = Path(out).expanduser().parent
    if not folder.parent.is_dir():
        raise UsageError(f"{folder.parent} does not exist, so --out {out} would create several folders",
                         hint=f"check the path, or create the folder first: mkdir -p {folder}")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is not a folder", hint="choose another --out")
    created = [] if folder.exists() else [str(folder)]
    priv, pub = generate_keypair(out, force=force)
    kid = key_id(load_public_key(pub))
    if as_json:
        click.echo(json.dumps({"private_key": str(priv), "public_key": str(pub), "key_id": kid,
                               "created_folders": created}, indent=2))
        return
    for f in created:
        click.echo(f"created folder {f}/")
    click.echo(f"private key: {priv}  (keep it secret; pass it to `edgepeft build --key`)")
    click.echo(f"public key:  {pub}  (install it on devices as their trusted key)")
    click.echo(f"key id:      {kid}")
