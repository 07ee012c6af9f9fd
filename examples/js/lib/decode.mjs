// Greedy decoding over the bundle's decoder graph with its key/value cache (docs/bundle-format.md,
// "Decoder inputs and outputs"): the first run takes the whole prompt and empty past tensors;
// each later run takes the one new token and the previous run's present.{i}.key/value as past.

import ort from "onnxruntime-node";

import { BundleError } from "./bundle.mjs";

const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);

/** One session over the (slot-detached) graph; `threads` from the bundle's target. */
export async function openSession(modelBytes, threads) {
  try {
    return await ort.InferenceSession.create(modelBytes, {
      executionProviders: ["cpu"], intraOpNumThreads: threads, interOpNumThreads: 1,
      graphOptimizationLevel: "all", executionMode: "sequential", logSeverityLevel: 3,
    });
  } catch (err) {
    throw new BundleError(`onnxruntime-node cannot load model.onnx: ${err.message}`,
      "the bundle may need a newer onnxruntime-node");
  }
}

function argmax(row) {
  let best = 0;
  for (let k = 1; k < row.length; k++) if (row[k] > row[best]) best = k;
  return best;
}

/**
 * Generate up to `maxNewTokens` ids after `promptIds`; stops at an id in `eosIds` (not returned)
 * or when the context (`maxContext` positions) is full. `slotFeeds` holds every adapter slot's tensor.
 * Returns {ids, finish} with finish "stop" or "length".
 */
export async function greedy(session, model, promptIds, { maxNewTokens, maxContext, eosIds, slotFeeds }) {
  const io = model.io || {};
  if ((io.kv_dtype || "float32") !== "float32" || (io.kv_layout || "BNSH") !== "BNSH") {
    throw new BundleError(`this app handles float32 BNSH caches, the bundle has ${io.kv_dtype} ${io.kv_layout}`);
  }
  const layers = model.num_layers, kvHeads = model.num_kv_heads, headDim = model.head_dim, vocab = model.vocab_size;
  let past = {};
  for (let i = 0; i < layers; i++) {
    for (const w of ["key", "value"]) {
      past[`past_key_values.${i}.${w}`] = new ort.Tensor("float32", new Float32Array(0), [1, kvHeads, 0, headDim]);
    }
  }
  const stops = new Set(eosIds);
  const budget = Math.min(maxNewTokens, maxContext - promptIds.length);
  const ids = [];
  let feed = promptIds, total = promptIds.length;
  while (ids.length < budget) {
    const out = await session.run({
      input_ids: int64(feed, [1, feed.length]),
      attention_mask: int64(new Array(total).fill(1), [1, total]),
      ...past, ...slotFeeds,
    });
    const rows = out.logits.dims[1];
    const tok = argmax(out.logits.data.subarray((rows - 1) * vocab, rows * vocab));
    if (stops.has(tok)) return { ids, finish: "stop" };
    ids.push(tok);
    past = {};
    for (let i = 0; i < layers; i++) {
      for (const w of ["key", "value"]) past[`past_key_values.${i}.${w}`] = out[`present.${i}.${w}`];
    }
    feed = [tok];
    total += 1;
  }
  return { ids, finish: "length" };
}
