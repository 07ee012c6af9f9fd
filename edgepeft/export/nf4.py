"""NF4 base weights for QLoRA adapters: the 4-bit base the adapter was trained against, on ONNX Runtime.

Why: a QLoRA adapter learns against its base *as bitsandbytes quantized it* (NF4, blocks of 64,
double-quantized block scales: ``edgepeft train --method qlora`` and transformers' defaults). Serving it
on another 4-bit grid (int4 ``MatMulNBits``) moves the base under the adapter. ONNX Runtime's CPU
``MatMulBnb4`` contrib op computes with bitsandbytes' own layout: the packed codes (two per byte, first
element in the high nibble) and the fp32 block scales go in as they are, so the weights here are made by
bitsandbytes itself (``quantize_4bit``, the function transformers calls when it loads a base in 4-bit),
and the double-quantized scales are dequantized the way bitsandbytes does before every matmul.

The price (``benchmarks``; docs/measured-defaults.md): ONNX Runtime 1.32's ``MatMulBnb4`` CPU kernel
dequantizes the whole weight on every call, so an NF4 bundle is for train-serve consistency checks and
GPU targets, not for fast CPU decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError

BLOCK = 64  # bitsandbytes' and transformers' default for 4-bit weights
# The 16 NF4 values (QLoRA paper, appendix E; bitsandbytes' get_4bit_type("nf4")), in code order.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


@dataclass(frozen=True)
class NF4Weight:
    """One weight [rows, cols] in bitsandbytes' NF4 layout: the row-major weight flattened, cut into blocks
    of ``block_size``; ``packed`` uint8 [rows*cols/2] (high nibble first), ``absmax`` fp32 per block."""

    packed: np.ndarray
    absmax: np.ndarray
    rows: int
    cols: int
    block_size: int = BLOCK

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.absmax.nbytes

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols]: ``NF4[code] * absmax`` per block, as bitsandbytes' dequantize_4bit."""
        codes = np.stack([self.packed >> 4, self.packed & 0x0F], axis=-1).reshape(-1)[: self.rows * self.cols]
        vals = NF4[codes].reshape(-1, self.block_size) * self.absmax[:, None]
        return vals.reshape(self.rows, self.cols)

    @classmethod
    def concat(cls, parts: list[NF4Weight]):
        """Weights stacked along rows (packed q|k|v): the same flat layout when no block crosses a row;
        None otherwise (the emitter then runs one op per part)."""
        if len({(p.cols, p.block_size) for p in parts}) != 1 or parts[0].cols % parts[0].block_size:
            return None
        return cls(np.concatenate([p.packed for p in parts]), np.concatenate([p.absmax for p in parts]),
                   sum(p.rows for p in parts), parts[0].cols, parts[0].block_size)


def quantize_nf4(weight: np.ndarray, block_size: int = BLOCK, double_quant: bool = True) -> NF4Weight:
    """``weight`` [rows, cols] quantized by bitsandbytes (NF4, double-quantized scales unless told otherwise).

    Raises :class:`ModelError` when a weight has an odd element count (bitsandbytes packs pairs).
    """
    import bitsandbytes.functional as F
    import torch

    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    if w.numel() % 2:
        raise ModelError(f"a weight of shape {tuple(w.shape)} has an odd number of elements, which NF4 cannot pack",
                         hint="export with --quant int4")
    q, state = F.quantize_4bit(w, blocksize=block_size, compress_statistics=double_quant, quant_type="nf4")
    absmax = state.absmax
    if state.nested:  # the scales bitsandbytes dequantizes before every matmul
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return NF4Weight(q.reshape(-1).numpy().copy(), absmax.float().numpy().copy(), int(w.shape[0]), int(w.shape[1]),
                     block_size)


def nf4_weights(sd: dict, names) -> dict:
    """``{HF name: NF4Weight}`` for the 2-D weights ``names`` of ``sd`` (the layers' linear projections)."""
    from .._extras import quiet_optional_kernel_notice, require

    require("bitsandbytes", "torch", feature="--quant nf4 (the QLoRA base, quantized by bitsandbytes)")
    quiet_optional_kernel_notice()
    return {n: quantize_nf4(sd[n]) for n in names}


__all__ = ["NF4", "NF4Weight", "quantize_nf4", "nf4_weights", "BLOCK"]
