// Opening a bundle from disk the way a device must (docs/bundle-format.md, "Verifying a bundle"):
// the Ed25519 signature over the canonical manifest bytes first, then the size and SHA-256 of
// every listed file. Each file is read once; the verified bytes are what the app then uses
// (no verify-then-reopen by path, no symlinks). The checks themselves are bundle_core.mjs's,
// shared with the browser entry.

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import {
  SCHEMA_VERSION, badSignature, bundleManifest, checkEntry, fileLookup, parseManifestBytes, signedParts,
} from "./bundle_core.mjs";
import { BundleError } from "./errors.mjs";

export { BundleError, SCHEMA_VERSION };

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

/**
 * Verify `dir` against `trusted` ([{key, id}]) and return {manifest, keyId, file(relPath) -> Buffer}.
 * Throws BundleError naming what failed.
 */
export function openBundle(dir, trusted) {
  const manifestPath = path.join(dir, "manifest.json");
  const raw = readNoFollow(manifestPath);
  if (raw === null) throw new BundleError(`${manifestPath} does not exist`, "is this a bundle directory?");
  const tree = parseManifestBytes(raw, manifestPath);
  const { key, signature, message } = signedParts(tree, trusted, manifestPath);
  if (!crypto.verify(null, message, key.key, signature)) throw badSignature(manifestPath);
  const manifest = bundleManifest(tree, manifestPath);
  const verified = new Map();
  for (const entry of manifest.files || []) {
    const data = readNoFollow(path.join(dir, entry.path));
    checkEntry(entry, data, data && crypto.createHash("sha256").update(data).digest("hex"), dir);
    verified.set(entry.path, data);
  }
  return { manifest, keyId: key.id, file: fileLookup(verified) };
}
