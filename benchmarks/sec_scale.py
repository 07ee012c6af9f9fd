"""Section 12: a base of Llama-3.2-1B's shape (issue 25), everything in one run.

The model is random-weight, written by :func:`benchmarks.scale.write_random_llama` (no download; the
same folder ``python -m benchmarks.scale --shape 1b`` uses). Measured here, against onnxruntime-genai's
int4 build of the same weights:

* the int4 build itself: ``edgepeft build --quant int4`` and genai's builder, each in a child of a
  fresh parent (wall time, peak resident memory of its largest process), one after the other;
* decode tokens/s and prefill of edgepeft without slots (a merged rank-16 adapter), with slots and no
  adapter, with the rank-16 all-linear adapter active, and genai int4, repetitions interleaved;
* resident memory and open to first token, each a fresh process (``benchmarks.probe``).

The edgepeft bundles are built once into ``benchmarks/work`` and reused; the timed builds run every time
(into ``benchmarks/work/scale/timed``), since the comparison must come from one run, and genai's becomes
the genai model measured.
The smoke run does the same on the tiny random Llama.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import sys_edgepeft, sys_genai
from .context import Context
from .fixtures import RESULTS, bench_prompt, dir_size
from .harness import Section, Skip, interleaved
from .scale import measure_build, n_params, write_random_llama, write_random_lora
from .sec_decode import record_decode
from .sec_memory import probe_rounds
from .systems import EP_INT4, EP_INT4_AD, EP_INT4_MERGED, EP_INT4_RQ, GENAI, isolated, open_peer, pubkey

SHAPE = "1b"
RANK = 16
EP_BARE = "edgepeft int4 1B, no slots (merged)"
EP_SLOTS = "edgepeft int4 1B, slots, no adapter"
EP_AD = "edgepeft int4 1B + rank-16 adapter"
GENAI_1B = "genai int4 1B"
GENAI_1B_AD = "genai int4 1B + rank-16 adapter"
EP_BUILD = "edgepeft build --quant int4"
GENAI_BUILD = "genai builder -p int4"


def model_dir(ctx: Context) -> Path:
    """The random Llama-3.2-1B-shaped base (the tiny random Llama in the smoke run); written once."""
    if ctx.smoke:
        return ctx.models.decoder_dir

    def make():
        d = ctx.work / "scale" / f"llama-{SHAPE}"
        if not (d / "model.safetensors.index.json").is_file():
            ctx.log(f"  writing a random Llama-3.2-1B-shaped model to {d} (2.4 GB, once)")
            write_random_llama(d, SHAPE)
        return d
    return ctx.get("1B model", make)


def _adapter(ctx: Context, model: Path) -> Path:
    """The rank-16 all-linear PEFT adapter (random), written once."""
    return write_random_lora(model, ctx.work / "adapters" / f"scale-lora-r{RANK}-{model.name}", rank=RANK)


def _bundles(ctx: Context, model: Path) -> tuple[Path, Path]:
    """(merged bundle without slots, slots bundle carrying adapter ``a0``), both int4, built in child processes."""
    pairs = [("a0", _adapter(ctx, model))]

    def build(name, merge):
        return lambda: sys_edgepeft.build(ctx.work, name, base=str(model), adapters=pairs, quant="int4", merge=merge,
                                          child=True, log=ctx.log)
    bare = ctx.get("bundle 1B merged", build(f"{model.name}-int4-r{RANK}-merged", "a0"))
    slots = ctx.get("bundle 1B slots", build(f"{model.name}-int4-r{RANK}", None))
    return bare, slots


def _genai_dir(ctx: Context, model: Path) -> Path:
    return ctx.work / "genai" / f"{model.name}-base-int4"


def _genai_with_adapter(ctx: Context, model: Path, text: str, ids: list[int]):
    """genai int4 of ``model`` with the rank-16 adapter on its LoRA path (an ``.onnx_adapter`` file activated per
    generator, as in section 1), in its own worker; raises Skip."""
    d = ctx.work / "genai" / f"{model.name}-lora-r{RANK}-int4"
    d = sys_genai.build(model, d, adapter_dir=_adapter(ctx, model))
    return isolated(ctx, GENAI_1B_AD, open_peer, {"kind": "genai", "model_dir": str(d),
                                                  "adapter_file": str(d / "adapter.onnx_adapter")},
                    probe=("tokens", (text, ids, 4)))


def _timed_builds(ctx: Context, sec: Section, model: Path) -> None:
    """Both int4 builds of ``model``, one after the other, each measured in a child of a fresh parent.

    genai's output replaces the cached genai model (so it is always built from the model as it is now).
    """
    scratch = ctx.work / "scale" / "timed"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    rows: dict[str, dict] = {}
    key = sys_edgepeft.keypair(ctx.work)[0]
    ctx.log(f"  timed build: {EP_BUILD}")
    res = measure_build(model, scratch / "edgepeft", key, target=sys_edgepeft.TARGET, quant="int4")
    if res["rc"] == 0:
        rows[EP_BUILD] = res | {"out_bytes": dir_size(scratch / "edgepeft")}
    else:
        ctx.skip(f"{EP_BUILD} (timed)", res["stderr"].strip().splitlines()[-1][-300:] if res["stderr"] else "failed")
    if ctx.wanted("genai"):
        ctx.log(f"  timed build: {GENAI_BUILD}")
        stats: dict = {}
        try:
            out = sys_genai.build(model, scratch / "genai", stats=stats)
            rows[GENAI_BUILD] = stats | {"out_bytes": dir_size(out / "model.onnx") + dir_size(out / "model.onnx.data")}
            cache = _genai_dir(ctx, model)  # this run's build is the one measured below
            cache.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(out, cache)
        except Skip as exc:
            ctx.skip(f"{GENAI_BUILD} (timed)", str(exc))
    shutil.rmtree(scratch, ignore_errors=True)
    if not rows:
        return
    g_wall = sec.group("build_wall_s", "int4 build: wall time (child process, one run each)", "lower", [GENAI_BUILD])
    g_peak = sec.group("build_peak_rss_bytes", "int4 build: peak resident memory of its largest process", "lower",
                       [GENAI_BUILD])
    g_out = sec.group("build_out_bytes", "int4 build: output (edgepeft: the bundle; genai: the graph and its data)",
                      "lower", [GENAI_BUILD])
    for name, r in rows.items():
        g_wall.add(name, "s", [r["wall_s"]])
        g_peak.add(name, "bytes", [r["peak_rss_mib"] * 2**20])
        g_out.add(name, "bytes", [r["out_bytes"]])
    sec.notes.append("Builds: each in a child of a fresh parent (peak = getrusage(RUSAGE_CHILDREN).ru_maxrss, the "
                     "largest of the build's processes), edgepeft first, then genai, once each per run; edgepeft's "
                     f"includes fingerprinting, the fit check, signing and the archive (target "
                     f"{Path(sys_edgepeft.TARGET).stem}), genai's is the export alone.")


def run(ctx: Context) -> Section:
    s = ctx.settings
    model = model_dir(ctx)
    params = n_params(model)
    sec = Section("scale", f"12. A base of Llama-3.2-1B's shape ({params / 1e9:.2f} B parameters, random weights)"
                  if not ctx.smoke else f"11. The 1B rows, on the {ctx.models.decoder_name} (smoke)")
    _timed_builds(ctx, sec, model)
    bare, slots = _bundles(ctx, model)
    pub = pubkey(ctx)
    text, ids = bench_prompt(model, s.prompt_tokens)
    samplers = {}
    eng_bare = ctx.try_get(EP_BARE, lambda: sys_edgepeft.EdgeDecoder(bare, pub, None))
    if eng_bare is not None:
        samplers[EP_BARE] = lambda: eng_bare.run_text(text, s.new_tokens)
    eng_slots = ctx.try_get(EP_SLOTS, lambda: sys_edgepeft.EdgeDecoder(slots, pub, None))
    if eng_slots is not None:
        samplers[EP_SLOTS] = lambda: eng_slots.run_text(text, s.new_tokens, adapter=None)
        samplers[EP_AD] = lambda: eng_slots.run_text(text, s.new_tokens, adapter="a0")
    gdir = None
    if ctx.wanted("genai"):
        try:
            gdir = ctx.get("genai 1B model", lambda: sys_genai.build(model, _genai_dir(ctx, model)))
        except Skip:
            pass
    if gdir is not None:
        genai = ctx.try_get(GENAI_1B, lambda: isolated(ctx, GENAI_1B, open_peer, {"kind": "genai", "model_dir": str(gdir)},
                                                       probe=("tokens", (text, ids, 4))))
        if genai is not None:
            samplers[GENAI_1B] = lambda: genai.run(text, ids, s.new_tokens)
        genai_ad = ctx.try_get(GENAI_1B_AD, lambda: _genai_with_adapter(ctx, model, text, ids))
        if genai_ad is not None:
            samplers[GENAI_1B_AD] = lambda: genai_ad.run(text, ids, s.new_tokens)
    if samplers:
        _decode(ctx, sec, samplers, len(ids))
    _memory(ctx, sec, model, bare, slots, gdir)
    sec.notes.append(f"Decode: greedy, {s.new_tokens} new tokens after a {len(ids)}-token prompt, {s.reps} "
                     f"interleaved repetitions after {s.warmup} warm-up, 2 threads each; edgepeft through "
                     "Engine.generate(stream=True), genai in its own worker process. The rank-16 adapter covers "
                     "all seven projections of every layer (random A and B); 'no slots' is the same adapter merged "
                     "into the weights (a graph without slots). SmolLM2's tokenizer stands in for Llama 3's.")
    return sec


def _decode(ctx: Context, sec: Section, samplers: dict, prompt_len: int) -> None:
    s = ctx.settings
    ctx.log(f"  scale decode: {len(samplers)} systems x {s.reps} reps")
    samples = interleaved(samplers, s.reps, s.warmup, log=ctx.log)
    g_dec = sec.group("decode_tok_s", f"1B decode tokens/s ({s.new_tokens} new tokens, batch 1)", "higher",
                      [GENAI_1B, GENAI_1B_AD])
    g_pre = sec.group("prefill_s", f"1B prefill, time to first token ({prompt_len}-token prompt)", "lower", [GENAI_1B])
    record_decode(ctx, sec, samples, g_dec, g_pre)


def _memory(ctx: Context, sec: Section, model: Path, bare: Path, slots: Path, gdir: Path | None) -> None:
    """Resident memory and open to first token, each measurement a fresh process, interleaved."""
    text, ids = bench_prompt(model, 32)
    common = {"text": text, "ids": ids, "n_new": 4}
    pub = str(pubkey(ctx))
    probes = {EP_BARE: ("edgepeft", common | {"bundle": str(bare), "pub": pub}),
              EP_SLOTS: ("edgepeft", common | {"bundle": str(slots), "pub": pub})}
    if gdir is not None:
        probes[GENAI_1B] = ("genai", common | {"dir": str(gdir)})
    runs = probe_rounds(ctx, probes, "scale memory")
    g_rss = sec.group("rss_bytes", "1B resident memory after the first tokens", "lower", [GENAI_1B])
    g_ttft = sec.group("open_to_first_token_s", "1B open to first token (fresh process, warm page cache)", "lower",
                       [GENAI_1B])
    g_peak = sec.group("peak_rss_bytes", "1B peak resident memory of the process", "lower", [GENAI_1B])
    for name, rs in runs.items():
        if not rs:
            continue
        g_rss.add(name, "bytes", [r["rss_0"] for r in rs])
        if name == EP_SLOTS and all("rss_1" in r for r in rs):
            g_rss.add(EP_AD, "bytes", [r["rss_1"] for r in rs])
        g_ttft.add(name, "s", [r["open_to_first_token_s"] for r in rs])
        g_peak.add(name, "bytes", [r["peak_rss"] for r in rs])
    sec.notes.append("Memory: each figure a fresh process (benchmarks.probe), 4 tokens of a 32-token prompt; edgepeft's "
                     "open includes the signature and every file's SHA-256; the adapter row is the slots bundle "
                     "after its adapter was loaded and used.")


def _ratios(decode_groups: list[dict], gid: str, names: dict[str, str], ref: str) -> list[str]:
    """``label ratio`` for each of ``names`` (system -> label) found in group ``gid``, over ``ref``'s median."""
    grp = next((g for g in decode_groups if g["id"] == gid), None)
    med = {f["system"]: f["median"] for f in grp["figures"]} if grp else {}
    if not med.get(ref):
        return []
    return [f"{label} {med[n] / med[ref]:.2f}x" for n, label in names.items() if n in med]


