"""Two graph forms of one LoRA group with a different adapter per row, timed in ONNX Runtime (an experiment tool).

    python tools/lora_batch_forms.py [--rows 8] [--k 576] [--width 24] [--n 960]

The per-row form is what edgepeft's graphs run (:mod:`edgepeft.runtime.rowslots`): x [rows, 1, K] times A
[rows, K, width] times B [rows, width, N], batched MatMuls. The concatenated form puts the U distinct adapters of
a step side by side, A [K, U*width] and B [U*width, N], and masks each row's other adapters out between the two
2-D GEMMs (a Mul by a [rows, 1, U*width] 0/1 tensor). Prints microseconds per run (2 threads, spinning) for the
per-row form and for the concatenated one at U = 1, rows/2 and rows; benchmarks/README.md ("Batching: where a
step's time goes as rows grow") quotes it. Needs onnx (server side).
"""

from __future__ import annotations

import argparse
import time


def _session(nodes, inputs):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "lora", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _us_per_run(sess, feeds: dict, n: int = 3000) -> float:
    for _ in range(100):
        sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run(None, feeds)
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from onnx import helper

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--k", type=int, default=576, help="input width (SmolLM2's hidden size)")
    ap.add_argument("--width", type=int, default=24, help="one adapter's A columns (q|k|v at rank 8)")
    ap.add_argument("--n", type=int, default=960, help="output width (SmolLM2's q|k|v)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.random((a.rows, 1, a.k), np.float32)
    per_row = _session([helper.make_node("MatMul", ["x", "a"], ["t"]), helper.make_node("MatMul", ["t", "b"], ["y"])],
                       ["x", "a", "b"])
    feeds = {"x": x, "a": rng.random((a.rows, a.k, a.width), np.float32),
             "b": rng.random((a.rows, a.width, a.n), np.float32)}
    print(f"per-row batched MatMuls, {a.rows} rows: {_us_per_run(per_row, feeds):.1f} us")
    masked = _session([helper.make_node("MatMul", ["x", "a"], ["t"]), helper.make_node("Mul", ["t", "m"], ["tm"]),
                       helper.make_node("MatMul", ["tm", "b"], ["y"])], ["x", "a", "b", "m"])
    for u in sorted({1, max(1, a.rows // 2), a.rows}):
        mask = np.zeros((a.rows, 1, u * a.width), np.float32)
        for i in range(a.rows):
            j = i % u
            mask[i, 0, j * a.width:(j + 1) * a.width] = 1.0
        feeds = {"x": x, "a": rng.random((a.k, u * a.width), np.float32),
                 "b": rng.random((u * a.width, a.n), np.float32), "m": mask}
        print(f"concatenated with a row mask, {u} distinct adapter{'s' if u > 1 else ''}: "
              f"{_us_per_run(masked, feeds):.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
