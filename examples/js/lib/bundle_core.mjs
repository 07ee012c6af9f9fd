// The checks of docs/bundle-format.md ("Verifying a bundle") that do not depend on where the bytes
// come from: parse the manifest strictly, find the trusted key that signed it, check its kind and
// schema, and check each listed file's size and SHA-256. The Node entry (bundle.mjs) reads files
// from disk and uses node:crypto; the browser entry (browser.mjs) fetches them and uses WebCrypto.

import { ManifestSyntaxError, canonicalBytes, parseManifestJson, toPlain } from "./canonical_json.mjs";
import { BundleError } from "./errors.mjs";

export const SCHEMA_VERSION = 1; // the newest manifest schema this reader understands

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** The manifest's parse tree (numbers keep their kind, so the signed bytes can be rebuilt). */
export function parseManifestBytes(raw, source) {
  try {
    return parseManifestJson(new TextDecoder("utf-8", { fatal: true }).decode(raw));
  } catch (err) {
    const why = err instanceof ManifestSyntaxError ? err.message : "it is not UTF-8";
    throw new BundleError(`${source} is not a valid manifest: ${why}`, "copy the bundle again");
  }
}

/**
 * What the signature check needs: the trusted key named by the manifest ({key, id} from `trusted`),
 * the signature bytes and the canonical signed bytes. Throws BundleError for an unsigned manifest,
 * a bad signature encoding or a key this app does not trust.
 */
export function signedParts(tree, trusted, source) {
  if (!trusted.length) {
    throw new BundleError("no trusted public key was given, so nothing can be verified", "pass a trusted .pub key");
  }
  const sig = tree instanceof Map ? tree.get("signature") : undefined;
  if (!(sig instanceof Map) || sig.get("algorithm") !== "ed25519") {
    throw new BundleError(`${source} is not signed with ed25519`, "rebuild it with `edgepeft build --key KEY`");
  }
  const value = sig.get("value");
  if (typeof value !== "string" || !BASE64.test(value)) {
    throw new BundleError(`${source}: the signature is not valid base64`);
  }
  const key = trusted.find((k) => k.id === sig.get("key_id"));
  if (!key) {
    throw new BundleError(`${source} was signed by key ${JSON.stringify(sig.get("key_id"))}, which this app does not trust`,
      `trusted key ids: ${trusted.map((k) => k.id).join(", ")}`);
  }
  const signature = Uint8Array.from(atob(value), (c) => c.charCodeAt(0));
  return { key, signature, message: canonicalBytes(tree) };
}

export function badSignature(source) {
  return new BundleError(`${source}: the signature does not match its content (tampered or corrupted)`,
    "fetch the bundle again from its source");
}

/** The manifest as plain values, after checking it is a bundle manifest this reader understands. */
export function bundleManifest(tree, source) {
  const manifest = toPlain(tree);
  if (manifest.kind !== "bundle" || !Number.isInteger(manifest.schema_version)) {
    throw new BundleError(`${source} is not a bundle manifest`, "pass a directory written by `edgepeft build`");
  }
  if (manifest.schema_version > SCHEMA_VERSION) {
    throw new BundleError(`manifest schema ${manifest.schema_version} is newer than this app reads (${SCHEMA_VERSION})`,
      "update the app");
  }
  for (const entry of manifest.files || []) {
    if (!safeRelPath(entry.path)) throw new BundleError(`manifest lists unsafe path ${JSON.stringify(entry.path)}`);
  }
  return manifest;
}

// The manifest's path rule, as contracts/manifest.py writes it: relative, "/"-separated, no empty, "." or ".."
// part, no backslash or control character, at most 1024 characters.
export function safeRelPath(p) {
  return typeof p === "string" && p.length > 0 && p.length <= 1024 && !p.startsWith("/") && !p.includes("\\")
    && !/[\x00-\x1f\x7f]/.test(p) && !p.split("/").some((part) => part === "" || part === "." || part === "..");
}

/** The URL of a listed file below the bundle's folder URL `base`: each part is a file name, percent-encoded,
 * so "%2e%2e" (which URLs read as ".."), "?" and "#" cannot point the fetch outside the bundle. */
export function fileUrl(base, rel) {
  if (!safeRelPath(rel)) throw new BundleError(`manifest lists unsafe path ${JSON.stringify(rel)}`);
  const url = new URL(rel.split("/").map(encodeURIComponent).join("/"), base);
  if (!url.href.startsWith(new URL(base).href)) throw new BundleError(`manifest lists unsafe path ${JSON.stringify(rel)}`);
  return url.href;
}

/** Size, then SHA-256 (lowercase hex) of one listed file; `data` is null when it is missing. */
export function checkEntry(entry, data, sha256hex, where) {
  if (data === null) throw new BundleError(`${entry.path} is missing from ${where}`, "copy the whole bundle again");
  if (data.length !== entry.size) {
    throw new BundleError(`${entry.path} is ${data.length} bytes, the manifest says ${entry.size}`,
      "the file is truncated or replaced; copy the bundle again");
  }
  if (sha256hex !== entry.sha256) {
    throw new BundleError(`${entry.path} does not match its SHA-256 in the manifest (tampered or corrupted)`,
      "copy the bundle again from a trusted source");
  }
}

/** file(relPath) -> the verified bytes; a path the manifest does not list is an error. */
export function fileLookup(verified) {
  return (rel) => {
    const data = verified.get(rel);
    if (data === undefined) throw new BundleError(`the manifest lists no file ${JSON.stringify(rel)}`, "rebuild the bundle");
    return data;
  };
}

export const toHex = (bytes) => Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
