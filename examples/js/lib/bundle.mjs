// Opening a bundle the way a device must (docs/bundle-format.md, "Verifying a bundle"):
// the Ed25519 signature over the canonical manifest bytes first, then the size and SHA-256 of
// every listed file. Each file is read once; the verified bytes are what the app then uses
// (no verify-then-reopen by path, no symlinks).

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import { ManifestSyntaxError, canonicalBytes, parseManifestJson, toPlain } from "./canonical_json.mjs";

export const SCHEMA_VERSION = 1; // the newest manifest schema this reader understands

export class BundleError extends Error {
  constructor(message, hint) {
    super(message);
    this.hint = hint;
  }
}

/** An Ed25519 public key from the PEM file `edgepeft keygen` writes, with its key id. */
export function loadTrustedKey(pemPath) {
  let key;
  try {
    key = crypto.createPublicKey(fs.readFileSync(pemPath));
  } catch (err) {
    throw new BundleError(`cannot read trusted key ${pemPath}: ${err.message}`,
      "pass the .pub file written by `edgepeft keygen`, not the private .key");
  }
  if (key.asymmetricKeyType !== "ed25519") {
    throw new BundleError(`${pemPath} is not an Ed25519 key`, "create one with `edgepeft keygen`");
  }
  const raw = Buffer.from(key.export({ format: "jwk" }).x, "base64url");
  return { key, id: crypto.createHash("sha256").update(raw).digest("hex").slice(0, 16) };
}

function readNoFollow(file) {
  let fd;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch (err) {
    if (err.code === "ENOENT") return null;
    if (err.code === "ELOOP") throw new BundleError(`${file} is a symbolic link`, "bundles hold plain files only");
    throw new BundleError(`cannot read ${file}: ${err.message}`, "check the bundle's permissions");
  }
  try {
    if (!fs.fstatSync(fd).isFile()) throw new BundleError(`${file} is not a regular file`, "copy the bundle again");
    return fs.readFileSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function safeRelPath(p) {
  return typeof p === "string" && p.length > 0 && !p.startsWith("/") && !p.includes("\\")
    && !p.split("/").includes("..");
}

/**
 * Verify `dir` against `trusted` ([{key, id}]) and return {manifest, keyId, file(relPath) -> Buffer}.
 * Throws BundleError naming what failed.
 */
export function openBundle(dir, trusted) {
  const manifestPath = path.join(dir, "manifest.json");
  const raw = readNoFollow(manifestPath);
  if (raw === null) throw new BundleError(`${manifestPath} does not exist`, "is this a bundle directory?");
  let tree;
  try {
    tree = parseManifestJson(new TextDecoder("utf-8", { fatal: true }).decode(raw));
  } catch (err) {
    const why = err instanceof ManifestSyntaxError ? err.message : "it is not UTF-8";
    throw new BundleError(`${manifestPath} is not a valid manifest: ${why}`, "copy the bundle again");
  }
  const keyId = checkSignature(tree, trusted, manifestPath);
  const manifest = toPlain(tree);
  if (manifest.kind !== "bundle" || !Number.isInteger(manifest.schema_version)) {
    throw new BundleError(`${manifestPath} is not a bundle manifest`, "pass a directory written by `edgepeft build`");
  }
  if (manifest.schema_version > SCHEMA_VERSION) {
    throw new BundleError(`manifest schema ${manifest.schema_version} is newer than this app reads (${SCHEMA_VERSION})`,
      "update the app");
  }
  const verified = new Map();
  for (const entry of manifest.files || []) {
    if (!safeRelPath(entry.path)) throw new BundleError(`manifest lists unsafe path ${JSON.stringify(entry.path)}`);
    const data = readNoFollow(path.join(dir, entry.path));
    if (data === null) throw new BundleError(`${entry.path} is missing from ${dir}`, "copy the whole bundle again");
    if (data.length !== entry.size) {
      throw new BundleError(`${entry.path} is ${data.length} bytes, the manifest says ${entry.size}`,
        "the file is truncated or replaced; copy the bundle again");
    }
    if (crypto.createHash("sha256").update(data).digest("hex") !== entry.sha256) {
      throw new BundleError(`${entry.path} does not match its SHA-256 in the manifest (tampered or corrupted)`,
        "copy the bundle again from a trusted source");
    }
    verified.set(entry.path, data);
  }
  const file = (rel) => {
    const data = verified.get(rel);
    if (data === undefined) throw new BundleError(`the manifest lists no file ${JSON.stringify(rel)}`, "rebuild the bundle");
    return data;
  };
  return { manifest, keyId, file };
}

function checkSignature(tree, trusted, source) {
  if (!trusted.length) {
    throw new BundleError("no trusted public key was given, so nothing can be verified", "pass --key with a .pub file");
  }
  const sig = tree instanceof Map ? tree.get("signature") : undefined;
  if (!(sig instanceof Map) || sig.get("algorithm") !== "ed25519") {
    throw new BundleError(`${source} is not signed with ed25519`, "rebuild it with `edgepeft build --key KEY`");
  }
  const value = sig.get("value");
  if (typeof value !== "string" || !/^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/.test(value)) {
    throw new BundleError(`${source}: the signature is not valid base64`);
  }
  const key = trusted.find((k) => k.id === sig.get("key_id"));
  if (!key) {
    throw new BundleError(`${source} was signed by key ${JSON.stringify(sig.get("key_id"))}, which this app does not trust`,
      `trusted key ids: ${trusted.map((k) => k.id).join(", ")}`);
  }
  if (!crypto.verify(null, canonicalBytes(tree), key.key, Buffer.from(value, "base64"))) {
    throw new BundleError(`${source}: the signature does not match its content (tampered or corrupted)`,
      "fetch the bundle again from its source");
  }
  return key.id;
}
