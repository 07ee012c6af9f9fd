"""Section 4: quality. Perplexity on held-out text (int4 and int8 against fp32), adapter task metrics.

Perplexity is computed the same way for every system: the first N tokens of
the held-out text, cut into non-overlapping windows, each scored from an empty
cache; the loss of each token given the ones before it in its window.
ONNX graphs (edgepeft bundles, the genai int4 model) are run directly with
onnxruntime through the shared decoder contract, so the number reflects the
weights, not the sampler.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .context import Context
from .fixtures import heldout_text
from .harness import THREADS, Section, Skip
from .systems import EP_INT4_LAYERS, EP_INT4_RQ, EP_INT4_RQ_SMALL, EP_NF4, bundle, decoder, genai_dirs, llama_scorer

REF = "transformers fp32"


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(ids[t+1] | ..t) over the window, and the token count."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    tgt = np.asarray(ids[1:])
    return float(-logp[np.arange(len(tgt)), tgt].sum()), len(tgt)


class OnnxScorer:
    """Full-window logits from a decoder graph that follows the genai/edgepeft contract."""

    def __init__(self, model_path: Path, hf_config: Path) -> None:
        import onnxruntime as ort

        cfg = json.loads(hf_config.read_text())
        self.kv_heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        self.head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])

        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]

    def _feeds(self, ids: list[int], past: dict | None) -> dict:
        n_past = 0 if past is None else next(iter(past.values())).shape[2]
        feeds = {"input_ids": np.asarray([ids], np.int64),
                 "attention_mask": np.ones((1, n_past + len(ids)), np.int64)}
        for name in self.past:
            if past is None:
                feeds[name] = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
            else:
                feeds[name] = past[name]
        return feeds

    def logits(self, ids: list[int]) -> np.ndarray:
        outs = self.sess.run(None, self._feeds(ids, None))
        names = [o.name for o in self.sess.get_outputs()]
        logits = outs[names.index("logits")][0]
        if logits.shape[0] == len(ids):
            return logits
        # graphs that return only the last position: score token by token with the cache
        rows, past = [], None
        for t in ids:
            outs = dict(zip(names, self.sess.run(None, self._feeds([t], past))))
            rows.append(outs["logits"][0, -1])
            past = {p: outs[p.replace("past_key_values", "present")] for p in self.past}
        return np.stack(rows)


def perplexity(logits_fn, ids: list[int], window: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(ids) - 1, window):
        w = ids[i:i + window]
        if len(w) < 2:
            break
        nll, n = _nll(logits_fn(w), w)
        total += nll
        count += n
    return math.exp(total / count)


def run(ctx: Context) -> Section:
    s = ctx.settings
    sec = Section("quality", "4. Quality: perplexity on held-out text; adapter task metrics")
    from tokenizers import Tokenizer

    text, source = heldout_text()
    tok = Tokenizer.from_file(str(ctx.models.decoder_dir / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids[: s.ppl_tokens]
    g = sec.group("perplexity", f"perplexity, {len(ids)} held-out tokens (lower is better)", "lower",
                  [REF, "genai int4"])
    scorers = {}
    cfg = ctx.models.decoder_dir / "config.json"
    try:
        if ctx.wanted(REF):
            scorers[REF] = decoder(ctx, REF).logits
    except Skip:
        pass
    forms = [("edgepeft fp32", dict(quant="fp32")), ("edgepeft int8", dict(quant="int8")),
             ("edgepeft int4", dict(quant="int4", all_adapters=True)),
             (EP_INT4_LAYERS, dict(quant="int4", gguf="layers")), (EP_INT4_RQ, dict(quant="int4", gguf="requantize")),
             (EP_INT4_RQ_SMALL, dict(quant="int4", gguf="requantize", zero_points="auto")),
             (EP_NF4, dict(quant="nf4"))]
    for label, kw in forms:
        if not ctx.wanted(label):
            continue
        try:
            scorers[label] = OnnxScorer(bundle(ctx, **kw) / "model.onnx", cfg).logits
        except Skip:
            pass
    try:
        if not ctx.wanted("genai int4"):
            raise Skip("not selected")
        scorers["genai int4"] = OnnxScorer(genai_dirs(ctx)[0] / "model.onnx", cfg).logits
    except Skip:
        pass
    except Exception as exc:  # genai graphs may grow inputs this scorer does not know
        ctx.skip("genai int4 perplexity", f"{type(exc).__name__}: {str(exc)[:200]}")
    if not ctx.smoke and ctx.wanted("llama.cpp"):
        try:
            scorers["llama.cpp Q4_1"] = llama_scorer(ctx, s.ppl_window).logits  # in its own worker process
        except Skip:
            pass  # recorded by the context with its reason
    for name, fn in scorers.items():
        try:
            g.add(name, "ppl", [perplexity(fn, ids, s.ppl_window)])
        except Skip as exc:  # e.g. its worker process died on one window
            ctx.skip(f"{name} perplexity", str(exc), getattr(exc, "kind", "skipped"))
        except Exception as exc:
            ctx.skip(f"{name} perplexity", f"{type(exc).__name__}: {str(exc)[:200]}")
    sec.notes.append(f"Held-out text: {source} (first {len(ids)} tokens, windows of {s.ppl_window}); "
                     "deterministic, so one value per system (no spread).")
    from .sec_tasks import run_into

    run_into(ctx, sec)
    return sec


def goal_float_base(sec: Section, sizes: Section | None) -> dict:
    """Float bases: int4 from float weights (here the re-quantized form, from the GGUF's dequantized weights,
    round-to-nearest) at perplexity <= genai int4's and size <= genai's, same run."""
    goal = {"name": "int4 from float weights vs genai int4", "target": "perplexity and size <= genai's"}
    g = sec.find("perplexity")
    mine, ref = (g.get(EP_INT4_RQ), g.get("genai int4")) if g else (None, None)
    if mine is None or ref is None:
        return goal | {"met": None, "measured": "not measured"}
    b = sizes.find("bundle_bytes") if sizes else None
    sm, sr = (b.get(EP_INT4_RQ), b.get("genai int4 model dir")) if b else (None, None)
    size = f"; {sm.median / 2 ** 20:.1f} vs {sr.median / 2 ** 20:.1f} MiB" if sm and sr else ""
    met = mine.median <= ref.median and (sm is None or sr is None or sm.median <= sr.median)
    return goal | {"met": met, "measured": f"perplexity {mine.median:.2f} vs {ref.median:.2f}{size}"}


def goal_quality(sec: Section) -> dict:
    """int4 perplexity within 1 % of the fp32 reference (transformers on the same dequantized weights)."""
    goal = {"name": "int4 perplexity vs fp32 reference", "target": "within 1 %"}
    g = sec.find("perplexity")
    mine, ref = (g.get("edgepeft int4"), g.get(REF)) if g else (None, None)
    if mine is None or ref is None:
        return goal | {"met": None, "measured": "not measured"}
    rel = mine.median / ref.median - 1
    measured = f"{mine.median:.2f} vs {ref.median:.2f} ({100 * rel:+.1f} %)"
    others = [f for f in (g.get(n) for n in (EP_INT4_LAYERS, EP_INT4_RQ, "genai int4")) if f]
    if others:
        measured += "; " + ", ".join(f"{f.system} {f.median:.2f}" for f in others)
    return goal | {"met": rel <= 0.01, "measured": measured}
