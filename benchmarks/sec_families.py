"""Section 8: the adapter families side by side: update size and decode speed with each adapter active.

One int4 bundle carries an adapter of every family (LoRA rank 8 on all linear layers, prefix tuning and
prompt tuning with 20 virtual tokens, a Houlsby bottleneck of hidden/16) and so has bottleneck slots;
its bare base, each adapter, and the plain int4 bundle without bottleneck slots (what empty slots cost)
are timed interleaved in one loop, through ``Engine.generate(stream=True)``. Update size is the signed
``.epu`` that ``create_adapter_update`` writes, per payload type.

The prompt-tuning row also answers how to ship a soft prompt: as the key/value cache compiled on the
server (what edgepeft does: bytes on the wire, nothing per request) or as an embeddings input (a few
bytes, but the soft prompt runs through every layer on every request). The second is measured as what
it costs: the same request with ``virtual_tokens`` more prompt tokens.

The adapters are random (speed does not depend on the values), scaled so greedy text stays text.
"""

from __future__ import annotations

from pathlib import Path

from . import sys_edgepeft
from .context import Context
from .fixtures import LORA_RANK, bench_prompt
from .harness import Section, Skip, interleaved
from .systems import bundle, peft_adapters, pubkey

VIRTUAL_TOKENS = 20
BARE = "edgepeft int4 (no bottleneck slots)"
BARE_SLOTS = "edgepeft int4 + bottleneck slots, no adapter"
FAMILY_SYSTEMS = {"lora": f"+ LoRA r{LORA_RANK} (all linear)", "prefix-tuning": f"+ prefix ({VIRTUAL_TOKENS} tokens)",
                  "prompt-tuning": f"+ prompt ({VIRTUAL_TOKENS} tokens, compiled cache)",
                  "bottleneck": "+ bottleneck (houlsby, hidden/16)"}
EMBEDS_ALT = f"prompt as an embeddings input ({VIRTUAL_TOKENS} more prompt tokens)"


def family_adapters(ctx: Context) -> dict[str, Path]:
    """Random adapters of the three new families for the decoder (cached in the work folder)."""
    def make():
        import torch
        from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from edgepeft.train import bottleneck

        base_dir = ctx.models.decoder_dir
        out = {"lora": peft_adapters(ctx)[0]}
        root = ctx.work / "adapters" / f"families-{base_dir.name}"
        for method, cls in (("prefix-tuning", PrefixTuningConfig), ("prompt-tuning", PromptTuningConfig)):
            d = root / method
            if not (d / "adapter_config.json").is_file():
                torch.manual_seed(1)
                model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
                peft = get_peft_model(model, cls(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS))
                with torch.no_grad():  # a soft prompt: real token embeddings; a prefix: small key/values
                    emb = peft.prompt_encoder["default"].embedding.weight
                    if method == "prompt-tuning":
                        ids = torch.randint(0, model.config.vocab_size, (VIRTUAL_TOKENS,))
                        emb.copy_(model.get_input_embeddings()(ids))
                    else:
                        emb.normal_(0, 0.3)
                peft.save_pretrained(d)
            out[method] = d
        d = root / "bottleneck"
        if not (d / "adapter_config.json").is_file():
            torch.manual_seed(2)
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            wrapped = bottleneck.wrap(model, bottleneck.config_for(model, size=None, non_linearity="relu",
                                                                   placement="houlsby", task="causal-lm"))
            with torch.no_grad():
                for name, p in wrapped.named_parameters():
                    if p.requires_grad and name.endswith("up.weight"):
                        p.normal_(0, 0.02)
            wrapped.save_pretrained(d)
        out["bottleneck"] = d
        return out
    return ctx.get("family adapters", make)


def families_bundle(ctx: Context) -> Path:
    ads = family_adapters(ctx)
    pairs = [(m.replace("-tuning", ""), d) for m, d in ads.items()]

    def make():
        return sys_edgepeft.build(ctx.work, f"dec-int4-families-r{LORA_RANK}", base=str(ctx.models.decoder_dir),
                                  adapters=pairs, quant="int4", log=ctx.log)
    return ctx.get("bundle families", make)


