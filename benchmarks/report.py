"""Turn a results dict into the JSON file, PNG plots, a markdown table and the results block.

The results block (in ``benchmarks/README.md``; ``run.py`` picks the page) is
everything between ``<!-- bench:start -->`` and ``<!-- bench:end -->``;
:func:`replace_readme_block` swaps it atomically and leaves the rest of the page
untouched.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def fmt(x: float | None) -> str:
    """A number with about three significant digits, readable in a table."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.995:
        return f"{x:.2f}"
    if a >= 0.1:
        return f"{x:.3f}"
    return f"{x:.3g}"


def fmt_value(x: float, unit: str) -> str:
    """Scale seconds and bytes to a readable unit."""
    if unit == "s":
        if abs(x) < 1e-3:
            return f"{fmt(x * 1e6)} µs"
        if abs(x) < 1:
            return f"{fmt(x * 1e3)} ms"
        return f"{fmt(x)} s"
    if unit == "bytes":
        if abs(x) >= 1024 ** 2:
            return f"{fmt(x / 1024 ** 2)} MiB"
        if abs(x) >= 1024:
            return f"{fmt(x / 1024)} KiB"
        return f"{fmt(x)} B"
    return f"{fmt(x)} {unit}".strip()


# Groups left out of the compact results block (they stay in table.md and the JSON).
DETAIL_GROUPS = {"memory.anon_bytes", "memory.peak_rss_bytes", "sizes.bundle_one_adapter_bytes"}


