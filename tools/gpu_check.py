"""QLoRA and LoRA on a CUDA GPU through edgepeft.train, then back to a CPU bundle: run where a GPU exists.

Not part of the test suite (CI has no GPU). It checks that the 4-bit NF4 base is
really bitsandbytes ``Linear4bit`` on the GPU, that loss falls, that the saved
adapter loads in plain PEFT, and that ``edgepeft build`` turns it into a bundle
whose ONNX output matches PEFT on the CPU. Prints one JSON report.

    python tools/gpu_check.py --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/edgepeft-gpu-check")
    ap.add_argument("--allow-cpu", action="store_true", help="dry-run the same steps on the CPU")
    args = ap.parse_args()
    import bitsandbytes as bnb
    import peft
    import torch
    import transformers

    from edgepeft.train import train
    from edgepeft.train.tiny import tiny_llama

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__}
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(json.dumps(report | {"error": "no CUDA device"}))
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report["gpu"] = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    base = tiny_llama(out / "base", hidden=256, layers=4, vocab_size=512)
    data = str(ROOT / "examples" / "northwind_support" / "train.jsonl")
    for method in ("qlora", "lora"):
        t0 = time.time()
        res = train(data=data, out=str(out / method), base=str(base), method=method, rank=8, max_steps=40,
                    batch_size=8, max_length=192, eval_split=0.1, eval_generate=4, max_new_tokens=16,
                    learning_rate=1e-3, progress=False)
        report[method] = {"seconds": round(time.time() - t0, 1), "train": res.metrics.get("train"),
                          "eval": {k: v for k, v in (res.metrics.get("eval") or {}).items() if k != "samples"}}
    # the 4-bit layers really are bitsandbytes on the GPU
    from edgepeft.models.base import resolve_base
    from edgepeft.train.modelprep import _load_4bit

    model = _load_4bit(resolve_base(str(base)), "causal-lm", None, None, device, None)
    four = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    report["linear4bit_modules"] = len(four)
    report["linear4bit_device"] = str(next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight.device)
    report["quant_type"] = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight.quant_type
    # the GPU-trained QLoRA adapter builds into a CPU bundle whose output matches PEFT on an fp32 base
    import numpy as np
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgepeft.bundle.build import build_bundle
    from edgepeft.contracts.signing import generate_keypair

    print(json.dumps(report, default=str), flush=True)  # the GPU part, before the CPU bundle part
    key, pub = generate_keypair(out / "key", force=True)
    b = build_bundle(base=str(base), adapters=[("qlora", out / "qlora")], target="x86-64-gateway", key=key,
                     out=out / "bundle", quant="fp32", adapter_dtype="fp32", force=True)
    from edgepeft.runtime import Engine

    ids = [5, 17, 42, 7, 99]
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                    out / "qlora").eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0, -1].numpy()
    import onnxruntime as ort

    m = json.loads((b.bundle_dir / "manifest.json").read_text())
    sess = ort.InferenceSession(str(b.bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in range(m["model"]["num_layers"]):
        for w in ("key", "value"):
            feeds[f"past_key_values.{i}.{w}"] = np.zeros((1, m["model"]["num_kv_heads"], 0, m["model"]["head_dim"]),
                                                        np.float32)
    ad = ort.LoraAdapter()
    ad.Load(str(b.bundle_dir / m["adapters"][0]["file"]))
    ro = ort.RunOptions()
    ro.add_active_adapter(ad)
    got = sess.run(["logits"], feeds, ro)[0][0, -1]
    report["bundle_vs_peft_max_abs_diff"] = float(np.abs(got - want).max())
    engine = Engine(b.bundle_dir, [pub])
    report["engine_answer"] = engine.generate(prompt="hello", adapter="qlora", max_new_tokens=8).text
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