def run(ctx: Context) -> Section:
    s = ctx.settings
    sec = Section("families", "8. Adapter families: update size and decode speed with the adapter active")
    try:
        fam = families_bundle(ctx)
        plain = bundle(ctx, "int4")  # the decode section's LoRA-only int4 bundle
    except Skip as exc:
        sec.notes.append(f"not measured: {exc}")
        return sec
    _sizes(ctx, sec, fam)
    pub = pubkey(ctx)
    text, ids = bench_prompt(ctx.models.decoder_dir, s.prompt_tokens)
    longer, _ = bench_prompt(ctx.models.decoder_dir, len(ids) + VIRTUAL_TOKENS)
    eng = sys_edgepeft.EdgeDecoder(fam, pub)
    bare = sys_edgepeft.EdgeDecoder(plain, pub)
    systems = {BARE: lambda: bare.run_text(text, s.new_tokens, adapter=None),
               BARE_SLOTS: lambda: eng.run_text(text, s.new_tokens, adapter=None),
               EMBEDS_ALT: lambda: eng.run_text(longer, s.new_tokens, adapter=None)}
    for method, label in FAMILY_SYSTEMS.items():
        name = method.replace("-tuning", "")
        systems[label] = lambda n=name: eng.run_text(text, s.new_tokens, adapter=n)
    ctx.log(f"  families: {len(systems)} systems x {s.reps} reps, prompt {len(ids)} tokens, {s.new_tokens} new")
    samples = interleaved(systems, s.reps, s.warmup, log=ctx.log)
    g_dec = sec.group("decode_tok_s", f"decode tokens/s with the adapter active ({s.new_tokens} new tokens)",
                      "higher", [BARE])
    g_pre = sec.group("prefill_s", f"time to first token ({len(ids)}-token prompt)", "lower", [BARE])
    for name, vals in samples.items():
        if "__skip__" in vals:
            ctx.skip(f"families: {name}", str(vals["__skip__"]), str(vals["__kind__"]))
            continue
        if name != EMBEDS_ALT:
            g_dec.add(name, "tok/s", vals["decode_tok_s"])
        g_pre.add(name, "s", vals["prefill_s"])
    sec.notes.append(f"One int4 bundle carries all four adapters (bottleneck slots at attn_out and mlp_out); "
                     f"'{BARE}' is the LoRA-only int4 bundle. {s.reps} interleaved repetitions after {s.warmup} "
                     "warm-up, 2 threads, greedy, timed through Engine.generate(stream=True). "
                     f"'{EMBEDS_ALT}' times what an embeddings input would cost per request: the soft prompt's "
                     f"{VIRTUAL_TOKENS} positions through every layer, as {VIRTUAL_TOKENS} more prompt tokens.")
    return sec


def _sizes(ctx: Context, sec: Section, fam: Path) -> None:
    """Signed update package bytes per family and payload, and the raw soft prompt for comparison."""
    import json

    from edgepeft.release.package import create_adapter_update

    priv, _ = sys_edgepeft.keypair(ctx.work)
    ads = family_adapters(ctx)
    g = sec.group("update_bytes", "signed update package (.epu) per family and payload", "lower")
    out = ctx.work / "payloads" / "families"
    out.mkdir(parents=True, exist_ok=True)
    for method, d in ads.items():
        for dtype in ("fp32", "fp16", "int8", "int4"):
            try:
                res = create_adapter_update(bundle=fam, name=method.replace("-tuning", ""), adapter=d, version=2,
                                            key=priv, out=out / f"{method}-{dtype}.epu", adapter_dtype=dtype)
            except Exception as exc:  # one payload that cannot be written must not lose the others
                ctx.skip(f"families: {method} {dtype} update", f"{type(exc).__name__}: {exc}")
                continue
            g.add(f"{method} {dtype}", "bytes", [res.bytes])
    cfg = json.loads((fam / "manifest.json").read_text())["model"]
    soft = VIRTUAL_TOKENS * int(cfg["hidden_size"]) * 4
    g.add(f"soft prompt itself, fp32 ({VIRTUAL_TOKENS} x {cfg['hidden_size']} floats, not shipped)", "bytes", [soft])
    sec.notes.append("Update size: the whole signed package (envelope, metadata, payload). A prefix (prefix or "
                     "prompt tuning) is layers x 2 x kv_heads x head_dim floats per virtual token; the soft "
                     "prompt it is compiled from is hidden floats per virtual token.")


__all__ = ["run", "family_adapters", "families_bundle"]
