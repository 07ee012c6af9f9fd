"""``edgepeft identity --state STATE``: this device's public key, to enroll in the fleet inventory."""

from __future__ import annotations

import json

import click


@click.command("identity")
@click.option("--state", required=True, type=click.Path(file_okay=False),
              help="The device's state folder (the agent's --state); the identity is created there if missing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: public_key, key_id, the files.")
def command(state, as_json):
    """Print the device's public key (``ed25519:<base64>``), creating its key pair on first use.

    The private key stays in STATE/identity.key (mode 0600). Enroll the printed line in the inventory as
    ``public_key = "ed25519:..."`` under the device's [[device]]: a rollout counts only reports signed by it."""
    from pathlib import Path

    from ..contracts.identity import IDENTITY_KEY, IDENTITY_PUB, DeviceIdentity

    ident = DeviceIdentity.load_or_create(state)
    for note in ident.notes:
        click.echo(f"warning: {note}", err=True)
    if as_json:
        click.echo(json.dumps({"public_key": ident.text, "key_id": ident.key_id,
                               "private_key_file": str(Path(state) / IDENTITY_KEY),
                               "public_key_file": str(Path(state) / IDENTITY_PUB)}, indent=2))
        return
    click.echo(ident.text)
