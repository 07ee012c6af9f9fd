"""Sections 2 and 3: adapter switch latency (vs reopening a merged model) and sizes."""

from __future__ import annotations

import json
import statistics
import time

from . import sys_edgepeft
from .context import Context
from .fixtures import LORA_RANK, dir_size
from .harness import Section, Skip, interleaved
from .systems import (
    EP_INT4_LAYERS,
    EP_INT4_RQ,
    EP_INT4_RQ_SMALL,
    EP_NF4,
    GENAI_AD,
    bundle,
    decoder,
    genai_dirs,
    peft_adapters,
    pubkey,
)

SWITCH = "edgepeft switch (registry + rebind)"
REOPEN_ORT = "reopen merged int4: ORT session"
REOPEN_ENGINE = "reopen merged int4: Engine (verify + session)"


class _EdgeSwitcher:
    """Times the engine's own switch path: activate another adapter and bind it to a context.

    This is what a request naming a different adapter pays on top of the same
    request with the previous adapter (engine internals: registry.activate +
    _Context.bind_adapters). Raises Skip if those internals are not there.
    """

    def __init__(self, ctx: Context) -> None:
        eng = decoder(ctx, "edgepeft int4 + adapter").obj.engine
        self.reg, self.runner = eng.registry, eng.runner
        self.names = [a["name"] for a in eng.adapters()][:2]
        if len(self.names) < 2:
            raise Skip("the int4 bundle has fewer than 2 adapters")
        if not hasattr(self.runner, "_acquire"):
            raise Skip("engine internals changed (no DecoderRunner._acquire); switch path not timed")

    def median_of(self, n: int) -> float:
        c = self.runner._acquire(())
        out = []
        try:
            for i in range(n):
                t0 = time.perf_counter()
                with self.reg.activate([self.names[i % 2]]) as chosen:
                    values = tuple(v for a in chosen for v in a.values)
                    c.bind_adapters(self.runner, tuple(a.key for a in chosen), values)
                out.append(time.perf_counter() - t0)
        finally:
            self.runner._release(c)
        return statistics.median(out)