def render_markdown(results: dict, *, compact: bool = False) -> str:
    """The benchmark section as markdown: goals, then one table per section.

    ``compact`` (for benchmarks/README.md) drops the detail groups and the notes and points to the full table.
    """
    m = results["machine"]
    lines = [f"Measured {results['created']} on {m['cpu']} ({m['logical_cpus']} logical CPUs, "
             f"{m['threads_per_system']} threads per system, load {m.get('loadavg_1_5_15')}), "
             f"mode `{results['mode']}`. Medians of {results['settings'].get('reps')} interleaved repetitions; "
             "spread = interquartile range; ratios are to peers measured in the same run "
             "(absolute speeds on a shared machine swing; the ratios are what to compare).", ""]
    for peer, build in (results.get("builds") or {}).items():
        lines += [f"{peer} peer: {build.get('summary', 'build not recorded')}.", ""]
    if results.get("goals"):
        lines += ["| goal | target | measured | met |", "|---|---|---|---|"]
        for g in results["goals"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[g.get("met")]
            lines.append(f"| {g['name']} | {g['target']} | {g.get('measured', 'n/a')} | {met} |")
        lines.append("")
    for sec in results["sections"]:
        lines.append(f"**{sec['title']}**")
        lines.append("")
        if sec.get("status") == "not built yet":
            lines += [f"_Not built yet._ {sec.get('note', '')}".rstrip(), ""]
            continue
        for tab in sec.get("tables", []):
            lines += [f"_{tab['title']}_", "", "| " + " | ".join(tab["columns"]) + " |",
                      "|" + "---|" * len(tab["columns"]), *("| " + " | ".join(r) + " |" for r in tab["rows"]), ""]
        rows = []
        for grp in sec.get("groups", []):
            if compact and (grp["id"] in DETAIL_GROUPS or sec.get("tables")):  # a summary table stands for them
                continue
            refs = grp.get("refs", [])
            for f in grp["figures"]:
                spread = "" if f["n"] == 1 else fmt_value(f["iqr"], f["unit"])
                ratios = ", ".join(f"{fmt(f['ratios'][r])}× {r}" for r in refs
                                   if r in f["ratios"] and r != f["system"])
                rows.append(f"| {grp['title']} | {f['system']} | {fmt_value(f['median'], f['unit'])} | "
                            f"{spread} | {ratios} |")
        if rows:
            lines += ["| figure | system | median | IQR | vs peers (same run) |", "|---|---|---|---|---|", *rows]
        if not compact:
            for note in sec.get("notes", []):
                lines.append(f"- {note}")
        lines.append("")
    if compact:
        lines.append("Full tables with notes: `benchmarks/results/table.md`; every sample, spread and ratio: "
                     "`benchmarks/results/bench.json`; plots: `benchmarks/results/*.png`.")
        lines.append("")
    if results.get("skipped"):
        lines.append("Not measured in this run:")
        lines += [f"- {s['what']}: {s['why']}" for s in results["skipped"]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def replace_readme_block(readme: Path, markdown: str) -> bool:
    """Put ``markdown`` between the bench markers of ``readme``; False if the markers are absent.

    The write is atomic (temporary file + os.replace).
    """
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        return False
    new = text[: i + len(START)] + "\n" + markdown.rstrip() + "\n" + text[j:]
    if new != text:
        tmp = readme.with_name(f".{readme.name}.tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, readme)
    return True


def write_plots(results: dict, out_dir: Path) -> list[str]:
    """One horizontal bar chart per figure group (median, IQR whiskers); returns file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for sec in results["sections"]:
        for grp in sec.get("groups", []):
            figs = grp["figures"]
            if len(figs) < 2:
                continue
            names = [f["system"] for f in figs]
            scale, unit = _plot_scale(figs[0]["unit"], max(f["median"] for f in figs))
            med = [f["median"] * scale for f in figs]
            lo = [(f["median"] - f["p25"]) * scale for f in figs]
            hi = [(f["p75"] - f["median"]) * scale for f in figs]
            fig, ax = plt.subplots(figsize=(7, 0.45 * len(figs) + 1.2))
            colors = ["#DD8452" if n.startswith("edgepeft") else "#4C72B0" for n in names]
            ax.barh(range(len(figs)), med, xerr=[lo, hi], color=colors, capsize=3)
            ax.set_yticks(range(len(figs)), names)
            ax.invert_yaxis()
            better = "higher is better" if grp.get("better") == "higher" else "lower is better"
            ax.set_xlabel(f"{unit} ({better})")
            ax.set_title(grp["title"])
            right = max(m + h for m, h in zip(med, hi)) or 1.0
            for k, (v, h) in enumerate(zip(med, hi)):
                ax.text(v + h + right * 0.01, k, fmt(v), va="center", fontsize=8)
            ax.set_xlim(0, right * 1.15)
            written.append(_save(plt, fig, out_dir, f"{grp['id'].replace('/', '_')}.png"))
        for ser in sec.get("series", []):
            fig, ax = plt.subplots(figsize=(7, 4))
            handles = []
            for label, points in ser["lines"].items():
                if points:
                    handles += ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            right = ser.get("right")  # a second quantity on its own axis (dashed), e.g. latency beside tok/s
            if right:
                ax2 = ax.twinx()
                for k, (label, points) in enumerate(right["lines"].items()):
                    if points:
                        handles += ax2.plot([p[0] for p in points], [p[1] for p in points], linestyle="--",
                                            marker="s", color=f"C{len(ser['lines']) + k}", label=label)
                ax2.set_ylabel(right["y"])
                ax2.set_ylim(bottom=0)
                ax.set_ylim(bottom=0)
            ax.set_xlabel(ser["x"])
            ax.set_ylabel(ser["y"])
            ax.set_title(ser["title"])
            ax.legend(handles=handles, fontsize=8)
            ax.grid(alpha=0.3)
            written.append(_save(plt, fig, out_dir, f"{sec['id']}.{ser['id']}.png"))
    return written


def _save(plt, fig, out_dir: Path, name: str) -> str:
    """Write ``fig`` to ``out_dir/name`` atomically (a half-written PNG never replaces the last one)."""
    fig.tight_layout()
    tmp = out_dir / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_dir / name)
    return name


def _plot_scale(unit: str, top: float) -> tuple[float, str]:
    if unit == "s":
        return (1e6, "µs") if top < 1e-3 else (1e3, "ms") if top < 1 else (1.0, "s")
    if unit == "bytes":
        return 1 / 1024 ** 2, "MiB"
    return 1.0, unit
