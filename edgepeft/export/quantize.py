"""Base-weight storage: fp32, fp16, int8 and int4 linear layers and embeddings.

Only base weights pass through here; adapter slots never do, so adapters stay
swappable and exact.

- ``int4``: ``MatMulNBits`` (bits=4), symmetric, block-wise along K. Block 32 for
  the layers (genai's CPU default, llama.cpp's Q4_0 granularity) and 64 for the
  tied embedding / lm_head. Measured on SmolLM2-135M (KL to fp32 over a chat
  turn): 32/32 -> 80.4 MiB, KL 0.57; 32/64 -> 78.7 MiB, KL 0.66; 64/64 -> 72.4 MiB,
  KL 0.74. 32/64 is the smallest loss that keeps model.onnx under 80 MiB.
  Each block stores ``scale = w[argmax|w|] / -8`` so the largest magnitude lands
  exactly on -8 and the full signed range [-8, 7] is used (one more level than
  absmax/7). (An MSE clip search lowered weight error but not the KL: dropped.)
- ``int8``: ``MatMulNBits`` (bits=8), same layout, ``scale = w[argmax|w|] / -128``.
  Block-wise is finer than per-channel, so it never damages outlier channels
  (SmolLM2: block 32 -> 145 MiB, KL 0.007, top-1 97%; block 128 -> 136 MiB, KL 0.013).
  accuracy_level 4 runs int4 and int8 on MLAS's int8-activation kernels.
- ``fp16``: weights stored fp16 with a ``Cast`` to fp32 that ONNX Runtime folds
  at load: half the file, fp32 compute on every CPU.
- tied embeddings: int4/int8 use ``GatherBlockQuantized`` on the *same* packed
  bytes and scales as the lm_head ``MatMulNBits`` (one copy on disk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

KINDS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class WeightQuant:
    """How base weights are stored. Validated here, where it enters the exporter.

    ``embed_block_size`` is the block size of the (tied) embedding / lm_head;
    None means 64 for int4 (see :attr:`embed_block`) and ``block_size`` otherwise.
    """

    kind: str = "int4"
    block_size: int = 32
    embed_block_size: int | None = None
    accuracy_level: int = 4

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UsageError(f"unknown weight quantization {self.kind!r}", hint=f"use one of {', '.join(KINDS)}")
        for bs in (self.block_size, self.embed_block_size):
            if bs is not None and (bs < 16 or bs & (bs - 1)):
                raise UsageError(f"quantization block size {bs} is not a power of two >= 16",
                                 hint="use 32 (default), 64 or 128")

    @property
    def embed_block(self) -> int:
        """Tied embedding / lm_head block: 64 for int4 unless set (keeps SmolLM2's int4 file under 80 MiB)."""
        if self.embed_block_size:
            return self.embed_block_size
        return max(self.block_size, 64) if self.kind == "int4" else self.block_size

    @property
    def bits(self) -> int | None:
        return {"int4": 4, "int8": 8}.get(self.kind)

    def to_dict(self) -> dict:
        d = {"weights": self.kind}
        if self.bits:
            d.update(block_size=self.block_size, embed_block_size=self.embed_block,
                     symmetric=True, accuracy_level=self.accuracy_level, op="MatMulNBits")
        return d

    @classmethod
    def coerce(cls, quant) -> "WeightQuant":
        """Accept a WeightQuant, a kind string, or a spec QuantSpec-like object (``.weights``, ``.block_size``)."""
        if isinstance(quant, cls):
            return quant
        if quant is None:
            return cls()
        if isinstance(quant, str):
            return cls(kind=quant)
        kind = getattr(quant, "weights", None) or getattr(quant, "kind", None)
        return cls(kind=kind, block_size=int(getattr(quant, "block_size", 32) or 32))


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int):
    """Quantize ``w`` [N, K] symmetrically along K in blocks.

    Returns ``(packed uint8 [N, k_blocks, block_size*bits/8], scales float32 [N, k_blocks], dequantized [N, K])``;
    K is zero-padded up to a multiple of ``block_size``. Values are stored with
    an offset of ``2**(bits-1)`` (the default zero point of MatMulNBits and
    GatherBlockQuantized), 4-bit values packed low nibble first.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    nb = -(-k // block_size)
    pad = nb * block_size - k
    wp = np.pad(w, ((0, 0), (0, pad))) if pad else w
    blocks = wp.reshape(n, nb, block_size)
    half = 2 ** (bits - 1)
    idx = np.abs(blocks).argmax(axis=-1)[..., None]
    signed_max = np.take_along_axis(blocks, idx, axis=-1)
    scales = signed_max / -half
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales), -half, half - 1)
    deq = (q * scales).reshape(n, nb * block_size)[:, :k]
    qu = (q + half).astype(np.uint8)
    if bits == 4:
        qu = (qu[..., 0::2] | (qu[..., 1::2] << 4)).astype(np.uint8)
    return qu, scales[..., 0].astype(np.float32), deq.astype(np.float32)


def _fit_block(k: int, block_size: int) -> int:
    """The largest power of two <= block_size (and >= 16) dividing k, else block_size (padded)."""
    bs = block_size
    while bs >= 16:
        if k % bs == 0:
            return bs
        bs //= 2
    return block_size


class LinearEmitter:
    """Emits ``y = x @ W.T (+ b)`` for a weight in nn.Linear layout [out, in]."""

    def __init__(self, gb, quant: WeightQuant):
        self.gb, self.q = gb, quant
        self.dequantized: dict[str, np.ndarray] = {}  # name -> effective weight, for tests/metrics

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        gb, q = self.gb, self.q
        weight = np.asarray(weight, dtype=np.float32)
        n, k = weight.shape
        if q.bits:
            bs = _fit_block(k, q.block_size)
            packed, scales, _ = quantize_blockwise(weight, q.bits, bs)
            ins = [x, gb.const(packed, f"{name}.qweight"), gb.const(scales, f"{name}.scales")]
            if bias is not None:
                ins += ["", "", gb.const(np.asarray(bias, np.float32), f"{name}.bias")]
            return gb.ms("MatMulNBits", ins, hint=name.replace(".", "_"), K=k, N=n, bits=q.bits, block_size=bs,
                         accuracy_level=q.accuracy_level)
        w_t = np.ascontiguousarray(weight.T)
        if q.kind == "fp16":
            wname = gb.op("Cast", [gb.const(w_t.astype(np.float16), f"{name}.weight")], to=1, hint="cast")
        else:
            wname = gb.const(w_t, f"{name}.weight")
        y = gb.op("MatMul", [x, wname], hint=name.replace(".", "_"))
        if bias is not None:
            y = gb.op("Add", [y, gb.const(np.asarray(bias, np.float32), f"{name}.bias")])
        return y

    def tied_embedding(self, ids: str, embed: np.ndarray, name: str = "embed"):
        """Embedding lookup plus a closure emitting the tied lm_head on the same stored weights.

        Returns ``(embeddings_name, lm_head(x) -> logits_name)``.
        """
        gb, q = self.gb, self.q
        embed = np.asarray(embed, dtype=np.float32)
        vocab, hidden = embed.shape
        if q.bits:
            bs = _fit_block(hidden, q.embed_block)
            if hidden % bs:
                raise UsageError(f"hidden size {hidden} has no quantization block size >= 16 dividing it",
                                 hint="export with fp16 or fp32 weights")
            packed, scales, _ = quantize_blockwise(embed, q.bits, bs)
            wname = gb.const(packed, f"{name}.qweight")
            sname = gb.const(scales, f"{name}.scales")
            flat = gb.op("Reshape", [wname, gb.const(np.array([vocab, -1], np.int64))], hint="embed_flat")
            emb = gb.ms("GatherBlockQuantized", [flat, ids, sname], hint="embed", bits=q.bits, block_size=bs,
                        gather_axis=0, quantize_axis=1)

            def lm_head(x: str) -> str:
                return gb.ms("MatMulNBits", [x, wname, sname], hint="lm_head", K=hidden, N=vocab, bits=q.bits,
                             block_size=bs, accuracy_level=q.accuracy_level)
            return emb, lm_head

        if q.kind == "fp16":
            table = gb.op("Cast", [gb.const(embed.astype(np.float16), f"{name}.weight")], to=1, hint="cast")
        else:
            table = gb.const(embed, f"{name}.weight")
        emb = gb.op("Gather", [table, ids], hint="embed")

        def lm_head(x: str) -> str:
            # Gemm with transB reads the [vocab, hidden] table as is: no transposed copy.
            flat = gb.op("Reshape", [x, gb.const(np.array([-1, hidden], np.int64))], hint="lm_in")
            logits = gb.op("Gemm", [flat, table], transB=1, hint="lm_head")
            lead = gb.op("Shape", [x], end=-1, hint="lead_shape")
            shape = gb.op("Concat", [lead, gb.const(np.array([vocab], np.int64))], axis=0)
            return gb.op("Reshape", [logits, shape], hint="logits")
        return emb, lm_head
