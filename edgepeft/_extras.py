"""Gate for optional dependency groups: a clear error instead of ImportError.

The device install has no torch; server-side code calls :func:`require` at the
top of the function that needs a heavy library, never at module import time.
"""

from __future__ import annotations

import importlib
import importlib.util

from .errors import MissingExtraError

# Which extra provides which importable module.
EXTRA_OF = {
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "accelerate": "train",
    "datasets": "train",
    "bitsandbytes": "train",
    "safetensors": "train",
    "gguf": "train",
    "onnx": "export",
    "matplotlib": "train",
}


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` the way this project tests it."""
    return (
        f"pip install 'edgepeft[{extra}]' -c constraints.txt "
        "(constraints.txt pins torch==2.13.0, the CPU build; drop -c to keep your own torch)"
    )


def require(*modules: str, extra: str | None = None, feature: str = "this command") -> None:
    """Raise :class:`MissingExtraError` naming the extra to install if any module is absent.

    Only checks that the modules can be found; importing stays with the caller.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    group = extra or EXTRA_OF.get(missing[0], "all")
    raise MissingExtraError(
        f"{feature} needs {', '.join(missing)}, which is not installed",
        hint=install_hint(group),
    )


def optional(module: str):
    """Import ``module`` if installed, else return None (for optional peers)."""
    if importlib.util.find_spec(module) is None:
        return None
    return importlib.import_module(module)


class _DropKernelsNotice:
    """bitsandbytes' CPU backend logs a warning on import when the optional `kernels` package is absent."""

    def filter(self, record) -> bool:
        return "kernels-community" not in record.getMessage()


def quiet_optional_kernel_notice() -> None:
    """Hide that one import-time notice (peft imports bitsandbytes even for plain LoRA); other warnings stay."""
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropKernelsNotice) for f in logger.filters):
        logger.addFilter(_DropKernelsNotice())
