"""Section 7: classification samples/s on all-MiniLM-L6-v2, edgepeft int8 (and int4, fp32) vs PyTorch.

int8 encoders run per-channel ``DynamicQuantizeMatMul`` (edgepeft.export.quantize.LinearEmitter), int4
``MatMulNBits``, fp16 (the classifier default since issue 13) stores fp16 and computes fp32; the goal row
says whether int8 is at least as fast as the fp32 graph.
"""

from __future__ import annotations

from pathlib import Path

from . import sys_edgepeft
from .context import Context
from .harness import Section, Skip, interleaved
from .systems import pubkey, torch_classifier

TEXTS = ["The delivery arrived two days late and the box was damaged.",
         "Great service, the technician fixed the router in ten minutes!",
         "How do I reset my password on the mobile app?",
         "The invoice shows a charge I do not recognise.",
         "Thanks, everything works now.",
         "My order number is 4471 and it still has not shipped."]
TORCH = "transformers fp32"


def cls_adapter(ctx: Context) -> Path:
    """A PEFT LoRA sequence-classification adapter for the encoder (random, 2 labels)."""
    def make():
        out = ctx.work / "adapters" / f"cls-lora-{ctx.models.encoder_dir.name}"
        if (out / "adapter_config.json").is_file():
            return out
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(ctx.models.encoder_dir, num_labels=2)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                         task_type="SEQ_CLS", lora_dropout=0.0)
        pm = get_peft_model(model, cfg)
        tmp = out.with_name(out.name + ".tmp")
        pm.save_pretrained(tmp)
        import os

        os.replace(tmp, out)
        return out
    return ctx.get("classification adapter", make)


def run(ctx: Context) -> Section:
    s = ctx.settings
    sec = Section("classify", f"7. Classification throughput ({ctx.models.encoder_name}, 2 labels)")
    systems = {}
    if ctx.wanted(TORCH):
        try:
            systems[TORCH] = torch_classifier(ctx)  # in its own worker process
        except Skip:
            pass  # recorded by the context with its reason
    for quant in ("int8", "int4", "fp16", "fp32"):
        name = f"edgepeft {quant} + adapter"
        if not ctx.wanted(name):
            continue

        def make(q=quant):
            b = sys_edgepeft.build(ctx.work, f"enc-{q}", base=str(ctx.models.encoder_dir),
                                   adapters=[("cls", cls_adapter(ctx))], quant=q, task="classification",
                                   log=ctx.log)
            return sys_edgepeft.EdgeClassifier(b, pubkey(ctx), "cls")
        try:  # cached apart from the decoder system of the same name
            systems[name] = ctx.get(f"{name} (classifier)", make)
        except Skip:
            pass  # recorded by the context with its reason
    systems = {k: v for k, v in systems.items() if v is not None}
    for batch in s.classify_batch:
        texts = (TEXTS * (batch // len(TEXTS) + 1))[:batch]
        calls = max(1, 32 // batch)  # one batch-1 call is ~2 ms: a sample of one call is mostly noise
        samples = interleaved({n: (lambda o=o, t=texts: _repeated(o, t, calls)) for n, o in systems.items()},
                              s.reps, s.warmup)
        g = sec.group(f"samples_per_s_b{batch}", f"samples/s at batch {batch} (tokenizing included; "
                      f"{calls} calls per sample)", "higher", [TORCH])
        for name, vals in samples.items():
            if "__skip__" in vals:
                ctx.skip(name, str(vals["__skip__"]), str(vals["__kind__"]))
            else:
                g.add(name, "samples/s", vals["samples_per_s"])
    return sec


def _repeated(system, texts: list[str], calls: int) -> dict:
    """``calls`` back-to-back calls as one sample: texts classified over the time the calls took."""
    spent = 0.0
    for _ in range(calls):
        spent += len(texts) / system.run(texts)["samples_per_s"]
    return {"samples_per_s": calls * len(texts) / spent}


def goal_classify(sec: Section) -> dict:
    """issue 13: the int8 classifier at least as fast as the fp32 graph (else int8 must not be the default)."""
    goal = {"name": "int8 classifier >= fp32 graph", "target": "ratio >= 1.00 at every batch"}
    parts, met = [], True
    for g in sec.groups:
        a, b = g.get("edgepeft int8 + adapter"), g.get("edgepeft fp32 + adapter")
        if a and b:
            parts.append(f"{g.title.split(' (')[0]}: {a.median / b.median:.2f}x")
            met = met and a.median >= b.median
    if not parts:
        return goal | {"met": None, "measured": "not measured"}
    return goal | {"met": met, "measured": "; ".join(parts)}


__all__ = ["run", "goal_classify", "Skip"]
