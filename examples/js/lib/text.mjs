// Text in and out (docs/bundle-format.md, "Tokenizer and chat template"): the bundle's
// tokenizer.json through @huggingface/tokenizers (a JavaScript port of the Hugging Face
// tokenizers library) and its chat template through @huggingface/jinja, both with the
// settings edgepeft's Python runtime uses: no special tokens added on encode, special tokens
// skipped on decode, no clean-up of tokenization spaces, Jinja with trim_blocks and lstrip_blocks.

import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";

import { BundleError } from "./errors.mjs";

export class TextCodec {
  constructor(tokenizerBytes, info) {
    let spec;
    try {
      spec = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(tokenizerBytes));
      this.tok = new Tokenizer(spec, { clean_up_tokenization_spaces: false });
    } catch (err) {
      throw new BundleError(`cannot read the bundle's tokenizer: ${err.message}`, "the bundle is incomplete; copy it again");
    }
    this.eosIds = (info.eos_token_ids || []).map(Number);
    this.bosToken = info.bos_token ?? "";
    this.eosToken = this.eosIds.length ? this.tok.id_to_token(this.eosIds[0]) ?? "" : "";
    this.template = info.chat_template ? new Template(info.chat_template) : null;
  }

  encode(text) {
    return this.tok.encode(text, { add_special_tokens: false }).ids;
  }

  decode(ids) {
    return this.tok.decode(ids, { skip_special_tokens: true });
  }

  /** The prompt text for chat messages [{role, content}] (edgepeft's plain layout without a template). */
  render(messages) {
    if (!this.template) return messages.map((m) => `${m.role}: ${m.content}\n`).join("") + "assistant:";
    return this.template.render({
      messages, add_generation_prompt: true, bos_token: this.bosToken, eos_token: this.eosToken,
    });
  }
}
