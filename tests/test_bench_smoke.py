"""The benchmark harness keeps working: statistics, README block, and a smoke run on tiny models.

The full benchmark (real SmolLM2 and MiniLM, all peers) is ``make bench``, not CI.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import llama_build, report, systems  # noqa: E402
from benchmarks.harness import Figure, Group, Skip, interleaved  # noqa: E402
from benchmarks.isolate import PeerFailed, Worker  # noqa: E402


def test_figure_stats_median_and_iqr():
    f = Figure("g", "s", "tok/s", "higher", [5, 1, 3, 2, 4])
    assert f.median == 3 and f.n == 5 and f.min == 1 and f.max == 5
    assert f.p25 == 2 and f.p75 == 4 and f.iqr == 2


def test_group_ratios_are_to_peers_of_the_same_group():
    g = Group("decode", "decode", "higher")
    g.add("a", "tok/s", [100, 100])
    g.add("b", "tok/s", [50])
    out = g.to_json()
    a = next(f for f in out["figures"] if f["system"] == "a")
    assert a["ratios"] == {"b": 2.0}


def test_interleaved_rotates_and_drops_a_failing_system():
    order = []

    def ok(name):
        def f():
            order.append(name)
            return {"x": 1.0}
        return f

    def bad():
        raise Skip("not here")

    res = interleaved({"a": ok("a"), "b": ok("b"), "c": bad}, reps=2, warmup=0)
    assert res["c"] == {"__skip__": "not here", "__kind__": "skipped"}
    assert res["a"]["x"] == [1.0, 1.0]
    assert order == ["a", "b", "b", "a"]  # second repetition starts with the next system


def test_readme_block_replaced_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n{report.START}\nold\n{report.END}\ntail\n")
    assert report.replace_readme_block(readme, "| new |\n")
    text = readme.read_text()
    assert "old" not in text and "| new |" in text and text.endswith("tail\n") and "intro" in text
    nomarks = tmp_path / "OTHER.md"
    nomarks.write_text("no markers\n")
    assert not report.replace_readme_block(nomarks, "x")
    assert nomarks.read_text() == "no markers\n"


def test_smoke_run_writes_json_table_plots_and_readme(tmp_path):
    from benchmarks.run import main

    out, work = tmp_path / "results", tmp_path / "work"
    readme = tmp_path / "README.md"
    readme.write_text(f"# demo\n{report.START}\n{report.END}\n")
    # genai and llama.cpp peers are left to the full run: building genai models takes ~20 s each
    rc = main(["--smoke", "--out", str(out), "--work", str(work), "--readme", str(readme), "--reps", "2",
               "--systems", "transformers,edgepeft",
               "--sections", "decode,switch,sizes,quality,transport,classify,families,concurrency,scale"])
    assert rc == 0
    data = json.loads((out / "bench-smoke.json").read_text())
    assert data["schema"] == "edgepeft-bench/1" and data["mode"] == "smoke"
    assert data["machine"]["threads_per_system"] == 2 and data["versions"]["onnxruntime"]
    assert edgepeft_failures(data) == []  # a failing edgepeft build or engine fails the test, not a skip
    sections = {s["id"]: s for s in data["sections"]}
    transport = {f["system"]: f for g in sections["transport"]["groups"] for f in g["figures"]}
    assert {"edgepeft serial @ 115200", "edgepeft serial @ 921600", "edgepeft HTTP push",
            "edgepeft install to healthy"} <= set(transport), sorted(transport)
    assert all(0 < f["median"] <= 1.0 for s, f in transport.items() if "serial" in s and "@" in s
               and f["unit"] == "ratio" and f["group"].endswith("efficiency"))
    decode = {g["id"]: g for g in sections["decode"]["groups"]}
    torch_fig = next(f for f in decode["decode.decode_tok_s"]["figures"] if f["system"] == "transformers fp32")
    assert torch_fig["n"] == 2 and torch_fig["median"] > 0 and torch_fig["unit"] == "tok/s"
    for key in ("median", "p25", "p75", "iqr", "samples", "ratios"):
        assert key in torch_fig
    families = {f["system"]: f for g in sections["families"]["groups"] for f in g["figures"]}
    for method in ("lora", "prefix-tuning", "prompt-tuning", "bottleneck"):
        assert families[f"{method} int8"]["median"] < families[f"{method} fp32"]["median"], method
    assert {"edgepeft int4 (no bottleneck slots)", "+ prefix (20 tokens)", "+ bottleneck (houlsby, hidden/16)",
            "+ prompt (20 tokens, compiled cache)", "+ LoRA r8 (all linear)"} <= set(families), sorted(families)
    conc = {g["id"]: {f["system"]: f for f in g["figures"]} for g in sections["concurrency"]["groups"]}
    assert all(f["median"] > 0 for f in conc["concurrency.agg_tok_s"].values())
    assert {"edgepeft serve, idle", "edgepeft serve, after 2 clients"} <= set(conc["concurrency.rss_bytes"])
    assert [r[0] for r in sections["concurrency"]["tables"][0]["rows"]] == ["1", "2"]
    goals = {g["name"]: g for g in data["goals"]}
    assert goals["tiny smoke model: 4 clients on 4 adapters, aggregate tok/s vs 1 client"]["met"] is None  # no 4
    table = (out / "table-smoke.md").read_text()
    assert "Decode speed" in table and "Updates: serial line use" in table and "Adapter families" in table
    assert "| clients | aggregate tok/s |" in table
    scale = {g["id"]: {f["system"] for f in g["figures"]} for g in sections["scale"]["groups"]}
    assert {"scale.decode_tok_s", "scale.prefill_s", "scale.rss_bytes", "scale.open_to_first_token_s",
            "scale.build_wall_s", "scale.build_peak_rss_bytes"} <= set(scale), sorted(scale)
    assert "edgepeft int4 1B + rank-16 adapter" in scale["scale.rss_bytes"]
    text = readme.read_text()
    assert text.startswith("# demo\n") and "Decode speed" in text and "benchmarks/results/table.md" in text
    assert any(p.suffix == ".png" for p in out.iterdir())
    assert (out / "concurrency.clients.png").is_file()  # aggregate tok/s and p95 latency against clients


# What every smoke run must measure for edgepeft; a skip of any of these (or any other skip but the example
# adapters, which are trained by `make demo`, not here) means an edgepeft build or engine failed.
EDGEPEFT_SYSTEMS = {
    "decode": {"edgepeft fp32", "edgepeft int4", "edgepeft int8", "edgepeft int4 + adapter", "edgepeft int4 merged"},
    "switch": {"edgepeft switch (registry + rebind)", "reopen merged int4: Engine (verify + session)"},
    "sizes": {"edgepeft fp32", "edgepeft int4", "edgepeft int8", "adapter file fp32", "adapter file fp16",
              "adapter file int8"},
    "quality": {"edgepeft fp32", "edgepeft int4", "edgepeft int8"},
    "transport": {"edgepeft serial @ 115200", "edgepeft serial @ 921600", "edgepeft HTTP push",
                  "edgepeft install to healthy"},
    "classify": {"edgepeft fp32 + adapter", "edgepeft int8 + adapter"},
    "concurrency": {"edgepeft serve, 1 client", "edgepeft serve, 2 clients"},
    "scale": {"edgepeft int4 1B, no slots (merged)", "edgepeft int4 1B, slots, no adapter",
              "edgepeft int4 1B + rank-16 adapter", "edgepeft build --quant int4"},
}


def edgepeft_failures(data: dict) -> list[str]:
    """Why a smoke result does not show every edgepeft system working ([] when it does)."""
    out = [f"skipped {s['what']}: {s['why']}" for s in data.get("skipped", [])
           if not (s["what"].startswith("example adapter ") and s["why"].startswith("not trained yet"))
           and not s["why"].startswith("the tiny smoke model is not a GGUF")]  # its GGUF forms: one bundle
    measured = {s["id"]: {f["system"] for g in s["groups"] for f in g["figures"] if f.get("n", 1)}
                for s in data["sections"]}
    for sid, want in EDGEPEFT_SYSTEMS.items():
        if sid in measured:
            out += [f"{sid}: no figure for {name}" for name in sorted(want - measured[sid])]
    return out


def test_edgepeft_failures_are_not_dropped_as_skips():
    ok = {"skipped": [{"what": "example adapter bank-intents", "why": "not trained yet: run ...", "kind": "skipped"}],
          "sections": [{"id": "quality", "groups": [{"figures": [{"system": s, "n": 2} for s in
                                                                  EDGEPEFT_SYSTEMS["quality"]]}]}]}
    assert edgepeft_failures(ok) == []
    broken = json.loads(json.dumps(ok))
    broken["skipped"].append({"what": "edgepeft int4 perplexity", "why": "BundleError: ...", "kind": "skipped"})
    broken["sections"][0]["groups"][0]["figures"].pop()
    problems = edgepeft_failures(broken)
    assert any("edgepeft int4 perplexity" in p for p in problems) and any("no figure" in p for p in problems)
    crashed = {"skipped": [{"what": "section decode", "why": "EngineError: ...", "kind": "skipped"}], "sections": []}
    assert edgepeft_failures(crashed) == ["skipped section decode: EngineError: ..."]


# Fake peers for the crash tests. They run in worker processes, which import them from this module by name.

def _segv_on_open(**_):
    os.kill(os.getpid(), signal.SIGSEGV)  # what llama.cpp's AMX kernels did while loading a model (issue 17)


def _hang_on_open(**_):
    time.sleep(3600)


class _SegvOnSecondRun:
    """Opens and passes its probe, then dies with SIGSEGV in the middle of the measured repetitions."""

    def __init__(self) -> None:
        self.runs = 0

    def tokens(self, text, ids, n_new):
        return [0] * n_new

    def run(self, text, ids, n_new):
        self.runs += 1
        if self.runs == 2:  # the warm-up passed; the first measured repetition crashes
            import ctypes

            ctypes.string_at(0)  # a real invalid read, not a polite signal
        return {"prefill_s": 1.0, "decode_tok_s": 1.0, "tokens": n_new}


def test_cmake_args_are_portable_with_amx_off():
    xeon = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512cd", "avx512vl",
            "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
            "amx_int8", "amx_bf16"}
    args = llama_build.cmake_args(xeon, "x86_64")
    assert args[0] == "-DGGML_NATIVE=OFF"
    for opt in ("AVX2", "FMA", "F16C", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI"):
        assert f"-DGGML_{opt}=ON" in args
    for opt in ("AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{opt}=OFF" in args
    # every instruction set is explicit: with GGML_NATIVE=OFF ggml would otherwise turn AVX2/FMA/F16C on
    old = llama_build.cmake_args({"sse4_2", "avx", "avx512f"}, "x86_64")
    assert "-DGGML_AVX=ON" in old and "-DGGML_AVX2=OFF" in old and "-DGGML_FMA=OFF" in old
    assert "-DGGML_AVX512=OFF" in old  # avx512f alone is not the five that -DGGML_AVX512 compiles for
    assert llama_build.cmake_args(xeon, "aarch64") == []
    assert "AMX_INT8" not in llama_build.expected_features(xeon)


def test_system_info_names_what_the_library_was_compiled_with():
    text = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
    info = llama_build.system_info(text)
    assert info["features"] == ["SSE3", "AVX", "AVX2", "AVX512", "AMX_INT8", "LLAMAFILE", "OPENMP"]
    line = llama_build.summary({"installed": info | {"version": "0.3.36", "amx": True, "missing": ["F16C"]}})
    assert "with AMX" in line and "lacks F16C" in line and "LLAMAFILE" not in line
    results = {"created": "now", "mode": "full", "settings": {"reps": 1}, "sections": [],
               "machine": {"cpu": "x", "logical_cpus": 2, "threads_per_system": 2},
               "builds": {"llama.cpp": {"summary": line}}}
    assert f"llama.cpp peer: {line}." in report.render_markdown(results, compact=True)  # the table says it


def test_worker_contains_a_segfault_a_hang_and_a_crash_mid_run(tmp_path):
    with pytest.raises(PeerFailed) as crashed:
        Worker("segv", _segv_on_open, log_dir=tmp_path)
    assert crashed.value.kind == "crashed" and "SIGSEGV" in str(crashed.value) and crashed.value.phase == "opening"
    with pytest.raises(PeerFailed) as hung:
        Worker("hang", _hang_on_open, open_timeout=1.5, log_dir=tmp_path)
    assert hung.value.kind == "hung" and "1.5 s" in str(hung.value)
    w = Worker("mid-run", _SegvOnSecondRun, probe=("tokens", ("t", [1], 3)), log_dir=tmp_path)
    try:
        assert w.call("run", "t", [1], 3)["tokens"] == 3
        with pytest.raises(PeerFailed) as mid:
            w.call("run", "t", [1], 3)
        assert mid.value.kind == "crashed" and "running run" in str(mid.value)
        assert "Segmentation fault" in (tmp_path / "mid-run.stderr.log").read_text()  # faulthandler's stack
        with pytest.raises(PeerFailed):  # a dead worker stays dead
            w.call("tokens", "t", [1], 3)
    finally:
        w.close()
    assert not multiprocessing.active_children()


def test_memory_probe_that_fails_is_reported_with_how_it_ended():
    from benchmarks.sec_memory import probe_fresh

    with pytest.raises(PeerFailed) as exc:
        probe_fresh("no-such-kind", {"text": "x", "ids": [1]}, timeout=120)
    assert exc.value.kind == "exited" and "exited with status 1" in str(exc.value)
    assert "unknown probe kind" in str(exc.value)


def test_smoke_run_skips_a_crashing_and_a_hanging_peer_and_goes_on(tmp_path, monkeypatch):
    from benchmarks.run import main

    fakes = {"fake segv on open": _segv_on_open, "fake hang on open": _hang_on_open,
             "fake segv mid-run": _SegvOnSecondRun}
    monkeypatch.setattr(systems, "DECODERS", systems.DECODERS + list(fakes))
    for name, factory in fakes.items():
        monkeypatch.setitem(systems.PEERS, name, lambda ctx, f=factory: (f, {}))
    out = tmp_path / "results"
    rc = main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--no-readme", "--no-plots",
               "--reps", "2", "--sections", "decode", "--systems", "edgepeft int8,fake", "--open-timeout", "4"])
    assert rc == 0
    data = json.loads((out / "bench-smoke.json").read_text())
    skipped = {s["what"]: s for s in data["skipped"]}
    assert skipped["fake segv on open"]["kind"] == "crashed"
    assert "killed by SIGSEGV" in skipped["fake segv on open"]["why"]
    assert skipped["fake hang on open"]["kind"] == "hung"
    assert "no answer within 4 s" in skipped["fake hang on open"]["why"]
    assert skipped["fake segv mid-run"]["kind"] == "crashed"
    assert "while running run" in skipped["fake segv mid-run"]["why"]
    decode = next(s for s in data["sections"] if s["id"] == "decode")
    figs = {f["system"]: f for g in decode["groups"] for f in g["figures"] if g["id"] == "decode.decode_tok_s"}
    assert set(figs) == {"edgepeft int8"} and figs["edgepeft int8"]["n"] == 2  # the run went on without them
    table = (out / "table-smoke.md").read_text()
    for name in fakes:
        assert f"- {name}: " in table
    assert "killed by SIGSEGV" in table and "no answer within 4 s" in table
    assert not multiprocessing.active_children()  # every worker was stopped


def test_concurrency_goals_are_ratios_in_the_run_and_to_the_run_before():
    from benchmarks.harness import Section
    from benchmarks.sec_concurrency import EP, LLAMA_BATCH, goals_concurrency, label

    def section(one: float, four: float, eight: float, rss4: float, llama4: float | None = None) -> Section:
        sec = Section("concurrency", "t")
        agg = sec.group("agg_tok_s", "agg", "higher")
        for n, v in ((1, one), (4, four), (8, eight)):
            agg.add(label(EP, n), "tok/s", [v, v])
        if llama4:
            agg.add(label(LLAMA_BATCH, 4), "tok/s", [llama4])
        lat = sec.group("latency_s", "lat", "lower")
        lat.add(label(EP, 1), "s", [1.0, 1.0])
        lat.add(label(EP, 4), "s", [2.0, 2.2])  # p50 2.1x
        sec.group("rss_bytes", "rss", "lower").add(f"{EP}, after 4 clients", "bytes", [rss4])
        return sec

    before = {"created": "then", "machine": {"loadavg_1_5_15": [1, 1, 1]},
              "sections": [section(40.0, 50.0, 55.0, 400e6).to_json() | {"id": "concurrency"}]}
    goals = {g["name"].split(": ", 1)[1].split(" (")[0]: g
             for g in goals_concurrency(section(38.0, 80.0, 90.0, 390e6, llama4=70.0), before)}
    assert goals["4 clients on 4 adapters, aggregate tok/s vs 1 client"]["met"] is True
    assert abs(goals["4 clients on 4 adapters, aggregate tok/s vs 1 client"]["ratio"] - 80 / 38) < 1e-3
    assert goals["4 clients, p50 latency vs 1 client"]["met"] is True  # 2.1x <= 2.2x
    assert goals["8 clients, aggregate tok/s vs 1 client"]["met"] is False  # 2.37x < 2.5x
    assert goals["4 clients, mixed adapters, vs llama.cpp 4 sequences without adapters"]["met"] is True
    assert goals["1 client alone vs the run before the change"]["met"] is True  # 0.95x: within the allowance
    assert goals["server RSS after 4 clients vs the run before the change"]["met"] is True
    alone = {g["name"].split(": ", 1)[1]: g for g in goals_concurrency(section(38.0, 80.0, 90.0, 390e6))}
    assert alone["1 client alone vs the run before the change"]["met"] is None
    assert "no run before the change given" in alone["1 client alone vs the run before the change"]["measured"]
    assert alone["4 clients, mixed adapters, vs llama.cpp 4 sequences without adapters (same run)"]["met"] is None


def test_peer_goals_are_same_run_ratios_and_missing_figures_are_not_met():
    from benchmarks.goals_peers import goals_peers
    from benchmarks.harness import Section
    from benchmarks.sec_scale import EP_AD, EP_BARE, EP_SLOTS, GENAI_1B

    dec = Section("decode", "d")
    g = dec.group("decode_tok_s", "tok/s", "higher")
    for name, v in ((systems.EP_INT4_RQ, 150.0), (systems.EP_INT4_RQ_MERGED, 155.0), (systems.GENAI, 200.0),
                    (systems.EP_INT4_RQ_AD, 130.0), (systems.GENAI_AD, 120.0)):
        g.add(name, "tok/s", [v, v])
    mem = Section("memory", "m")
    r = mem.group("rss_bytes", "rss", "lower")
    r.add(f"{systems.EP_INT4_RQ}, 0 adapters", "bytes", [200e6])
    r.add("genai int4", "bytes", [210e6])
    scale = Section("scale", "s")
    s = scale.group("decode_tok_s", "tok/s", "higher")
    for name, v in ((EP_SLOTS, 7.0), (EP_BARE, 7.7), (GENAI_1B, 6.5), (EP_AD, 6.0)):
        s.add(name, "tok/s", [v])
    goals = {x["name"]: x for x in goals_peers([dec, mem, scale])}
    assert goals["135M: float-base int4, no adapter >= genai int4"]["met"] is False  # 0.75x
    assert abs(goals["135M: float-base int4, no adapter >= genai int4"]["ratio"] - 0.75) < 1e-9
    assert goals["135M: slot graph without adapter within 5 % of the merged graph"]["met"] is True  # 0.968x
    assert goals["135M: float-base int4 + rank-8 adapter >= 1.3x genai int4 + adapter"]["met"] is False  # 1.08x
    assert goals["135M: resident memory, float-base, no adapter <= genai int4"]["met"] is True
    missing = goals["135M: GGUF-exact default, no adapter >= 1.15x llama.cpp"]
    assert missing["met"] is None and "llama.cpp Q4_1" in missing["measured"]
    assert goals["1B shape: slot graph without adapter within 5 % of the merged graph"]["met"] is False  # 0.909x
    assert goals["1B shape: float-base int4, no adapter >= genai int4"]["met"] is True
    assert goals["1B shape: float-base int4 + rank-16 adapter >= 1.3x genai int4 + adapter"]["met"] is None
    assert goals["1B shape: GGUF-exact default, no adapter >= 1.15x llama.cpp"]["met"] is None
