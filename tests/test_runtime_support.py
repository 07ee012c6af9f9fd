"""Helpers for the runtime tests (no tests here): tiny signed bundles built through edgepeft's own
exporter and bundle builder, with a byte-level tokenizer so multi-byte UTF-8 really splits across tokens.

Building needs torch/transformers/peft (server side); the runtime under test never imports them. A device
has no torch, so ``tools/aarch64.sh`` builds every fixture kind on the host first (:func:`prebuild`) and
the device-side tests read them from ``$EDGEPEFT_PREBUILT_FIXTURES`` through :func:`cached_bundle`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 300


def byte_level_tokenizer(out_dir: Path) -> None:
    """A GPT-2 style byte-level BPE (256 byte tokens + a few merges + 3 specials), saved HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() <= VOCAB
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "model_max_length": 128}))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                 "pad_token": "<|endoftext|>"}))


def wordpiece_tokenizer(out_dir: Path, vocab_size: int = 120) -> None:
    """A tiny BERT WordPiece tokenizer (letters + a few words) for the encoder bundle."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?")
    words += ["good", "bad", "great", "awful", "product", "service", "the", "is", "was", "very"]
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "[PAD]",
        "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "model_max_length": 64}))


def training_record(peft_dir: Path, **fields) -> None:
    """The training record ``edgepeft build`` reads beside a PEFT adapter (version, labels, threshold)."""
    (Path(peft_dir) / "edgepeft_training.json").write_text(json.dumps(fields))
    if "labels" in fields:  # write_adapter reads labels.json; build_bundle prefers what it finds there
        (Path(peft_dir) / "labels.json").write_text(json.dumps(fields["labels"]))


def build_decoder_bundle(root: Path, private_key: Path, *, quant: str = "fp32",
                         target: str = "x86-64-gateway", base_seed: int = 0, lora_b: str | None = None) -> dict:
    """Tiny llama + adapters "alpha" (q,v) and "beta" (gate,down) -> a signed bundle via ``build_bundle``,
    plus an update for "alpha" (version 2, exported for the same slots) and a compact int8 copy of it."""
    from test_export_support import make_peft_adapter, tiny_llama_dir

    from edgepeft.bundle.build import build_bundle
    from edgepeft.export import write_adapter
    from edgepeft.release.package import create_adapter_update

    base = tiny_llama_dir(root / "base", seed=base_seed, vocab_size=VOCAB, initializer_range=0.2)
    byte_level_tokenizer(base)
    alpha, beta, gamma = root / "peft-alpha", root / "peft-beta", root / "peft-gamma"
    make_peft_adapter(base, alpha, r=4, alpha=8, targets=("q_proj", "v_proj"), seed=11)
    make_peft_adapter(base, beta, r=4, alpha=8, targets=("gate_proj", "down_proj"), seed=12)
    make_peft_adapter(base, gamma, r=4, alpha=8, targets=("q_proj", "v_proj"), seed=13)
    res = build_bundle(base=str(base), adapters=[("alpha", alpha), ("beta", beta)], target=target,
                       key=private_key, out=root / "bundle", quant=quant, slot_rank=4, lora_b=lora_b)
    manifest = res.manifest
    upd = root / "updates"
    upd.mkdir()
    write_adapter(gamma, manifest["model"], upd / "alpha-2.onnx_adapter")
    write_adapter(gamma, manifest["model"], upd / "alpha-2-int8.onnx_adapter", dtype="int8")
    create_adapter_update(bundle=res.bundle_dir, name="alpha", adapter=gamma, version=2, key=private_key,
                          out=upd / "alpha-2.epu")
    create_adapter_update(bundle=res.bundle_dir, name="alpha", adapter=gamma, version=7, key=private_key,
                          out=upd / "alpha-7-int8.epu", adapter_dtype="int8")
    return {"bundle": res.bundle_dir, "manifest": manifest, "model_info": manifest["model"],
            "update": upd / "alpha-2.onnx_adapter", "update_int8": upd / "alpha-2-int8.onnx_adapter",
            "package": upd / "alpha-2.epu", "package_int8": upd / "alpha-7-int8.epu", "base": base}


def build_encoder_bundle(root: Path, private_key: Path) -> dict:
    """Tiny BERT + two classification adapters with their own heads, labels and review thresholds."""
    from test_export_support import make_peft_adapter, tiny_bert_dir

    from edgepeft.bundle.build import build_bundle

    base = tiny_bert_dir(root / "base")
    wordpiece_tokenizer(base)
    sent, topic = root / "peft-sentiment", root / "peft-topic"
    make_peft_adapter(base, sent, task="classification", r=4, alpha=8, targets=("query", "value"), seed=21,
                      num_labels=2)
    training_record(sent, labels=["negative", "positive"], review_threshold=0.9)
    make_peft_adapter(base, topic, task="classification", r=4, alpha=8, targets=("query", "value"), seed=22,
                      num_labels=3)
    training_record(topic, labels=["billing", "shipping", "other"], review_threshold=0.34)
    res = build_bundle(base=str(base), adapters=[("sentiment", sent), ("topic", topic)], target="x86-64-gateway",
                       key=private_key, out=root / "bundle", quant="fp32", slot_rank=4, task="classification")
    return {"bundle": res.bundle_dir, "manifest": res.manifest, "model_info": res.manifest["model"], "base": base}


FAMILY_PROMPT = "the tin ünï ☃"
FAMILY_STEPS = 10
# name -> family of the adapters the "families" fixture bundle carries (one of each, LoRA beside them)
FAMILY_ADAPTERS = {"voice": "lora", "pre": "prefix-tuning", "prm": "prompt-tuning", "bn": "bottleneck"}


def build_families_bundle(root: Path, private_key: Path) -> dict:
    """Tiny llama (GQA: 4 heads, 2 key/value heads) + one adapter of every family in one signed fp32 bundle,
    a LoRA-only bundle of the same base (no bottleneck slots), next versions of the prefix (int8 payload),
    prompt and bottleneck adapters as update packages, and the PyTorch+PEFT reference: greedy ids and
    per-step logits for every adapter and none (what the device must reproduce, recorded on the host)."""
    from test_export_support import make_bottleneck_adapter, make_peft_adapter, make_prompt_adapter, tiny_llama_dir

    from edgepeft.bundle.build import build_bundle
    from edgepeft.release.package import create_adapter_update

    base = tiny_llama_dir(root / "base", seed=0, vocab_size=VOCAB, initializer_range=0.2)
    byte_level_tokenizer(base)
    dirs = {n: root / f"adapter-{n}" for n in FAMILY_ADAPTERS}
    models = {"voice": make_peft_adapter(base, dirs["voice"], r=4, alpha=8, targets=("q_proj", "v_proj"), seed=31),
              "pre": make_prompt_adapter(base, dirs["pre"], kind="prefix-tuning", tokens=6, seed=32),
              "prm": make_prompt_adapter(base, dirs["prm"], kind="prompt-tuning", tokens=5, seed=33),
              "bn": make_bottleneck_adapter(base, dirs["bn"], size=8, seed=34)}
    res = build_bundle(base=str(base), adapters=list(dirs.items()), target="x86-64-gateway", key=private_key,
                       out=root / "bundle", quant="fp32", slot_rank=4)
    plain = build_bundle(base=str(base), adapters=[("voice", dirs["voice"])], target="x86-64-gateway",
                         key=private_key, out=root / "plain", quant="fp32", slot_rank=4)
    nxt = {"pre": root / "adapter-pre-2", "prm": root / "adapter-prm-2", "bn": root / "adapter-bn-2"}
    make_prompt_adapter(base, nxt["pre"], kind="prefix-tuning", tokens=7, seed=35)
    make_prompt_adapter(base, nxt["prm"], kind="prompt-tuning", tokens=3, seed=36)
    make_bottleneck_adapter(base, nxt["bn"], size=12, placement="pfeiffer", seed=37)
    upd = root / "updates"
    upd.mkdir()
    packages = {}
    for name, dtype in (("pre", "int8"), ("prm", "fp16"), ("bn", "fp32")):
        packages[name] = upd / f"{name}-2.epu"
        create_adapter_update(bundle=res.bundle_dir, name=name, adapter=nxt[name], version=2, key=private_key,
                              out=packages[name], adapter_dtype=dtype)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(res.bundle_dir / "tokenizer.json")).encode(FAMILY_PROMPT,
                                                                             add_special_tokens=False).ids
    reference = {name or "": _torch_greedy(models[name] if name else models["voice"], ids, FAMILY_STEPS,
                                           bare=name is None) for name in (None, *FAMILY_ADAPTERS)}
    reference_v2 = {}
    for name, d in nxt.items():
        from test_export_support import load_family_model

        reference_v2[name] = _torch_greedy(load_family_model(base, d), ids, FAMILY_STEPS)
    return {"bundle": res.bundle_dir, "manifest": res.manifest, "plain": plain.bundle_dir, "base": base,
            "packages": packages, "adapters": dirs, "next": nxt, "prompt_ids": ids,
            "torch": reference, "torch_v2": reference_v2}


def _torch_greedy(model, ids, steps: int, *, bare: bool = False) -> dict:
    """Greedy ids and each step's last-position logits from PyTorch (the PEFT or bottleneck model; ``bare``:
    its base with the adapter off), re-running the whole sequence each step (no cache to get wrong)."""
    import contextlib

    import torch

    seq, out, rows = list(ids), [], []
    off = model.disable_adapter() if bare else contextlib.nullcontext()
    with off, torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([seq])
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1]
            rows.append([float(v) for v in logits])
            tok = int(logits.argmax())
            out.append(tok)
            seq.append(tok)
    return {"tokens": out, "logits": rows}


def reference_greedy(bundle: Path, manifest: dict, prompt_ids, steps: int, adapter_file: Path | None = None,
                     logits: list | None = None):
    """The plainest possible loop: session.run, a growing numpy cache, ORT's own LoraAdapter.

    A compact (fp16/int8) adapter is first expanded to fp32 the documented way. With ``logits``
    (a list), each step's last-position logits row is appended to it."""
    import tempfile

    import onnxruntime as ort

    from edgepeft.contracts.adapter_payload import expand_adapter
    from edgepeft.runtime.adapter_file import read_header

    info = manifest["model"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ro = ort.RunOptions()
    keep, scratch = None, tempfile.TemporaryDirectory()
    if adapter_file is not None:
        if any(p.dtype != "tensor(float)" for p in read_header(adapter_file).params.values()):
            expand_adapter(adapter_file, Path(scratch.name) / "fp32.onnx_adapter")
            adapter_file = Path(scratch.name) / "fp32.onnx_adapter"
        keep = ort.LoraAdapter()
        keep.Load(str(adapter_file))
        ro.add_active_adapter(keep)
    nl, kvh, hd = info["num_layers"], info["num_kv_heads"], info["head_dim"]
    names = [o.name for o in sess.get_outputs()]
    past = {f"past_key_values.{i}.{w}": np.zeros((1, kvh, 0, hd), np.float32) for i in range(nl)
            for w in ("key", "value")}
    seq, feed, out = list(prompt_ids), list(prompt_ids), []
    eos = set(manifest["tokenizer"].get("eos_token_ids", []))
    for _ in range(steps):
        r = dict(zip(names, sess.run(None, {"input_ids": np.array([feed], np.int64),
                                            "attention_mask": np.ones((1, len(seq)), np.int64), **past}, ro)))
        if logits is not None:
            logits.append(r["logits"][0, -1].copy())
        tok = int(np.argmax(r["logits"][0, -1]))
        if tok in eos:
            break
        out.append(tok)
        seq.append(tok)
        feed = [tok]
        past = {f"past_key_values.{i}.{w}": r[f"present.{i}.{w}"] for i in range(nl) for w in ("key", "value")}
    del keep
    scratch.cleanup()
    return out


PREBUILT_ENV = "EDGEPEFT_PREBUILT_FIXTURES"  # a folder written by prebuild(): device runs read fixtures from it
PARITY_PROMPTS = ["the tin ünï ☃", "hello how can i help"]
PARITY_STEPS = 16


def _record_reference(built: dict) -> dict:
    """Greedy tokens and per-step logits of the plain loop on this machine, for each adapter and none:
    what another machine (the emulated aarch64 device) must reproduce from the same bundle."""
    from tokenizers import Tokenizer

    bundle, manifest = built["bundle"], built["manifest"]
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    cases = []
    for prompt in PARITY_PROMPTS:
        ids = tok.encode(prompt, add_special_tokens=False).ids
        for name in (None, "alpha", "beta"):
            rows: list = []
            adapter_file = None if name is None else bundle / next(a["file"] for a in manifest["adapters"]
                                                                   if a["name"] == name)
            tokens = reference_greedy(bundle, manifest, ids, PARITY_STEPS, adapter_file, logits=rows)
            cases.append({"prompt": prompt, "adapter": name, "tokens": tokens,
                          "logits": [[float(x) for x in row] for row in rows]})
    return {"machine": platform.machine(), "onnxruntime": __import__("onnxruntime").__version__,
            "steps": PARITY_STEPS, "cases": cases}


def _build(kind: str, root: Path) -> dict:
    from edgepeft.contracts.signing import generate_keypair

    priv, pub = generate_keypair(root / "keys" / "device")
    if kind == "decoder":
        built = build_decoder_bundle(root, priv)
    elif kind == "decoder-int4":  # what a Raspberry Pi 5 gets: int4 weights, fp16 adapters
        built = build_decoder_bundle(root, priv, quant="int4", target="raspberry-pi-5")
    elif kind == "decoder-int4-b8":  # the same with int8 LoRA B slots (`lora_b = "int8"`; host tests only)
        built = build_decoder_bundle(root, priv, quant="int4", target="raspberry-pi-5", lora_b="int8")
    elif kind == "encoder":
        built = build_encoder_bundle(root, priv)
    elif kind == "families":
        built = build_families_bundle(root, priv)
    else:
        raise ValueError(f"unknown fixture kind {kind!r}")
    built |= {"private_key": priv, "public_key": pub, "root": root}
    if kind.startswith("decoder"):
        built["reference"] = _record_reference(built)
    return built


KINDS = ("decoder", "decoder-int4", "encoder", "families")


def _to_json(value, root: Path):
    if isinstance(value, Path):
        return {"$path": value.relative_to(root).as_posix()}
    if isinstance(value, dict):
        return {k: _to_json(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, root) for v in value]
    return value


def _from_json(value, root: Path):
    if isinstance(value, dict):
        if set(value) == {"$path"}:
            return root / value["$path"]
        return {k: _from_json(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, root) for v in value]
    return value


def prebuild(out: Path, kinds=KINDS) -> None:
    """Build each fixture kind into ``out/<kind>/`` with ``fixture.json`` (paths relative), for a
    machine that cannot build them (no torch). Needs the server side (torch, transformers, peft)."""
    out = Path(out)
    for kind in kinds:
        root = out / kind
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        built = _build(kind, root)
        (root / "fixture.json").write_text(json.dumps(_to_json(built, root), ensure_ascii=False))


def _load_prebuilt(kind: str, tmp_path_factory) -> dict:
    """A private copy of a prebuilt fixture (tests may write beside it; the shared copy stays pristine)."""
    src = Path(os.environ[PREBUILT_ENV]) / kind
    if not (src / "fixture.json").is_file():
        raise FileNotFoundError(f"{src}/fixture.json is missing: rebuild the fixtures with tools/device_fixtures.py")
    root = tmp_path_factory.mktemp(f"rt-{kind}")
    shutil.copytree(src, root, dirs_exist_ok=True)
    return _from_json(json.loads((root / "fixture.json").read_text(encoding="utf-8")), root)


def can_build_or_load() -> str | None:
    """None when fixtures can be had (server side installed, or prebuilt ones given); else why not."""
    if os.environ.get(PREBUILT_ENV):
        return None
    import importlib.util

    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    return f"building runtime fixtures needs {', '.join(missing)} (or ${PREBUILT_ENV})" if missing else None


def require_fixtures() -> None:
    """Skip the calling test module (loudly, with the reason) when no fixture can be built or loaded."""
    import pytest

    why = can_build_or_load()
    if why:
        pytest.skip(why, allow_module_level=True)


_BUILT: dict = {}


def cached_bundle(kind: str, tmp_path_factory) -> dict:
    """Each kind of fixture bundle once per test session (shared by the runtime test files): built here,
    or copied from ``$EDGEPEFT_PREBUILT_FIXTURES`` on a machine without the server side."""
    if kind not in _BUILT:
        if os.environ.get(PREBUILT_ENV):
            _BUILT[kind] = _load_prebuilt(kind, tmp_path_factory)
        else:
            _BUILT[kind] = _build(kind, tmp_path_factory.mktemp(f"rt-{kind}"))
    return _BUILT[kind]


def resign_bundle(built: dict, out: Path, **changes) -> Path:
    """A copy of a fixture bundle with manifest fields changed (e.g. ``health_checks``), signed again
    with the fixture's key: a variant of a bundle without the server side (works on the device run)."""
    from edgepeft.contracts.signing import load_private_key, sign_manifest

    out = Path(out)
    shutil.copytree(built["bundle"], out)
    data = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    data.pop("signature", None)
    data.update(changes)
    signed = sign_manifest(data, load_private_key(built["private_key"]))
    (out / "manifest.json").write_text(json.dumps(signed, indent=2, ensure_ascii=False), encoding="utf-8")
    return out
