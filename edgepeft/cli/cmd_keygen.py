"""``edgepeft keygen``: create the Ed25519 key pair that signs bundles and updates."""

from __future__ import annotations

import click


@click.command("keygen")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Path stem: writes STEM.key (private, keep it on the server) and STEM.pub (give it to devices).")
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def command(out: str, force: bool) -> None:
    """Create an Ed25519 key pair for signing bundles and updates."""
    from ..bundle.signing import generate_keypair
    from ..spec.verify import key_id, load_public_key

    priv, pub = generate_keypair(out, force=force)
    click.echo(f"private key: {priv}  (keep it secret; pass it to `edgepeft build --key`)")
    click.echo(f"public key:  {pub}  (install it on devices as their trusted key)")
    click.echo(f"key id:      {key_id(load_public_key(pub))}")
