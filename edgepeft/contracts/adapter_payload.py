"""Expand compact adapter payloads (fp16, int8, int4) into the tensors the graph's slots take.

Exported graphs declare their LoRA slots as float32 (and, in int4/int8 decoders, LoRA B
as int8) and ONNX Runtime refuses other dtypes, so an adapter shipped as fp16 or int8
(to shrink updates) is expanded once, at install, into the slots' dtypes, and then
loads like any other. A compact int8 tensor comes with a ``<name>.scale`` fp32 tensor
(per rank column of lora_A / row of lora_B / label of the head); an int8 tensor
*without* one is already in an int8 slot's form (its scales are folded into lora_A)
and is kept as it is.

int4 (the smallest updates) packs a tensor into four stored tensors, since ONNX Runtime's
adapter format has no 4-bit type: ``<name>.q4`` (uint8, two 4-bit codes per byte, low
nibble first, codes 1..15 meaning -7..7), ``<name>.q4scale`` (fp16 or fp32, one per
stored group), ``<name>.q4mask`` (uint8 bitmap over all groups, little-endian bit order:
all-zero groups, such as the off-diagonal blocks of a packed q|k|v B, are not stored) and
``<name>.q4meta`` (int64: group size, transposed, int8 output, then the logical shape).
Groups run along the last axis, or along the first for a transposed 2-D tensor (lora_A:
one group of inputs per rank column). :func:`int4_layout` reads the logical shape without
expanding, so a receiver checks it against the graph before allocating anything.

Device-safe: numpy and onnxruntime only, imported inside the functions.
"""

from __future__ import annotations

from ..fsio import atomic_path

SCALE_SUFFIX = ".scale"
INT4_CODES, INT4_SCALE, INT4_MASK, INT4_META = ".q4", ".q4scale", ".q4mask", ".q4meta"
INT4_PARTS = (INT4_CODES, INT4_SCALE, INT4_MASK, INT4_META)
INT4_GROUP = 32
_INT4_GROUPS = (8, 16, 32, 64, 128, 256)
_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # candidate clipping of each group's range (least error kept)
_MAX_SCALE = 1e30  # far above any adapter weight; keeps (code - 8) * scale finite in float32


def int4_names(names) -> set[str]:
    """Logical tensor names stored as int4 parts (those with a ``.q4meta``)."""
    return {n[: -len(INT4_META)] for n in names if n.endswith(INT4_META)}


def is_int4_part(name: str, packed: set[str]) -> bool:
    """Whether stored tensor ``name`` is one of the parts of a tensor in ``packed`` (:func:`int4_names`)."""
    return name.endswith(INT4_PARTS) and name.rpartition(".")[0] in packed


def int4_layout(meta) -> tuple[tuple[int, ...], bool, int, bool]:
    """``(shape, int8 output, group, transposed)`` from a ``.q4meta`` tensor. Raises ValueError for a
    malformed one (a hostile file must not make the receiver allocate what the graph does not take:
    the caller checks the shape against its slot before :func:`int4_decode`)."""
    import numpy as np

    m = np.asarray(meta)
    if m.dtype != np.int64 or m.ndim != 1 or not 4 <= m.size <= 6:
        raise ValueError("an int4 tensor's .q4meta must be int64 [group, transposed, int8, *shape] (1-3 dims)")
    group, transposed, out_int8 = (int(x) for x in m[:3])
    shape = tuple(int(x) for x in m[3:])
    if group not in _INT4_GROUPS or transposed not in (0, 1) or out_int8 not in (0, 1):
        raise ValueError(f"an int4 tensor's .q4meta has group {group}, transposed {transposed}, int8 {out_int8}; "
                         f"groups are one of {_INT4_GROUPS}, the flags 0 or 1")
    if any(d < 1 or d > 1 << 24 for d in shape) or (transposed and len(shape) != 2):
        raise ValueError(f"an int4 tensor's .q4meta has an impossible shape {list(shape)}")
    return shape, bool(out_int8), group, bool(transposed)


