"""``python -m benchmarks.run``: the whole benchmark in one command.

Sets up what it needs (genai models, edgepeft bundles, LoRA adapters; cached in
``benchmarks/work/``), measures every section with interleaved repetitions,
writes ``benchmarks/results/bench.json``, ``table.md`` and PNG plots, and
refreshes the results block of ``benchmarks/README.md`` between
``<!-- bench:start -->`` and ``<!-- bench:end -->``.

``--smoke`` runs the same harness on tiny random models in seconds (used by
``tests/test_bench_smoke.py``); it never touches benchmarks/README.md or the committed
results unless ``--out``/``--readme`` point there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from . import llama_build, report
from .context import Context, Settings
from .fixtures import RESULTS, WORK, real_models, tiny_models, write_json_atomic
from .goals_peers import goals_peers
from .harness import Section, machine, versions
from .systems import LLAMA

SCHEMA = "edgepeft-bench/1"
SECTIONS = ["kernels", "decode", "switch", "sizes", "quality", "transport", "memory", "classify", "families",
            "fleet", "concurrency", "scale"]


def run_sections(ctx: Context, only: list[str]) -> tuple[list[Section], list[dict]]:
    """Run the chosen sections in order; returns (sections, goals)."""
    from . import (
        sec_adapters,
        sec_classify,
        sec_concurrency,
        sec_decode,
        sec_families,
        sec_fleet,
        sec_kernels,
        sec_memory,
        sec_quality,
        sec_scale,
        sec_tasks,
        sec_transport,
    )

    runners = {"kernels": sec_kernels.run, "decode": sec_decode.run, "switch": sec_adapters.run_switch, "sizes": sec_adapters.run_sizes,
               "quality": sec_quality.run, "transport": sec_transport.run,
               "memory": sec_memory.run, "classify": sec_classify.run, "families": sec_families.run,
               "fleet": sec_fleet.run, "concurrency": sec_concurrency.run, "scale": sec_scale.run}
    sections, goals = [], []
    for sid in SECTIONS:
        if sid not in only:
            continue
        ctx.log(f"[{time.perf_counter() - ctx.t0:6.0f}s] section {sid}")
        try:
            sec = runners[sid](ctx)
        except Exception as exc:  # one broken section must not lose the others' numbers
            sec = Section(sid, sid)
            sec.status = "failed"
            sec.notes.append(f"section failed: {type(exc).__name__}: {str(exc)[:300]}")
            ctx.skip(f"section {sid}", f"{type(exc).__name__}: {str(exc)[:300]}")
        sections.append(sec)
        if sid == "switch":
            goals.append(sec_adapters.goal_switch(sec))
        elif sid == "sizes":
            goals += sec_adapters.goals_sizes(sec)
        elif sid == "quality":
            goals.append(sec_quality.goal_quality(sec))
            goals.append(sec_quality.goal_float_base(sec, next((x for x in sections if x.id == "sizes"), None)))
            goals.append(sec_tasks.goal_int4_payload(sec))
        elif sid == "memory":
            goals += sec_memory.goals_memory(sec)
        elif sid == "classify":
            goals.append(sec_classify.goal_classify(sec))
        elif sid == "transport":
            goals.append(sec_transport.goal_serial(sec))
        elif sid == "fleet":
            goals.append(sec_fleet.goal_fleet(sec))
        elif sid == "concurrency":
            goals += concurrency_goals(sec, ctx)
        elif sid == "scale":
            goals += sec_scale.goals_scale(sec, next((x for x in sections if x.id == "decode"), None))
    return sections, goals + goals_peers(sections)


def concurrency_goals(sec: Section, ctx: Context) -> list[dict]:
    """The concurrency goals of SmolLM2 (and of the 1B-class model when it ran), against the run before the
    change when ``--concurrency-before`` names one."""
    import json

    from . import sec_concurrency

    before = None
    if ctx.settings.concurrency_before:
        before = json.loads(Path(ctx.settings.concurrency_before).read_text(encoding="utf-8"))
    goals = sec_concurrency.goals_concurrency(sec, before, name=sec_concurrency.short_name(ctx))
    if sec.find("1b_agg_tok_s"):
        goals += sec_concurrency.goals_concurrency(sec, before, tag="1b_", name=sec_concurrency.short_name(ctx, "1b_"))
    return goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                 description="Measure edgepeft against its peers in one run; write JSON, PNG plots, "
                                             "table.md and the results block of benchmarks/README.md.")
    ap.add_argument("--smoke", action="store_true", help="tiny random models, seconds (harness check)")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    ap.add_argument("--work", type=Path, help="work folder for built artifacts (default benchmarks/work)")
    ap.add_argument("--readme", type=Path, help="page whose results block to refresh (default: benchmarks/README.md, full runs only)")
    ap.add_argument("--no-readme", action="store_true", help="do not refresh any results block")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--reps", type=int, help="repetitions per figure (default 7; smoke 3)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("--examples-out", help="folder of the trained example adapters (default examples/out)")
    ap.add_argument("--systems", help="comma list of substrings: only matching systems (e.g. 'genai,llama')")
    ap.add_argument("--open-timeout", type=float, metavar="S",
                    help="seconds a peer's worker may take to open and produce its first tokens (default 300)")
    ap.add_argument("--call-timeout", type=float, metavar="S",
                    help="seconds a peer may take for any later call before it counts as hung (default 900)")
    ap.add_argument("--concurrency-clients", metavar="N,N,...",
                    help="clients at once in the concurrency section (default 1,2,4,8; smoke 1,2)")
    ap.add_argument("--concurrency-1b", action="store_true",
                    help="also the concurrency rows of a random-weight Llama-3.2-1B-shaped bundle (built once into "
                         "benchmarks/work/concurrency-1b, a few minutes and ~3 GB; then minutes per run)")
    ap.add_argument("--concurrency-before", type=Path, metavar="JSON",
                    help="results JSON of a run before the change (e.g. today's server): the goals 'one client no "
                         "slower' and 'RSS after 4 clients' compare with it")
    a = ap.parse_args(argv)

    settings = Settings.smoke() if a.smoke else Settings()
    if a.reps:
        settings.reps = a.reps
    if a.examples_out:
        settings.examples_out = a.examples_out
    if a.systems:
        settings.systems = [x.strip() for x in a.systems.split(",") if x.strip()]
    if a.open_timeout:
        settings.open_timeout_s = a.open_timeout
    if a.call_timeout:
        settings.call_timeout_s = a.call_timeout
    if a.concurrency_clients:
        settings.concurrency_clients = sorted({int(x) for x in a.concurrency_clients.split(",") if x.strip()})
    settings.concurrency_1b = a.concurrency_1b
    if a.concurrency_before:
        if not a.concurrency_before.is_file():
            ap.error(f"--concurrency-before {a.concurrency_before}: no such file")
        settings.concurrency_before = str(a.concurrency_before.resolve())
    work = a.work or (WORK / "smoke" if a.smoke else WORK)
    work.mkdir(parents=True, exist_ok=True)
    out = a.out or (work / "results" if a.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    only = [x.strip() for x in a.sections.split(",") if x.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {SECTIONS}")

    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    mach = machine()
    models = tiny_models(work) if a.smoke else real_models()
    ctx = Context(models, settings, work)
    builds = {}
    if not a.smoke and ctx.wanted(LLAMA):  # what the llama.cpp peer was compiled with (issue 17)
        builds["llama.cpp"] = llama_build.describe()
        ctx.log(f"llama.cpp peer: {builds['llama.cpp']['summary']}")
    try:
        sections, goals = run_sections(ctx, only)
    finally:
        ctx.close()  # stop the peers' worker processes
    mach["loadavg_end"] = machine()["loadavg_1_5_15"]
    results = {
        "schema": SCHEMA, "mode": "smoke" if a.smoke else "full", "created": started,
        "duration_s": round(time.perf_counter() - ctx.t0, 1), "machine": mach, "versions": versions(),
        "settings": {k: v for k, v in vars(settings).items()} | {"threads": 2},
        "models": {"decoder": str(models.decoder_dir), "encoder": str(models.encoder_dir),
                   "gguf": str(models.gguf) if models.gguf else None},
        "builds": builds,
        "goals": goals, "sections": [s.to_json() for s in sections], "skipped": ctx.skipped,
    }
    name = "bench-smoke.json" if a.smoke else "bench.json"
    if not a.no_plots:
        results["plots"] = report.write_plots(results, out)
    write_json_atomic(out / name, results)
    md = report.render_markdown(results)
    table = out / ("table-smoke.md" if a.smoke else "table.md")
    tmp = table.with_name(f".{table.name}.tmp")
    tmp.write_text(md, encoding="utf-8")
    tmp.replace(table)
    readme = a.readme or (None if a.smoke else Path(__file__).resolve().parent / "README.md")
    if readme and not a.no_readme:
        if report.replace_readme_block(readme, report.render_markdown(results, compact=True)):
            ctx.log(f"results block refreshed in {readme}")
        else:
            ctx.log(f"{readme} has no {report.START} ... {report.END} block; table left in {table}")
    ctx.log(f"wrote {out / name} and {table} in {results['duration_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
