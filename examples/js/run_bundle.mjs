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

import { loadTrustedKey, openBundle } from "./lib/bundle.mjs";
import { openSession } from "./lib/decode.mjs";
import { BundleError, UsageError } from "./lib/errors.mjs";
import { Runner } from "./lib/runner.mjs";

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
  const maxNewTokens = opt["max-new-tokens"] === undefined ? undefined : Number(opt["max-new-tokens"]);
  if (maxNewTokens !== undefined && (!Number.isInteger(maxNewTokens) || maxNewTokens < 1)) {
    throw new UsageError("--max-new-tokens must be a positive integer");
  }
  const threads = Number(bundle.manifest.target?.threads) || 1;
  const runner = await Runner.load(bundle, ort, (graph) => openSession(graph, threads));
  const result = await runner.generate({ prompt: opt.prompt, chat: opt.chat, adapter: opt.adapter ?? null, maxNewTokens });
  process.stdout.write(opt.json ? JSON.stringify(result) + "\n" : result.text + "\n");
}

main(process.argv.slice(2)).catch((err) => {
  if (err instanceof BundleError || err?.code?.startsWith?.("ERR_PARSE_ARGS")) {
    process.stderr.write(`error: ${err.message}\n${err.hint ? `hint: ${err.hint}\n` : ""}`);
    process.exit(err instanceof UsageError || !(err instanceof BundleError) ? 2 : 1);
  }
  throw err;
});
