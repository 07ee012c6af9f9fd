"""The device side never imports torch, transformers, peft, bitsandbytes or onnx: proved in a clean interpreter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import run_python

ROOT = Path(__file__).resolve().parents[1]
_CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
# The import-linter contract in pyproject.toml is the one place the rule is written; this test runs it for real.
_DEVICE = next(c for c in _CONTRACTS if c["name"].startswith("The device side"))
DEVICE_PACKAGES = [m for m in _DEVICE["source_modules"] if m.count(".") == 1 and (ROOT / m.replace(".", "/")).is_dir()]
BLOCKED = sorted(set(_DEVICE["forbidden_modules"]) | {"optimum"})

_PROBE = """
import importlib, importlib.abc, json, pkgutil, sys
BLOCKED = set({blocked!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked on the device side: ' + name)
        return None
sys.meta_path.insert(0, Block())
imported = []
for pkg_name in {packages!r}:
    pkg = importlib.import_module(pkg_name)  # a missing device package is a failure, not a skip
    imported.append(pkg_name)
    for info in pkgutil.walk_packages(pkg.__path__, pkg_name + '.'):
        importlib.import_module(info.name)
        imported.append(info.name)
import edgepeft.cli.main
leaked = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
print(json.dumps({{'imported': imported, 'leaked': leaked}}))
"""


def test_device_side_imports_without_server_libraries():
    proc = run_python(_PROBE.format(blocked=BLOCKED, packages=DEVICE_PACKAGES))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for module in ("edgepeft.contracts.verify", "edgepeft.contracts.update", "edgepeft.update.device", "edgepeft.update.agent",
                   "edgepeft.transport.serial_agent", "edgepeft.transport.serial_link", "edgepeft.transport.http"):
        assert module in result["imported"], module
    assert result["leaked"] == []


def test_cli_help_imports_nothing_heavy():
    proc = run_python(
        "import sys\nfrom edgepeft.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{set(BLOCKED) | {'onnxruntime', 'numpy', 'tokenizers'}!r})\n"
        "print('HEAVY', heavy)"
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.exists(), "import-linter is missing: pip install -e '.[dev]'"
    return subprocess.run([str(exe), "--config", str(cwd / "pyproject.toml")], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


@pytest.mark.host_only  # import-linter is a developer tool: the device's base install does not have it
def test_import_contract_holds_and_a_broken_layer_fails(tmp_path):
    assert _lint_imports(ROOT).returncode == 0
    # A copy of the package where the device runtime imports training: the contract must break.
    shutil.copytree(ROOT / "edgepeft", tmp_path / "edgepeft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "edgepeft" / "runtime" / "health.py", "a") as f:
        f.write("\nfrom ..train import options  # noqa: E402,F401\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "edgepeft.runtime.health -> edgepeft.train.options" in proc.stdout
