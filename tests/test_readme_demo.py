"""The walkthrough's commands are what `make demo` runs, they parse, and the README's quickstart is a part of them.

`tools/demo.sh` runs the commands of `docs/walkthrough.md` verbatim; this test keeps the two from drifting apart
in either direction, checks that the README's short quickstart shows some of those same commands in the same
order (and nothing else), that every option shown exists, and that the walkthrough's `edgepeft train` commands
are the settings the example scripts train with (so `examples/train_*.py --from` reports on the same run).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import asdict
from pathlib import Path

import click
import pytest

from edgepeft.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
DEMO = ROOT / "tools" / "demo.sh"
PROGRAMS = ("edgepeft ", "curl ")


def commands(text: str) -> list[str]:
    """Shell commands starting with a program we compare: continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        line = pending + line.strip() if pending else line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith(PROGRAMS):
            words = shlex.split(line, comments=True)
            out.append(shlex.join(words) + (" &" if re.search(r"&\s*(#.*)?$", line) else ""))
    return out


def bash_blocks(text: str) -> str:
    return "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))


def readme_quickstart() -> list[str]:
    """The commands of the bash blocks in the README's Quickstart section."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Quickstart")
    return commands(bash_blocks(text[start:text.index("\n## ", start + 1)]))


def walkthrough() -> list[str]:
    """The commands of every bash block in docs/walkthrough.md (the quickstart, the classifier, updates, fleet)."""
    return commands(bash_blocks(WALKTHROUGH.read_text(encoding="utf-8")))


def test_the_demo_runs_every_walkthrough_command_verbatim_and_nothing_else():
    page, demo = walkthrough(), commands(DEMO.read_text(encoding="utf-8"))
    assert len(page) >= 12, page
    assert [c for c in page if c not in demo] == [], "walkthrough commands the demo does not run"
    assert [c for c in demo if c not in page] == [], "demo commands the walkthrough does not show"
    assert page == demo, "same commands, same order"


def test_the_readme_quickstart_is_a_part_of_the_walkthrough_in_its_order():
    quick, rest = readme_quickstart(), iter(walkthrough())
    assert len(quick) >= 8, quick
    assert [c for c in quick if c not in walkthrough()] == [], "README commands the demo does not run"
    assert all(c in rest for c in quick), "README commands out of the demo's order"


def test_the_classifier_path_has_eval_data_a_build_and_a_run():
    cls = [c for c in walkthrough() if "bank_intents" in c or "bundles/gateway" in c]
    train = next(c for c in cls if c.startswith("edgepeft train"))
    assert "--eval-data examples/bank_intents/eval.jsonl" in train
    assert any(c.startswith("edgepeft build --adapter intents=adapters/intents") for c in cls)
    assert any("--classify 'someone took money from my card'" in c for c in cls)


def _edgepeft_commands():
    return [shlex.split(c.rstrip(" &")) for c in walkthrough() if c.startswith("edgepeft ")]


@pytest.mark.parametrize("argv", _edgepeft_commands(), ids=lambda a: " ".join(a[:3]))
def test_every_readme_option_exists(argv):
    cmd = cli.get_command(click.Context(cli), argv[1])
    assert cmd is not None, argv[1]
    rest = argv[2:]
    if isinstance(cmd, click.Group):  # e.g. `edgepeft update create ...`
        cmd, rest = cmd.get_command(click.Context(cmd), rest[0]), rest[1:]
        assert cmd is not None, argv[:3]
    known = {o for p in cmd.params for o in p.opts + p.secondary_opts}
    given = [w.split("=", 1)[0] for w in rest if w.startswith("--")]
    assert [o for o in given if o not in known] == []


from edgepeft.cli.columns import pop_columns  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("example, data", [("train_support_voice", "northwind_support"),
                                           ("train_bank_intents", "bank_intents")])
def test_readme_train_commands_are_the_examples_settings(example, data):
    from edgepeft.cli.cmd_train import command
    from edgepeft.train import TrainOptions

    argv = next(a for a in _edgepeft_commands() if a[1] == "train" and f"examples/{data}/" in a[3])
    params = command.make_context("train", argv[2:]).params
    params.pop("as_json")
    params["columns"] = pop_columns(params)
    readme = asdict(TrainOptions(**params))
    settings = _load(example).SETTINGS
    want = asdict(TrainOptions(**(settings | {"out": readme["out"]})))
    for key in ("data", "eval_data"):
        readme[key] = str((ROOT / readme[key]).resolve())
    assert readme == want


def test_readme_prompt_tuning_command_is_the_families_example_setting():
    from edgepeft.cli.cmd_train import command
    from edgepeft.train import TrainOptions

    argv = next(a for a in _edgepeft_commands() if a[1] == "train" and "prompt-tuning" in a)
    params = command.make_context("train", argv[2:]).params
    params.pop("as_json")
    params["columns"] = pop_columns(params)
    readme = asdict(TrainOptions(**params))
    want = asdict(TrainOptions(**(_load("train_adapter_families").SETTINGS["prompt-tuning"] | {"out": readme["out"]})))
    for key in ("data", "eval_data"):
        readme[key] = str((ROOT / readme[key]).resolve())
    assert readme == want


def test_the_demo_serves_a_new_family_beside_lora_from_one_bundle():
    cmds = walkthrough()
    build = next(c for c in cmds if c.startswith("edgepeft build") and "bundles/pi5" in c)
    assert "northwind=adapters/northwind" in build and "northwind-prompt=adapters/northwind-prompt" in build
    assert any("--adapter northwind-prompt" in c and c.startswith("edgepeft run") for c in cmds)
    assert any(c.startswith("curl") and "northwind-prompt" in c for c in cmds)


@pytest.mark.slow
def test_the_readme_classifier_path_classifies_its_own_example_on_the_real_model(tmp_path):
    """The walkthrough's classifier commands, run as written (about 3 minutes on 2 cores): its example text is a
    suspicious charge, and the device's held-out accuracy equals training's."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def edgepeft(argv):
        proc = subprocess.run([sys.executable, "-m", "edgepeft", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    edgepeft(["edgepeft", "keygen", "--out", "keys/fleet"])
    outputs = {}
    for argv in _edgepeft_commands():
        if any("bank_intents" in w or "bundles/gateway" in w for w in argv):
            outputs[argv[1]] = edgepeft(argv + (["--json"] if argv[1] in ("run", "eval") else []))
    rows = {r["text"]: r for r in json.loads(outputs["run"])}
    assert rows["someone took money from my card"]["label"] == "suspicious_charge"
    ev = json.loads(outputs["eval"])
    assert ev["device"]["accuracy"] == ev["training_record"]["eval"]["accuracy"] >= 0.7
