"""The benchmark harness keeps working: statistics, README block, and a smoke run on tiny models.

The full benchmark (real SmolLM2 and MiniLM, all peers) is ``make bench``, not CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.harness import Figure, Group, Skip, interleaved  # noqa: E402


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
    assert res["c"] == {"__skip__": "not here"}
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
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks.run import main

    out, work = tmp_path / "results", tmp_path / "work"
    readme = tmp_path / "README.md"
    readme.write_text(f"# demo\n{report.START}\n{report.END}\n")
    # genai and llama.cpp peers are left to the full run: building genai models takes ~20 s each
    rc = main(["--smoke", "--out", str(out), "--work", str(work), "--readme", str(readme), "--reps", "2",
               "--systems", "transformers,edgepeft",
               "--sections", "decode,switch,sizes,quality,transport,classify"])
    assert rc == 0
    data = json.loads((out / "bench-smoke.json").read_text())
    assert data["schema"] == "edgepeft-bench/1" and data["mode"] == "smoke"
    assert data["machine"]["threads_per_system"] == 2 and data["versions"]["onnxruntime"]
    sections = {s["id"]: s for s in data["sections"]}
    assert sections["transport"]["status"] == "not built yet" and not sections["transport"]["groups"]
    decode = {g["id"]: g for g in sections["decode"]["groups"]}
    torch_fig = next(f for f in decode["decode.decode_tok_s"]["figures"] if f["system"] == "transformers fp32")
    assert torch_fig["n"] == 2 and torch_fig["median"] > 0 and torch_fig["unit"] == "tok/s"
    for key in ("median", "p25", "p75", "iqr", "samples", "ratios"):
        assert key in torch_fig
    table = (out / "table-smoke.md").read_text()
    assert "Decode speed" in table and "Not built yet" in table
    text = readme.read_text()
    assert text.startswith("# demo\n") and "Decode speed" in text and "benchmarks/results/table.md" in text
    assert any(p.suffix == ".png" for p in out.iterdir())
