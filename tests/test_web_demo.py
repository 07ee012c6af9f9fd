"""examples/web in a real browser (Debian's Chromium through Playwright): the page opens a tiny int4 bundle
served by `python -m http.server`, verifies it with WebCrypto, runs it on onnxruntime-web (WASM) and must give
the Python engine's greedy token ids with and without an adapter, switching adapters without reloading the
model. A flipped byte, a foreign key and an adapter for another base are refused on the page with the reason.

Needs `npm ci` in examples/js (the test does it, as tests/test_js_consumer.py does) for the pinned
onnxruntime-web, @huggingface/tokenizers and @huggingface/jinja the page imports; without node/npm it skips.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from browser_support import ROOT, browser_page, require_browser, screenshot, wait_until
from js_support import npm_ci

CHROMIUM = require_browser()
NPM = shutil.which("npm")
if NPM is None:
    pytest.skip("npm is needed to install the page's pinned packages (apt-get install npm); "
                "THE BROWSER RUNTIME IS NOT CHECKED IN THIS RUN", allow_module_level=True)
from test_runtime_support import cached_bundle, require_fixtures, resign_bundle  # noqa: E402

require_fixtures()
from edgepeft.runtime import Engine  # noqa: E402


@pytest.fixture(scope="module")
def node_modules():
    modules = npm_ci(NPM)
    assert (modules / "onnxruntime-web" / "dist" / "ort-wasm-simd-threaded.wasm").is_file()
    return modules


def fp32_compute_copy(built: dict, out) -> dict:
    """The int4 bundle with MatMulNBits at accuracy_level 1 (fp32 compute), signed again. edgepeft builds int4 at
    accuracy_level 4 (int8 activations on x86's MLAS kernels); onnxruntime-web's WASM kernels compute such
    nodes another way, so on this tiny random model (near-tied logits) greedy picks can differ. At level 1
    both compute in fp32 and must agree token for token."""
    import hashlib

    import onnx

    out = resign_bundle(built, out)
    graph_file = out / built["manifest"]["model"]["graph"]
    model = onnx.load(str(graph_file))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 1
    onnx.save(model, str(graph_file))
    data = graph_file.read_bytes()
    files = [dict(f, size=len(data), sha256=hashlib.sha256(data).hexdigest()) if f["path"] == built["manifest"]["model"]["graph"]
             else f for f in built["manifest"]["files"]]
    shutil.rmtree(out)
    resign_bundle(built, out, files=files)
    graph_file.write_bytes(data)
    return {**built, "bundle": out, "manifest": json.loads((out / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def site(node_modules, tmp_path_factory):
    """A folder served on 127.0.0.1: examples/ (the page and node_modules), the bundle, a flipped copy, a copy
    whose adapter names another base, the trusted key and a foreign one."""
    from edgepeft.contracts.signing import generate_keypair

    root = tmp_path_factory.mktemp("site")
    b = fp32_compute_copy(cached_bundle("decoder-int4", tmp_path_factory), root / "int4-fp32-compute")
    (root / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    shutil.copytree(b["bundle"], root / "bundle")
    shutil.copyfile(b["public_key"], root / "key.pub")
    _, other = generate_keypair(root / "keys" / "other")
    shutil.copyfile(other, root / "other.pub")
    shutil.copytree(b["bundle"], root / "flipped")
    f = root / "flipped" / "adapters" / "alpha-1.onnx_adapter"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    adapters = [dict(a, base_fingerprint="0" * 64) if a["name"] == "beta" else a for a in b["manifest"]["adapters"]]
    resign_bundle(b, root / "foreign-base", adapters=adapters)
    web = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                            str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    port = web.stdout.readline().decode().split(" port ")[1].split()[0]
    yield {"url": f"http://127.0.0.1:{port}", "built": b, "root": root}
    web.terminate()
    web.wait(10)
    web.stdout.close()


def _open(page, site, bundle="/bundle/", key="/key.pub"):
    page.goto(f"{site['url']}/examples/web/index.html?bundle={bundle}&key={key}")
    return wait_until(page, "['ready', 'refused'].includes(document.body.dataset.state) && document.body.dataset.state", 120)


def _ask(page, *, adapter, text, chat, tokens=16):
    page.select_option("#adapter", adapter or "")
    page.set_checked("#chat", chat)
    page.fill("#max-tokens", str(tokens))
    page.fill("#prompt", text)
    page.click("#generate")
    state = wait_until(page, "['done', 'refused'].includes(document.body.dataset.state) && document.body.dataset.state", 120)
    assert state == "done", page.evaluate("window.edgepeftDemo.error")
    return page.evaluate("window.edgepeftDemo.last")


def test_the_page_answers_as_the_python_engine_and_swaps_adapters_without_reloading(site, tmp_path):
    b = site["built"]
    engine = Engine(b["bundle"], [b["public_key"]])
    cases = [(None, "the tin ünï ☃", False), ("alpha", "the tin ünï ☃", False), ("beta", "hello how can i help", True),
             (None, "hello how can i help", True), ("alpha", "héllo ☃ wörld", True)]
    with browser_page(CHROMIUM) as page:
        assert _open(page, site) == "ready", page.evaluate("window.edgepeftDemo.error")
        assert "files verified" in page.inner_text("#status")
        page.evaluate("window.firstSession = window.edgepeftDemo.runner.session")
        for adapter, text, chat in cases:
            if chat:
                want = engine.generate(messages=[{"role": "user", "content": text}], adapter=adapter, max_new_tokens=16)
            else:
                want = engine.generate(text, adapter=adapter, max_new_tokens=16)
            got = _ask(page, adapter=adapter, text=text, chat=chat)
            assert got["token_ids"] == want.token_ids, (adapter, text)
            assert got["text"] == want.text and got["finish_reason"] == want.finish_reason
            assert got["adapter"] == adapter and page.inner_text("#output") == want.text
            meta = page.inner_text("#meta")
            version = next((a["version"] for a in b["manifest"]["adapters"] if a["name"] == adapter), None)
            assert (f"adapter {adapter} v{version}" if adapter else "the base model") in meta and "tokens/s" in meta
        # one model session served every adapter: switching never reloaded the model
        assert page.evaluate("window.firstSession === window.edgepeftDemo.runner.session")
        _ask(page, adapter="alpha", text="hello how can i help", chat=True, tokens=24)
        screenshot(page, tmp_path / "out" / "web-demo.png")


@pytest.mark.parametrize("bundle, key, adapter, reason", [
    ("/flipped/", "/key.pub", None, "adapters/alpha-1.onnx_adapter does not match its SHA-256 in the manifest"),
    ("/bundle/", "/other.pub", None, "which this app does not trust"),
    ("/foreign-base/", "/key.pub", "beta", "was built for base 0000000000000000"),
])
def test_the_page_refuses_with_the_reason(site, tmp_path, bundle, key, adapter, reason):
    with browser_page(CHROMIUM) as page:
        state = _open(page, site, bundle, key)
        if adapter:  # the bundle itself is fine; the adapter is refused when it is asked for
            assert state == "ready"
            page.select_option("#adapter", adapter)
            page.click("#generate")
            state = wait_until(page, "document.body.dataset.state === 'refused' && 'refused'", 60)
        assert state == "refused"
        assert page.is_visible("#ask-form") == bool(adapter)  # a refused bundle cannot be asked anything
        assert page.is_visible("#refusal") and reason in page.inner_text("#refusal-reason")
        assert page.inner_text("#output") == ""
        if bundle == "/flipped/":
            screenshot(page, tmp_path / "out" / "web-demo-refused.png")


def test_the_page_may_load_its_own_files_only(site):
    """The page's Content-Security-Policy: its import map is allowed by its hash (kept in step here), and a
    fetch to another origin (a bundle or key some link points at) is refused by the browser."""
    import base64
    import hashlib
    import re

    html = (ROOT / "examples" / "web" / "index.html").read_text(encoding="utf-8")
    imports = re.search(r'<script type="importmap">(.*?)</script>', html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(imports.encode("utf-8")).digest()).decode("ascii")
    assert f"'sha256-{digest}'" in html, "update the CSP's hash of the import map in examples/web/index.html"
    with browser_page(CHROMIUM) as page:
        assert _open(page, site) == "ready"  # the page works under its policy
        violated = page.evaluate("""async () => {
            let directive = null;
            document.addEventListener("securitypolicyviolation", (e) => { directive = e.effectiveDirective; });
            try { await fetch("http://localhost:9/key.pub"); } catch (err) { /* refused */ }
            await new Promise((r) => setTimeout(r, 100));
            return directive;
        }""")
        assert violated == "connect-src"


@pytest.mark.slow
def test_the_page_runs_the_real_smollm2_int4_bundle_as_the_engine_does(node_modules, tmp_path):
    """The Raspberry Pi 5 bundle of the demo (SmolLM2-135M-Instruct, int4 at edgepeft's accuracy_level 4) in the
    page: its real tokenizer and chat template through the browser entry, and the Python engine's 40 tokens."""
    from edgepeft.bundle.build import build_bundle
    from edgepeft.contracts.signing import generate_keypair

    site = tmp_path / "site"
    priv, pub = generate_keypair(site / "keys" / "fleet")
    res = build_bundle(base=None, adapters=[], target="raspberry-pi-5", key=priv, out=site / "bundles" / "pi5",
                       quant="int4")
    (site / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    chat = "My Wi-Fi keeps dropping every evening. What should I do?"
    want = Engine(res.bundle_dir, [pub]).generate(messages=[{"role": "user", "content": chat}], max_new_tokens=40)
    web = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                            str(site)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        port = web.stdout.readline().decode().split(" port ")[1].split()[0]
        with browser_page(CHROMIUM) as page:
            assert _open(page, {"url": f"http://127.0.0.1:{port}"}, "/bundles/pi5/", "/keys/fleet.pub") == "ready"
            got = _ask(page, adapter=None, text=chat, chat=True, tokens=40)
            assert got["token_ids"] == want.token_ids and got["text"] == want.text
            screenshot(page, tmp_path / "out" / "web-demo-smollm2.png", "web-demo.png")
    finally:
        web.terminate()
        web.wait(10)
        web.stdout.close()
