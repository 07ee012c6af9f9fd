"""Which systems exist in a run and how each is built and opened (once, via the Context cache).

System names are the labels used in the JSON, the plots and the README.
"""

from __future__ import annotations

from pathlib import Path

from . import sys_edgepeft, sys_genai, sys_llama, sys_torch
from .context import Context
from .fixtures import LORA_RANK, lora_adapter

EP_INT4_AD = "edgepeft int4 + adapter"
EP_INT4 = "edgepeft int4"
EP_INT4_QV = "edgepeft int4 + q,v adapter"
EP_INT8 = "edgepeft int8"
EP_FP32 = "edgepeft fp32"
EP_INT4_MERGED = "edgepeft int4 merged"
TORCH = "transformers fp32"
GENAI = "genai int4"
GENAI_AD = "genai int4 + adapter"
LLAMA = "llama.cpp Q4_1"

N_ADAPTERS = 10


def peft_adapters(ctx: Context) -> list[Path]:
    """The decoder LoRA adapters (random, seeds 0..9; 2 in smoke mode)."""
    def make():
        n = 2 if ctx.smoke else N_ADAPTERS
        return [lora_adapter(ctx.models.decoder_dir, ctx.work / "adapters", seed=s) for s in range(n)]
    return ctx.get("peft adapters", make)


def pubkey(ctx: Context) -> Path:
    return ctx.get("signing key", lambda: sys_edgepeft.keypair(ctx.work)[1])


def bundle(ctx: Context, quant: str, *, merged: bool = False, all_adapters: bool = False) -> Path:
    """A decoder bundle: ``quant`` weights, adapter ``a0`` (or all of them), or ``a0`` merged."""
    ads = peft_adapters(ctx)
    pairs = [(f"a{i}", p) for i, p in enumerate(ads if all_adapters else ads[:1])]
    name = f"dec-{quant}-r{LORA_RANK}" + ("-merged" if merged else "") + ("-all" if all_adapters else "")
    base = str(ctx.models.decoder_dir)

    def make():
        return sys_edgepeft.build(ctx.work, name, base=base, adapters=pairs, quant=quant,
                                  merge="a0" if merged else None, log=ctx.log)
    return ctx.get(f"bundle {name}", make)


def bundle_qv(ctx: Context) -> Path:
    """An int4 bundle whose one adapter trains only q_proj and v_proj (PEFT's own default for llama)."""
    def make():
        ad = lora_adapter(ctx.models.decoder_dir, ctx.work / "adapters", seed=0, targets=["q_proj", "v_proj"])
        return sys_edgepeft.build(ctx.work, f"dec-int4-r{LORA_RANK}-qv", base=str(ctx.models.decoder_dir),
                                  adapters=[("qv", ad)], quant="int4", merge=None, log=ctx.log)
    return ctx.get("bundle qv", make)


def genai_dirs(ctx: Context) -> tuple[Path, Path]:
    """(plain int4 model dir, LoRA int4 model dir with adapter.onnx_adapter)."""
    def make():
        hf = ctx.models.decoder_dir
        tag = "tiny" if ctx.smoke else "smollm2"
        ctx.log("  building onnxruntime-genai int4 models (cached in benchmarks/work/genai)")
        base = sys_genai.build(hf, ctx.work / "genai" / f"{tag}-base-int4")
        lora = sys_genai.build(hf, ctx.work / "genai" / f"{tag}-lora-r{LORA_RANK}-int4",
                               adapter_dir=peft_adapters(ctx)[0])
        return base, lora
    return ctx.get("genai models", make)


class _TextRunner:
    """Adapts an id-based decoder to the (text, ids) call every system gets."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def run(self, text: str, ids: list[int], n_new: int) -> dict:
        return self.obj.run(ids, n_new)

    def tokens(self, text: str, ids: list[int], n_new: int) -> list[int]:
        return self.obj.tokens(ids, n_new)


class _EdgeRunner:
    def __init__(self, obj) -> None:
        self.obj = obj

    def run(self, text: str, ids: list[int], n_new: int) -> dict:
        return self.obj.run_text(text, n_new)

    def tokens(self, text: str, ids: list[int], n_new: int) -> list[int]:
        return self.obj.tokens(text, n_new)


def decoder(ctx: Context, name: str):
    """Open decoder system ``name`` (cached); raises Skip when it cannot run here."""
    def make():
        m = ctx.models
        if name == TORCH:
            return _TextRunner(sys_torch.TorchDecoder(m.decoder_dir))
        if name == GENAI:
            return _TextRunner(sys_genai.GenaiDecoder(genai_dirs(ctx)[0]))
        if name == GENAI_AD:
            d = genai_dirs(ctx)[1]
            return _TextRunner(sys_genai.GenaiDecoder(d, d / "adapter.onnx_adapter"))
        if name == LLAMA:
            if m.smoke:
                raise sys_llama.Skip("no GGUF for the tiny smoke model")
            return _TextRunner(sys_llama.LlamaCppDecoder(m.gguf))
        if name == EP_INT4_QV:
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(bundle_qv(ctx), pubkey(ctx), "qv"))
        quant = {EP_INT4_AD: "int4", EP_INT4: "int4", EP_INT8: "int8", EP_FP32: "fp32", EP_INT4_MERGED: "int4"}[name]
        if name == EP_INT4_MERGED:
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(bundle(ctx, quant, merged=True), pubkey(ctx), None))
        if name in (EP_INT4_AD, EP_INT4):
            b = bundle(ctx, "int4", all_adapters=True)
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(b, pubkey(ctx), "a0" if name == EP_INT4_AD else None))
        return _EdgeRunner(sys_edgepeft.EdgeDecoder(bundle(ctx, quant), pubkey(ctx), None))
    return ctx.get(name, make)


DECODERS = [EP_INT4_AD, EP_INT4_QV, EP_INT4, EP_INT8, EP_FP32, EP_INT4_MERGED, GENAI, GENAI_AD, LLAMA, TORCH]
