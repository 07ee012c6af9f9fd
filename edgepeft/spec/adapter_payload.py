"""Expand compact adapter payloads (fp16, int8) into the tensors the graph's slots take.

Exported graphs declare their LoRA slots as float32 (and, in int4/int8 decoders, LoRA B
as int8) and ONNX Runtime refuses other dtypes, so an adapter shipped as fp16 or int8
(to shrink updates) is expanded once, at install, into the slots' dtypes, and then
loads like any other. A compact int8 tensor comes with a ``<name>.scale`` fp32 tensor
(per rank column of lora_A / row of lora_B / label of the head); an int8 tensor
*without* one is already in an int8 slot's form (its scales are folded into lora_A)
and is kept as it is.

Device-safe: numpy and onnxruntime only, imported inside the functions.
"""

from __future__ import annotations

import os
import tempfile

SCALE_SUFFIX = ".scale"


def expand_arrays(params: dict) -> dict:
    """``{name: ndarray}`` as stored -> ``{slot name: ndarray}`` (float32, or int8 for int8 slots).

    Raises ValueError for a scale without a tensor.
    """
    import numpy as np

    out = {}
    for name, arr in params.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in params:
                raise ValueError(f"adapter tensor {name} scales a tensor the file does not hold")
            continue
        arr = np.asarray(arr)
        if arr.dtype == np.int8:
            scale = params.get(name + SCALE_SUFFIX)
            if scale is None:  # an int8 slot's tensor: kept as it is
                out[name] = arr
                continue
            out[name] = (arr.astype(np.float32) * np.asarray(scale, np.float32)).astype(np.float32)
        else:
            out[name] = arr.astype(np.float32, copy=False)
    return out


def needs_expansion(path) -> bool:
    """True when the adapter file at ``path`` holds compact tensors (fp16, or int8 with a scale)."""
    import numpy as np
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    params = fmt.get_parameters()
    return any(v.numpy().dtype == np.float16 or k.endswith(SCALE_SUFFIX) for k, v in params.items())


def expand_adapter(src, dst) -> dict:
    """Read ``src`` (.onnx_adapter, any payload), write its slot-ready copy to ``dst`` atomically.

    Returns ``{slot name: shape}`` of what was written. Raises ValueError (bad
    payload) or onnxruntime's errors for a file that is not an adapter.
    """
    import onnxruntime as ort

    fmt_in = ort.AdapterFormat.read_adapter(str(src))
    params = {k: v.numpy() for k, v in fmt_in.get_parameters().items()}
    arrays = expand_arrays(params)
    write_adapter_file(dst, arrays, adapter_version=fmt_in.get_adapter_version(),
                       model_version=fmt_in.get_model_version())
    return {k: list(v.shape) for k, v in arrays.items()}


def write_adapter_file(path, arrays: dict, *, adapter_version: int = 1, model_version: int = 1) -> None:
    """Write ``{name: ndarray}`` as an ONNX Runtime adapter file, atomically (temp file, fsync, rename).

    Shared by the server's exporter and the device's payload expansion.
    """
    import numpy as np
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".adapter-", suffix=".onnx_adapter", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        fmt.export_adapter(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
