"""Compile a prompt-tuning soft prompt into a key/value prefix with the device's own graph.

The decoder graph names the point where token embeddings enter the layers
(``inputs_embeds``, :data:`.decoder_graph.EMBEDS`). Cutting the graph there gives an
embeddings-in variant that shares every node and weight with the graph a device
runs: same quantized blocks, same kernels. Running it once over the soft prompt
(positions 0..P-1, empty cache, no adapter) returns ``present.{i}.key/value``:
exactly the cache the device would build if it fed the soft prompt itself, since in
a causal decoder those positions never see what follows them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contracts.methods import prefix_names
from ..errors import AdapterError
from .decoder_graph import EMBEDS


def embeds_graph(model_path, hidden: int | str = "hidden_size"):
    """The graph at ``model_path`` with ``inputs_embeds`` [batch, sequence, hidden] as an input instead of
    ``input_ids``; every node and initializer that no output needs any more is dropped. Raises
    :class:`AdapterError` for a graph without the ``inputs_embeds`` point (exported by an older edgepeft)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    g = model.graph
    cut = [n for n in g.node if EMBEDS in n.output]
    if len(cut) != 1:
        raise AdapterError(f"{Path(model_path).name} has no '{EMBEDS}' point to compile a soft prompt with",
                           hint="rebuild the bundle with this edgepeft (edgepeft build), then create the update")
    g.node.remove(cut[0])
    g.input.insert(0, helper.make_tensor_value_info(EMBEDS, TensorProto.FLOAT, ["batch_size", "sequence_length",
                                                                               hidden]))
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name in needed]
    del g.input[:]
    g.input.extend(inputs)
    return model


def compile_prompt(model_path, soft_prompt: np.ndarray, model_info: dict, *, threads: int | None = None) -> dict:
    """``prefix.{i}.key/value`` [kv_heads, P, head_dim] of ``soft_prompt`` [P, hidden] through the graph at
    ``model_path``. Raises :class:`AdapterError` when the graph cannot run it."""
    import onnxruntime as ort

    layers = int(model_info["num_layers"])
    kv, hd = int(model_info["num_kv_heads"]), int(model_info["head_dim"])
    p = int(soft_prompt.shape[0])
    model = embeds_graph(model_path, int(model_info["hidden_size"]))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {EMBEDS: np.ascontiguousarray(soft_prompt[None], np.float32),
                 "attention_mask": np.ones((1, p), np.int64)}
        for i in range(layers):
            for w in ("key", "value"):
                feeds[f"past_key_values.{i}.{w}"] = np.zeros((1, kv, 0, hd), np.float32)
        wanted = [f"present.{i}.{w}" for i in range(layers) for w in ("key", "value")]
        outs = sess.run(wanted, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise AdapterError(f"cannot compile the soft prompt with {Path(model_path).name}: {str(exc)[:300]}",
                           hint="rebuild the bundle with this edgepeft") from exc
    out = {}
    for i in range(layers):
        k, v = prefix_names(i)
        out[k] = np.ascontiguousarray(outs[2 * i][0])
        out[v] = np.ascontiguousarray(outs[2 * i + 1][0])
    return out


__all__ = ["embeds_graph", "compile_prompt"]
