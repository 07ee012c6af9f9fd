"""Every name a package's ``__all__`` promises resolves (the lazy ``__getattr__`` maps of edgepeft.export
and edgepeft.runtime point at modules that can move: a moved module broke ``supported_architectures``)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import edgepeft

PACKAGES = sorted(m.name for m in pkgutil.walk_packages(edgepeft.__path__, "edgepeft.") if m.ispkg)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_resolves(package):
    mod = importlib.import_module(package)
    missing = []
    for name in getattr(mod, "__all__", ()):
        try:
            getattr(mod, name)
        except (AttributeError, ImportError) as exc:
            missing.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not missing, f"{package}.__all__ names what it cannot give: {missing}"


def test_supported_architectures_from_the_export_package():
    from edgepeft.export import supported_architectures
    from edgepeft.models.arch import supported

    assert supported_architectures is supported
