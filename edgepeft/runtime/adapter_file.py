"""Read the header of an ONNX Runtime ``.onnx_adapter`` file without reading its weights.

Why: the registry must check an adapter's parameter names, shapes and dtypes
against the graph's slots before activating it, and ``onnxruntime.AdapterFormat.
read_adapter`` copies every weight into memory to do that (200 MB for a 200 MB
file). This parses the flatbuffer table directly (schema
``onnxruntime/lora/adapter_format/adapter_schema.fbs``: Adapter{format_version,
adapter_version, model_version, parameters:[Parameter{name, dims, data_type,
raw_data}]}) from a memory map, touching only the few header pages.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AdapterError

# TensorDataType -> the type string onnxruntime reports for graph inputs
ORT_TYPES = {1: "tensor(float)", 2: "tensor(uint8)", 3: "tensor(int8)", 4: "tensor(uint16)",
             5: "tensor(int16)", 6: "tensor(int32)", 7: "tensor(int64)", 9: "tensor(bool)",
             10: "tensor(float16)", 11: "tensor(double)", 12: "tensor(uint32)", 13: "tensor(uint64)",
             16: "tensor(bfloat16)"}
_NUMPY = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
          "tensor(uint16)": np.uint16, "tensor(int16)": np.int16, "tensor(int32)": np.int32,
          "tensor(int64)": np.int64, "tensor(bool)": np.bool_, "tensor(float16)": np.float16,
          "tensor(double)": np.float64, "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64}
_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in _NUMPY.items()} | {"tensor(bfloat16)": 2}


@dataclass(frozen=True)
class AdapterParam:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "tensor(float)"
    nbytes: int
    offset: int = 0  # where the raw little-endian data starts in the file


@dataclass(frozen=True)
class AdapterHeader:
    format_version: int
    adapter_version: int
    model_version: int
    params: dict  # name -> AdapterParam

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.params.values())


class _Table:
    def __init__(self, buf, pos: int):
        self.buf, self.pos = buf, pos
        vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vt_len = struct.unpack_from("<H", buf, vt)[0]
        self.vt = vt

    def _field(self, i: int) -> int:
        off = 4 + 2 * i
        if off >= self.vt_len:
            return 0
        rel = struct.unpack_from("<H", self.buf, self.vt + off)[0]
        return self.pos + rel if rel else 0

    def int32(self, i: int, default: int = 0) -> int:
        p = self._field(i)
        return struct.unpack_from("<i", self.buf, p)[0] if p else default

    def _vector(self, i: int) -> tuple[int, int]:
        p = self._field(i)
        if not p:
            return 0, 0
        start = p + struct.unpack_from("<I", self.buf, p)[0]
        return start + 4, struct.unpack_from("<I", self.buf, start)[0]

    def string(self, i: int) -> str:
        start, n = self._vector(i)
        return bytes(self.buf[start:start + n]).decode("utf-8")

    def int64s(self, i: int) -> tuple[int, ...]:
        start, n = self._vector(i)
        return struct.unpack_from(f"<{n}q", self.buf, start) if n else ()

    def bytes_span(self, i: int) -> tuple[int, int]:
        return self._vector(i)

    def tables(self, i: int) -> list[_Table]:
        start, n = self._vector(i)
        out = []
        for k in range(n):
            p = start + 4 * k
            out.append(_Table(self.buf, p + struct.unpack_from("<I", self.buf, p)[0]))
        return out


def read_header(source, name: str | None = None) -> AdapterHeader:
    """Names, shapes and dtypes of every parameter of an adapter file (a path) or of its bytes
    (a bytes-like object already verified by the caller). Raises :class:`AdapterError` if unreadable."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _parse_header(memoryview(source).cast("B"), name or "adapter")
    path = Path(source)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(buf, str(path))
    except AdapterError:
        raise
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not a readable .onnx_adapter file: {exc}",
                           hint="re-export the adapter with edgepeft build, or check the file was not truncated") from exc


