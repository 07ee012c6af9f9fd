"""Section 0: the weight kernels behind each int4 form, on the decoder's own projection shapes.

Why: a GGUF's Q4_1 blocks (``w = d q + m``) can reach ``MatMulNBits`` two exact ways:
a *float* zero point ``-m/d`` (the op's own form) or the symmetric op plus a small
block-offset matmul (what edgepeft emits, :mod:`edgepeft.export.gguf_blocks`). This
section times both against the uint8-zero-point and zero-point-free kernels that
re-quantized int4 uses, and Q8_0's 8-bit kernel, on one decoder layer's four
projections (q|k|v, o, gate|up, down) plus the tied lm_head, at one token (decode).
Each variant is one ONNX Runtime session; calls are interleaved.
"""

from __future__ import annotations

import time

import numpy as np

from .context import Context
from .harness import THREADS, Section, interleaved

U8 = "uint8 zero point (re-quantized int4)"
SYM = "no zero point (GGUF Q4_0)"
FZP = "float zero point (GGUF Q4_1, op's own form)"
OFFSET = "GGUF Q4_1 + block-offset matmul (edgepeft)"
Q8 = "8 bits (GGUF Q8_0)"
VARIANTS = [U8, SYM, FZP, OFFSET, Q8]


def _shapes(ctx: Context) -> dict[str, tuple[int, int]]:
    """name -> (K, N) for one layer of the benchmark decoder, and its lm_head."""
    import json

    cfg = json.loads((ctx.models.decoder_dir / "config.json").read_text())
    h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    return {"qkv": (h, (heads + 2 * kv) * hd), "o": (heads * hd, h), "gate_up": (h, 2 * inter),
            "down": (inter, h), "lm_head": (h, cfg["vocab_size"])}


def _graph(variant: str, shapes: dict, rng) -> bytes:
    """One graph holding every projection of ``shapes`` in ``variant``'s form (independent inputs)."""
    from onnx import TensorProto

    from edgepeft.export.gguf_blocks import BlockWeight, GGUFBlocks
    from edgepeft.export.onnx_builder import GraphBuilder
    from edgepeft.export.quantize import LinearEmitter, WeightQuant, quantize_blockwise

    gb = GraphBuilder(f"kernels_{variant}")
    outs = []
    for name, (k, n) in shapes.items():
        x = gb.input(f"x_{name}", TensorProto.FLOAT, [1, 1, k])
        nb = k // 32
        codes4 = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
        d = (rng.random((n, nb)) * 0.02 + 0.001).astype(np.float16)
        m = (-rng.random((n, nb)) * 0.1).astype(np.float16)
        if variant in (SYM, OFFSET, Q8):
            qtype = {SYM: "Q4_0", OFFSET: "Q4_1", Q8: "Q8_0"}[variant]
            codes = rng.integers(0, 256, (n, nb, 32), dtype=np.uint8) if variant == Q8 else codes4
            blk = BlockWeight(qtype, codes, d, m if variant == OFFSET else None)
            lin = LinearEmitter(gb, WeightQuant("int4"), GGUFBlocks("bench.gguf", {name: blk}))
            y = lin.linear(x, np.zeros((n, k), np.float32), None, name, source=[name])
        elif variant == U8:
            w = rng.standard_normal((n, k)).astype(np.float32)
            q = quantize_blockwise(w, 4, 32, symmetric=False)
            y = gb.ms("MatMulNBits", [x, gb.const(q.packed), gb.const(q.scales), gb.const(q.zero_points)],
                      K=k, N=n, bits=4, block_size=32, accuracy_level=4)
        else:  # FZP: MatMulNBits' float zero point, w = d * (q - z) with z = -m / d
            zp = (-m.astype(np.float32) / d.astype(np.float32)).astype(np.float32)
            y = gb.ms("MatMulNBits", [x, gb.const(codes4), gb.const(d.astype(np.float32)), gb.const(zp)],
                      K=k, N=n, bits=4, block_size=32, accuracy_level=4)
        out = f"y_{name}"
        gb.nodes.append(gb._helper.make_node("Identity", [y], [out]))
        gb.output(out, TensorProto.FLOAT, [1, 1, n])
        outs.append(out)
    return gb.model().SerializeToString()


class _Kernel:
    """One session over ``shapes`` in one form; a sample is the mean time of runs filling ``budget_s``."""

    def __init__(self, variant: str, shapes: dict, budget_s: float) -> None:
        from edgepeft.runtime.session import open_session

        rng = np.random.default_rng(0)
        self.sess = open_session(_graph(variant, shapes, rng), providers=None, threads=THREADS)
        self.feeds = {f"x_{n}": rng.standard_normal((1, 1, k)).astype(np.float32) for n, (k, _) in shapes.items()}
        self.budget_s = budget_s

    def sample(self) -> dict[str, float]:
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < self.budget_s:
            self.sess.run(None, self.feeds)
            n += 1
        return {"us": (time.perf_counter() - t0) / n * 1e6}


PARTS = {"layer": ("one decoder layer: q|k|v, o, gate|up, down", ("qkv", "o", "gate_up", "down")),
         "lm_head": ("the tied lm_head", ("lm_head",))}


def run(ctx: Context) -> Section:
    sec = Section("kernels", "0. Weight kernels per int4 form, at one token (decode)")
    shapes = _shapes(ctx)
    if any(k % 32 for k, _ in shapes.values()):
        sec.notes.append("the decoder's dims are not multiples of 32: GGUF blocks do not apply")
        return sec
    budget = 0.05 if ctx.smoke else 0.4
    for part, (title, names) in PARTS.items():
        sub = {n: shapes[n] for n in names}
        kernels = {v: _Kernel(v, sub, budget) for v in VARIANTS}
        samples = interleaved({v: k.sample for v, k in kernels.items()}, ctx.settings.reps, ctx.settings.warmup,
                              log=ctx.log)
        g = sec.group(f"{part}_us", f"µs per token, {title} (batch 1)", "lower", [U8])
        for v, vals in samples.items():
            if "__skip__" in vals:
                ctx.skip(f"{v} ({part})", str(vals["__skip__"]))
                continue
            g.add(v, "µs", vals["us"])
    dims = ", ".join(f"{n} {k}x{n_}" for n, (k, n_) in shapes.items())
    sec.notes.append(f"Shapes (K x N): {dims}; block 32, accuracy_level 4 (int8 activations), {THREADS} threads; "
                     f"a sample is the mean of the session runs that fill {budget} s. The float zero point computes "
                     "the same numbers as the block-offset form, but ONNX Runtime's CPU kernel has no packed path "
                     "for it and dequantizes the whole weight on every call.")
    return sec


__all__ = ["run", "VARIANTS"]
