"""Shared fixtures. Tiny random models are built in code; real models only under -m slow."""

from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Device-side test modules, the one list to extend: they run in the default suite on the host and,
# unchanged, on an emulated aarch64 device with the base (torch-free) install (`make test-aarch64`,
# tools/aarch64.sh). Each of their tests gets the `device` marker; a test in them that needs the
# server side takes `@pytest.mark.host_only`. Fixtures that need torch come from
# test_runtime_support.cached_bundle, which the device run reads prebuilt.
DEVICE_TESTS = ("test_contracts_*.py", "test_runtime_*.py", "test_device_*.py",
                "test_update*.py", "test_transport*.py", "test_agent*.py")
DEVICE_RUN = os.environ.get("EDGEPEFT_DEVICE_RUN") == "1"  # set by tools/aarch64.sh on the device


def _is_device_module(path: Path) -> bool:
    return any(fnmatch.fnmatch(path.name, pattern) for pattern in DEVICE_TESTS)


def pytest_ignore_collect(collection_path, config):
    """On the device run only device-side modules are even imported (the others need the server side)."""
    if DEVICE_RUN and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return not _is_device_module(collection_path)
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_device_module(item.path):
            item.add_marker(pytest.mark.device)


def pytest_sessionfinish(session, exitstatus):
    """On the device run a skip is a failure: every selected device test must really run there."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if DEVICE_RUN and skipped and session.exitstatus == 0:
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            reporter.write_line(f"device run: {report.nodeid} was skipped ({reason})", red=True)
        reporter.write_line("device run: skips are failures here; mark server-side tests host_only", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def keypair(tmp_path_factory):
    """An Ed25519 key pair (private path, public path) for signing test bundles."""
    from edgepeft.contracts.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys") / "test")


def run_python(code: str, *, env: dict | None = None, timeout: float = 120):
    """Run ``code`` in a fresh interpreter (clean sys.modules); returns CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})
