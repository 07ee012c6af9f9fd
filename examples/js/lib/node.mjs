// The Node entry of the library: open a bundle from disk (node:crypto, node:fs) and run it on
// onnxruntime-node. The browser entry (browser.mjs) shares every check and the decoding loop.

import ort from "onnxruntime-node";

import { loadTrustedKey, openBundle } from "./bundle.mjs";
import { openSession } from "./decode.mjs";
import { BundleError, UsageError } from "./errors.mjs";
import { Runner } from "./runner.mjs";

export { BundleError, Runner, UsageError, loadTrustedKey, openBundle, ort };

/** A Runner over a verified bundle; `threads` defaults to the bundle target's. */
export async function loadRunner(bundle, { threads } = {}) {
  const n = threads ?? (Number(bundle.manifest.target?.threads) || 1);
  return Runner.load(bundle, ort, (graph) => openSession(graph, n));
}
