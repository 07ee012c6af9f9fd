"""The bundle format is enough for a non-Python consumer: examples/js (Node.js, onnxruntime-node) opens
the same tiny bundles as the Python Engine and must give the same greedy answer, refuse the same
tampering, and compute the same signed bytes (docs/bundle-format.md is what it was written from).

Needs node and npm; `npm ci` installs the pinned packages into examples/js/node_modules (once per
lockfile). Without node or npm the module is skipped with the reason.
"""

from __future__ import annotations

import base64
import json
import math
import random
import shutil
import struct
import subprocess

import pytest
from conftest import ROOT
from js_support import npm_ci

JS = ROOT / "examples" / "js"
NODE, NPM = shutil.which("node"), shutil.which("npm")
if not (NODE and NPM):
    pytest.skip("node and npm are needed for the JavaScript consumer test (apt-get install nodejs npm); "
                "THE NON-PYTHON CONSUMER IS NOT CHECKED IN THIS RUN", allow_module_level=True)
from test_runtime_support import cached_bundle, require_fixtures  # noqa: E402

require_fixtures()

from edgepeft.contracts.manifest import canonical_bytes  # noqa: E402
from edgepeft.runtime import Engine  # noqa: E402


@pytest.fixture(scope="module")
def node_modules():
    return npm_ci(NPM)


def _node(args, *, stdin: str | None = None, check: bool = True):
    proc = subprocess.run([NODE, *args], cwd=JS, capture_output=True, text=True, timeout=120, input=stdin)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _run_js(b, *, adapter=None, prompt=None, chat=None, tokens=16, check=True, bundle=None):
    args = ["run_bundle.mjs", "--bundle", str(bundle or b["bundle"]), "--key", str(b["public_key"]),
            "--max-new-tokens", str(tokens), "--json"]
    args += ["--adapter", adapter] if adapter else []
    args += ["--prompt", prompt] if prompt is not None else ["--chat", chat]
    proc = _node(args, check=check)
    return json.loads(proc.stdout) if check else proc


CASES = [  # (fixture kind, adapter, prompt, chat)
    ("decoder", None, "the tin ünï ☃", None),
    ("decoder", "alpha", "the tin ünï ☃", None),
    ("decoder", "beta", "hello how can i help", None),
    ("decoder", "beta", None, "héllo ☃ wörld"),
    ("decoder-int4", "alpha", "the tin ünï ☃", None),  # int4 MatMulNBits, fp16 adapter expanded in JS
    ("decoder-int4", None, None, "hello how can i help"),
]


@pytest.mark.parametrize("kind, adapter, prompt, chat", CASES)
def test_js_app_answers_exactly_as_the_python_engine(node_modules, tmp_path_factory, kind, adapter, prompt, chat):
    b = cached_bundle(kind, tmp_path_factory)
    engine = Engine(b["bundle"], [b["public_key"]])
    if chat is None:
        want = engine.generate(prompt, adapter=adapter, max_new_tokens=16)
    else:
        want = engine.generate(messages=[{"role": "user", "content": chat}], adapter=adapter, max_new_tokens=16)
    got = _run_js(b, adapter=adapter, prompt=prompt, chat=chat)
    assert got["token_ids"] == want.token_ids
    assert got["text"] == want.text
    assert got["prompt_tokens"] == want.prompt_tokens and got["finish_reason"] == want.finish_reason
    assert got["adapter"] == adapter and got["key_id"] == b["manifest"]["signature"]["key_id"]


