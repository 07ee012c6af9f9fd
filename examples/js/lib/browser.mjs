// The browser entry of the library: open a bundle served as static files, verify it with WebCrypto
// (the manifest's Ed25519 signature, then every file's size and SHA-256, before any byte is used),
// load model.onnx into onnxruntime-web (WASM) and answer prompts with hot-swapped adapters.
// The checks, the adapter reader, the tokenizer and the decoding loop are the Node entry's own
// modules; only fetching, hashing and the ONNX Runtime binding differ.
//
// "onnxruntime-web", "@huggingface/tokenizers" and "@huggingface/jinja" are bare imports: a page
// maps them to the files under node_modules with an import map (see examples/web/index.html).

import * as ort from "onnxruntime-web";

import {
  SCHEMA_VERSION, badSignature, bundleManifest, checkEntry, fileLookup, fileUrl, parseManifestBytes, signedParts,
  toHex,
} from "./bundle_core.mjs";
import { BundleError, UsageError } from "./errors.mjs";
import { Runner } from "./runner.mjs";

export { BundleError, Runner, SCHEMA_VERSION, UsageError, ort };

const subtle = () => {
  if (!globalThis.crypto?.subtle) {
    throw new BundleError("this page has no WebCrypto (crypto.subtle), so nothing can be verified",
      "open it over https:// or from http://127.0.0.1 / http://localhost (a secure context)");
  }
  return globalThis.crypto.subtle;
};

/** An Ed25519 public key from the PEM text `edgepeft keygen` writes, with its key id. */
export async function importTrustedKey(pem, source = "the trusted key") {
  const body = /-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]+)-----END PUBLIC KEY-----/.exec(String(pem));
  if (!body) {
    throw new BundleError(`${source} is not a PEM public key`, "use the .pub file written by `edgepeft keygen`");
  }
  const der = Uint8Array.from(atob(body[1].replace(/\s+/g, "")), (c) => c.charCodeAt(0));
  let key;
  try {
    key = await subtle().importKey("spki", der, { name: "Ed25519" }, true, ["verify"]);
  } catch (err) {
    throw new BundleError(`${source} is not an Ed25519 key this browser can use: ${err.message}`,
      "create one with `edgepeft keygen`; Ed25519 in WebCrypto needs a current browser");
  }
  const raw = new Uint8Array(await subtle().exportKey("raw", key));
  return { key, id: toHex(await subtle().digest("SHA-256", raw)).slice(0, 16) };
}

async function fetchBytes(url) {
  let res;
  try {
    res = await fetch(url, { cache: "no-store", redirect: "error" });
  } catch (err) {
    throw new BundleError(`cannot fetch ${url}: ${err.message}`, "check the bundle's address and that its server runs");
  }
  if (res.status === 404) return null;
  if (!res.ok) throw new BundleError(`fetching ${url} answered HTTP ${res.status}`, "check the bundle's server");
  return new Uint8Array(await res.arrayBuffer());
}

/**
 * Fetch and verify the bundle at `baseUrl` (a folder URL) against `trusted` ([{key, id}] from
 * importTrustedKey). Returns {manifest, keyId, file(rel) -> Uint8Array}. Throws BundleError naming
 * what failed: an unsigned or tampered manifest, an untrusted key, a missing or changed file.
 */
export async function fetchBundle(baseUrl, trusted) {
  const base = new URL(baseUrl.endsWith("/") ? baseUrl : baseUrl + "/", globalThis.location?.href);
  const manifestUrl = new URL("manifest.json", base).href;
  const raw = await fetchBytes(manifestUrl);
  if (raw === null) throw new BundleError(`${manifestUrl} does not exist`, "is this the address of a bundle folder?");
  const tree = parseManifestBytes(raw, manifestUrl);
  const { key, signature, message } = signedParts(tree, trusted, manifestUrl);
  if (!(await subtle().verify({ name: "Ed25519" }, key.key, signature, message))) throw badSignature(manifestUrl);
  const manifest = bundleManifest(tree, manifestUrl);
  const verified = new Map();
  for (const entry of manifest.files || []) {
    const data = await fetchBytes(fileUrl(base, entry.path));
    checkEntry(entry, data, data && toHex(await subtle().digest("SHA-256", data)), base.href);
    verified.set(entry.path, data);
  }
  return { manifest, keyId: key.id, file: fileLookup(verified) };
}

/**
 * A Runner over a verified bundle on onnxruntime-web's WASM backend. `wasmPaths`: the folder URL
 * holding onnxruntime-web's .wasm/.mjs files (served by the page's own server, never a CDN).
 */
export async function loadRunner(bundle, { wasmPaths } = {}) {
  if (wasmPaths) ort.env.wasm.wasmPaths = wasmPaths;
  if (!globalThis.crossOriginIsolated) ort.env.wasm.numThreads = 1; // threads need SharedArrayBuffer
  return Runner.load(bundle, ort, async (graph) => {
    try {
      return await ort.InferenceSession.create(graph, {
        executionProviders: ["wasm"], graphOptimizationLevel: "all", executionMode: "sequential", logSeverityLevel: 3,
      });
    } catch (err) {
      throw new BundleError(`onnxruntime-web cannot load model.onnx: ${err.message ?? err}`,
        "the bundle may need a newer onnxruntime-web");
    }
  });
}
