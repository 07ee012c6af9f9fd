"""The device side never imports torch, transformers, peft, bitsandbytes or onnx: proved in a clean interpreter."""

from __future__ import annotations

import json

from conftest import run_python

DEVICE_PACKAGES = ["edgepeft.spec", "edgepeft.runtime", "edgepeft.update", "edgepeft.transport"]
BLOCKED = ["torch", "transformers", "peft", "bitsandbytes", "onnx", "optimum", "accelerate", "datasets"]

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
    for module in ("edgepeft.spec.verify", "edgepeft.spec.update", "edgepeft.update.device", "edgepeft.update.agent",
                   "edgepeft.update.agent_serial", "edgepeft.transport.serial_link", "edgepeft.transport.http"):
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
