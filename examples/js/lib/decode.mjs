// The Node side of decoding: one onnxruntime-node session over the (slot-detached) graph, and the
// shared greedy loop (generate.mjs) bound to onnxruntime-node's tensors.

import ort from "onnxruntime-node";

import { BundleError } from "./errors.mjs";
import { greedy as greedyWith } from "./generate.mjs";

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

/** greedy(session, model, promptIds, options): see generate.mjs. */
export const greedy = (session, model, promptIds, options) => greedyWith(ort, session, model, promptIds, options);