def _parse_header(buf, source: str) -> AdapterHeader:
    label = Path(source).name
    try:
        if len(buf) < 8:
            raise ValueError("the file is too short")
        root = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
        params = {}
        for t in root.tables(3):
            name = t.string(0)
            code = t.int32(2)
            dtype = ORT_TYPES.get(code)
            if dtype is None:
                raise AdapterError(f"{label}: parameter {name!r} has unsupported data type {code}",
                                   hint="export adapters with float32, float16 or int8 tensors")
            start, n = t.bytes_span(3)
            shape = tuple(t.int64s(1))
            if any(d < 0 for d in shape) or start + n > len(buf) or \
                    n != int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]:
                raise AdapterError(f"{label}: parameter {name!r} data does not match its shape {list(shape)}",
                                   hint="the file is truncated or corrupted; fetch it again")
            if name in params:
                raise AdapterError(f"{label}: parameter {name!r} appears twice", hint="re-export the adapter")
            params[name] = AdapterParam(name, shape, dtype, n, start)
        return AdapterHeader(root.int32(0), root.int32(1), root.int32(2), params)
    except AdapterError:
        raise
    except (ValueError, struct.error, UnicodeDecodeError, IndexError, OverflowError) as exc:
        raise AdapterError(f"{source} is not a readable .onnx_adapter file: {exc}",
                           hint="re-export the adapter with edgepeft build, or check the file was not truncated") from exc


def logical_header(header: AdapterHeader, arrays: dict, source: str = "adapter") -> AdapterHeader:
    """``header`` with each int4-packed tensor (:mod:`edgepeft.contracts.adapter_payload`) seen as the tensor it
    expands to: its logical name, shape and dtype, so the slot checks run before anything is expanded.
    ``arrays`` are :func:`map_arrays`'s views. Raises :class:`AdapterError` for malformed int4 parts."""
    from ..contracts.adapter_payload import INT4_META, int4_layout, int4_names, is_int4_part

    packed = int4_names(header.params)
    if not packed:
        return header
    params = {k: p for k, p in header.params.items() if not is_int4_part(k, packed)}
    for name in sorted(packed):
        if name in params:
            raise AdapterError(f"{source}: {name} is stored both as is and as int4", hint="re-export the adapter")
        try:
            shape, out_int8, _, _ = int4_layout(arrays[name + INT4_META])
        except ValueError as exc:
            raise AdapterError(f"{source}: {name}: {exc}", hint="re-export the adapter with edgepeft") from exc
        dtype = "tensor(int8)" if out_int8 else "tensor(float)"
        count = math.prod(shape)  # Python ints: no int64 wrap-around for a hostile shape
        params[name] = AdapterParam(name, shape, dtype, count * _ITEMSIZE[dtype])
    return AdapterHeader(header.format_version, header.adapter_version, header.model_version, params)


def read_logical_header(path) -> AdapterHeader:
    """:func:`read_header` of the adapter file at ``path``, int4 parts seen as their tensors
    (:func:`logical_header`). Raises :class:`AdapterError`."""
    data = Path(path).read_bytes()
    header = read_header(data, str(path))
    try:
        return logical_header(header, map_arrays(data, header), str(path))
    except ValueError as exc:  # a tensor that does not lie within the file
        raise AdapterError(f"{path} is not a readable .onnx_adapter file: {exc}",
                           hint="re-export the adapter with edgepeft build") from exc


def map_arrays(data, header: AdapterHeader) -> dict:
    """Read-only numpy views of every parameter over ``data`` (the adapter's verified bytes; no copy).

    ``onnxruntime.OrtValue.ortvalue_from_numpy`` wraps these views without copying, so the
    bytes that were hashed are the bytes the session reads.
    """
    buf = memoryview(data).cast("B")
    out = {}
    for p in header.params.values():
        if p.dtype not in _NUMPY:
            raise AdapterError(f"{p.name}: {p.dtype} tensors cannot be mapped",
                               hint="export adapters with float32, float16 or int8 tensors")
        dt = np.dtype(_NUMPY[p.dtype])
        arr = np.frombuffer(buf, dtype=dt, count=p.nbytes // dt.itemsize, offset=p.offset).reshape(p.shape)
        arr.flags.writeable = False
        out[p.name] = arr
    return out
