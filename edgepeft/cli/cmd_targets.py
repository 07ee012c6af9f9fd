"""``edgepeft targets``: list the shipped device profiles or show one, validated."""

from __future__ import annotations

import json

import click

COLUMNS = ("name", "device", "arch", "weights", "memory", "rank<=", "updates", "providers")


@click.command("targets")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the list of profiles, or the profile NAME.")
def command(name: str | None, as_json: bool) -> None:
    """List the device target profiles, or show NAME (a shipped name or a path to a .toml)."""
    from ..contracts.target import list_targets, load_target

    if name is None:
        profiles = [load_target(n) for n in list_targets()]
        if as_json:
            click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
            return
        rows = [COLUMNS] + [_row(p) for p in profiles]
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        for r in rows:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return
    t = load_target(name)
    click.echo(t.to_json() if as_json else t.to_toml(), nl=False)
    if as_json:
        click.echo()


def _row(t) -> tuple[str, ...]:
    link = t.update.link + (f"@{t.update.baud}" if t.update.baud else "")
    return (t.name, t.device_class, t.arch, t.quant.weights, f"{t.budgets.memory_mib} MiB",
            str(t.budgets.max_adapter_rank), link, " > ".join(p.replace("ExecutionProvider", "") for p in t.providers))
