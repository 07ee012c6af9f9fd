"""A GGUF file's quantized blocks, carried into ``MatMulNBits`` as they are (no dequantize-requantize trip).

Carried exactly: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K (what Q4_K_M and
Q5_K_M files are made of).

Why: a base that arrives as a GGUF (the embedded SmolLM2 is a Q4_1 GGUF) *is* its
quantized blocks; the fp32 weights transformers gives us are their dequantization,
and that is what every adapter was trained against. Re-quantizing those to another
4-bit grid loses quality twice (SmolLM2: perplexity 16.6 -> 23.4). The block formats
of GGUF's quants map exactly onto ONNX Runtime's ``MatMulNBits`` (block 32, or 16
along K), so the device graph can compute with the very same numbers:

- ``Q4_0``: ``w = d * (q - 8)``: ``MatMulNBits`` bits 4, scale ``d``, its default zero point 8.
- ``Q8_0``: ``w = d * q`` (q int8): bits 8, codes ``q + 128``, its default zero point 128.
- ``Q4_1``: ``w = d * q + m``: bits 4, scale ``d`` gives ``d * (q - 8)``; the rest, ``m + 8 d``
  per block, is added as ``blocksum(x) @ (m + 8d)^T``, a small fp32 matmul (one value per
  32 weights). ``MatMulNBits`` also takes a *float* zero point ``-m / d`` that computes the
  same, but ONNX Runtime 1.32's CPU kernel has no packed path for it: it dequantizes the
  whole weight on every call (``benchmarks`` section "kernels"; docs/measured-defaults.md),
  so the correction matmul it is.

- ``Q5_0`` / ``Q5_1``: as Q4_0 / Q4_1 with 5-bit codes: 8-bit ``MatMulNBits``, codes ``q + 112``
  (its default zero point 128 gives ``d * (q - 16)``); Q5_1's rest, ``m + 16 d``, by the block sums.
- ``Q4_K`` / ``Q5_K`` (super-blocks of 256): eight 32-weight sub-blocks ``w = d*sc * q - dmin*m``
  with 6-bit integers ``sc`` and ``m``: the Q4_1 / Q5_1 form with scale ``d*sc`` and minimum
  ``-dmin*m`` (both exact in fp32), so bits 4 / 8 and the same block-sum correction.
- ``Q6_K``: sixteen 16-weight sub-blocks ``w = d*sc * (q - 32)`` (``sc`` int8): 8-bit
  ``MatMulNBits`` with block size 16, codes ``q + 96``; no correction.

Scales and minimums stay the GGUF's fp16 values (and K-quants' integer sub-scales) in the file;
``Cast``/``Mul`` nodes that ONNX Runtime folds at load hand the kernels fp32. 5- and 6-bit codes
are stored as GGUF stores them, 4 low bits and 1-2 high bits apart, and joined into the 8-bit
kernel's codes by ``BitShift``/``Add`` nodes folded at load too: the file keeps the GGUF's size,
the session holds a byte per weight. Other GGUF types (Q2_K, Q3_K, the IQ and TQ types, and
float tensors) are re-quantized to the export's scheme, the reason recorded per weight.

Which GGUF tensor is which weight comes from gguf-py's own name table; llama.cpp
permutes the q/k rows of llama-family models for its rotary layout, and the row order
is found by checking, not assumed: a block weight is used only when its dequantization
equals the weight being exported (so a merged adapter, or a directory that is not this
GGUF's conversion, falls back to re-quantizing with the reason recorded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelError

BLOCK = 32  # the legacy formats' block; K-quants use 32 (Q4_K, Q5_K) or 16 (Q6_K) inside 256-weight super-blocks
SUPER = 256  # QK_K: the K-quants' super-block
SUPPORTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34,  # per block of 32 weights
          "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # per super-block of 256
# qtype -> (block, code bits, centre c): the kernel computes scale * (q - c) with codes q in [0, 2**bits)
_FORMAT = {"Q4_0": (32, 4, 8), "Q4_1": (32, 4, 8), "Q5_0": (32, 5, 16), "Q5_1": (32, 5, 16), "Q8_0": (32, 8, 128),
           "Q4_K": (32, 4, 8), "Q5_K": (32, 5, 16), "Q6_K": (16, 6, 32)}
_AFFINE = ("Q4_1", "Q5_1", "Q4_K", "Q5_K")  # w = scale * q + offset (a minimum per block): the block-sum correction
# transformers' model_type -> gguf-py's architecture name, where they differ
_GGUF_ARCH = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "cohere": "command-r"}


@dataclass(frozen=True)
class BlockWeight:
    """One weight [rows, cols] as GGUF blocks, laid out for ``MatMulNBits`` (4 or 8 bits).

    ``codes``: uint8 [rows, blocks, block/2], each block's low 4 bits of its codes, element 2i in the
    low nibble of byte i (4-bit ``MatMulNBits``' layout); for Q8_0 uint8 [rows, blocks, 32] holding
    ``q + 128``. ``high``: the codes' 5th (Q5_*) or 5th-6th (Q6_K) bits, uint8 [rows, blocks, block*bits/8]
    (element 8i+b at bit b of byte i; for 2 bits element 4i+b at bits 2b..2b+1), which the graph adds
    back (nodes ONNX Runtime folds at load) to feed 8-bit ``MatMulNBits``. ``scales``: fp16 ``d`` per
    block (legacy) or per super-block (K-quants, times the integer ``sub_scales`` per block);
    ``mins``: fp16 ``m`` per block (Q4_1, Q5_1) or ``dmin`` per super-block (Q4_K, Q5_K, times
    ``sub_mins``). Every value is the GGUF's own; only the bit packing differs.
    """

    qtype: str
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None
    high: np.ndarray | None = None
    sub_scales: np.ndarray | None = None
    sub_mins: np.ndarray | None = None

    @property
    def block(self) -> int:
        return _FORMAT[self.qtype][0]

    @property
    def code_bits(self) -> int:
        return _FORMAT[self.qtype][1]

    @property
    def centre(self) -> int:
        """c in ``scale * (q - c)``: what the kernel's default zero point stands for."""
        return _FORMAT[self.qtype][2]

    @property
    def bits(self) -> int:
        """``MatMulNBits``' bits: 4 for 4-bit codes, 8 for 5, 6 and 8-bit codes."""
        return 4 if self.code_bits == 4 else 8

    @property
    def affine(self) -> bool:
        return self.qtype in _AFFINE

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def cols(self) -> int:
        return int(self.codes.shape[1]) * self.block

    def _parts(self):
        return (self.codes, self.scales, self.mins, self.high, self.sub_scales, self.sub_mins)

    @property
    def nbytes(self) -> int:
        """Bytes the graph stores (the GGUF's bytes; K-quants' 6-bit sub-scales take a byte each)."""
        return sum(p.nbytes for p in self._parts() if p is not None)

    def unpacked(self) -> np.ndarray:
        """Codes as uint8 [rows, blocks, block] in element order (0 .. 2**code_bits - 1; Q8_0: q + 128)."""
        if self.code_bits == 8:
            return self.codes
        lo, hi = self.codes & 0x0F, self.codes >> 4
        q = np.stack([lo, hi], axis=-1).reshape(self.rows, -1, self.block)
        if self.high is None:
            return q
        hb = self.code_bits - 4
        per = 8 // hb
        shifts = (np.arange(per) * hb).astype(np.uint8)
        h = ((self.high[..., None] >> shifts) & ((1 << hb) - 1)).reshape(q.shape)
        return (q | (h << 4)).astype(np.uint8)

    def block_scales(self) -> np.ndarray:
        """float32 [rows, blocks]: each block's scale, as gguf-py computes it (``d``, or ``d * sc``)."""
        d = self.scales.astype(np.float32)
        if self.sub_scales is None:
            return d
        per = SUPER // self.block
        return (d[..., None] * self.sub_scales.astype(np.float32).reshape(self.rows, -1, per)).reshape(self.rows, -1)

    def block_mins(self) -> np.ndarray | None:
        """float32 [rows, blocks]: ``m`` (Q4_1, Q5_1) or ``-dmin * m`` (Q4_K, Q5_K), None when not affine."""
        if self.mins is None:
            return None
        m = self.mins.astype(np.float32)
        if self.sub_mins is None:
            return m
        per = SUPER // self.block
        return -(m[..., None] * self.sub_mins.astype(np.float32).reshape(self.rows, -1, per)).reshape(self.rows, -1)

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], computed as llama.cpp and gguf-py do (``s * q + m``, or ``s * (q - c)``)."""
        q = self.unpacked().astype(np.float32)
        s = self.block_scales()[..., None]
        m = self.block_mins()
        w = s * (q - self.centre) if m is None else s * q + m[..., None]
        return w.reshape(self.rows, self.cols)

    @classmethod
    def concat(cls, parts: list[BlockWeight]):
        return concat_rows(parts)

    def take_rows(self, order: np.ndarray) -> BlockWeight:
        return BlockWeight(self.qtype, *(None if p is None else p[order] for p in self._parts()))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 codes [..., block] -> their low 4 bits packed [..., block/2], element 2i low nibble of byte i."""
    lo = q & 0x0F
    return (lo[..., 0::2] | (lo[..., 1::2] << 4)).astype(np.uint8)


