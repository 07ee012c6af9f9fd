"""The weights of a graph over 2 GiB (``model.onnx.data``, ONNX external data) handed to ONNX Runtime
from verified memory.

Why: ONNX Runtime reads external data from a file by path, after the engine has hashed it, so a file
swapped or rewritten in between (or while it is memory-mapped) would be computed with unverified. Instead
the engine reads the data file once into a sealed in-memory copy while hashing it
(:meth:`edgepeft.contracts.verify.BundleFiles.open_verified`), finds every external initializer in the
verified graph (:func:`external_tensors`), and gives ONNX Runtime each one as an ``OrtValue`` over that
copy (``SessionOptions.add_external_initializers``): the bundle's data file is never opened by ONNX
Runtime. The graph is parsed here with a small protobuf reader, since the device side has no ``onnx``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BundleError

# TensorProto.DataType -> numpy dtype name (bfloat16 and the 4-bit / 8-bit float types have no numpy dtype)
_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
           10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class ExternalTensor:
    """One initializer whose bytes lie in the data file: ``length`` bytes at ``offset``."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    offset: int
    length: int


def _bad(what: str) -> BundleError:
    return BundleError(f"the verified graph cannot be read for its external weights: {what}",
                       hint="rebuild the bundle with edgepeft build")


def _varint(buf, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _bad("a truncated number")
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf):
    """(field number, wire type, value) of each field of one message: ints for varints and fixed
    fields, memoryviews for length-delimited ones. Raises :class:`BundleError` on malformed bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > n:
                raise _bad("a field runs past its message")
            val, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if i + width > n:
                raise _bad("a truncated fixed-width field")
            val, i = int.from_bytes(buf[i:i + width], "little"), i + width
        else:
            raise _bad(f"wire type {wire} (protobuf groups) where ONNX has none")
        yield num, wire, val


def _tensor(buf, location: str) -> ExternalTensor | None:
    """The TensorProto in ``buf`` if its data lies in ``location``; None for an inline tensor."""
    name, data_type, dims, where, ext = "", 0, [], 0, {}
    for num, wire, val in _fields(buf):
        if num == 1:  # dims: packed or one varint each
            if wire == 2:
                j = 0
                while j < len(val):
                    d, j = _varint(val, j)
                    dims.append(d)
            else:
                dims.append(val)
        elif num == 2:
            data_type = val
        elif num == 8:
            name = bytes(val).decode("utf-8", "replace")
        elif num == 13:  # external_data: StringStringEntryProto {1: key, 2: value}
            kv = {k: bytes(v).decode("utf-8", "replace") for k, w, v in _fields(val) if w == 2}
            ext[kv.get(1, "")] = kv.get(2, "")
        elif num == 14:
            where = val
    if where != _EXTERNAL:
        return None
    if ext.get("location") != location:
        raise _bad(f"initializer {name} keeps its data in {ext.get('location')!r}, not {location!r}")
    try:
        offset, length = int(ext.get("offset", "0")), int(ext["length"])
    except (KeyError, ValueError):
        raise _bad(f"initializer {name} has no valid offset and length") from None
    return ExternalTensor(name, data_type, tuple(dims), offset, length)


def external_tensors(graph, location: str) -> list[ExternalTensor]:
    """Every initializer of the serialized ModelProto ``graph`` whose data is in the file ``location``,
    in order. ``graph`` may come in several ``graph`` fragments (the streaming exporter writes it so;
    protobuf merges them). Raises :class:`BundleError` for bytes that are not such a model."""
    out = []
    view = memoryview(graph)
    for num, wire, val in _fields(view):
        if num != 7 or wire != 2:  # ModelProto.graph
            continue
        for gnum, gwire, gval in _fields(val):
            if gnum == 5 and gwire == 2:  # GraphProto.initializer
                t = _tensor(gval, location)
                if t is not None:
                    out.append(t)
    return out


def initializers_from(tensors: list[ExternalTensor], data) -> tuple[list[str], list]:
    """``(names, OrtValues)`` for :meth:`SessionOptions.add_external_initializers`, each value a view of
    ``data`` (the verified data file's content; no copy: keep ``data`` alive as long as the session).
    Raises :class:`BundleError` for a tensor outside ``data``, of a size its shape contradicts, or of a
    type numpy cannot hold."""
    import numpy as np
    import onnxruntime as ort

    view = memoryview(data)
    names, values = [], []
    for t in tensors:
        dtype = _DTYPES.get(t.data_type)
        if dtype is None:
            raise _bad(f"initializer {t.name} has element type {t.data_type}, which cannot be loaded from memory")
        count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
        if count * np.dtype(dtype).itemsize != t.length:
            raise _bad(f"initializer {t.name}: {t.length} bytes for shape {list(t.dims)} of {dtype}")
        if t.offset < 0 or t.offset + t.length > len(view):
            raise _bad(f"initializer {t.name} lies outside model.onnx.data ({t.offset}+{t.length} of {len(view)} bytes)")
        arr = np.frombuffer(view, dtype=dtype, count=count, offset=t.offset).reshape(t.dims)
        names.append(t.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(arr))
    return names, values


__all__ = ["ExternalTensor", "external_tensors", "initializers_from"]
