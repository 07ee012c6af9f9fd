// One loaded bundle that answers prompts, shared by the Node and browser entries: the model is
// loaded once (slots detached, one session) and each request feeds its adapter's tensors, so
// switching adapters never reloads the model. Adapter tensors are read and checked on first use
// and kept. `ort` is onnxruntime-node or onnxruntime-web; `createSession(bytes)` makes the session.

import { adapterTensors } from "./adapters.mjs";
import { UsageError } from "./errors.mjs";
import { greedy } from "./generate.mjs";
import { detachSlots } from "./onnx_slots.mjs";
import { TextCodec } from "./text.mjs";

export class Runner {
  /** `bundle` is a verified {manifest, keyId, file(rel)}. Throws BundleError / UsageError. */
  static async load(bundle, ort, createSession) {
    const { manifest } = bundle;
    if (manifest.base?.task !== "causal-lm") {
      throw new UsageError(`this is a ${manifest.base?.task} bundle; this app generates text`);
    }
    const codec = new TextCodec(bundle.file(manifest.tokenizer.file || "tokenizer.json"), manifest.tokenizer);
    const slotNames = Object.keys(manifest.model.slots || {});
    const { model: graph, defaults } = detachSlots(bundle.file(manifest.model.graph), slotNames);
    const session = await createSession(graph);
    return new Runner(bundle, ort, session, codec, slotNames, defaults);
  }

  constructor(bundle, ort, session, codec, slotNames, defaults) {
    Object.assign(this, { bundle, ort, session, codec, slotNames, defaults });
    this.adapters = new Map(); // name -> {tensors, version}, checked once
  }

  /** [{name, version}] of the bundle's adapters. */
  adapterList() {
    return (this.bundle.manifest.adapters || []).map((a) => ({ name: a.name, version: a.version, method: a.method || "lora" }));
  }

  adapter(name) {
    if (!this.adapters.has(name)) this.adapters.set(name, adapterTensors(this.bundle, name));
    return this.adapters.get(name);
  }

  /**
   * Generate for one request: exactly one of `prompt` (raw text) and `chat` (one user message);
   * `adapter` a name or null; `onToken(id, ids)` sees each token as it comes.
   * Returns {text, token_ids, prompt_tokens, finish_reason, adapter, adapter_version, key_id}.
   */
  async generate({ prompt, chat, adapter = null, maxNewTokens, onToken } = {}) {
    const { manifest, keyId } = this.bundle;
    if ((prompt === undefined) === (chat === undefined)) throw new UsageError("pass exactly one of prompt and chat");
    const text = chat !== undefined ? this.codec.render([{ role: "user", content: chat }]) : prompt;
    if (!text.trim()) throw new UsageError("the prompt is empty", "send some text");
    const promptIds = this.codec.encode(text);
    const gen = manifest.generation || {};
    const maxContext = Math.min(...[gen.max_context, manifest.model.max_context].filter(Boolean));
    if (promptIds.length >= maxContext) {
      throw new UsageError(`the prompt is ${promptIds.length} tokens, longer than the context of ${maxContext}`);
    }
    const budget = Number(maxNewTokens ?? gen.max_new_tokens ?? 128);
    if (!Number.isInteger(budget) || budget < 1) throw new UsageError("max new tokens must be a positive integer");
    const chosen = adapter ? this.adapter(adapter) : { tensors: {}, version: null };
    const slotFeeds = {};
    for (const name of this.slotNames) {
      const t = chosen.tensors[name] || this.defaults[name];
      slotFeeds[name] = new this.ort.Tensor(t.type, t.data, t.dims);
    }
    const { ids, finish } = await greedy(this.ort, this.session, manifest.model, promptIds, {
      maxNewTokens: budget, maxContext, eosIds: this.codec.eosIds, slotFeeds, onToken,
    });
    return {
      text: this.codec.decode(ids), token_ids: ids, prompt_tokens: promptIds.length, finish_reason: finish,
      adapter: adapter ?? null, adapter_version: chosen.version, key_id: keyId,
    };
  }
}
