#!/usr/bin/env node
// Run an edgepeft bundle from Node.js, without Python: verify it, load model.onnx into
// onnxruntime-node, feed an adapter's tensors, decode greedily with the KV cache, print the text.
//
//   node run_bundle.mjs --bundle DIR --key device.pub [--adapter NAME] (--prompt TEXT | --chat TEXT)
//                       [--max-new-tokens N] [--json]
//
// Everything it relies on is written down in docs/bundle-format.md; this file is the proof
// that the specification is enough to consume a bundle from another language.

import { parseArgs } from "node:util";

import ort from "onnxruntime-node";

import { expandToSlots, readAdapter } from "./lib/adapter_file.mjs";
import { BundleError, loadTrustedKey, openBundle } from "./lib/bundle.mjs";
import { greedy, openSession } from "./lib/decode.mjs";
import { detachSlots } from "./lib/onnx_slots.mjs";
import { TextCodec } from "./lib/text.mjs";

class UsageError extends BundleError {}

// Slot dims are integers or "rank" / "k*rank"; an adapter of rank r fills them with k*r.
function rankOf(dim, actual) {
  const m = /^\s*(?:(\d+)\s*\*\s*)?rank\s*$/.exec(String(dim));
  if (!m) return null;
  const k = Number(m[1] || 1);
  return actual % k === 0 && actual > 0 ? actual / k : -1;
}

/** The adapter's slot tensors after the checks edgepeft's registry makes (base, task, slots, rank). */
function adapterTensors(bundle, name) {
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

async function main(argv) {
  const { values: opt } = parseArgs({
    args: argv,
    options: {
      bundle: { type: "string" }, key: { type: "string", multiple: true }, adapter: { type: "string" },
      prompt: { type: "string" }, chat: { type: "string" }, "max-new-tokens": { type: "string" },
      json: { type: "boolean", default: false },
    },
  });
  if (!opt.bundle || !opt.key) throw new UsageError("--bundle and --key are required", "see the usage line at the top of run_bundle.mjs");
  if ((opt.prompt === undefined) === (opt.chat === undefined)) throw new UsageError("pass exactly one of --prompt and --chat");

  const bundle = openBundle(opt.bundle, opt.key.map(loadTrustedKey));
  const { manifest } = bundle;
  const model = manifest.model;
  if (manifest.base.task !== "causal-lm") throw new UsageError(`this is a ${manifest.base.task} bundle; this app generates text`);

  const codec = new TextCodec(bundle.file(manifest.tokenizer.file || "tokenizer.json"), manifest.tokenizer);
  const text = opt.chat !== undefined ? codec.render([{ role: "user", content: opt.chat }]) : opt.prompt;
  if (!text.trim()) throw new UsageError("the prompt is empty", "send some text");
  const promptIds = codec.encode(text);
  const gen = manifest.generation || {};
  const maxContext = Math.min(...[gen.max_context, model.max_context].filter(Boolean));
  if (promptIds.length >= maxContext) {
    throw new UsageError(`the prompt is ${promptIds.length} tokens, longer than the context of ${maxContext}`);
  }
  const maxNewTokens = Number(opt["max-new-tokens"] ?? gen.max_new_tokens ?? 128);
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) throw new UsageError("--max-new-tokens must be a positive integer");

  const slotNames = Object.keys(model.slots || {});
  const { model: graph, defaults } = detachSlots(bundle.file(model.graph), slotNames);
  const adapter = opt.adapter ? adapterTensors(bundle, opt.adapter) : { tensors: {}, version: null };
  const session = await openSession(graph, Number(manifest.target?.threads) || 1);
  const slotFeeds = {};
  for (const name of slotNames) {
    const t = adapter.tensors[name] || defaults[name];
    slotFeeds[name] = new ort.Tensor(t.type, t.data, t.dims);
  }
  const { ids, finish } = await greedy(session, model, promptIds, {
    maxNewTokens, maxContext, eosIds: codec.eosIds, slotFeeds,
  });
  const result = {
    text: codec.decode(ids), token_ids: ids, prompt_tokens: promptIds.length, finish_reason: finish,
    adapter: opt.adapter ?? null, adapter_version: adapter.version, key_id: bundle.keyId,
  };
  process.stdout.write(opt.json ? JSON.stringify(result) + "\n" : result.text + "\n");
}

main(process.argv.slice(2)).catch((err) => {
  if (err instanceof BundleError || err?.code?.startsWith?.("ERR_PARSE_ARGS")) {
    process.stderr.write(`error: ${err.message}\n${err.hint ? `hint: ${err.hint}\n` : ""}`);
    process.exit(err instanceof UsageError || !(err instanceof BundleError) ? 2 : 1);
  }
  throw err;
});
