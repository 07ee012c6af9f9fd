"""Section 1: decode tokens/s and prefill latency, every decoder interleaved in one loop."""

from __future__ import annotations

from . import systems
from .context import Context
from .fixtures import bench_prompt
from .harness import Section, Skip, interleaved
from .systems import (
    EP_INT4,
    EP_INT4_AD,
    GENAI,
    GENAI_AD,
    LLAMA,
    TORCH,
    bundle,
    decoder,
)

REFS = [GENAI, LLAMA, TORCH]


def run(ctx: Context) -> Section:
    s = ctx.settings
    sec = Section("decode", f"1. Decode speed and prefill latency ({ctx.models.decoder_name})")
    text, ids = bench_prompt(ctx.models.decoder_dir, s.prompt_tokens)
    opened = {}
    for name in systems.DECODERS:
        sys_ = ctx.try_get(name, lambda n=name: decoder(ctx, n))
        if sys_ is not None:
            opened[name] = sys_
    if not opened:
        sec.notes.append("no decoder could be opened")
        return sec
    ctx.log(f"  decode: {len(opened)} systems x {s.reps} reps, prompt {len(ids)} tokens, {s.new_tokens} new")
    samples = interleaved({n: (lambda o=o: o.run(text, ids, s.new_tokens)) for n, o in opened.items()},
                          s.reps, s.warmup, log=ctx.log)
    g_dec = sec.group("decode_tok_s", f"decode tokens/s ({s.new_tokens} new tokens, batch 1)", "higher", REFS)
    g_pre = sec.group("prefill_s", f"prefill latency, time to first token ({len(ids)}-token prompt)", "lower", REFS)
    record_decode(ctx, sec, samples, g_dec, g_pre)
    alive = {n: o for n, o in opened.items() if "__skip__" not in samples[n]}
    _agreement(ctx, sec, alive, text, ids)
    _ceiling(ctx, sec, g_dec)
    sec.notes.append(f"Greedy decoding, {s.new_tokens} new tokens after a {len(ids)}-token prompt, "
                     f"{ctx.settings.reps} interleaved repetitions after {s.warmup} warm-up; 2 threads each. "
                     "edgepeft is timed through Engine.generate(stream=True) (tokenizing and detokenizing "
                     "included); the peers get token ids. Each peer runs in a worker process of its own and "
                     "times itself there (the pipe to it is outside every timed span), so a peer that crashes "
                     "or hangs is skipped with the reason and the run goes on.")
    return sec


def _agreement(ctx: Context, sec: Section, opened: dict, text: str, ids: list[int], n: int = 16) -> None:
    """Note where each system's greedy tokens first differ from transformers fp32 (a correctness check).

    fp32 graphs should agree; int4/int8 may flip near-ties; an adapter should change the output.
    """
    toks = {}
    for name, o in opened.items():
        try:
            toks[name] = o.tokens(text, ids, n)
        except Exception as exc:  # a check, not a figure: note and go on
            sec.notes.append(f"agreement check: {name} failed ({type(exc).__name__}: {str(exc)[:120]})")
    def first_diff(t, ref):
        return next((i for i, (a, b) in enumerate(zip(t, ref)) if a != b), min(len(t), len(ref)))

    ref = toks.get(TORCH)
    if ref is not None:
        parts = [f"{name}: {first_diff(t, ref)}/{n}" for name, t in toks.items() if name != TORCH]
        sec.notes.append("Greedy tokens identical to transformers fp32 before the first difference: "
                         + ", ".join(parts) + " (an active adapter is expected to differ; int4/int8 may flip "
                         "near-ties).")
    pairs = [(EP_INT4_AD, EP_INT4), (GENAI_AD, GENAI)]
    parts = [f"{a}: {first_diff(toks[a], toks[b])}/{n}" for a, b in pairs if a in toks and b in toks]
    if parts:
        sec.notes.append("Adapter effect, tokens identical to the same runtime without it: " + ", ".join(parts)
                         + f" (a value below {n} shows the adapter is applied).")


def _bandwidth_gb_s(mib: int = 256, reps: int = 5) -> float:
    """This machine's memory bandwidth (GB/s): the best of ``reps`` copies of a ``mib`` MiB array,
    counting the bytes read and written."""
    import time

    import numpy as np

    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best = min(_timed_copy(src, dst, time.perf_counter) for _ in range(reps))
    return 2 * src.nbytes / best / 1e9


def _timed_copy(src, dst, clock) -> float:
    t0 = clock()
    dst[...] = src
    return clock() - t0


def _ceiling(ctx: Context, sec: Section, g_dec) -> None:
    """Each system's decode speed as a share of the memory-bandwidth ceiling: the bandwidth measured here
    divided by the bytes of int4 weights a token reads (the re-quantized int4 graph, ~80 MB for SmolLM2)."""
    try:
        weights = (bundle(ctx, "int4", gguf="keep" if ctx.smoke else "requantize") / "model.onnx")
        weights = weights.stat().st_size
    except Skip:
        return
    bw = _bandwidth_gb_s(32 if ctx.smoke else 256)
    ceiling = bw * 1e9 / weights
    g = sec.group("ceiling_share", f"decode speed as a share of the ceiling ({ceiling:.0f} tok/s = "
                  f"{bw:.1f} GB/s over {weights / 1e6:.1f} MB of int4 weights per token)", "higher")
    for f in g_dec.figures:
        g.add(f.system, "%", [100 * f.median / ceiling])
    sec.notes.append(f"Ceiling: memory bandwidth {bw:.1f} GB/s (best of 5 copies of 256 MiB, read + write) "
                     f"over the {weights / 1e6:.1f} MB of weights an int4 token reads = {ceiling:.0f} tok/s; "
                     "a system at 100 % would be limited by memory alone.")


def record_decode(ctx: Context, sec: Section, samples: dict, g_dec, g_pre) -> None:
    """Add each system's decode tok/s and prefill time to ``g_dec``/``g_pre`` (a skipped system is recorded as
    skipped), and note the systems that stopped at end-of-sequence before the asked number of tokens."""
    for name, vals in samples.items():
        if "__skip__" in vals:
            ctx.skip(name, str(vals["__skip__"]), str(vals["__kind__"]))
            continue
        g_dec.add(name, "tok/s", vals["decode_tok_s"])
        g_pre.add(name, "s", vals["prefill_s"])
        if "tokens" in vals and min(vals["tokens"]) < ctx.settings.new_tokens:
            sec.notes.append(f"{name} stopped at end-of-sequence after {int(min(vals['tokens']))} tokens in some "
                             "repetitions")


__all__ = ["run", "record_decode", "Skip"]