def _ratios_135m(decode: Section | None) -> str:
    """The 135M decode ratios over genai int4: from this run's decode section, else from the last full run."""
    if decode is not None:
        groups, where = decode.to_json()["groups"], "this run"
    else:
        try:
            data = json.loads((RESULTS / "bench.json").read_text(encoding="utf-8"))
            groups = next(s for s in data["sections"] if s["id"] == "decode")["groups"]
            where = f"the full run of {data['created']}"
        except (OSError, ValueError, StopIteration, KeyError):
            return ""
    parts = _ratios(groups, "decode.decode_tok_s", {EP_INT4_MERGED: "merged (no slots)",
                                                     EP_INT4_RQ: "slots, no adapter (re-quantized)",
                                                     EP_INT4: "slots, no adapter (GGUF blocks)",
                                                     EP_INT4_AD: "rank-8 adapter (GGUF blocks)"}, GENAI)
    return f"; at 135M ({where}): " + ", ".join(parts) if parts else ""


def goals_scale(sec: Section, decode: Section | None) -> list[dict]:
    """Issue 25's 1B decode goals: edgepeft int4 without slots >= 1.0x genai int4; with the rank-16 adapter
    active >= 0.9x genai int4 without one (same run). The 135M ratios are given beside them."""
    g = sec.find("decode_tok_s")
    ref = g.get(GENAI_1B) if g else None
    extra = _ratios_135m(decode)
    out = []
    for name, label, target in ((EP_BARE, "1B int4 decode without slots >= genai int4", 1.0),
                                (EP_AD, "1B int4 decode, rank-16 all-linear adapter >= 0.9x genai int4 bare", 0.9)):
        goal = {"name": label, "target": f"ratio >= {target:.2f}"}
        mine = g.get(name) if g else None
        if mine is None or ref is None:
            out.append(goal | {"met": None, "measured": f"{name} or {GENAI_1B} missing"})
            continue
        ratio = mine.median / ref.median
        slots = g.get(EP_SLOTS)
        more = f"; slots without adapter {slots.median / ref.median:.2f}x" if slots and name == EP_BARE else ""
        out.append(goal | {"met": ratio >= target, "ratio": ratio,
                           "measured": f"{mine.median:.1f} vs {ref.median:.1f} tok/s = {ratio:.2f}x{more}"
                                       + (extra if name == EP_BARE else "")})
    return out
