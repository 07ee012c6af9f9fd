"""Timing core of the benchmarks: interleaved repetitions, robust statistics, figures.

Why interleave: on a shared or thermally throttled machine absolute speed drifts
by tens of percent within minutes. Running rep 1 of every system, then rep 2 of
every system (rotating who goes first), spreads that drift over all systems
alike, so the *ratios* between systems measured in one run stay meaningful even
when the absolute numbers do not.

Every figure carries its raw samples, median, quartiles and IQR; ratios to the
peers measured in the same run are added by :func:`add_ratios`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata

THREADS = 2  # every system gets the same thread budget


class Skip(Exception):
    """A system or figure cannot be measured here; the message says why (kept in the JSON)."""


@dataclass
class Figure:
    """One measured quantity of one system, with its spread.

    ``group`` names the comparison the figure belongs to (figures in one group
    are ratios of each other); ``better`` is "higher" or "lower".
    """

    group: str
    system: str
    unit: str
    better: str
    samples: list[float]
    note: str = ""
    median: float = 0.0
    p25: float = 0.0
    p75: float = 0.0
    iqr: float = 0.0
    min: float = 0.0
    max: float = 0.0
    n: int = 0
    ratios: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = sorted(float(x) for x in self.samples)
        if not s:
            raise ValueError(f"figure {self.group}/{self.system} has no samples")
        self.samples = [round(x, 9) for x in self.samples]
        self.n = len(s)
        self.median = statistics.median(s)
        self.p25, self.p75 = _quartiles(s)
        self.iqr = self.p75 - self.p25
        self.min, self.max = s[0], s[-1]

    def to_json(self) -> dict:
        return asdict(self)


def _quartiles(s: list[float]) -> tuple[float, float]:
    if len(s) == 1:
        return s[0], s[0]
    q = statistics.quantiles(s, n=4, method="inclusive")
    return q[0], q[2]


def single(group: str, system: str, unit: str, value: float, *, better: str = "lower", note: str = "") -> Figure:
    """A figure that is a single deterministic value (a file size): spread 0."""
    return Figure(group, system, unit, better, [float(value)], note=note)


def interleaved(systems: dict[str, Callable[[], dict[str, float]]], reps: int, warmup: int = 1,
                log: Callable[[str], None] | None = None, settle_s: float = 0.05) -> dict[str, dict[str, list[float]]]:
    """Run each system's ``sample()`` ``reps`` times, interleaved, after ``warmup`` runs.

    ``sample()`` returns a dict of metric -> value for one repetition. The start
    system rotates each repetition so none is always first after a pause.
    Returns ``{system: {metric: [values...]}}``. A system whose sample raises
    is dropped with the reason in ``result[system]["__skip__"]`` and its kind
    in ``["__kind__"]`` ("skipped"; "crashed", "exited" or "hung" for a peer
    whose worker process failed; "failed" for any other exception).
    """
    names = list(systems)
    out: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    dead: dict[str, tuple[str, str]] = {}

    def call(n: str):
        if settle_s:
            time.sleep(settle_s)  # let the previous system's spinning thread pool go idle (not timed)
        try:
            return systems[n]()
        except Skip as exc:  # cannot run, or its worker process died: drop it, keep the others
            dead[n] = (str(exc), getattr(exc, "kind", "skipped"))
        except Exception as exc:  # a failure of the system under test: drop it, keep the others
            dead[n] = (f"{type(exc).__name__}: {str(exc)[:300]}", "failed")
        return None

    for n in names:
        for _ in range(warmup):
            if n in dead or call(n) is None:
                break
    for rep in range(reps):
        live = [n for n in names if n not in dead]
        k = rep % max(len(live), 1)
        for n in live[k:] + live[:k]:
            vals = call(n)
            if vals is None:
                continue
            for metric, v in vals.items():
                out[n].setdefault(metric, []).append(float(v))
        if log:
            log(f"  rep {rep + 1}/{reps} done")
    for n, (why, kind) in dead.items():
        out[n] = {"__skip__": why, "__kind__": kind}  # type: ignore[dict-item]
    return out


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (perf_counter)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def add_ratios(figures: list[Figure]) -> None:
    """Give every figure its ratio to each other figure of the same group (same run).

    The ratio is ``this.median / peer.median`` whatever ``better`` says, so the
    JSON stays unambiguous; the README table says which way is better.
    """
    by_group: dict[str, list[Figure]] = {}
    for f in figures:
        by_group.setdefault(f.group, []).append(f)
    for group in by_group.values():
        for f in group:
            f.ratios = {p.system: (f.median / p.median if p.median else float("nan"))
                        for p in group if p is not f}


def versions() -> dict[str, str | None]:
    """Versions of every package a figure may depend on (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("edgepeft", "onnxruntime", "onnxruntime-genai", "torch", "transformers", "peft",
                 "llama_cpp_python", "numpy", "tokenizers", "onnx", "psutil", "openai"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict:
    """What the numbers were taken on: CPU, cores, memory, OS, load when the run started."""
    info: dict = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads_per_system": THREADS,
    }
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["loadavg_1_5_15"] = None
    try:
        import psutil

        info["memory_total_bytes"] = psutil.virtual_memory().total
    except ImportError:
        info["memory_total_bytes"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Group:
    """Figures that are compared with each other (ratios are taken within a group)."""

    def __init__(self, gid: str, title: str, better: str, refs: list[str] | None = None) -> None:
        self.id, self.title, self.better, self.refs = gid, title, better, refs or []
        self.figures: list[Figure] = []

    def add(self, system: str, unit: str, samples: list[float], note: str = "") -> Figure:
        fig = Figure(self.id, system, unit, self.better, list(samples), note=note)
        self.figures.append(fig)
        return fig

    def get(self, system: str) -> Figure | None:
        return next((f for f in self.figures if f.system == system), None)

    def to_json(self) -> dict:
        add_ratios(self.figures)
        return {"id": self.id, "title": self.title, "better": self.better, "refs": self.refs,
                "figures": [f.to_json() for f in self.figures]}


class Section:
    """One numbered part of the issue (decode, switch, sizes, ...)."""

    def __init__(self, sid: str, title: str) -> None:
        self.id, self.title = sid, title
        self.groups: list[Group] = []
        self.notes: list[str] = []
        self.series: list[dict] = []  # line plots over time: {"id", "title", "x", "y", "lines": {name: [[x, y]...]}}
        self.tables: list[dict] = []  # summary tables: {"title", "columns": [str], "rows": [[str]]}
        self.status = "measured"

    def group(self, gid: str, title: str, better: str, refs: list[str] | None = None) -> Group:
        g = Group(f"{self.id}.{gid}", title, better, refs)
        self.groups.append(g)
        return g

    def find(self, gid: str) -> Group | None:
        return next((g for g in self.groups if g.id == f"{self.id}.{gid}"), None)

    def to_json(self) -> dict:
        return {"id": self.id, "title": self.title, "status": self.status, "notes": self.notes,
                "groups": [g.to_json() for g in self.groups if g.figures], "series": self.series,
                "tables": self.tables}
