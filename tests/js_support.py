"""examples/js's pinned npm packages for the tests that run its code (no tests here)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

JS = Path(__file__).resolve().parent.parent / "examples" / "js"


def npm_ci(npm: str) -> Path:
    """`npm ci` into examples/js/node_modules when the installed tree is not the lockfile's; returns it."""
    lock, installed = JS / "package-lock.json", JS / "node_modules" / ".package-lock.json"
    want = json.loads(lock.read_text())["packages"]
    have = json.loads(installed.read_text())["packages"] if installed.is_file() else None
    if have is None or {k: v.get("version") for k, v in have.items()} != \
            {k: v.get("version") for k, v in want.items() if k}:
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"})
        assert proc.returncode == 0, f"npm ci failed in {JS}:\n{proc.stdout}\n{proc.stderr}"
    return JS / "node_modules"