def _rows(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """(rows, columns) of the 2-D view whose rows are cut into groups."""
    import math

    return (shape[1], shape[0]) if transposed else (math.prod(shape[:-1]), shape[-1])


def int4_encode(arr, *, group: int = INT4_GROUP, transposed: bool = False) -> dict:
    """``arr`` (float, or int8 in an int8 slot's form) -> its four int4 parts, keyed by suffix.

    Each group of ``group`` values gets a symmetric scale chosen among a few clippings of its largest
    magnitude by least squared error (round-to-nearest within the group); all-zero groups are dropped.
    Scales are fp16 where that holds every one within 1/64, else fp32. An int8 ``arr`` comes back as int8.
    """
    import numpy as np

    a = np.asarray(arr)
    out_int8 = a.dtype == np.int8
    if not out_int8 and not np.all(np.isfinite(a)):
        raise ValueError("an int4 payload cannot hold NaN or infinite values")
    shape = tuple(a.shape)
    rows, cols = _rows(shape, transposed)
    m = (a.T if transposed else a.reshape(rows, cols)).astype(np.float32)
    ngr = -(-cols // group)
    g = np.zeros((rows, ngr * group), np.float32)
    g[:, :cols] = m
    g = g.reshape(rows * ngr, group)
    amax = np.abs(g).max(axis=1)
    best_q = np.zeros(g.shape, np.int8)
    best_s = np.zeros(len(g), np.float32)
    best_err = np.full(len(g), np.inf, np.float32)
    for c in _CLIPS:
        s = (amax * c / 7.0).astype(np.float32)
        q = np.clip(np.rint(np.divide(g, s[:, None], out=np.zeros_like(g), where=s[:, None] > 0)), -7, 7)
        err = ((q * s[:, None] - g) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better], best_s[better], best_q[better] = err[better], s[better], q[better]
    keep = best_s > 0
    scales16 = best_s[keep].astype(np.float16)
    # fp16 only where it holds every scale within 1/64 (the int4 step is 1/7 of a group's range): folded int8-B
    # slots push A's scales to ~1e-5, below fp16's normal range, where its absolute step (6e-8) may not be
    kept_s = best_s[keep]
    fits = bool(np.all(np.isfinite(scales16)) and np.all(np.abs(scales16.astype(np.float32) - kept_s) <= kept_s / 64))
    codes = (best_q[keep].astype(np.int16) + 8).astype(np.uint8).reshape(-1)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(8))
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    meta = np.array([group, int(transposed), int(out_int8), *shape], np.int64)
    return {INT4_CODES: packed, INT4_SCALE: scales16 if fits else best_s[keep],
            INT4_MASK: np.packbits(keep, bitorder="little"), INT4_META: meta}


def int4_decode(parts: dict, name: str = "tensor"):
    """The four int4 parts (keyed by suffix) -> the logical tensor (float32, or int8 for an int8 slot).
    Raises ValueError when the parts disagree with each other."""
    import numpy as np

    shape, out_int8, group, transposed = int4_layout(parts[INT4_META])
    rows, cols = _rows(shape, transposed)
    ngr = -(-cols // group)
    total = rows * ngr
    mask, scale, codes = (np.asarray(parts[k]) for k in (INT4_MASK, INT4_SCALE, INT4_CODES))
    if mask.dtype != np.uint8 or mask.shape != (-(-total // 8),):
        raise ValueError(f"{name}: its .q4mask must be {-(-total // 8)} bytes for {total} groups")
    keep = np.unpackbits(mask, bitorder="little", count=total).astype(bool)
    if np.unpackbits(mask, bitorder="little")[total:].any():
        raise ValueError(f"{name}: its .q4mask marks groups beyond the tensor")
    kept = int(keep.sum())
    if scale.dtype not in (np.float16, np.float32) or scale.shape != (kept,) or not np.all(np.isfinite(scale)) \
            or np.any(np.abs(scale.astype(np.float32)) > _MAX_SCALE):
        raise ValueError(f"{name}: its .q4scale must hold {kept} finite fp16/fp32 scales of at most {_MAX_SCALE:.1e}")
    if codes.dtype != np.uint8 or codes.shape != (-(-kept * group // 2),):
        raise ValueError(f"{name}: its .q4 must hold {-(-kept * group // 2)} bytes for {kept} groups of {group}")
    nib = np.empty(codes.size * 2, np.int8)
    nib[0::2], nib[1::2] = codes & 0x0F, codes >> 4
    if np.any(nib[: kept * group] == 0) or np.any(nib[kept * group:] != 8):
        raise ValueError(f"{name}: its .q4 holds code 0 (not a value) or padding other than 8")
    vals = (nib[: kept * group].astype(np.float32) - 8.0).reshape(kept, group) * scale.astype(np.float32)[:, None]
    g = np.zeros((total, group), np.float32)
    g[keep] = vals
    m = g.reshape(rows, ngr * group)[:, :cols]
    out = np.ascontiguousarray(m.T) if transposed else m.reshape(shape)
    if out_int8:
        return np.clip(np.rint(out), -127, 127).astype(np.int8)
    return np.ascontiguousarray(out, dtype=np.float32)


def expand_arrays(params: dict) -> dict:
    """``{name: ndarray}`` as stored -> ``{slot name: ndarray}`` (float32, or int8 for int8 slots).

    Raises ValueError for a scale without a tensor, or int4 parts that disagree.
    """
    import numpy as np

    out = {}
    packed = int4_names(params)
    for name in packed:
        parts = {sfx: params.get(name + sfx) for sfx in INT4_PARTS}
        missing = [sfx for sfx, v in parts.items() if v is None]
        if missing:
            raise ValueError(f"int4 tensor {name} lacks its {missing[0]} part")
        out[name] = int4_decode(parts, name)
    for name, arr in params.items():
        if is_int4_part(name, packed):
            continue
        if name.endswith(INT4_PARTS):
            raise ValueError(f"adapter tensor {name} is part of an int4 tensor the file does not describe")
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
    """True when the adapter file at ``path`` holds compact tensors (fp16, int8 with a scale, int4)."""
    import numpy as np
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    params = fmt.get_parameters()
    return any(v.numpy().dtype == np.float16 or k.endswith((SCALE_SUFFIX, INT4_META)) for k, v in params.items())


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
    with atomic_path(path) as tmp:
        fmt.export_adapter(str(tmp))
