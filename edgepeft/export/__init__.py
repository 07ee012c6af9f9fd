"""Server-side exporter: base model -> ONNX graph with adapter slots; PEFT LoRA -> ORT adapter files.

Heavy libraries (torch, transformers, onnx) load only when a function runs.
Public API: :func:`export_model`, :class:`ExportResult`, :func:`write_adapter`,
:class:`AdapterInfo`, :func:`base_fingerprint`, :class:`WeightQuant`, and
:func:`supported_architectures` (the families :mod:`edgepeft.models.arch` describes, per task).
"""

from __future__ import annotations

_EXPORTS = {  # name -> the module that defines it, relative to this package
    "export_model": ".api", "ExportResult": ".api", "base_fingerprint": ".api",
    "write_adapter": ".adapters", "AdapterInfo": ".adapters", "build_slot_tensors": ".adapters",
    "WeightQuant": ".quantize", "supported_architectures": "..models.arch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(name)
