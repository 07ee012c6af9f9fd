"""``edgepeft verify BUNDLE_OR_EPB``: check a bundle (or update package) the way a device would.

Torch-free. A bundle (directory or ``.epb``): the manifest's signature by a trusted key, its
schema, every file's size and SHA-256, and (for an archive) that it holds exactly the files
its manifest lists. An update package (``.epu``): its signature, payload hash and size, and
expiry. Exit 0 when everything checks out; otherwise the one error that failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .keys import trusted_keys


@click.command("verify")
@click.argument("path", type=click.Path(exists=True))
@click.option("--trusted-key", "trusted_key", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (.pub) to verify with; repeatable. [default: $EDGEPEFT_TRUSTED_KEYS]")
@click.option("--json", "as_json", is_flag=True, help="Print what was verified as JSON.")
def command(path: str, trusted_key: tuple[str, ...], as_json: bool) -> None:
    """Verify PATH (a bundle directory, its .epb archive, or a .epu update package) with the trusted keys."""
    keys = trusted_keys(trusted_key)
    p = Path(path)
    if p.is_file() and _is_update(p):
        info = _update(p, keys)
    else:
        info = _bundle(p, keys)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"verified {info['path']} ({info['kind']}): signed by key {info['key_id']}; {info['summary']}")


def _is_update(p: Path) -> bool:
    from ..contracts.update import MAGIC

    with open(p, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def _bundle(p: Path, keys) -> dict:
    from ..contracts.verify import BundleFiles, verify_bundle

    m = verify_bundle(BundleFiles(p), keys)
    total = sum(f.size for f in m.files)
    adapters = [f"{a.name} v{a.version}" for a in m.adapters]
    return {"path": str(p), "kind": "archive" if p.is_file() else "bundle directory", "verified": True,
            "key_id": m.signature.key_id if m.signature else None, "base": m.base.get("name"),
            "fingerprint": m.base.get("fingerprint"), "target": m.target.get("name"), "files": len(m.files),
            "bytes": total, "adapters": adapters, "health_checks": len(m.health_checks),
            "summary": f"{len(m.files)} files ({total} bytes) match their SHA-256; base {m.base.get('name')} for "
                       f"{m.target.get('name')}; adapters: {', '.join(adapters) or 'none'}"}


def _update(p: Path, keys) -> dict:
    from ..contracts.update import read_update

    envelope, payload = read_update(p.read_bytes(), keys, source=str(p))
    meta = envelope.meta
    return {"path": str(p), "kind": "update package", "verified": True, "key_id": envelope.key_id, "type": meta.type,
            "name": meta.name, "version": meta.version, "bytes": len(payload),
            "summary": f"{meta.type} update {meta.name} v{meta.version}, payload of {len(payload)} bytes matches "
                       "its SHA-256, not expired"}
