"""Section 6: resident memory with 0, 1 and 10 adapters in use; bundle open to first token.

edgepeft is measured on the default int4 bundle (the GGUF's blocks), on the re-quantized one (what a float
base gets), and in the phone profile's form (targets/android-arm64.toml: re-quantized, and int8 LoRA B slots,
since a target that serves one request at a time never batches: ``resolve_lora_b``).

Each measurement is a fresh process (``benchmarks.probe``), repeated and
interleaved across systems like everything else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .context import Context
from .fixtures import bench_prompt
from .harness import Section, Skip
from .isolate import PeerFailed, exit_text
from .sys_llama import available as llama_available
from .systems import EP_INT4_PHONE as EP_PHONE
from .systems import EP_INT4_RQ as EP_RQ
from .systems import bundle, genai_dirs, pubkey

ROOT = Path(__file__).resolve().parent.parent


def probe_fresh(kind: str, args: dict, timeout: float) -> dict:
    """One fresh-process measurement; raises PeerFailed when that process dies or hangs."""
    label, phase = f"probe {kind}", "opening and producing first tokens in a fresh process"
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.probe", kind, json.dumps(args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PeerFailed(label, "hung", phase, f"no answer within {timeout:g} s; stopped it") from None
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-300:]
        raise PeerFailed(label, "crashed" if proc.returncode < 0 else "exited", phase,
                         exit_text(proc.returncode) + (f"; last stderr: {tail}" if tail else ""))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> Section:
    sec = Section("memory", "6. Resident memory and bundle open to first token")
    text, ids = bench_prompt(ctx.models.decoder_dir, 32)
    common = {"text": text, "ids": ids, "n_new": 4}
    probes: dict[str, tuple[str, dict]] = {}
    try:
        probes["edgepeft int4"] = ("edgepeft", common | {"bundle": str(bundle(ctx, "int4", all_adapters=True)),
                                                          "pub": str(pubkey(ctx))})
    except Skip:
        pass
    if not ctx.smoke:  # the float-base form, then the phone profile's
        try:
            probes[EP_RQ] = ("edgepeft", common | {"bundle": str(bundle(ctx, "int4", all_adapters=True,
                                                                        gguf="requantize")), "pub": str(pubkey(ctx))})
        except Skip:
            pass
        try:
            probes[EP_PHONE] = ("edgepeft", common | {"bundle": str(bundle(ctx, "int4", all_adapters=True,
                                                                           gguf="requantize", lora_b="int8")),
                                                      "pub": str(pubkey(ctx))})
        except Skip:
            pass
    if ctx.wanted("genai"):
        try:
            probes["genai int4"] = ("genai", common | {"dir": str(genai_dirs(ctx)[0])})
        except Skip:
            pass
    if not ctx.smoke and ctx.models.gguf and llama_available() is None and ctx.wanted("llama.cpp"):
        probes["llama.cpp Q4_1"] = ("llama", common | {"gguf": str(ctx.models.gguf)})
    if ctx.wanted("transformers"):
        probes["transformers fp32"] = ("torch", common | {"dir": str(ctx.models.decoder_dir)})
    results = probe_rounds(ctx, probes, "memory")
    g_rss = sec.group("rss_bytes", "resident memory after the first tokens", "lower",
                      ["genai int4", "llama.cpp Q4_1", "transformers fp32"])
    g_ttft = sec.group("open_to_first_token_s", "open to first token (fresh process, warm page cache)", "lower",
                       ["genai int4", "llama.cpp Q4_1", "transformers fp32"])
    g_anon = sec.group("anon_bytes", "private (anonymous) resident memory after the first tokens", "lower",
                       ["genai int4", "llama.cpp Q4_1", "transformers fp32"])
    g_peak = sec.group("peak_rss_bytes", "peak resident memory of the process", "lower",
                       ["genai int4", "llama.cpp Q4_1", "transformers fp32"])
    for name, runs in results.items():
        if not runs:
            continue
        if name in ("edgepeft int4", EP_RQ, EP_PHONE):
            n_ad = runs[0].get("adapters", 0)
            for k in (0, 1, 10):
                if all(f"rss_{k}" in r for r in runs):
                    label = f"{name}, {k} adapter{'' if k == 1 else 's'}"
                    g_rss.add(label, "bytes", [r[f"rss_{k}"] for r in runs])
                    g_anon.add(label, "bytes", [r[f"anon_{k}"] for r in runs])
            if n_ad < 10:
                sec.notes.append(f"the {name} bundle holds {n_ad} adapters, so the 10-adapter figure is missing")
        else:
            g_rss.add(name, "bytes", [r["rss_0"] for r in runs])
            g_anon.add(name, "bytes", [r["anon_0"] for r in runs])
        g_ttft.add(name, "s", [r["open_to_first_token_s"] for r in runs])
        g_peak.add(name, "bytes", [r["peak_rss"] for r in runs])
    if results.get("edgepeft int4"):
        sec.notes.append(_against_estimate(probes["edgepeft int4"][1]["bundle"], results["edgepeft int4"]))
    sec.notes.append("edgepeft: the bundle's adapters are unloaded after open, then loaded one by one, each used "
                     "by a request (memory-mapped files count once their pages are touched). "
                     "edgepeft's open includes verifying the signature and every file's SHA-256; its bundled "
                     "adapters load (hashed again) on the first request naming them. Each system's imports "
                     "(genai's native library; edgepeft's onnxruntime and tokenizers) happen before the clock. "
                     "Every system starts from the prompt's text: edgepeft's open builds its tokenizer, genai's probe "
                     "opens og.Tokenizer and llama.cpp tokenizes with the vocabulary its open loaded, inside the "
                     "clock (tools/profile_startup.py splits edgepeft's open and memory).")
    return sec


PHONE_MIB = 384  # targets/android-arm64.toml's memory budget


def goals_memory(sec: Section) -> list[dict]:
    """10 rank-8 adapters within the phone profile with room (<= 90 % of its budget, in the phone's form:
    re-quantized, int8 LoRA B). Memory and open time against genai are :mod:`.goals_peers`' rows."""
    rss = sec.find("rss_bytes")
    ten = rss.get(f"{EP_PHONE}, 10 adapters") if rss else None
    goal = {"name": "10 rank-8 adapters on the phone profile", "target": f"<= 90 % of {PHONE_MIB} MiB"}
    return [goal | ({"met": None, "measured": "not measured"} if ten is None else
                    {"met": ten.median <= 0.9 * PHONE_MIB * 2 ** 20,
                     "measured": f"{ten.system} {ten.median / 2 ** 20:.0f} MiB "
                                 f"({100 * ten.median / (PHONE_MIB * 2 ** 20):.0f} % of {PHONE_MIB})"})]


