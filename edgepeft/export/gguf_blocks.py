"""A GGUF file's quantized blocks, carried into ``MatMulNBits`` as they are (no dequantize-requantize trip).

Why: a base that arrives as a GGUF (the embedded SmolLM2 is a Q4_1 GGUF) *is* its
quantized blocks; the fp32 weights transformers gives us are their dequantization,
and that is what every adapter was trained against. Re-quantizing those to another
4-bit grid loses quality twice (SmolLM2: perplexity 16.6 -> 23.4). The block formats
of GGUF's legacy quants map exactly onto ONNX Runtime's ``MatMulNBits`` (block 32
along K), so the device graph can compute with the very same numbers:

- ``Q4_0``: ``w = d * (q - 8)``: ``MatMulNBits`` bits 4, scale ``d``, its default zero point 8.
- ``Q8_0``: ``w = d * q`` (q int8): bits 8, codes ``q + 128``, its default zero point 128.
- ``Q4_1``: ``w = d * q + m``: bits 4, scale ``d`` gives ``d * (q - 8)``; the rest, ``m + 8 d``
  per block, is added as ``blocksum(x) @ (m + 8d)^T``, a small fp32 matmul (one value per
  32 weights). ``MatMulNBits`` also takes a *float* zero point ``-m / d`` that computes the
  same, but ONNX Runtime 1.32's CPU kernel has no packed path for it: it dequantizes the
  whole weight on every call (``benchmarks`` section "kernels"; docs/measured-defaults.md),
  so the correction matmul it is.

Scales and minimums stay the GGUF's fp16 values in the file (the bundle keeps GGUF's
5 bits per Q4_1 weight); ``Cast`` nodes that ONNX Runtime folds at load hand the kernels fp32.

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

BLOCK = 32
SUPPORTED = ("Q4_0", "Q4_1", "Q8_0")
_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 weights
# transformers' model_type -> gguf-py's architecture name, where they differ
_GGUF_ARCH = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "cohere": "command-r"}


@dataclass(frozen=True)
class BlockWeight:
    """One weight [rows, cols] as GGUF blocks of 32, laid out for ``MatMulNBits``.

    ``codes``: uint8 [rows, cols/32, 16] (4 bits: element 2i in the low nibble of byte i)
    or [rows, cols/32, 32] (8 bits: ``q + 128``); ``scales`` / ``mins``: the GGUF's fp16
    ``d`` / ``m`` per block (``mins`` only for Q4_1).
    """

    qtype: str
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None

    @property
    def bits(self) -> int:
        return _BITS[self.qtype]

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def cols(self) -> int:
        return int(self.codes.shape[1]) * BLOCK

    @property
    def nbytes(self) -> int:
        """Bytes the graph stores: codes, fp16 scales and minimums (what the GGUF held for it)."""
        return self.codes.nbytes + self.scales.nbytes + (0 if self.mins is None else self.mins.nbytes)

    def unpacked(self) -> np.ndarray:
        """Codes as uint8 [rows, cols/32, 32] in element order (0..15, or 0..255 for 8 bits)."""
        if self.bits == 8:
            return self.codes
        lo, hi = self.codes & 0x0F, self.codes >> 4
        return np.stack([lo, hi], axis=-1).reshape(self.rows, -1, BLOCK)

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], computed as llama.cpp and gguf-py do (``d * q (+ m)``)."""
        q = self.unpacked().astype(np.float32)
        d = self.scales.astype(np.float32)[..., None]
        if self.qtype == "Q4_1":
            w = d * q + self.mins.astype(np.float32)[..., None]
        else:
            w = d * (q - (8 if self.bits == 4 else 128))
        return w.reshape(self.rows, self.cols)

    @classmethod
    def concat(cls, parts: list[BlockWeight]):
        return concat_rows(parts)

    def take_rows(self, order: np.ndarray) -> BlockWeight:
        return BlockWeight(self.qtype, self.codes[order], self.scales[order],
                           None if self.mins is None else self.mins[order])


def from_gguf_rows(qtype: str, raw: np.ndarray, cols: int) -> BlockWeight:
    """Parse GGUF block bytes (uint8 [rows, cols/32 * bytes per block]) into a :class:`BlockWeight`."""
    rows = raw.shape[0]
    nb = cols // BLOCK
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, nb, _BYTES[qtype])
    scales = b[..., 0:2].copy().view(np.float16)[..., 0]
    mins = None
    if qtype == "Q8_0":
        q = b[..., 2:].view(np.int8).astype(np.int16) + 128
        return BlockWeight(qtype, q.astype(np.uint8), scales)
    if qtype == "Q4_1":
        mins = b[..., 2:4].copy().view(np.float16)[..., 0]
        qs = b[..., 4:]
    else:
        qs = b[..., 2:]
    # GGUF: element j in the low nibble of qs[j], element j+16 in its high nibble
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    codes = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return BlockWeight(qtype, codes, scales, mins)


def concat_rows(parts: list[BlockWeight]) -> BlockWeight | None:
    """Parts stacked along rows (packed q|k|v, gate|up), or None when their formats differ."""
    if len({p.qtype for p in parts}) != 1 or len({p.cols for p in parts}) != 1:
        return None
    mins = None if parts[0].mins is None else np.concatenate([p.mins for p in parts])
    return BlockWeight(parts[0].qtype, np.concatenate([p.codes for p in parts]),
                       np.concatenate([p.scales for p in parts]), mins)


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

    A 2-D weight is carried as blocks when the GGUF stores it as Q4_0, Q4_1 or Q8_0 and
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
        if int(t.shape[0]) != cols or cols % BLOCK or t.data.shape[0] != rows:
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
