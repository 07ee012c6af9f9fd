"""Run health checks on the build machine, on the very graph and adapters a device will open, before a
bundle or update package is signed: an expectation that cannot hold (a typo, another model's name) is
refused here, with the answer produced, instead of failing on every device."""

from __future__ import annotations

from pathlib import Path

from ..errors import BuildError, EdgePeftError


def _failed(what: str, failures: list[str], where: str) -> BuildError:
    return BuildError(f"{what}: the health checks fail on the built graph, so nothing was signed: "
                      f"{'; '.join(failures)}",
                      hint=f"fix the expectation in {where} (the answer above is what the model says), "
                           "or train the adapter until it gives it")


def check_bundle(bundle_dir: Path, public_key, checks: list, *, what: str, where: str) -> None:
    """Open the bundle in ``bundle_dir`` (its manifest signed by ``public_key``'s pair) and run ``checks``,
    each with the adapter it names. Raises :class:`BuildError` listing every failure."""
    from ..runtime import Engine
    from ..runtime.health import run_bundle_checks

    if not checks:
        return
    with Engine(bundle_dir, [public_key], health_checks=False, threads=1) as engine:
        failures = run_bundle_checks(engine, checks)
    if failures:
        raise _failed(what, failures, where)


def check_package(bundle_dir: Path, public_key, package: bytes, name: str, checks: list, *, what: str,
                  where: str) -> None:
    """Load an adapter update package (bytes, signed by ``public_key``'s pair) into the bundle it is for and
    run ``checks`` on it, as a device does on install. Raises :class:`BuildError`."""
    from ..runtime import Engine

    if not checks:
        return
    with Engine(bundle_dir, [public_key], health_checks=False, threads=1) as engine:
        probe = f"{name}-probe"
        try:
            engine.load_adapter(package, name=probe)
            failures = engine.health_check(checks, probe)
        except EdgePeftError as exc:
            failures = [f"the adapter does not load: {exc.message}"]
    if failures:
        raise _failed(what, failures, where)
