"""Shared fixtures. Tiny random models are built in code; real models only under -m slow."""

from __future__ import annotations

import fnmatch
import importlib.util
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


# Hard dependencies: a test run fails, never skips, when one is missing. The device run needs the base
# install (and the test tools); the host run the server side too. Only truly optional things (real model
# wheels, llama.cpp, node, mosquitto) may skip a test, with the reason.
DEVICE_DEPENDENCIES = ("onnxruntime", "numpy", "tokenizers", "click", "serial", "cryptography", "jinja2", "tuf",
                       "paho.mqtt", "hypothesis")
HOST_DEPENDENCIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors", "gguf",
                     "matplotlib", "onnx")


def missing_dependencies(device_run: bool = DEVICE_RUN) -> list[str]:
    """The hard dependencies this run lacks (looked up, not imported: torch stays out of a quick run)."""
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ModuleNotFoundError:  # its parent package is missing
            return True

    wanted = DEVICE_DEPENDENCIES + (() if device_run else HOST_DEPENDENCIES)
    return [name for name in wanted if absent(name)]


def pytest_sessionstart(session):
    """A missing hard dependency fails the run before any test: a skip would pass it silently."""
    missing = missing_dependencies()
    if missing:
        raise pytest.UsageError(f"missing hard test dependencies: {', '.join(missing)} "
                                f"({'device' if DEVICE_RUN else 'host'} run); install them (`make env`, or "
                                "pip install -e '.[dev]'); tests skip only for optional things")


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


# The tiny signed fixture bundles (test_runtime_support.cached_bundle: built once per session here,
# copied from $EDGEPEFT_PREBUILT_FIXTURES on the device run, where a test without them is skipped, and
# the device run counts that skip as a failure).
def _fixture_bundle(kind: str, tmp_path_factory) -> dict:
    from test_runtime_support import cached_bundle, require_fixtures

    require_fixtures()
    return cached_bundle(kind, tmp_path_factory)


@pytest.fixture(scope="session")
def decoder_bundle(tmp_path_factory):
    """A tiny decoder base with LoRA adapters, as a signed bundle (see test_runtime_support)."""
    return _fixture_bundle("decoder", tmp_path_factory)


@pytest.fixture(scope="session")
def encoder_bundle(tmp_path_factory):
    """A tiny encoder classifier with adapters, as a signed bundle."""
    return _fixture_bundle("encoder", tmp_path_factory)


@pytest.fixture(scope="session")
def families_bundle(tmp_path_factory):
    """A tiny decoder with one adapter of each family (LoRA, prefix, prompt, bottleneck), as a signed bundle."""
    return _fixture_bundle("families", tmp_path_factory)


@pytest.fixture(scope="session")
def built(decoder_bundle):
    """The bundle most device-side tests run on (the decoder); a module that wants another kind overrides it."""
    return decoder_bundle
