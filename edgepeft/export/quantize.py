"""Base-weight storage: fp32, fp16, int8, int4 and nf4 linear layers and embeddings.

Only base weights pass through here; adapter slots never do, so adapters stay
swappable and exact.

- A GGUF base (the embedded SmolLM2 is one) in an int4/int8 export keeps its own
  Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and Q4_K/Q5_K/Q6_K blocks (``gguf="keep"``, :mod:`.gguf_blocks`): far closer to fp32 than
  re-quantizing them. ``gguf="layers"`` keeps the layers' blocks and re-quantizes only the
  Q8_0 embedding / lm_head to int4. ``gguf="requantize"`` is the scheme described next.
- ``nf4``: the QLoRA base, quantized by bitsandbytes and run by ``MatMulBnb4`` (:mod:`.nf4`).

- ``int4``: ``MatMulNBits`` (bits=4), block-wise along K. Default ``zero_points="all"``: every
  weight in blocks of 32 with uint4 zero points, the tied embedding / lm_head (one copy,
  ``GatherBlockQuantized`` + ``MatMulNBits``) included. The smaller ``"auto"`` mix:
  qkv: block 32 + uint4 zero points; o, gate|up: block 32 symmetric; down: block 64
  + zero points; embedding / lm_head block 64 + zero points. Symmetric blocks store
  ``scale = w[argmax|w|] / -8`` (largest magnitude exactly on -8); asymmetric blocks
  take the min/max range (including 0), round the zero point, then rescale so the
  block's larger-magnitude extreme lands exactly on code 0 or 15. Exact extremes
  matter more than mean error here: SmolLM2's layers are Q4_1 (blocks of 32) in
  disguise, and every MSE scale search tried raised perplexity although it lowered
  weight error.
- ``int8``: ``MatMulNBits`` (bits=8), same layout, ``scale = w[argmax|w|] / -128``.
  Block-wise is finer than per-channel, so it never damages outlier channels.
  accuracy_level 4 runs int4 and int8 on MLAS's int8-activation kernels.
- ``fp16``: weights stored fp16 with a ``Cast`` to fp32 that ONNX Runtime folds
  at load: half the file, fp32 compute on every CPU.
- tied embeddings: int4/int8 use ``GatherBlockQuantized`` on the *same* packed
  bytes and scales as the lm_head ``MatMulNBits`` (one copy on disk).

The measurements behind these defaults (perplexity, KL and size of each variant) are in
docs/measured-defaults.md; the benchmark (benchmarks/README.md) refreshes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from ..contracts.fields import check_choice
from ..contracts.target import GGUF_MODES, ZERO_POINTS  # GGUF blocks, zero points, LoRA B
from ..contracts.target import LORA_B_TYPES as LORA_B
from ..errors import UsageError

KINDS = ("fp32", "fp16", "int8", "int4", "nf4")
_ASYM_AUTO = ("embed", "lm_head", ".qkv", ".down")  # names (endings) with zero points under "auto"
_WIDE_AUTO = (".down",)  # ... of which these use blocks of 2 * block_size


@dataclass(frozen=True)
class WeightQuant:
    """How base weights are stored. Validated here, where it enters the exporter.

    ``embed_block_size`` is the block size of the (tied) embedding / lm_head;
    None means the policy's default (see :attr:`embed_block`).
    ``zero_points`` (int4 only; int8 is always symmetric): ``"all"`` (default) makes
    every int4 weight asymmetric at its block size, the embedding / lm_head included
    (the measured best from float weights at onnxruntime-genai's size, module
    docstring); ``"auto"`` gives only the embedding / lm_head (blocks of 64) and the
    qkv projection zero points, and the MLP down projection asymmetric blocks of
    ``2 * block_size`` (the smaller form); ``"none"`` is plain
    symmetric.
    """

    kind: str = "int4"
    block_size: int = 32
    embed_block_size: int | None = None
    accuracy_level: int = 4
    zero_points: str = "all"
    gguf: str = "keep"
    lora_b: str = "auto"

    def __post_init__(self):
        check_choice(self.lora_b, LORA_B, "LoRA B slot type")
        check_choice(self.gguf, GGUF_MODES, "GGUF mode")
        check_choice(self.kind, KINDS, "weight quantization")
        check_choice(self.zero_points, ZERO_POINTS, "zero_points policy")
        for bs in (self.block_size, self.embed_block_size):
            if bs is not None and (bs < 16 or bs & (bs - 1)):
                raise UsageError(f"quantization block size {bs} is not a power of two >= 16",
                                 hint="use 32 (default), 64 or 128")

    def asymmetric(self, name: str) -> bool:
        """Whether the weight emitted as ``name`` gets zero points (see the module docstring)."""
        if self.kind != "int4" or self.zero_points == "none":
            return False
        return self.zero_points == "all" or name.endswith(_ASYM_AUTO)

    def block_for(self, name: str) -> int:
        """Block size (before fitting to K) of the layer weight emitted as ``name``."""
        if self.kind == "int4" and self.zero_points == "auto" and name.endswith(_WIDE_AUTO):
            return 2 * self.block_size
        return self.block_size

    @property
    def embed_block(self) -> int:
        """Tied embedding / lm_head block: ``block_size`` unless set, 64 under ``zero_points="auto"`` (the
        smaller form)."""
        if self.embed_block_size:
            return self.embed_block_size
        return max(self.block_size, 64) if self.kind == "int4" and self.zero_points == "auto" else self.block_size

    @property
    def lora_b_int8(self) -> bool:
        """Whether decoder LoRA B slots are int8 (``DynamicQuantizeMatMul``; scales folded into A). Only when
        asked for: its activations share one scale per run, so rows batched together would change each
        other's answers (docs/quantization.md), and at batch 1 it decodes no faster than fp32 B."""
        return self.lora_b == "int8"

    @property
    def bits(self) -> int | None:
        return {"int4": 4, "int8": 8}.get(self.kind)

    def to_dict(self) -> dict:
        d = {"weights": self.kind}
        if self.bits:
            d.update(block_size=self.block_size, embed_block_size=self.embed_block,
                     symmetric=self.kind != "int4" or self.zero_points == "none",
                     zero_points=self.zero_points if self.kind == "int4" else "none",
                     accuracy_level=self.accuracy_level, op="MatMulNBits", gguf=self.gguf)
        return d

    @classmethod
    def coerce(cls, quant) -> WeightQuant:
        """Accept a WeightQuant, a kind string, or a spec QuantSpec-like object (``.weights``, ``.block_size``)."""
        if isinstance(quant, cls):
            return quant
        if quant is None:
            return cls()
        if isinstance(quant, str):
            return cls(kind=quant)
        kind = getattr(quant, "weights", None) or getattr(quant, "kind", None)
        return cls(kind=kind, block_size=int(getattr(quant, "block_size", 32) or 32),
                   gguf=getattr(quant, "gguf", None) or "keep", lora_b=getattr(quant, "lora_b", None) or "auto",
                   zero_points=getattr(quant, "zero_points", None) or "all")


