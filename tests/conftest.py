"""Shared fixtures. Tiny random models are built in code; real models only under -m slow."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def keypair(tmp_path_factory):
    """An Ed25519 key pair (private path, public path) for signing test bundles."""
    from edgepeft.bundle.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys") / "test")


def run_python(code: str, *, env: dict | None = None, timeout: float = 120):
    """Run ``code`` in a fresh interpreter (clean sys.modules); returns CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})
