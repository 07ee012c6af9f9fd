// Choosing an adapter from a verified bundle and checking it the way edgepeft's registry does
// (docs/bundle-format.md, "Adapter files"): listed in the manifest, built for this base, a LoRA
// adapter for text generation, every tensor matching a slot's dtype and shape, one rank within the
// bundle's slot rank. Shared by the Node and browser entries; `bundle` is {manifest, file(rel)}.

import { expandToSlots, readAdapter } from "./adapter_file.mjs";
import { BundleError, UsageError } from "./errors.mjs";

// Slot dims are integers or "rank" / "k*rank"; an adapter of rank r fills them with k*r.
function rankOf(dim, actual) {
  const m = /^\s*(?:(\d+)\s*\*\s*)?rank\s*$/.exec(String(dim));
  if (!m) return null;
  const k = Number(m[1] || 1);
  return actual % k === 0 && actual > 0 ? actual / k : -1;
}

/** The adapter's slot tensors after the checks edgepeft's registry makes (base, task, slots, rank). */
export function adapterTensors(bundle, name) {
  const { manifest } = bundle;
  const entry = (manifest.adapters || []).find((a) => a.name === name);
  if (!entry) {
    throw new UsageError(`the bundle has no adapter named ${JSON.stringify(name)}`,
      `known: ${(manifest.adapters || []).map((a) => a.name).join(", ") || "none"}`);
  }
  const source = `adapter ${name} (${entry.file})`;
  if (entry.base_fingerprint !== manifest.base.fingerprint) {
    throw new BundleError(`${source} was built for base ${entry.base_fingerprint}, this bundle's base is ${manifest.base.fingerprint}`);
  }
  if ((entry.task || "causal-lm") !== "causal-lm") throw new BundleError(`${source} is a ${entry.task} adapter`);
  if ((entry.method || "lora") !== "lora") {  // bottleneck slots and prefixes: docs/bundle-format.md 6.3, 6.4
    throw new BundleError(`${source} is a ${entry.method} adapter; this example applies LoRA adapters only`,
      "run it with edgepeft, or extend this consumer as docs/bundle-format.md sections 6.3 and 6.4 describe");
  }
  const tensors = expandToSlots(readAdapter(bundle.file(entry.file), source), source);
  const slots = manifest.model.slots || {};
  const slotTypes = manifest.model.slot_dtypes || {};  // slots that are not float32 (int8 LoRA B)
  const ranks = new Set();
  for (const [tname, t] of Object.entries(tensors)) {
    const dims = slots[tname];
    if (!dims) throw new BundleError(`${source}: tensor ${tname} matches no adapter slot of this graph`);
    const want = slotTypes[tname] === "int8" ? "int8" : "float32";
    if (t.type !== want) throw new BundleError(`${source}: tensor ${tname} is ${t.type}, the slot takes ${want}`);
    if (dims.length !== t.dims.length) throw new BundleError(`${source}: tensor ${tname} has shape [${t.dims}], the slot is [${dims}]`);
    dims.forEach((d, i) => {
      const r = rankOf(d, t.dims[i]);
      if (r === null ? d !== t.dims[i] : r < 1) {
        throw new BundleError(`${source}: tensor ${tname} has shape [${t.dims}], the slot is [${dims}]`);
      }
      if (r !== null) ranks.add(r);
    });
  }
  if (ranks.size > 1) throw new BundleError(`${source}: tensors disagree on the rank (${[...ranks]})`);
  const [rank] = ranks;
  if (manifest.model.slot_rank && rank > manifest.model.slot_rank) {
    throw new BundleError(`${source} has rank ${rank}, above this bundle's slot rank ${manifest.model.slot_rank}`);
  }
  return { tensors, version: entry.version };
}
