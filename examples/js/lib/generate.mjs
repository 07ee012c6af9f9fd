// Greedy decoding over the bundle's decoder graph with its key/value cache (docs/bundle-format.md,
// "Decoder inputs and outputs"): the first run takes the whole prompt and empty past tensors;
// each later run takes the one new token and the previous run's present.{i}.key/value as past.
// `ort` is the ONNX Runtime binding in use (onnxruntime-node or onnxruntime-web: the same API).

import { BundleError } from "./errors.mjs";

function argmax(row) {
  let best = 0;
  for (let k = 1; k < row.length; k++) if (row[k] > row[best]) best = k;
  return best;
}

/**
 * Generate up to `maxNewTokens` ids after `promptIds`; stops at an id in `eosIds` (not returned)
 * or when the context (`maxContext` positions) is full. `slotFeeds` holds every adapter slot's tensor;
 * `onToken(id, ids)` (optional, may be async) sees each new id as it comes.
 * Returns {ids, finish} with finish "stop" or "length".
 */
export async function greedy(ort, session, model, promptIds, { maxNewTokens, maxContext, eosIds, slotFeeds, onToken }) {
  const io = model.io || {};
  if ((io.kv_dtype || "float32") !== "float32" || (io.kv_layout || "BNSH") !== "BNSH") {
    throw new BundleError(`this app handles float32 BNSH caches, the bundle has ${io.kv_dtype} ${io.kv_layout}`);
  }
  const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);
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
    if (onToken) await onToken(tok, ids);
    past = {};
    for (let i = 0; i < layers; i++) {
      for (const w of ["key", "value"]) past[`past_key_values.${i}.${w}`] = out[`present.${i}.${w}`];
    }
    feed = [tok];
    total += 1;
  }
  return { ids, finish: "length" };
}