def _against_estimate(bundle_dir: str, runs: list[dict]) -> str:
    """The fit check's estimate for this bundle (what `edgepeft build` compares with the target's
    budget, with the graph's session memory measured as the build does) beside the largest resident and
    peak memory measured: the estimate must not be below them. The probes decode one short request, so
    the estimate compared is the one for a single request (one full context counted)."""
    import statistics

    from edgepeft.bundle.fit import MIB, manifest_estimate
    from edgepeft.bundle.session_memory import measure_session

    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text(encoding="utf-8"))
    session = measure_session(Path(bundle_dir) / manifest["model"].get("graph", "model.onnx"))
    est = manifest_estimate(manifest, session=session)
    one = manifest_estimate(manifest, concurrency=1, session=session)
    rss = max(max(v for k, v in r.items() if k.startswith("rss_")) for r in runs) / MIB
    peak = statistics.median(r["peak_rss"] for r in runs) / MIB
    ok = rss <= one.memory_mib and peak <= one.open_peak_mib
    return (f"fit estimate of the edgepeft int4 bundle (the graph's session {one.session_mib:.0f} MiB"
            f"{', measured' if one.measured else ', unmeasured'}; adapters as fp32): {est.memory_mib:.0f} MiB serving "
            f"{est.concurrency} requests at {est.context} tokens, {one.memory_mib:.0f} MiB serving one, "
            f"{one.open_peak_mib:.0f} MiB while opening; measured with one short request: largest RSS {rss:.0f} MiB, "
            f"peak {peak:.0f} MiB: "
            + ("within the one-request estimate" if ok else "ABOVE the estimate (the fit check undercounts)"))


def probe_rounds(ctx: Context, probes: dict, label: str) -> dict[str, list[dict]]:
    """``memory_reps`` rounds of :func:`probe_fresh` over ``probes`` (name -> (kind, args)), interleaved; a system
    whose probe fails is recorded as skipped and left out of later rounds. Returns name -> the probes' results."""
    s = ctx.settings
    results: dict[str, list[dict]] = {k: [] for k in probes}
    for rep in range(s.memory_reps):
        for name, (kind, args) in probes.items():
            if name in results:
                try:
                    results[name].append(probe_fresh(kind, args, s.call_timeout_s))
                except Skip as exc:
                    ctx.skip(f"{name} memory probe", str(exc), getattr(exc, "kind", "skipped"))
                    results.pop(name)
        ctx.log(f"  {label} rep {rep + 1}/{s.memory_reps} done")
    return results
