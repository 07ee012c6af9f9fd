"""Build time and peak memory of ``edgepeft build`` on random-weight models of Llama 3.x shapes (1B, 3B, 8B).

The models are written here tensor by tensor into bf16 safetensors shards (no download; no model is
ever instantiated, so an 8B one needs no 32 GB to make), with SmolLM2's tokenizer (the embedded base's,
converted once) standing in for Llama 3's. The build runs in a child process under a fresh parent, so
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is the build's own peak (the largest of its processes: the
exporter, or the fit check's session in its own process).

    python -m benchmarks.scale --shape 1b [--work DIR] [--keep] [--target NAME_OR_TOML] [--src CHECKOUT]

Prints one JSON line: shape, parameters, wall seconds, peak RSS (MiB), bundle size. Off by default in
``make bench`` (minutes and gigabytes); docs/scale.md has the measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, head_dim=64, tie_word_embeddings=True,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               intermediate_size=8192, head_dim=128, tie_word_embeddings=True,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, head_dim=128, tie_word_embeddings=False,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
COMMON = dict(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2)
SHARD_BYTES = 2 << 30


def shapes_of(cfg: dict) -> list[tuple[str, tuple]]:
    """(HF name, shape) of every weight of a Llama model with config ``cfg``, in state-dict order."""
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return out


def write_random_llama(path, shape: str = "1b", seed: int = 0, **over) -> Path:
    """A random-weight Llama of ``shape`` (a key of :data:`SHAPES`, fields overridable) saved as bf16 safetensors
    shards of at most 2 GiB, written shard by shard (never more than one shard in memory).

    The stand-in tokenizer (SmolLM2's) has fewer tokens than the shape's vocabulary: the embedding's (and an
    untied head's) rows past it are zero, so greedy decoding picks tokens the tokenizer can print (a token
    it cannot print yields no text, and a benchmark timing text pieces would miscount). The work per token
    is the same: every row is still multiplied."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**COMMON, **SHAPES[shape], **over}
    LlamaConfig(**cfg, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(path)
    _tokenizer(path)
    printable = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    gen = torch.Generator().manual_seed(seed)
    shards, cur, size = [], {}, 0
    for name, shp in shapes_of(cfg):
        t = torch.ones(shp) if len(shp) == 1 else torch.randn(shp, generator=gen) * 0.02
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[printable:] = 0
        t = t.to(torch.bfloat16)
        if cur and size + t.numel() * 2 > SHARD_BYTES:
            shards.append(cur)
            _save(path, shards, save_file)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 2
    shards.append(cur)
    _save(path, shards, save_file)
    n = len(shards)
    weight_map = {}
    for i in range(n):
        tmp = path / f".shard-{i}.safetensors"
        final = path / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp.rename(final)
        weight_map.update({k: final.name for k in _keys(final)})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _save(path: Path, shards: list, save_file) -> None:
    i = len(shards) - 1
    save_file(shards[i], str(path / f".shard-{i}.safetensors"), metadata={"format": "pt"})
    shards[i] = None  # written: free it


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _tokenizer(path: Path) -> None:
    """SmolLM2's tokenizer files (the embedded base's) beside the weights: any tokenizer does for timing."""
    from edgepeft.models.base import embedded_smollm2_dir

    src = embedded_smollm2_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, path / name)


def n_params(path) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    total = 0
    for _, shp in shapes_of(cfg):
        n = 1
        for d in shp:
            n *= d
        total += n
    return total


_MEASURE = """
import resource, subprocess, sys, time
import psutil
t = time.time()
p = subprocess.Popen(sys.argv[1:])
me, main, kids = psutil.Process(p.pid), 0, 0
while p.poll() is None:
    try:
        main = max(main, me.memory_info().rss)
        for c in me.children(recursive=True):
            kids = max(kids, c.memory_info().rss)
    except psutil.Error:
        pass
    time.sleep(0.05)
print("SCALE", p.returncode, time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, main, kids)
"""