def test_js_app_refuses_what_the_engine_refuses(node_modules, tmp_path_factory, tmp_path):
    from edgepeft.contracts.signing import generate_keypair

    b = cached_bundle("decoder", tmp_path_factory)
    flipped = tmp_path / "flipped"
    shutil.copytree(b["bundle"], flipped)
    data = bytearray((flipped / "adapters/alpha-1.onnx_adapter").read_bytes())
    data[-5] ^= 0xFF
    (flipped / "adapters/alpha-1.onnx_adapter").write_bytes(bytes(data))
    edited = tmp_path / "edited"
    shutil.copytree(b["bundle"], edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["generation"]["max_new_tokens"] = 9999
    (edited / "manifest.json").write_text(json.dumps(m, indent=2, ensure_ascii=False))
    _, other_pub = generate_keypair(tmp_path / "other")
    for bundle, key, extra, code, match in [
        (flipped, b["public_key"], [], 1, "alpha-1.onnx_adapter does not match its SHA-256"),
        (edited, b["public_key"], [], 1, "signature does not match its content"),
        (b["bundle"], other_pub, [], 1, "which this app does not trust"),
        (b["bundle"], b["public_key"], ["--adapter", "nope"], 2, "no adapter named \"nope\""),
        (b["bundle"], b["public_key"], ["--prompt", " "], 2, "the prompt is empty"),
    ]:
        args = ["run_bundle.mjs", "--bundle", str(bundle), "--key", str(key), "--json", *extra]
        if "--prompt" not in extra:
            args += ["--prompt", "hi"]
        proc = _node(args, check=False)
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.startswith("error: ") and match in proc.stderr, proc.stderr
        assert proc.stdout == ""


def test_js_app_refuses_families_it_does_not_apply_and_still_runs_lora_from_the_same_bundle(node_modules,
                                                                                           tmp_path_factory):
    b = cached_bundle("families", tmp_path_factory)
    for name, method in (("pre", "prefix-tuning"), ("prm", "prompt-tuning"), ("bn", "bottleneck")):
        proc = _run_js(b, adapter=name, prompt="hi", check=False)
        assert proc.returncode == 1 and f"is a {method} adapter; this example applies LoRA" in proc.stderr
    want = Engine(b["bundle"], [b["public_key"]]).generate("the tin", adapter="voice", max_new_tokens=8)
    assert _run_js(b, adapter="voice", prompt="the tin", tokens=8)["token_ids"] == want.token_ids


def _random_doubles(n: int, seed: int = 7) -> list[float]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        x = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(x):
            out.append(x)
    return out


def test_js_canonical_bytes_equal_python_canonical_bytes(node_modules):
    """The signed bytes are Python's json.dumps form; the JS reimplementation must agree byte for byte on
    what JSON.stringify gets wrong: float spelling, code-point key order, escapes, big integers."""
    floats = [0.0, -0.0, 1.0, 8.0, 0.1, 1e-4, 1e-5, 1.5e-5, 123456789012345.6, 1e15, 1e16, 1.25e16, 1e22,
              5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -2.5, 0.30000000000000004, 1e-06, 3e21]
    floats += _random_doubles(2000) + [random.Random(3).uniform(-1e6, 1e6) for _ in range(500)]
    docs = [{"f": x} for x in floats]
    docs += [
        {"\uffff": 1, "\U0001F600": 2, "a": 3, "é": 4, "": 5, "\ue000": 6},  # UTF-16 order differs from code points
        {"s": "quote\" back\\ nl\n tab\t cr\r bs\b ff\f nul\x00 us\x1f del\x7f ls\u2028 ☃ 😀 é"},
        {"big": 2 ** 64 + 1, "neg": -(2 ** 70), "zero": 0, "list": [1, 1.0, True, False, None, [], {}]},
        {"nested": {"z": {"b": [0.5, {"y": 1, "x": 2}]}, "a": "x"}, "signature": {"dropped": True}},
    ]
    texts = [json.dumps(d, ensure_ascii=bool(i % 2)) for i, d in enumerate(docs)]  # both spellings of strings
    script = ("import { canonicalBytes, parseManifestJson } from './lib/canonical_json.mjs';"
              "let s = ''; process.stdin.on('data', (c) => s += c).on('end', () => {"
              "const out = JSON.parse(s).map((t) => Buffer.from(canonicalBytes(parseManifestJson(t))).toString('base64'));"
              "process.stdout.write(JSON.stringify(out)); });")
    got = json.loads(_node(["--input-type=module", "-e", script], stdin=json.dumps(texts)).stdout)
    for text, b64 in zip(texts, got):
        assert base64.b64decode(b64) == canonical_bytes(json.loads(text)), text
    assert len(got) == len(texts)


@pytest.mark.slow
def test_js_app_on_the_real_smollm2_int4_bundle(node_modules, tmp_path):
    """The real tokenizer and chat template (SmolLM2-135M-Instruct, int4 for a Raspberry Pi 5) through
    @huggingface/tokenizers and @huggingface/jinja give the Python engine's answer token for token."""
    from edgepeft.bundle.build import build_bundle
    from edgepeft.contracts.signing import generate_keypair

    priv, pub = generate_keypair(tmp_path / "keys" / "fleet")
    res = build_bundle(base=None, adapters=[], target="raspberry-pi-5", key=priv, out=tmp_path / "pi5", quant="int4")
    engine = Engine(res.bundle_dir, [pub])
    chat = "My Wi-Fi keeps dropping every evening. What should I do?"
    want = engine.generate(messages=[{"role": "user", "content": chat}], max_new_tokens=40)
    got = _run_js({"bundle": res.bundle_dir, "public_key": pub}, chat=chat, tokens=40)
    assert got["token_ids"] == want.token_ids and got["text"] == want.text
    assert len(want.token_ids) >= 10  # a real answer, not an immediate end of turn


def test_js_path_rule_is_the_manifests_and_file_urls_stay_in_the_bundle():
    """bundle_core.mjs refuses the paths contracts/manifest.py refuses, and the browser entry's file URLs
    cannot leave the bundle's folder: a URL reads "%2e%2e" as "..", so each part is encoded as a file name."""
    from edgepeft.contracts.manifest import _safe_relpath  # the rule itself; no public name of its own
    from edgepeft.errors import SpecError

    paths = ["model.onnx", "adapters/a.onnx_adapter", "%2e%2e/%2e%2e/keys/fleet.key", "a?x", "a#b", "./x", "a/./b",
             "a//b", "..", "a/../b", "a\u0001", "a\x7f", "/x", "a\\b", "", "x" * 1025, "x" * 1024]
    script = ("import { safeRelPath, fileUrl } from './lib/bundle_core.mjs';"
              "let s = ''; process.stdin.on('data', (c) => s += c).on('end', () => {"
              "const base = 'http://127.0.0.1:8000/out/demo/bundles/pi5/';"
              "process.stdout.write(JSON.stringify(JSON.parse(s).map((p) => {"
              "  try { return [safeRelPath(p), fileUrl(base, p)]; } catch (e) { return [safeRelPath(p), null]; } }))); });")
    got = json.loads(_node(["--input-type=module", "-e", script], stdin=json.dumps(paths)).stdout)
    for p, (ok, url) in zip(paths, got):
        try:
            _safe_relpath(p, "m", "files")
            python_ok = True
        except SpecError:
            python_ok = False
        assert ok is python_ok, p
        assert (url is not None) is ok, p
        if url is not None:
            assert url.startswith("http://127.0.0.1:8000/out/demo/bundles/pi5/"), url
    assert dict(zip(paths, got))["%2e%2e/%2e%2e/keys/fleet.key"][1].endswith("/pi5/%252e%252e/%252e%252e/keys/fleet.key")