class Blocks(NamedTuple):
    """One block-quantized weight: what the graph stores plus what it computes (for tests/metrics)."""

    packed: np.ndarray        # uint8 [N, k_blocks, block_size*bits/8], 4-bit values low nibble first
    scales: np.ndarray        # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks/2)], packed uint4 (None: symmetric)
    deq: np.ndarray | None    # float32 [N, K], the weight the graph effectively uses (None when not asked for)


_CHUNK = 1 << 22  # weights quantized at a time: the temporaries of a 1B model's embedding stay small


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True,
                       dequantized: bool = True) -> Blocks:
    """Quantize ``w`` [N, K] along K in blocks (K zero-padded to a multiple of ``block_size``).

    Symmetric: ``scale = w[argmax|w|] / -2**(bits-1)`` and values stored with the
    ops' default zero point ``2**(bits-1)``. Asymmetric (4 bits only): codes
    0..15 with a uint4 zero point per block, the block's larger-magnitude extreme
    exact (see the module docstring). Rows go through in chunks (the same result,
    bounded temporaries); ``dequantized=False`` leaves ``deq`` None (the exporter
    does not need it, and for an embedding it is as large as the fp32 table).
    """
    w = w if hasattr(w, "row_chunks") else np.asarray(w, dtype=np.float32)  # lazy rows: sliced below
    n, k = w.shape
    step = max(1, _CHUNK // max(k, 1))
    if n > step:
        parts = [quantize_blockwise(w[i:i + step], bits, block_size, symmetric, dequantized)
                 for i in range(0, n, step)]
        cat = lambda xs: None if xs[0] is None else np.concatenate(xs)  # noqa: E731
        return Blocks(*(cat([p[j] for p in parts]) for j in range(4)))
    return _quantize_rows(np.asarray(w, dtype=np.float32), bits, block_size, symmetric, dequantized)


def _quantize_rows(w: np.ndarray, bits: int, block_size: int, symmetric: bool, dequantized: bool) -> Blocks:
    n, k = w.shape
    nb = -(-k // block_size)
    pad = nb * block_size - k
    wp = np.pad(w, ((0, 0), (0, pad))) if pad else w
    blocks = wp.reshape(n, nb, block_size)
    zp = None
    if symmetric:
        half = 2 ** (bits - 1)
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        scales = np.take_along_axis(blocks, idx, axis=-1) / -half
        scales[scales == 0] = 1.0
        q = np.clip(np.rint(blocks / scales), -half, half - 1)
        deq = q * scales
        qu = (q + half).astype(np.uint8)
    else:
        if bits != 4:
            raise UsageError("zero points are implemented for int4 only", hint="use symmetric int8")
        lo = np.minimum(blocks.min(axis=-1, keepdims=True), 0)
        hi = np.maximum(blocks.max(axis=-1, keepdims=True), 0)
        span = hi - lo
        z = np.clip(np.rint(np.divide(-lo * 15, span, out=np.zeros_like(span), where=span > 0)), 0, 15)
        # Rescale so the larger-magnitude extreme sits exactly on code 0 (negative) or 15 (positive):
        # -lo >= hi implies z >= 8, and otherwise z <= 7, so neither divisor is 0.
        scales = np.where(-lo >= hi, -lo / np.maximum(z, 1), hi / np.maximum(15 - z, 1))
        scales[scales == 0] = 1.0
        qu = np.clip(np.rint(blocks / scales) + z, 0, 15)
        deq = (qu - z) * scales
        qu = qu.astype(np.uint8)
        zb = np.pad(z[..., 0].astype(np.uint8), ((0, 0), (0, nb % 2)))
        zp = (zb[:, 0::2] | (zb[:, 1::2] << 4)).astype(np.uint8)
    if bits == 4:
        qu = (qu[..., 0::2] | (qu[..., 1::2] << 4)).astype(np.uint8)
    deq = deq.reshape(n, nb * block_size)[:, :k].astype(np.float32) if dequantized else None
    return Blocks(qu, scales[..., 0].astype(np.float32), zp, deq)


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [out, in] as int8 [in, out] (MatMul layout) with one scale per output channel (max |row| / 127)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scale


def fake_quantize(w: np.ndarray, quant: WeightQuant, name: str, per_channel: bool = False) -> np.ndarray:
    """The weight an int4/int8 export computes with for the weight emitted as ``name`` ("embed" for the table);
    ``per_channel``: an encoder's int8 linear layer (see :class:`LinearEmitter`)."""
    w = np.asarray(w, dtype=np.float32)
    if not quant.bits:
        return w
    if per_channel and quant.bits == 8 and name != "embed":
        q, scale = quantize_per_channel(w)
        return q.T.astype(np.float32) * scale[:, None]
    bs = _fit_block(w.shape[1], quant.embed_block if name == "embed" else quant.block_for(name))
    return quantize_blockwise(w, quant.bits, bs, symmetric=not quant.asymmetric(name)).deq


def _fit_block(k: int, block_size: int) -> int:
    """The largest power of two <= block_size (and >= 16) dividing k, else block_size (padded)."""
    bs = block_size
    while bs >= 16:
        if k % bs == 0:
            return bs
        bs //= 2
    return block_size


class LinearEmitter:
    """Emits ``y = x @ W.T (+ b)`` for a weight in nn.Linear layout [out, in].

    ``blocks`` (a :class:`.gguf_blocks.GGUFBlocks`) holds the base's GGUF block weights by
    HF name: an int4/int8 export with ``gguf="keep"`` stores those as they are for every
    weight whose ``source`` names they cover (see :mod:`.gguf_blocks`); ``gguf="layers"`` keeps
    the tied embedding / lm_head out of it (re-quantized to the int4 scheme, smaller where the table is
    Q8_0; docs/measured-defaults.md).
    """

    def __init__(self, gb, quant: WeightQuant, blocks=None, per_channel_int8: bool = False):
        self.gb, self.q = gb, quant
        self.blocks = blocks  # HF name -> a GGUF BlockWeight or an NF4Weight (anything with .get)
        # int8 layers as DynamicQuantizeMatMul (per-channel scales, activations per tensor): faster for an
        # encoder's batches of rows than MatMulNBits (docs/measured-defaults.md); decoders keep MatMulNBits
        self.per_channel_int8 = per_channel_int8
        self.dequantized: dict[str, np.ndarray] = {}  # name -> effective weight, for tests/metrics
        self.carried: list[str] = []  # HF names of the weights whose GGUF blocks were carried as they are
        self._emit: dict[str, object] = {}  # name -> emits the layer on another input, same stored weights
        self._indicator: dict[tuple, str] = {}  # (K, block) -> the [0, 0, K/block, block] shape of its block sums

    def _source_blocks(self, source, n: int):
        """The GGUF block weights for the HF weights ``source``, stacked along rows: one block weight,
        or a list of them when their GGUF types differ; None when any part has no blocks."""
        if self.blocks is None or not source:
            return None
        parts = [self.blocks.get(s) for s in source]
        if any(p is None for p in parts) or sum(p.rows for p in parts) != n:
            return None
        if len(parts) == 1:
            return parts[0]
        same = len({type(p) for p in parts}) == 1
        return (type(parts[0]).concat(parts) if same else None) or parts

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str, source=None) -> str:
        """Emit the layer ``name`` on ``x``; ``source``: the HF weight names stacked into ``weight``."""
        gb, q = self.gb, self.q
        n, k = weight.shape
        if not (hasattr(weight, "row_chunks") and q.bits and not self.per_channel_int8):
            weight = np.asarray(weight, dtype=np.float32)  # (a lazily read one stays lazy for blockwise quantizing)
        blk = self._source_blocks(source, n) if name != "lm_head" or q.gguf == "keep" else None
        if blk is not None:
            self.carried += list(source)
        if isinstance(blk, list):  # parts of different GGUF types: one op each, outputs side by side
            cuts = np.cumsum([0] + [p.rows for p in blk])
            parts = [self._block_linear(p, None if bias is None else bias[a:b], f"{name}.{j}")
                     for j, (p, a, b) in enumerate(zip(blk, cuts[:-1], cuts[1:]))]

            def emit(inp):
                return gb.op("Concat", [f(inp) for f in parts], axis=-1, hint=name.replace(".", "_"))
        elif blk is not None:
            emit = self._block_linear(blk, bias, name)
        elif q.kind == "nf4":  # a weight QLoRA does not quantize (an untied lm_head): int8
            sub = LinearEmitter(gb, replace(q, kind="int8"))
            out = sub.linear(x, weight, bias, name)
            self._emit[name] = sub._emit[name]
            return out
        elif q.bits == 8 and self.per_channel_int8:
            w8, scale = quantize_per_channel(weight)
            ins = [gb.const(w8, f"{name}.weight_int8"), gb.const(scale, f"{name}.scales")]
            bname = None if bias is None else gb.const(np.asarray(bias, np.float32), f"{name}.bias")

            def emit(inp):
                # bias as the op's own input: one node fewer per layer
                return gb.ms("DynamicQuantizeMatMul", [inp, *ins, "", *([bname] if bname else [])],
                             hint=name.replace(".", "_"))
        elif q.bits:
            bs = _fit_block(k, q.block_for(name))
            blk = quantize_blockwise(weight, q.bits, bs, symmetric=not q.asymmetric(name), dequantized=False)
            ins = [gb.const(blk.packed, f"{name}.qweight"), gb.const(blk.scales, f"{name}.scales")]
            if blk.zero_points is not None:
                ins.append(gb.const(blk.zero_points, f"{name}.zero_points"))
            if bias is not None:
                ins += [""] * (4 - len(ins)) + [gb.const(np.asarray(bias, np.float32), f"{name}.bias")]

            def emit(inp):
                return gb.ms("MatMulNBits", [inp, *ins], hint=name.replace(".", "_"), K=k, N=n, bits=q.bits,
                             block_size=bs, accuracy_level=q.accuracy_level)
        else:
            w_t = np.ascontiguousarray(weight.T)
            if q.kind == "fp16":
                wname = gb.op("Cast", [gb.const(w_t.astype(np.float16), f"{name}.weight")], to=1, hint="cast")
            else:
                wname = gb.const(w_t, f"{name}.weight")
            bname = None if bias is None else gb.const(np.asarray(bias, np.float32), f"{name}.bias")

            def emit(inp):
                y = gb.op("MatMul", [inp, wname], hint=name.replace(".", "_"))
                return y if bname is None else gb.op("Add", [y, bname])
        self._emit[name] = emit
        return emit(x)

    def _scales(self, blk, name: str) -> tuple[str, str | None]:
        """fp32 scales and (affine formats) the per-block correction ``min + c * scale`` [N, blocks], from
        the GGUF's fp16 values (times K-quants' integer sub-scales and sub-minimums) by nodes ONNX Runtime
        folds at load: the file keeps the GGUF's numbers, the kernels get fp32."""
        from onnx import TensorProto

        gb = self.gb
        nb = blk.cols // blk.block

        def per_block(fp16, sub, what):
            v = gb.op("Cast", [gb.const(fp16, f"{name}.{what}_fp16")], to=TensorProto.FLOAT, hint=what)
            if sub is None:
                return v
            per = sub.shape[1] // fp16.shape[1]
            subf = gb.op("Cast", [gb.const(sub, f"{name}.sub_{what}")], to=TensorProto.FLOAT, hint=f"sub_{what}")
            subf = gb.op("Reshape", [subf, gb.const(np.array([blk.rows, -1, per], np.int64))], hint=f"sub_{what}")
            v = gb.op("Unsqueeze", [v, gb.const(np.array([-1], np.int64))], hint=what)
            return gb.op("Reshape", [gb.op("Mul", [v, subf], hint=what), gb.const(np.array([blk.rows, nb], np.int64))],
                         hint=what)

        scales = per_block(blk.scales, blk.sub_scales, "scales")
        if blk.mins is None:
            return scales, None
        mins = per_block(blk.mins, blk.sub_mins, "mins")
        centre = gb.const(np.array(float(blk.centre), np.float32))
        shift = gb.op("Mul", [scales, centre], hint="zp_shift")
        if blk.sub_mins is not None:  # K-quants: w = s * q - dmin * m
            return scales, gb.op("Sub", [shift, mins], hint="block_offset")
        return scales, gb.op("Add", [mins, shift], hint="block_offset")

    def _codes(self, blk, name: str) -> str:
        """The kernel's codes: stored as they are (4-bit codes, Q8_0), or for 5- and 6-bit codes their low
        nibbles and high bits stored apart (the GGUF's size) and joined into 8-bit codes ``q + 128 - c`` by
        nodes ONNX Runtime folds at load."""
        from onnx import TensorProto

        gb = self.gb
        packed = gb.const(blk.codes, f"{name}.qweight")
        if blk.high is None:
            return packed
        u8 = lambda v: gb.const(np.array(v, np.uint8))  # noqa: E731
        last = gb.const(np.array([-1], np.int64))
        shape = gb.const(np.array([blk.rows, -1, blk.block], np.int64))
        lo = gb.op("BitShift", [gb.op("BitShift", [packed, u8(4)], direction="LEFT", hint="nib"), u8(4)],
                   direction="RIGHT", hint="nib_lo")
        hi = gb.op("BitShift", [packed, u8(4)], direction="RIGHT", hint="nib_hi")
        nib = gb.op("Concat", [gb.op("Unsqueeze", [lo, last]), gb.op("Unsqueeze", [hi, last])], axis=-1, hint="nib")
        nib = gb.op("Reshape", [nib, shape], hint="nib")
        hb = blk.code_bits - 4
        per = 8 // hb
        left = u8([8 - hb * (b + 1) for b in range(per)])  # bit field b to the top, then down to bit 0
        high = gb.op("Unsqueeze", [gb.const(blk.high, f"{name}.qweight_high"), last], hint="high")
        high = gb.op("BitShift", [gb.op("BitShift", [high, left], direction="LEFT", hint="high"), u8(8 - hb)],
                     direction="RIGHT", hint="high")
        high = gb.op("Reshape", [high, shape], hint="high")
        i32 = lambda t: gb.op("Cast", [t], to=TensorProto.INT32, hint="codes_i32")  # noqa: E731
        code = gb.op("Add", [i32(nib), gb.op("Mul", [i32(high), gb.const(np.array(16, np.int32))], hint="high")],
                     hint="codes")
        code = gb.op("Add", [code, gb.const(np.array(128 - blk.centre, np.int32))], hint="codes")
        return gb.op("Cast", [code], to=TensorProto.UINT8, hint="codes")

    def _block_sum(self, x: str, k: int, block: int) -> str:
        """``x`` summed over each block along its last axis: [..., K] -> [..., K/block].

        Reshape + ReduceSum is cheaper than a MatMul with a 0/1 block matrix (``benchmarks.sec_kernels``)."""
        gb = self.gb
        key = (k, block)
        if key not in self._indicator:
            self._indicator[key] = gb.const(np.array([0, 0, k // block, block], np.int64), f"block_shape.k{k}b{block}")
        blocks = gb.op("Reshape", [x, self._indicator[key]], hint="blocks")
        return gb.op("ReduceSum", [blocks, gb.const(np.array([-1], np.int64))], keepdims=0, hint="block_sum")

    def _block_linear(self, blk, bias, name: str):
        """A closure emitting ``MatMulNBits`` on GGUF blocks (plus the block-offset matmul of the affine
        formats), or ``MatMulBnb4`` on an NF4 weight."""
        from .nf4 import NF4Weight

        if isinstance(blk, NF4Weight):
            return self._nf4_linear(blk, bias, name)
        scales, offset = self._scales(blk, name)
        wname = self._codes(blk, name)
        bname = None if bias is None else self.gb.const(np.asarray(bias, np.float32), f"{name}.bias")
        return self._block_linear_on(wname, scales, offset, blk, name.replace(".", "_"), bias=bname)

    def emit_on(self, x: str, name: str) -> str:
        """The layer emitted as ``name`` applied to another input, reading the same stored weights."""
        return self._emit[name](x)

    def tied_embedding(self, ids: str, embed: np.ndarray, name: str = "embed", source: str | None = None):
        """Embedding lookup plus a closure emitting the tied lm_head on the same stored weights.

        ``source``: the HF name of the table, whose GGUF blocks are carried when there are any.
        Returns ``(embeddings_name, lm_head(x) -> logits_name)``.
        """
        gb, q = self.gb, self.q
        vocab, hidden = embed.shape
        blk = self._source_blocks([source] if source else None, vocab) if q.gguf == "keep" else None
        if blk is not None and not isinstance(blk, list) and not hasattr(blk, "absmax"):
            self.carried.append(source)
            return self._block_embedding(ids, blk, name)
        if q.kind == "nf4":  # QLoRA leaves the embedding unquantized; on the device it is int8 (near-lossless)
            q = replace(q, kind="int8")
        if q.bits:
            bs = _fit_block(hidden, q.embed_block)
            if hidden % bs:
                raise UsageError(f"hidden size {hidden} has no quantization block size >= 16 dividing it",
                                 hint="export with fp16 or fp32 weights")
            blk = quantize_blockwise(embed, q.bits, bs, symmetric=not q.asymmetric("embed"), dequantized=False)
            wname = gb.const(blk.packed, f"{name}.qweight")
            qins = [gb.const(blk.scales, f"{name}.scales")]
            if blk.zero_points is not None:  # [vocab, ceil(blocks/2)] packed: both ops read this layout
                qins.append(gb.const(blk.zero_points, f"{name}.zero_points"))
            flat = gb.op("Reshape", [wname, gb.const(np.array([vocab, -1], np.int64))], hint="embed_flat")
            emb = gb.ms("GatherBlockQuantized", [flat, ids, *qins], hint="embed", bits=q.bits, block_size=bs,
                        gather_axis=0, quantize_axis=1)

            def lm_head(x: str) -> str:
                return gb.ms("MatMulNBits", [x, wname, *qins], hint="lm_head", K=hidden, N=vocab, bits=q.bits,
                             block_size=bs, accuracy_level=q.accuracy_level)
            return emb, lm_head

        embed = np.asarray(embed, dtype=np.float32)
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

    def _block_embedding(self, ids: str, blk, name: str):
        """Tied embedding and lm_head on one copy of GGUF blocks (``GatherBlockQuantized`` + ``MatMulNBits``)."""
        gb = self.gb
        vocab, hidden = blk.rows, blk.cols
        scales, offset = self._scales(blk, name)
        wname = self._codes(blk, name)
        flat = gb.op("Reshape", [wname, gb.const(np.array([vocab, -1], np.int64))], hint="embed_flat")
        emb = gb.ms("GatherBlockQuantized", [flat, ids, scales], hint="embed", bits=blk.bits, block_size=blk.block,
                    gather_axis=0, quantize_axis=1)
        if offset is not None:  # affine formats: each row's blocks also get min + c * scale
            rows = gb.op("Unsqueeze", [gb.op("Gather", [offset, ids], hint="embed_offset"),
                                       gb.const(np.array([-1], np.int64))], hint="embed_offset")
            shape = np.array([0, 0, hidden // blk.block, blk.block], np.int64)
            blocks = gb.op("Reshape", [emb, gb.const(shape)])
            emb = gb.op("Reshape", [gb.op("Add", [blocks, rows]), gb.const(np.array([0, 0, hidden], np.int64))],
                        hint="embed")
        head = self._block_linear_on(wname, scales, offset, blk, "lm_head")
        return emb, head

    def _nf4_linear(self, w, bias, name: str):
        """``MatMulBnb4`` (NF4) on bitsandbytes' packed codes and fp32 block scales; a bias is an Add."""
        gb, hint = self.gb, name.replace(".", "_")
        ins = [gb.const(w.packed, f"{name}.nf4"), gb.const(w.absmax, f"{name}.absmax")]
        bname = None if bias is None else gb.const(np.asarray(bias, np.float32), f"{name}.bias")

        def emit(inp):
            y = gb.ms("MatMulBnb4", [inp, *ins], hint=hint, K=w.cols, N=w.rows, block_size=w.block_size,
                      quant_type=1)
            return y if bname is None else gb.op("Add", [y, bname])
        return emit

    def _block_linear_on(self, wname, scales, offset, blk, hint, bias=None):
        """``MatMulNBits`` over stored codes and scales, plus ``blocksum(x) @ offset^T`` for the affine formats."""
        gb, q = self.gb, self.q
        n, k, bits, block = blk.rows, blk.cols, blk.bits, blk.block
        offset_t = None if offset is None else gb.op("Transpose", [offset], perm=[1, 0], hint="block_offset_t")
        ins = [wname, scales] + ([] if bias is None else ["", "", bias])

        def emit(inp):
            y = gb.ms("MatMulNBits", [inp, *ins], hint=hint, K=k, N=n, bits=bits, block_size=block,
                      accuracy_level=q.accuracy_level)
            if offset_t is None:
                return y
            return gb.op("Add", [y, gb.op("MatMul", [self._block_sum(inp, k, block), offset_t],
                                          hint="block_offset_mm")],
                         hint="block_offset_add")
        return emit