def _pack_high(q: np.ndarray, hb: int) -> np.ndarray:
    """Bits 4.. of uint8 codes [..., block] (``hb`` of them) packed [..., block*hb/8], element per*i+b at bits hb*b."""
    h = (q >> 4).reshape(*q.shape[:-1], -1, 8 // hb)
    out = np.zeros(h.shape[:-1], np.uint8)
    for b in range(8 // hb):
        out |= (h[..., b] << (hb * b)).astype(np.uint8)
    return out


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 12 bytes of 8 six-bit scales and 8 six-bit minimums -> uint8 [..., 8] each (gguf-py's
    ``Q4_K.get_scale_min``)."""
    s = packed.reshape(*packed.shape[:-1], 3, 4)
    d, m, m_d = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.uint8), mn.astype(np.uint8)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def from_gguf_rows(qtype: str, raw: np.ndarray, cols: int) -> BlockWeight:
    """Parse GGUF block bytes (uint8 [rows, row bytes]) into a :class:`BlockWeight` (no value changes)."""
    rows = raw.shape[0]
    block, bits, _ = _FORMAT[qtype]
    k = qtype.endswith("_K")
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // (SUPER if k else BLOCK), _BYTES[qtype])
    mins = sub_scales = sub_mins = None
    if qtype == "Q8_0":
        q = b[..., 2:].view(np.int8).astype(np.int16) + 128
        return BlockWeight(qtype, q.astype(np.uint8), _f16(b[..., 0:2]))
    if not k:
        scales = _f16(b[..., 0:2])
        at = 2
        if qtype in ("Q4_1", "Q5_1"):
            mins, at = _f16(b[..., 2:4]), 4
        qh = None
        if bits == 5:  # 32 high bits, little-endian: element j at bit j
            qh = b[..., at:at + 4]
            at += 4
        qs = b[..., at:]
        # element j in the low nibble of qs[j], element j+16 in its high nibble
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        if qh is not None:
            q = q | (((qh[..., :, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(rows, -1, 32) << 4)
    elif qtype in ("Q4_K", "Q5_K"):
        scales, mins = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scale_min(b[..., 4:16])
        sub_scales, sub_mins = sc.reshape(rows, -1), mn.reshape(rows, -1)
        at = 16
        qh = None
        if qtype == "Q5_K":
            qh, at = b[..., 16:48], 48
        qs = b[..., at:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
        q = (qs & 0x0F).reshape(rows, -1, 8, 32)
        if qh is not None:  # sub-block i's 5th bit of element j: bit i of qh[j]
            h = (qh[..., None, :] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
            q = q | (h << 4)
    else:  # Q6_K: ql 128, qh 64, int8 scales 16, d
        ql = b[..., :128].reshape(rows, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
        ql = (ql & 0x0F).reshape(rows, -1, 8, 32)
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
        qh = (qh & 0x03).reshape(rows, -1, 8, 32)
        q = ql | (qh << 4)
        sub_scales = b[..., 192:208].view(np.int8).reshape(rows, -1).copy()
        scales = _f16(b[..., 208:210])
    q = np.asarray(q, np.uint8).reshape(rows, -1, block)
    high = _pack_high(q, bits - 4) if bits > 4 else None
    return BlockWeight(qtype, _pack_nibbles(q), np.ascontiguousarray(scales), mins, high, sub_scales, sub_mins)


def concat_rows(parts: list[BlockWeight]) -> BlockWeight | None:
    """Parts stacked along rows (packed q|k|v, gate|up), or None when their formats differ."""
    if len({p.qtype for p in parts}) != 1 or len({p.cols for p in parts}) != 1:
        return None
    fields = zip(*(p._parts() for p in parts))
    return BlockWeight(parts[0].qtype, *(None if f[0] is None else np.concatenate(f) for f in fields))


def _reverse_permute(rows: int, heads: int) -> np.ndarray:
    """The row order undoing llama.cpp's q/k permutation for rotary (convert_hf_to_gguf's ``permute``)."""
    idx = np.arange(rows)
    if heads <= 0 or rows % (2 * heads):
        return idx
    return idx.reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)


@dataclass
class GGUFBlocks:
    """The block weights of one GGUF that equal the weights being exported, by HF weight name.

    ``skipped`` says, per weight, why it is re-quantized instead (its GGUF type, or that it
    differs from the exported weight).
    """

    path: Path
    weights: dict = field(default_factory=dict)  # HF name -> BlockWeight
    skipped: dict = field(default_factory=dict)  # HF name -> reason

    def get(self, name: str) -> BlockWeight | None:
        return self.weights.get(name)

    def describe(self, used) -> dict:
        """The manifest's view: the file, the formats carried into the graph (``used``: HF names), and what
        was re-quantized and why."""
        used = set(used)
        kinds: dict[str, int] = {}
        for name in used:
            qtype = self.weights[name].qtype
            kinds[qtype] = kinds.get(qtype, 0) + 1
        out = {"file": self.path.name, "carried": dict(sorted(kinds.items()))}
        requantized = dict(self.skipped)
        requantized.update({n: "not carried by choice (gguf = layers, or nf4's own layers)"
                            for n in self.weights if n not in used})
        if requantized:
            out["requantized"] = dict(sorted(requantized.items()))
        return out


def load_gguf_blocks(path, config, state_dict: dict, *, rtol: float = 1e-6) -> GGUFBlocks:
    """Match the GGUF at ``path`` against ``state_dict`` (HF names -> float32 arrays).

    A 2-D weight is carried as blocks when the GGUF stores it in a :data:`SUPPORTED` type and
    its dequantization equals the state dict's (to ``rtol`` of the largest magnitude:
    float rounding only). Raises :class:`ModelError` when the file cannot be read or
    gguf-py does not know the architecture.
    """
    from .._extras import require

    require("gguf", feature="carrying a GGUF's quantized blocks into the device graph")
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors for a damaged file
        raise ModelError(f"cannot read GGUF file {path}: {exc}", hint="check the file, or pass a model directory") from exc
    mtype = str(getattr(config, "model_type", ""))
    arch_name = _GGUF_ARCH.get(mtype, mtype)
    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name), None)
    if arch is None:
        raise ModelError(f"gguf-py has no tensor names for architecture {mtype!r}",
                         hint="export with --gguf requantize, or update the gguf package")
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    tensors = {t.name: t for t in reader.tensors}
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    out = GGUFBlocks(path)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, w in state_dict.items():
        if not hf_name.endswith(".weight") or np.ndim(w) != 2 or (tied and hf_name == "lm_head.weight"):
            continue
        stem = names.get_name(hf_name[: -len(".weight")])
        t = tensors.get(f"{stem}.weight") if stem else None
        if t is None:
            continue
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED:
            out.skipped[hf_name] = f"GGUF type {qtype} has no exact MatMulNBits form"
            continue
        rows, cols = w.shape
        if int(t.shape[0]) != cols or cols % (SUPER if qtype.endswith("_K") else BLOCK) or t.data.shape[0] != rows:
            out.skipped[hf_name] = f"GGUF shape {list(t.shape)} does not match {list(w.shape)}"
            continue
        blk = from_gguf_rows(qtype, np.asarray(t.data), cols)
        found = _matching(blk, np.asarray(w, np.float32), stem, heads, kv_heads, rtol)
        if found is None:
            out.skipped[hf_name] = "differs from the exported weight (merged adapter or another conversion)"
        else:
            out.weights[hf_name] = found
    return out


def _matching(blk: BlockWeight, w: np.ndarray, stem: str, heads: int, kv_heads: int, rtol: float):
    """``blk`` (or its rows reordered back from llama.cpp's rotary permutation) when it equals ``w``."""
    tol = rtol * float(np.abs(w).max() or 1.0)
    orders = [None]
    if stem.endswith(".attn_q"):
        orders.append(_reverse_permute(blk.rows, heads))
    elif stem.endswith(".attn_k"):
        orders.append(_reverse_permute(blk.rows, kv_heads))
    for order in orders:
        cand = blk if order is None else blk.take_rows(order)
        if float(np.abs(cand.dequantize() - w).max()) <= tol:
            return cand
    return None


__all__ = ["BlockWeight", "GGUFBlocks", "SUPPORTED", "concat_rows", "from_gguf_rows", "load_gguf_blocks"]
