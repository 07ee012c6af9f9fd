"""Section 1: decode tokens/s and prefill latency, every decoder interleaved in one loop."""

from __future__ import annotations

from .context import Context
from .fixtures import bench_prompt
from . import systems
from .harness import Section, Skip, interleaved
from .systems import EP_INT4, EP_INT4_AD, EP_INT4_QV, GENAI, GENAI_AD, LLAMA, TORCH, decoder

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
    for name, vals in samples.items():
        if "__skip__" in vals:
            ctx.skip(name, str(vals["__skip__"]), str(vals["__kind__"]))
            continue
        g_dec.add(name, "tok/s", vals["decode_tok_s"])
        g_pre.add(name, "s", vals["prefill_s"])
    short = {n: min(v["tokens"]) for n, v in samples.items() if "tokens" in v and min(v["tokens"]) < s.new_tokens}
    for n, k in short.items():
        sec.notes.append(f"{n} stopped at end-of-sequence after {int(k)} tokens in some repetitions")
    alive = {n: o for n, o in opened.items() if "__skip__" not in samples[n]}
    _agreement(ctx, sec, alive, text, ids)
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


def goal_decode(sec: Section) -> dict:
    """int4 with an adapter >= the faster of genai int4 and llama.cpp Q4_1 without one."""
    g = sec.find("decode_tok_s")
    goal = {"name": "int4 decode with adapter >= faster peer without one", "target": "ratio >= 1.00"}
    mine = g.get(EP_INT4_AD) if g else None
    peers = [f for f in (g.get(GENAI), g.get(LLAMA)) if f] if g else []
    if mine is None or not peers:
        return goal | {"met": None, "measured": "edgepeft int4 + adapter or both peers missing"}
    best = max(peers, key=lambda f: f.median)
    ratio = mine.median / best.median
    measured = f"all-linear adapter {mine.median:.1f} vs {best.median:.1f} tok/s ({best.system}) = {ratio:.2f}x"
    qv = g.get(EP_INT4_QV)
    if qv is not None:  # met is judged on the all-linear adapter (edgepeft train's default), the harder case
        measured += f"; q,v adapter {qv.median:.1f} tok/s = {qv.median / best.median:.2f}x"
    return goal | {"met": ratio >= 1.0, "ratio": ratio, "measured": measured}




__all__ = ["run", "goal_decode", "Skip"]
