"""Device runtime (torch-free): one verified bundle, one ONNX Runtime session, many adapters.

Public API (imported lazily, so ``import edgepeft.runtime`` is instant):
:class:`Engine`, :class:`AuditLog`, :class:`GenerationResult`,
:class:`Classification`, :class:`Stream`, :func:`start_server`.
"""

from __future__ import annotations

_EXPORTS = {
    "Engine": "engine", "AuditLog": "audit",
    "GenerationResult": "results", "Classification": "results", "Stream": "results",
    "EngineServer": "http", "start_server": "http", "IncrementalDetokenizer": "detok",
    "SamplingParams": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'edgepeft.runtime' has no attribute {name!r}")
