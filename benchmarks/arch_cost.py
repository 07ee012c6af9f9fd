"""``python -m benchmarks.arch_cost``: what Gemma 2's soft-capping and local/global layers cost on device.

Not part of ``make bench`` (which measures SmolLM2 and MiniLM): a one-off measurement for the exporter's
architecture table. One random-weight decoder with Gemma 2's structure (sandwich norms, tanh-GELU, 256k
vocabulary, alternating local/global layers) at a small width, exported three times from the SAME weights
with only the config switches changed:

- ``gemma2``: attention soft-cap (``GroupQueryAttention``'s ``softcap``), final-logit soft-cap (Div, Tanh,
  Mul over the vocabulary), a 128-token window on every other layer (``local_window_size``);
- ``no softcap``: both soft-caps off (and each alone: ``no attn softcap``, ``no final softcap``);
- ``no window``: every layer global.

Each runs int4 through the device runtime's decode loop (``DecoderRunner``: IOBinding, shared KV buffers),
2 threads, a 256-token prompt and 64 greedy tokens, repetitions interleaved. On a shared machine the
whole-model figures drift by tens of percent, so the same features are also timed alone (``ops``): one
``GroupQueryAttention`` decode step (8 heads, 4 KV heads, head 64) over a 320- and a 2048-token cache,
plain / ``softcap`` / ``local_window_size=128``, and the final soft-cap (Div, Tanh, Mul) over 256k logits;
each the best of 7 batches of 200 calls. Writes ``benchmarks/results/arch_cost.json``. Takes ~6 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from .fixtures import RESULTS, WORK, write_json_atomic

DIMS = dict(vocab_size=256000, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, sliding_window=128,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=64,
            pad_token_id=0, bos_token_id=2, eos_token_id=1)
VARIANTS = {"gemma2": {}, "no softcap": dict(attn_logit_softcapping=None, final_logit_softcapping=None),
            "no attn softcap": dict(attn_logit_softcapping=None), "no final softcap": dict(final_logit_softcapping=None),
            "no window": dict(layer_types=["full_attention"] * 8)}


def _build(work: Path) -> dict:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from edgepeft.export import export_model

    base = work / "base"
    if not (base / "model.safetensors").is_file():
        torch.manual_seed(0)
        Gemma2ForCausalLM(Gemma2Config(**DIMS)).save_pretrained(base)
    out = {}
    for name, over in VARIANTS.items():
        d = work / name.replace(" ", "_")
        if not (d / "onnx" / "model.onnx").is_file():
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(base, d / "hf")
            cfg = json.loads((d / "hf" / "config.json").read_text())
            cfg.update(over)
            (d / "hf" / "config.json").write_text(json.dumps(cfg))
            res = export_model(str(d / "hf"), d / "onnx", quant="int4", slot_rank=8, max_context=1024)
            (d / "onnx" / "info.json").write_text(json.dumps(res.model_info))
        out[name] = d / "onnx"
    return out


def _runner(onnx_dir: Path, threads: int):
    from edgepeft.runtime.decoder import DecoderRunner
    from edgepeft.runtime.session import open_session

    info = json.loads((onnx_dir / "info.json").read_text())
    # no spin-waiting, so the process CPU time counts work, not polling (the CPU-time figure is the steadier
    # one on a shared machine; wall time is what a device sees)
    sess = open_session(onnx_dir / "model.onnx", providers=["CPUExecutionProvider"], threads=threads, spinning=False)
    return DecoderRunner(sess, num_layers=info["num_layers"], num_kv_heads=info["num_kv_heads"],
                         head_dim=info["head_dim"], vocab_size=info["vocab_size"], max_context=1024), info


def _op_model(kind: str, past: int):
    """One decode-step graph: a GQA node (plain / softcap / window) or the final soft-cap ops."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    f = T.FLOAT
    if kind == "final softcap":
        cap = numpy_helper.from_array(np.array(30.0, np.float32), "cap")
        nodes = [helper.make_node("Div", ["x", "cap"], ["a"]), helper.make_node("Tanh", ["a"], ["b"]),
                 helper.make_node("Mul", ["b", "cap"], ["y"])]
        ins, feeds = [helper.make_tensor_value_info("x", f, [1, 1, 256000])], \
            {"x": np.random.default_rng(0).standard_normal((1, 1, 256000)).astype(np.float32) * 20}
        graph = helper.make_graph(nodes, "op", ins, [helper.make_tensor_value_info("y", f, None)], [cap])
    else:
        attrs = {"plain": {}, "softcap": {"softcap": 50.0}, "window": {"local_window_size": 128}}[kind]
        h, kv, d = 8, 4, 64
        node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "sl", "tot"], ["o", "k", "v"],
                                domain="com.microsoft", num_heads=h, kv_num_heads=kv, **attrs)
        ins = [helper.make_tensor_value_info("qkv", f, [1, 1, (h + 2 * kv) * d]),
               helper.make_tensor_value_info("pk", f, [1, kv, past, d]),
               helper.make_tensor_value_info("pv", f, [1, kv, past, d]),
               helper.make_tensor_value_info("sl", T.INT32, [1]), helper.make_tensor_value_info("tot", T.INT32, [])]
        rng = np.random.default_rng(0)
        feeds = {"qkv": rng.standard_normal((1, 1, (h + 2 * kv) * d)).astype(np.float32),
                 "pk": rng.standard_normal((1, kv, past, d)).astype(np.float32),
                 "pv": rng.standard_normal((1, kv, past, d)).astype(np.float32),
                 "sl": np.array([past], np.int32), "tot": np.array(past + 1, np.int32)}
        graph = helper.make_graph([node], "op", ins, [helper.make_tensor_value_info("o", f, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model, feeds


def _time_ops(threads: int) -> dict:
    import onnxruntime as ort

    out = {}
    cases = [(k, p) for p in (320, 2048) for k in ("plain", "softcap", "window")] + [("final softcap", 0)]
    for kind, past in cases:
        model, feeds = _op_model(kind, past)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(50):
            sess.run(None, feeds)
        batches = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(200):
                sess.run(None, feeds)
            batches.append((time.perf_counter() - t) / 200 * 1e6)
        out[f"{kind} @ {past}" if past else kind] = {"best_us": min(batches), "median_us": statistics.median(batches)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "arch_cost.json")
    args = ap.parse_args(argv)
    import os

    dirs = _build(WORK / "arch_cost")
    runners = {name: _runner(d, args.threads) for name, d in dirs.items()}
    prompt = list(np.random.default_rng(0).integers(3, 256000, 256))
    new = 64
    samples = {name: {"prefill_s": [], "decode_tok_s": [], "decode_cpu_ms_per_tok": []} for name in runners}
    load0 = os.getloadavg()
    for rep in range(args.reps + 1):
        order = list(runners)[rep % len(runners):] + list(runners)[:rep % len(runners)]
        for name in order:
            runner, _ = runners[name]
            marks = []
            t0 = time.perf_counter()
            for _ in runner.generate(prompt, pick=lambda z: int(np.argmax(z)), max_new_tokens=new,
                                     on_prefill=lambda: marks.append((time.perf_counter(), time.process_time()))):
                pass
            t1, c1 = time.perf_counter(), time.process_time()
            if rep:  # rep 0 warms up
                samples[name]["prefill_s"].append(marks[0][0] - t0)
                samples[name]["decode_tok_s"].append((new - 1) / (t1 - marks[0][0]))
                samples[name]["decode_cpu_ms_per_tok"].append((c1 - marks[0][1]) * 1000 / (new - 1))
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    ref = med["gemma2"]
    result = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "dims": DIMS, "threads": args.threads, "prompt_tokens": len(prompt), "new_tokens": new,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "samples": samples, "median": med,
        "ratios_vs_gemma2": {n: {k: m[k] / ref[k] for k in m} for n, m in med.items()},
    }
    result["ops"] = _time_ops(args.threads)
    write_json_atomic(args.out, result)
    for n, m in result["ops"].items():
        print(f"op {n:18s} best {m['best_us']:8.1f} us   median {m['median_us']:8.1f} us")
    for n, m in med.items():
        print(f"{n:16s} prefill {m['prefill_s'] * 1000:7.1f} ms   decode {m['decode_tok_s']:6.1f} tok/s "
              f"({m['decode_tok_s'] / ref['decode_tok_s']:.3f}x gemma2), CPU {m['decode_cpu_ms_per_tok']:6.2f} ms/token "
              f"({m['decode_cpu_ms_per_tok'] / ref['decode_cpu_ms_per_tok']:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
