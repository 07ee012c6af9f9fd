"""``edgepeft targets``: list the shipped device profiles or show one, validated."""

from __future__ import annotations

import click


@click.command("targets")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def command(name: str | None, as_json: bool) -> None:
    """List the device target profiles, or show NAME (a shipped name or a path to a .toml)."""
    from ..spec.target import list_targets, load_target

    if name is None:
        for n in list_targets():
            t = load_target(n)
            link = t.update.link + (f"@{t.update.baud}" if t.update.baud else "")
            click.echo(f"{n:20s} {t.device_class:14s} {t.arch:8s} {t.quant.weights:5s} "
                       f"{t.budgets.memory_mib:>6d} MiB  rank<={t.budgets.max_adapter_rank:<4d} {link:16s} "
                       f"{' > '.join(p.replace('ExecutionProvider', '') for p in t.providers)}")
        return
    t = load_target(name)
    click.echo(t.to_json() if as_json else t.to_toml(), nl=False)
    if as_json:
        click.echo()