def run_switch(ctx: Context) -> Section:
    s = ctx.settings
    sec = Section("switch", "2. Adapter switch latency vs reopening a merged model")
    g = sec.group("switch_s", "switch to another adapter", "lower", [REOPEN_ORT, REOPEN_ENGINE])
    per = max(1, s.switch_reps // max(s.reps, 1))
    systems = {}
    try:
        sw = _EdgeSwitcher(ctx)
        systems[SWITCH] = lambda: {"s": sw.median_of(per)}
    except Skip as exc:
        ctx.skip(SWITCH, str(exc))
    gen = ctx.try_get(GENAI_AD, lambda: decoder(ctx, GENAI_AD))
    if gen is not None:
        systems["genai set_active_adapter"] = lambda: {"s": gen.switch_median(per)}  # timed in genai's worker
    try:
        merged = bundle(ctx, "int4", merged=True)
        import onnxruntime as ort

        from edgepeft.runtime.engine import Engine

        from .harness import THREADS

        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.log_severity_level = 3
        pub = pubkey(ctx)
        systems[REOPEN_ORT] = lambda: {"s": _t(lambda: ort.InferenceSession(str(merged / "model.onnx"), so))}
        systems[REOPEN_ENGINE] = lambda: {"s": _t(lambda: Engine(merged, [pub], threads=THREADS))}
    except Skip as exc:
        ctx.skip("reopen merged model", str(exc))
    for name, vals in interleaved(systems, s.reps, s.warmup).items():
        if "__skip__" in vals:
            ctx.skip(name, str(vals["__skip__"]), str(vals["__kind__"]))
        else:
            g.add(name, "s", vals["s"])
    sec.notes.append(f"Switch = what a request naming another adapter pays before its first run (each sample is the "
                     f"median of {per} alternating switches); reopen = what a single-task merged deployment pays to "
                     "change task (page cache warm). genai's set_active_adapter only marks the adapter; it binds "
                     "the tensors in the next run.")
    return sec


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def goal_switch(sec: Section) -> dict:
    goal = {"name": "adapter switch", "target": "<= 0.1 ms"}
    g = sec.find("switch_s")
    f = g.get(SWITCH) if g else None
    if f is None:
        return goal | {"met": None, "measured": "not measured"}
    return goal | {"met": f.median <= 1e-4, "measured": f"{f.median * 1e3:.3f} ms (median)"}


def run_sizes(ctx: Context) -> Section:
    sec = Section("sizes", "3. Bundle size per quantization; update size per adapter payload")
    g_b = sec.group("bundle_bytes", "bundle without adapters (model + tokenizer + manifest)", "lower",
                    ["genai int4 model dir", "GGUF Q4_1"])
    g_a = sec.group("bundle_one_adapter_bytes", f"bundle with one adapter (rank {LORA_RANK}, fp32 payload)", "lower")
    forms = [("edgepeft int4", dict(quant="int4", all_adapters=True)),
             (EP_INT4_LAYERS, dict(quant="int4", gguf="layers")), (EP_INT4_RQ, dict(quant="int4", gguf="requantize")),
             (EP_INT4_RQ_SMALL, dict(quant="int4", gguf="requantize", zero_points="auto")),
             ("edgepeft int8", dict(quant="int8")), (EP_NF4, dict(quant="nf4")), ("edgepeft fp32", dict(quant="fp32"))]
    for label, kw in forms:
        try:
            b = bundle(ctx, **kw)
        except Skip:
            continue
        man = json.loads((b / "manifest.json").read_text())
        base = sum(f["size"] for f in man["files"] if not f["path"].startswith("adapters/"))
        base += (b / "manifest.json").stat().st_size
        g_b.add(label, "bytes", [base])
        one = [f["size"] for f in man["files"] if f["path"].startswith("adapters/")][:1]
        if one:
            g_a.add(label, "bytes", [base + one[0]])
    if ctx.wanted("genai int4"):
        try:
            gbase, _ = genai_dirs(ctx)
            g_b.add("genai int4 model dir", "bytes", [dir_size(gbase)])
        except Skip:
            pass
    if ctx.models.gguf:
        g_b.add("GGUF Q4_1", "bytes", [ctx.models.gguf.stat().st_size])
    g_u = sec.group("update_bytes", f"one adapter update (rank {LORA_RANK}, all linear layers)", "lower",
                    ["PEFT safetensors (source)", "genai .onnx_adapter (fp32)"])
    try:
        b = bundle(ctx, "int4", all_adapters=True)
        peft0 = peft_adapters(ctx)[0]
        for dtype in ("fp32", "fp16", "int8", "int4"):
            try:
                dest = ctx.work / "payloads" / f"a0-r{LORA_RANK}-{dtype}.onnx_adapter"
                f = sys_edgepeft.write_adapter_file(b, peft0, dest, dtype)
                g_u.add(f"adapter file {dtype}", "bytes", [f.stat().st_size])
            except Exception as exc:  # the exporter may not support every payload yet
                ctx.skip(f"adapter payload {dtype}", f"{type(exc).__name__}: {exc}")
        g_u.add("PEFT safetensors (source)", "bytes", [(peft0 / "adapter_model.safetensors").stat().st_size])
    except Skip:
        pass
    if ctx.wanted("genai int4"):
        try:
            genai_adapter = genai_dirs(ctx)[1] / "adapter.onnx_adapter"
            g_u.add("genai .onnx_adapter (fp32)", "bytes", [genai_adapter.stat().st_size])
        except Skip:
            pass
    sec.notes.append("edgepeft int4 carries the GGUF's own Q4_1/Q8_0 blocks (edgepeft build's default for a GGUF "
                     "base); \"GGUF layers\" keeps the layers' blocks and re-quantizes the embedding / lm_head to "
                     "int4; \"re-quantized\" quantizes the dequantized weights as a float base would be (zero points on every "
                     "block of 32), \"zero points auto\" the smaller mix of the earlier default; int8 is re-quantized "
                     "to 8 bits. Update payloads are for the int4 bundle, whose LoRA B slots are int8 in every payload "
                     "(scales folded into A): fp16/int8 shrink A; int4 packs A and B in 4-bit groups of 32 and leaves out "
                     "all-zero groups (the off-diagonal blocks of the packed q|k|v B).")
    return sec


MIB = 1024 ** 2


def goals_sizes(sec: Section) -> list[dict]:
    """int4 (GGUF blocks) no larger than the GGUF; the smaller forms within 80 MiB; a rank-8 update <= 1.5 MiB."""
    g, u = sec.find("bundle_bytes"), sec.find("update_bytes")
    fig = (lambda grp, name: grp.get(name) if grp else None)
    out = []
    mine, gguf = fig(g, "edgepeft int4"), fig(g, "GGUF Q4_1")
    goal = {"name": "int4 bundle (GGUF blocks) size", "target": "<= the GGUF it came from"}
    if mine is None or gguf is None:
        out.append(goal | {"met": None, "measured": "not measured"})
    else:
        out.append(goal | {"met": mine.median <= gguf.median,
                           "measured": f"{mine.median / MIB:.1f} MiB vs {gguf.median / MIB:.1f} MiB"})
    small, rq, layers = fig(g, EP_INT4_RQ_SMALL), fig(g, EP_INT4_RQ), fig(g, EP_INT4_LAYERS)
    goal = {"name": "re-quantized int4, the smaller choice (--zero-points auto)", "target": "<= 80 MiB"}
    if small is None:
        out.append(goal | {"met": None, "measured": "not measured"})
    else:
        extra = "".join(f"; {f.system.removeprefix('edgepeft int4, ')} {f.median / MIB:.1f} MiB" for f in (rq, layers) if f)
        out.append(goal | {"met": small.median <= 80 * MIB, "measured": f"{small.median / MIB:.1f} MiB{extra}"})
    payloads = [f for f in (u.figures if u else []) if f.system.startswith("adapter file")]
    goal = {"name": f"rank-{LORA_RANK} all-linear update payload", "target": "<= 1.5 MiB"}
    if not payloads:
        out.append(goal | {"met": None, "measured": "not measured"})
    else:
        best = min(payloads, key=lambda f: f.median)
        out.append(goal | {"met": best.median <= 1.5 * MIB,
                           "measured": f"smallest: {best.system} {best.median / MIB:.2f} MiB"})
    return out