def measured(cmd: list[str], *, env: dict | None = None, cwd=None) -> dict:
    """Run ``cmd`` in a child of a fresh parent: exit status, wall seconds, peak RSS (MiB) of the largest of
    its processes (``ru_maxrss``) and, polled every 50 ms, of ``cmd``'s own process and of its children.
    Raises RuntimeError when the measuring parent itself fails."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCALE ")]
    if not line:
        raise RuntimeError(f"the measurement failed: {proc.stderr[-2000:]}")
    _, rc, wall, rss_kib, main, kids = line[-1].split()
    return {"rc": int(rc), "wall_s": round(float(wall), 1), "peak_rss_mib": round(int(rss_kib) / 1024, 1),
            "build_process_mib": round(int(main) / 2**20, 1), "fit_check_mib": round(int(kids) / 2**20, 1),
            "stdout": proc.stdout[-3000:], "stderr": proc.stderr[-3000:]}


def measure_build(model_dir, out_dir, key, *, target: str = "raspberry-pi-5", quant: str = "int4",
                  extra: tuple = (), src=None) -> dict:
    """``edgepeft build`` under :func:`measured` (``fit_check_mib``: its children, the fit check's session
    measurement). ``src``: the edgepeft checkout to run (default: this one), e.g. an older commit for a
    before/after."""
    src = Path(src or Path(__file__).resolve().parents[1]).resolve()
    cmd = [sys.executable, "-m", "edgepeft", "build", "--base", str(Path(model_dir).resolve()), "--target", target,
           "--quant", quant, "--key", str(Path(key).resolve()), "--out", str(Path(out_dir).resolve()), "--force",
           *extra]
    return measured(cmd, env=dict(os.environ, PYTHONPATH=str(src)), cwd=src)


def write_random_lora(model_dir, out, *, rank: int = 16, alpha: int = 32, seed: int = 0) -> Path:
    """A PEFT LoRA adapter (rank ``rank``, all seven projections) for the Llama at ``model_dir``, written from
    its config alone: random A, small random B, fp32 safetensors, as PEFT saves them. No model is loaded,
    so a 1B base costs the adapter's few MB, not the 5 GB of an fp32 model."""
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(out)
    if (out / "adapter_config.json").is_file():
        return out
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shp in shapes_of(cfg):
        module = name.removesuffix(".weight")
        if len(shp) == 2 and module.rsplit(".", 1)[-1] in targets:
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, shp[1])) / np.sqrt(shp[1])).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((shp[0], rank)) * 0.02).astype(np.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": str(Path(model_dir).resolve()), "inference_mode": True}, indent=2))
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--work", default=str(Path(os.environ.get("EDGEPEFT_BENCH_WORK")
                                               or Path(__file__).resolve().parent / "work") / "scale"))
    ap.add_argument("--target", default=None, help="default: raspberry-pi-5 for 1b, scale-target.toml (32 GiB) above")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--keep", action="store_true", help="keep the bundle")
    ap.add_argument("--src", default=None, help="an edgepeft checkout to build with (default: this one)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    model = work / f"llama-{args.shape}"
    if not (model / "model.safetensors.index.json").is_file():
        t = time.time()
        write_random_llama(model, args.shape)
        print(f"wrote {model} in {time.time() - t:.0f} s", file=sys.stderr)
    key = work / "key.key"
    if not key.is_file():
        subprocess.run([sys.executable, "-m", "edgepeft", "keygen", "--out", str(work / "key")], check=True,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    out = work / f"bundle-{args.shape}"
    args.target = args.target or ("raspberry-pi-5" if args.shape == "1b" else str(Path(__file__).parent / "scale-target.toml"))
    res = measure_build(model, out, key, target=args.target, quant=args.quant, src=args.src)
    bundle = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0
    row = {"shape": args.shape, "src": args.src or "this checkout", "params": n_params(model), "quant": args.quant,
           "target": Path(args.target).stem,
           "rc": res["rc"], "wall_s": res["wall_s"], "peak_rss_mib": res["peak_rss_mib"],
           "build_process_mib": res["build_process_mib"], "fit_check_mib": res["fit_check_mib"],
           "bundle_mib": round(bundle / 2**20, 1)}
    print(json.dumps(row))
    if res["rc"]:
        print(res["stderr"], file=sys.stderr)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        Path(str(out) + ".epb").unlink(missing_ok=True)
    return res["rc"]


if __name__ == "__main__":
    raise SystemExit(main())
