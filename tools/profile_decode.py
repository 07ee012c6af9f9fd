"""Where a decoder graph's decode time goes, op type by op type (an experiment tool).

    python tools/profile_decode.py BUNDLE_DIR [BUNDLE_DIR ...]

Opens each bundle's model.onnx in a profiling ONNX Runtime session (2 threads, the device's session options),
runs a 16-token prompt and 40 single-token decode steps with empty adapter slots, and prints the time per
token and the kernel time per op type. docs/quantization.md quotes it for the graph that carries
a GGUF's blocks against the re-quantized one (e.g. the benchmark's benchmarks/work/bundles/dec-int4-r8-all and
dec-int4-r8-requantize). Profiling adds its own overhead: compare graphs within one run.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
from pathlib import Path


def profile(bundle: Path, steps: int = 40) -> None:
    import numpy as np
    import onnxruntime as ort

    from edgepeft.runtime.session import session_options

    so = session_options(2)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    sess = ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    kv = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    heads, dim = kv[0].shape[1], kv[0].shape[3]
    dim = dim if isinstance(dim, int) else 64  # onnxruntime-genai names the head dim (SmolLM2's is 64)
    past = {i.name: np.zeros((1, heads, 256, dim), np.float32) for i in kv}

    def run(ids: list[int], pos: int) -> None:
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, pos + len(ids)), np.int64)}
        sess.run(["logits"], feeds | past)

    run(list(range(1, 17)), 0)
    t0 = time.perf_counter()
    for k in range(steps):
        run([5], 16 + k)
    per_token = (time.perf_counter() - t0) / steps
    events = json.loads(Path(sess.end_profiling()).read_text())
    spent, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            spent[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    runs = steps + 1
    print(f"{bundle.name}: {per_token * 1e3:.2f} ms per token (profiling on); kernels "
          f"{sum(spent.values()) / runs / 1e3:.2f} ms per run")
    for op, us in spent.most_common(14):
        print(f"  {op:34s} {us / runs / 1e3:7.3f} ms  {count[op] // runs:5d} nodes")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        profile(Path(arg))
