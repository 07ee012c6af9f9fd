"""A fresh process that opens one system, produces a first token, and reports time and memory.

Run as ``python -m benchmarks.probe KIND ARGS_JSON``; prints one JSON line. A
separate process per measurement gives honest resident-memory numbers (nothing
else loaded) and a real "open to first token" (page cache warm, process cold).
Each system's Python modules and native libraries are imported before the clock
starts (``import_s``), as ``import onnxruntime_genai`` loads genai's: edgepeft's
engine imports onnxruntime and tokenizers lazily, so the probe imports them first.

Every system starts from the prompt's text, as an application does: edgepeft's open
builds its tokenizer, genai's probe opens ``og.Tokenizer`` and llama.cpp's tokenizes with
the vocabulary its open loaded, all inside the clock (``tokenizer_s`` is that part).
transformers' probe (no goal's peer) is handed the ids from the same ``tokenizer.json``.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def rss() -> int:
    """Resident set now (anonymous + file-backed pages, e.g. memory-mapped weights)."""
    return _status()["VmRSS"]


def anon() -> int:
    """Private (anonymous) resident memory: what the process itself allocated."""
    return _status().get("RssAnon", 0)


def peak() -> int:
    """High-water mark of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    return _status().get("VmHWM", 0) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    kind, args = sys.argv[1], json.loads(sys.argv[2])
    out: dict = {"kind": kind, "rss_start": rss()}
    t_imp = time.perf_counter()
    n_new = int(args.get("n_new", 2))
    text, ids = args["text"], args["ids"]
    if kind == "edgepeft":
        import onnxruntime  # noqa: F401  the runtime's native libraries, as genai's import loads its own
        import tokenizers  # noqa: F401

        from edgepeft.runtime.engine import Engine

        out["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        eng = Engine(args["bundle"], [args["pub"]], threads=2)
        out["open_s"] = time.perf_counter() - t0
        out["rss_open"] = rss()
        stream = eng.generate(text, max_new_tokens=n_new, temperature=0.0, stream=True)
        next(iter(stream))
        out["open_to_first_token_s"] = time.perf_counter() - t0
        for _ in stream:
            pass
        out["rss_open_all"] = rss()
        entries = list(eng.manifest.adapters)
        for e in entries:  # start from 0 loaded adapters, then load 1, then 10
            eng.unload_adapter(e.name)
        eng.generate(text, max_new_tokens=n_new, temperature=0.0)
        out["rss_0"], out["anon_0"] = rss(), anon()
        for k, e in enumerate(entries, 1):
            eng.serve_adapter(eng.bundled_adapter(e.name))  # read, hashed and loaded again from the bundle
            eng.generate(text, adapter=e.name, max_new_tokens=n_new, temperature=0.0)
            if k in (1, 10):
                out[f"rss_{k}"], out[f"anon_{k}"] = rss(), anon()
        out["adapters"] = len(entries)
    elif kind == "genai":
        import onnxruntime_genai as og

        out["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        model = og.Model(args["dir"])
        out["open_s"] = time.perf_counter() - t0
        out["rss_open"] = rss()
        t_tok = time.perf_counter()
        prompt_ids = og.Tokenizer(model).encode(text)
        out["tokenizer_s"] = time.perf_counter() - t_tok
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + 64, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt_ids)
        gen.generate_next_token()
        out["open_to_first_token_s"] = time.perf_counter() - t0
        out["rss_0"], out["anon_0"] = rss(), anon()
    elif kind == "llama":
        import llama_cpp
        import numpy as np

        out["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=args["gguf"], n_ctx=1024, n_threads=2, n_threads_batch=2, verbose=False)
        out["open_s"] = time.perf_counter() - t0
        t_tok = time.perf_counter()
        prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        out["tokenizer_s"] = time.perf_counter() - t_tok
        llm.eval(prompt_ids)
        int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
        out["open_to_first_token_s"] = time.perf_counter() - t0
        out["rss_0"], out["anon_0"] = rss(), anon()
    elif kind == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(2)
        out["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args["dir"], dtype=torch.float32).eval()
        out["open_s"] = time.perf_counter() - t0
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()
        out["open_to_first_token_s"] = time.perf_counter() - t0
        out["rss_0"], out["anon_0"] = rss(), anon()
    else:
        raise SystemExit(f"unknown probe kind {kind!r}")
    out["peak_rss"] = peak()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
