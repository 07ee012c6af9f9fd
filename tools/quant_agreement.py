"""How close a quantized decoder graph is to the fp32 one: KL divergence and top-1 agreement per token.

    python tools/quant_agreement.py FP32_GRAPH GRAPH [GRAPH ...]

Scores the benchmark's held-out text (the first 3072 tokens of CPython's LICENSE, windows of 256, as
`make bench` section 4 does for perplexity) with every graph and prints, per graph, the mean KL(fp32 ||
graph) of the next-token distributions and how often both pick the same top token. The
quantization table in docs/quantization.md quotes it for the benchmark's bundles (benchmarks/work/bundles/dec-fp32-r8/model.onnx
against dec-int4-r8, -layers, -requantize, -requantize-zpauto, after `make bench` built them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main(ref_graph: str, graphs: list[str], tokens: int = 3072, window: int = 256) -> None:
    from tokenizers import Tokenizer

    from benchmarks.fixtures import heldout_text
    from benchmarks.sec_quality import OnnxScorer
    from edgepeft.models.base import embedded_smollm2_dir

    model_dir = embedded_smollm2_dir()
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(heldout_text()[0]).ids[:tokens]
    starts = range(0, len(ids), window)
    ref = OnnxScorer(Path(ref_graph), model_dir / "config.json")
    want = [_log_softmax(ref.logits(ids[i:i + window])) for i in starts]
    del ref
    for g in graphs:
        scorer = OnnxScorer(Path(g), model_dir / "config.json")
        kl, same, n = 0.0, 0, 0
        for r, i in zip(want, starts):
            q = _log_softmax(scorer.logits(ids[i:i + window]))
            kl += float((np.exp(r) * (r - q)).sum())
            same += int((r.argmax(-1) == q.argmax(-1)).sum())
            n += len(q)
        print(f"{g}: KL {kl / n:.4f} per token, top-1 agreement {same / n:.3f} ({n} tokens)")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
