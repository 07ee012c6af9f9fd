// The demo page: open a bundle (?bundle=URL&key=URL), pick an adapter, type a prompt, watch the
// tokens stream. Everything from the bundle is shown with textContent. The trusted key is fetched
// from a URL here for the demo; a real app ships its trusted key inside its own code.

import { BundleError, fetchBundle, importTrustedKey, loadRunner } from "../js/lib/browser.mjs";

const $ = (id) => document.getElementById(id);
const WASM = new URL("../js/node_modules/onnxruntime-web/dist/", import.meta.url).href;
const state = { runner: null, busy: false, last: null, error: null };
window.edgepeftDemo = state; // for tests and the console: the last result and the last refusal

function refuse(err) {
  state.error = { message: err.message, hint: err.hint ?? null, kind: err instanceof BundleError ? "bundle" : "error" };
  $("refusal").hidden = false;
  $("refusal-reason").textContent = err.message;
  $("refusal-hint").textContent = err.hint ? `hint: ${err.hint}` : "";
}

function clearRefusal() {
  state.error = null;
  $("refusal").hidden = true;
}

async function fetchText(url) {
  const res = await fetch(url, { cache: "no-store" });
  if (!res.ok) throw new BundleError(`cannot fetch the trusted key ${url}: HTTP ${res.status}`, "check the key's URL");
  return res.text();
}

async function open(bundleUrl, keyUrl) {
  clearRefusal();
  state.runner = null;
  $("ask-form").hidden = true;
  $("status").textContent = "verifying the bundle…";
  document.body.dataset.state = "opening";
  try {
    const key = await importTrustedKey(await fetchText(keyUrl), keyUrl);
    const t0 = performance.now();
    const bundle = await fetchBundle(bundleUrl, [key]);
    $("status").textContent = "verified; loading model.onnx into onnxruntime-web…";
    state.runner = await loadRunner(bundle, { wasmPaths: WASM });
    const m = bundle.manifest;
    const select = $("adapter");
    select.replaceChildren(new Option("(base model, no adapter)", ""));
    for (const a of state.runner.adapterList()) select.append(new Option(`${a.name} v${a.version}`, a.name));
    $("status").textContent = `${m.base?.name ?? "bundle"} for ${m.target?.name ?? "?"}: signed by key ${bundle.keyId}, `
      + `${(m.files || []).length} files verified, loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
    $("ask-form").hidden = false;
    document.body.dataset.state = "ready";
  } catch (err) {
    $("status").textContent = "no bundle open";
    document.body.dataset.state = "refused";
    refuse(err);
  }
}

async function generate() {
  if (!state.runner || state.busy) return;
  state.busy = true;
  clearRefusal();
  document.body.dataset.state = "generating";
  $("generate").disabled = true;
  $("output").textContent = "";
  $("meta").textContent = "";
  const adapter = $("adapter").value || null;
  const text = $("prompt").value;
  const t0 = performance.now();
  let first = null;
  try {
    const result = await state.runner.generate({
      ...($("chat").checked ? { chat: text } : { prompt: text }),
      adapter, maxNewTokens: Number($("max-tokens").value),
      onToken: async (id, ids) => {
        first ??= performance.now();
        $("output").textContent = state.runner.codec.decode(ids);
        await new Promise((r) => setTimeout(r, 0)); // let the page paint each token
      },
    });
    const secs = (performance.now() - (first ?? t0)) / 1000;
    const rate = result.token_ids.length > 1 ? (result.token_ids.length - 1) / secs : 0;
    $("output").textContent = result.text;
    $("meta").textContent = `answered by ${adapter ? `adapter ${adapter} v${result.adapter_version}` : "the base model"}`
      + ` · ${result.token_ids.length} tokens (${result.finish_reason}) · ${rate.toFixed(1)} tokens/s`;
    state.last = result;
    document.body.dataset.state = "done";
  } catch (err) {
    document.body.dataset.state = "refused";
    refuse(err);
  } finally {
    state.busy = false;
    $("generate").disabled = false;
  }
}

$("open-form").addEventListener("submit", (e) => { e.preventDefault(); open($("bundle-url").value, $("key-url").value); });
$("ask-form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
const params = new URLSearchParams(location.search);
$("bundle-url").value = params.get("bundle") ?? "";
$("key-url").value = params.get("key") ?? "";
document.body.dataset.state = "idle";
if (params.get("bundle") && params.get("key")) open(params.get("bundle"), params.get("key"));
