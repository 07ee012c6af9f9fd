"""``edgepeft build``: base + PEFT adapters + target -> a signed device bundle (directory and .epb).

Order matters for the user: everything cheap is checked first (target, key,
adapter configs, ranks, merge name, the base each adapter was trained on), then
the long export runs in a temporary directory beside ``--out``, and only a
bundle that fits its target and is signed is renamed into place. A failure at
any step leaves no partial bundle.

What travels about an adapter's training is its metric values and the SHA-256
of its training record (``metrics.record_sha256``), never the record's samples:
a bundle goes to every device, and held-out prompts and answers may be personal
data.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..contracts.checks import read_health_checks
from ..contracts.fields import check_choice
from ..contracts.manifest import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, Manifest
from ..contracts.methods import ACTIVATIONS, PLACEMENTS, PREFIX_METHODS, describe_size
from ..contracts.names import sha256_file
from ..contracts.signing import load_private_key, sign_manifest
from ..contracts.target import (
    GGUF_MODES,
    LORA_B_TYPES,
    ZERO_POINTS,
    QuantSpec,
    TargetProfile,
    load_target,
    resolve_lora_b,
)
from ..errors import AdapterError, BuildError, UsageError
from .adapters_in import AdapterInput, check_trained_base, read_adapter
from .archive import pack_bundle
from .entries import adapter_entry
from .fit import UNMEASURED_FACTOR, check_fit
from .session_memory import MEASURE_MAX_BYTES, measure_session

QUANTS = ("int4", "int8", "nf4", "fp16", "fp32")


@dataclass
class BuildResult:
    """What was built: paths, sizes, and the manifest as written."""

    bundle_dir: Path
    archive: Path
    manifest: dict
    fit: dict

    def summary(self) -> dict:
        files = {f["path"]: f["size"] for f in self.manifest["files"]}
        return {
            "bundle": str(self.bundle_dir), "archive": str(self.archive),
            "archive_bytes": self.archive.stat().st_size,
            "target": self.manifest["target"]["name"], "quantization": self.manifest["quantization"],
            "base": self.manifest["base"], "merged_adapter": self.manifest.get("merged_adapter"),
            "adapters": [{k: a.get(k) for k in ("name", "version", "method", "rank", "virtual_tokens",
                                                "bottleneck_size", "activation", "target_modules", "dtype", "file")}
                         | {"bytes": files[a["file"]]} for a in self.manifest["adapters"]],
            "files": files, "fit": self.fit,
        }


def _compact_merges(spec: dict) -> None:
    """BPE merges as ``"a b"`` strings instead of ``["a", "b"]`` pairs when no token holds a space: the
    tokenizers library reads both the same way, and SmolLM2's 48,900 merges shrink by 191 KiB."""
    model = spec.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not isinstance(merges, list) or not merges:
        return
    if all(isinstance(m, list) and len(m) == 2 and all(isinstance(t, str) and " " not in t for t in m)
           for m in merges):
        model["merges"] = [f"{a} {b}" for a, b in merges]


def _tokenizer_files(tokenizer, dest: Path) -> dict:
    """Save what the device-side ``tokenizers`` library needs; return manifest["tokenizer"]."""
    tmp = dest / ".tok"
    tokenizer.save_pretrained(tmp)
    if not (tmp / "tokenizer.json").is_file():
        raise BuildError("the base tokenizer has no fast (tokenizer.json) form, which devices need",
                         hint="use a base whose tokenizer has a tokenizer.json")
    # Compact JSON: the same tokenizer in less than half the bytes.
    spec = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
    _compact_merges(spec)
    (dest / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    shutil.rmtree(tmp)
    eos = tokenizer.eos_token_id
    info = {
        "file": "tokenizer.json",
        "chat_template": tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None,
        "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token": tokenizer.bos_token if getattr(tokenizer, "add_bos_token", False) else None,
        "special_tokens": sorted(set(getattr(tokenizer, "all_special_tokens", []))),
        # what transformers' apply_chat_template passes the template (bos_token, eos_token, pad_token, ...)
        "template_tokens": {k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
                            if isinstance(v, str)},
        "model_max_length": min(int(getattr(tokenizer, "model_max_length", 1 << 30) or 0), 1 << 30),
    }
    return {k: v for k, v in info.items() if v is not None}


def build_bundle(*, base: str | None, adapters: list[tuple[str, Path]], target: str | os.PathLike | TargetProfile,
                 key: str | os.PathLike, out: str | os.PathLike, quant: str | None = None,
                 merge: str | None = None, adapter_dtype: str | None = None, slot_rank: int | None = None,
                 health_checks: str | os.PathLike | None = None, task: str | None = None, force: bool = False,
                 bottleneck_slots: str | None = None, bottleneck_activation: str | None = None,
                 gguf: str | None = None, lora_b: str | None = None, zero_points: str | None = None,
                 progress: Callable[[str], None] = lambda msg: None) -> BuildResult:
    """Build a signed bundle. See the module docstring for the order of checks.

    Adapters of every family may travel together. The graph gets bottleneck slots where the
    bundle's bottleneck adapters sit, plus ``bottleneck_slots`` ("houlsby": after attention and
    MLP, "pfeiffer": after the MLP) for adapters that will arrive later as updates, with
    ``bottleneck_activation`` (default: the adapters', else relu).

    Raises :class:`UsageError` (bad options), :class:`AdapterError` (an adapter
    that cannot be used with this base or target), :class:`SignatureError` (key),
    :class:`~edgepeft.errors.SpecError` (target), :class:`TargetFitError`
    (does not fit) or :class:`BuildError` (also when a health check fails on the built graph: the
    bundle is not written).
    """
    profile = target if isinstance(target, TargetProfile) else load_target(target)
    explicit_quant, quant_note = quant is not None, ""
    quant = quant or profile.quant.weights
    check_choice(quant, QUANTS, "quantization", hint_flag="--quant")
    adapter_dtype = adapter_dtype or profile.quant.adapter_dtype
    gguf = gguf or profile.quant.gguf
    check_choice(gguf, GGUF_MODES, "GGUF mode", hint_flag="--gguf")
    lora_b = lora_b or profile.quant.lora_b
    zero_points = zero_points or profile.quant.zero_points
    check_choice(zero_points, ZERO_POINTS, "zero_points policy", hint_flag="--zero-points")
    check_choice(lora_b, LORA_B_TYPES, "LoRA B slot type")
    private_key = load_private_key(key)
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} already exists", hint="choose a new --out, or pass --force to replace it")

    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise UsageError("two --adapter options share a name", hint="give every adapter its own NAME")
    inputs: list[AdapterInput] = [read_adapter(n, Path(p)) for n, p in adapters]
    if merge is not None and merge not in names:
        raise UsageError(f"--merge {merge!r} names no --adapter", hint=f"adapters given: {', '.join(names) or 'none'}")
    if merge is not None and len(names) > 1:
        raise UsageError("a merged bundle is single-task: --merge takes exactly one --adapter",
                         hint="build a slots bundle (no --merge) to ship several adapters")
    tasks = {a.task for a in inputs} | ({task} if task else set())
    if len(tasks) > 1:
        raise AdapterError(f"adapters mix tasks {sorted(tasks)}", hint="build one bundle per task")
    source = None
    if tasks:
        task = tasks.pop()
    elif base is not None:  # no adapter and no --task: the checkpoint says (a fine-tuned classifier's own head)
        from ..export.api import read_config
        from ..models.arch import task_of
        from ..models.base import resolve_base

        source = resolve_base(base)
        task = task_of(read_config(source))
        progress(f"task {task} (from {source.name}'s config)")
    else:
        task = "causal-lm"
    loras = [a for a in inputs if a.method == "lora"]
    if merge is not None and next(a for a in inputs if a.name == merge).method != "lora":
        raise UsageError(f"--merge {merge!r} is a {next(a for a in inputs if a.name == merge).method} adapter; only "
                         "LoRA merges into the base weights", hint="build it as a swappable adapter (no --merge)")
    bottleneck = bottleneck_plan(inputs, bottleneck_slots, bottleneck_activation)
    check_prefix_room(inputs, profile.budgets.max_context, f"target {profile.name}")
    if task == "classification" and not explicit_quant and quant in ("int4", "int8", "nf4"):
        # The target's quantized default is for decoders: on an encoder int4 is slower than fp32 and int8's
        # activation rounding moves labels; fp16 storage computes in fp32 (docs/measured-defaults.md).
        quant_note = (f"; a classifier: fp16 weights computed in fp32 instead of the target's {quant} "
                      "(--quant int8: faster, probabilities a few hundredths off)")
        quant = "fp16"
    # an encoder's B slots are always fp32: the manifest records the form built
    lora_b = resolve_lora_b(lora_b, profile, quant) if task == "causal-lm" else "fp32"
    max_rank = max([a.rank for a in loras], default=0)
    rank = slot_rank or max(max_rank, 1)
    if rank < max_rank:
        raise UsageError(f"--slot-rank {rank} is below the largest adapter rank {max_rank}")
    over = [f"{a.name} (rank {a.rank})" for a in loras if a.rank > profile.budgets.max_adapter_rank]
    if over or rank > profile.budgets.max_adapter_rank:
        raise AdapterError(f"{', '.join(over) or f'slot rank {rank}'} above target {profile.name}'s limit "
                           f"of {profile.budgets.max_adapter_rank}",
                           hint="retrain with a smaller --rank, or choose a target with a larger max_adapter_rank")

    from .. import export as export_api
    from ..models.base import resolve_base

    source = source or resolve_base(base, task=task)
    for a in inputs:
        check_trained_base(a, source.name, None if source.is_hub or source.gguf_file else source.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        merged = next((a for a in inputs if a.name == merge), None)
        slot_adapters = [a for a in inputs if a is not merged]
        progress(f"exporting {source.name} for {task} ({quant}{', merged ' + merge if merge else ''}){quant_note}")
        exported = export_api.export_model(
            source, work, task=task, slot_rank=rank,
            quant=QuantSpec(weights=quant, block_size=profile.quant.block_size, adapter_dtype=adapter_dtype,
                            gguf=gguf, lora_b=lora_b, zero_points=zero_points),
            target_modules=sorted({m for a in loras for m in a.target_modules}) or "all-linear",
            merge_adapter=merged.path if merged else None, bottleneck=bottleneck, progress=progress)
        fingerprint = exported.fingerprint
        for a in inputs:
            if a.base_fingerprint and a.base_fingerprint != fingerprint:
                raise AdapterError(f"adapter {a.name!r} was trained on a different base "
                                   f"({a.base_fingerprint[:19]}..., this base is {fingerprint[:19]}...)",
                                   hint="build with the --base it was trained on, or retrain it on this base")
        (work / "adapters").mkdir(exist_ok=True)
        adapter_entries = []
        for a in slot_adapters:
            rel = f"adapters/{a.name}-{a.version}.onnx_adapter"
            # Slots have a symbolic rank dim, so each adapter keeps its own rank (<= the slot rank):
            # padding it to the slot rank would slow decoding and grow the file.
            size = f"rank {a.rank} (slots take up to {rank})" if a.method == "lora" else \
                f"{a.method}, {describe_size(a.method, vars(a))}"
            progress(f"adapter {a.name} v{a.version}: {size}, {adapter_dtype}")
            info = export_api.write_adapter(a.path, exported.model_info, work / rel, dtype=adapter_dtype,
                                            name=a.name, version=a.version, labels=a.labels, pad=False,
                                            graph_path=exported.model_path)
            adapter_entries.append(adapter_entry(a, file=rel, fingerprint=fingerprint, dtype=adapter_dtype,
                                                 labels=info.labels))
        progress("tokenizer")
        from ..models.base import load_tokenizer

        tokenizer_info = _tokenizer_files(load_tokenizer(source), work)
        files = []
        for p in [work, *work.rglob("*")]:
            p.chmod(0o644 if p.is_file() else 0o755)  # readable by the device's runtime user (mkdtemp makes 0700)
        for p in sorted(x for x in work.rglob("*") if x.is_file()):
            rel = p.relative_to(work).as_posix()
            files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
        weight_bytes = sum(f["size"] for f in files if f["path"] in exported.files)
        sizes = {f["path"]: f["size"] for f in files}
        if weight_bytes <= MEASURE_MAX_BYTES:
            progress("measuring the graph's session memory")
            session = measure_session(exported.model_path, threads=profile.threads)
        else:  # opening it would take as much memory again as the build, and minutes: estimated, and said so
            progress(f"the graph is {weight_bytes / 2**20:.0f} MiB: its session memory is estimated "
                     f"({UNMEASURED_FACTOR}x the file), not measured (graphs up to {MEASURE_MAX_BYTES >> 20} MiB are)")
            session = None
        fit = check_fit(profile, bundle_bytes=sum(sizes.values()), weight_bytes=weight_bytes,
                        adapters=[(sizes[e["file"]], e.get("dtype", "fp32")) for e in adapter_entries],
                        model_info=exported.model_info, max_rank=max_rank, session=session,
                        external_bytes=sizes.get(exported.model_path.name + ".data", 0))
        check_prefix_room(slot_adapters, fit.context, f"this bundle for {profile.name}")
        data = {
            "schema_version": MANIFEST_SCHEMA_VERSION, "kind": "bundle", "edgepeft_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "base": {"name": source.name, "fingerprint": fingerprint, "task": task,
                     "architecture": exported.model_info.get("architecture", "unknown")},
            "target": profile.to_dict() | {"description": profile.description},
            "quantization": {"weights": quant, "block_size": profile.quant.block_size, "adapter_dtype": adapter_dtype,
                             "gguf": gguf, "lora_b": lora_b,
                             "zero_points": zero_points if quant == "int4" else "none"},
            "model": {"graph": next(iter(exported.files))} | exported.model_info, "tokenizer": tokenizer_info,
            "generation": {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0,
                           "max_context": fit.context},
            "files": files, "adapters": adapter_entries,
            "health_checks": read_health_checks(health_checks),
            "merged_adapter": merge,
        }
        if merged is not None:
            data["model"] = data["model"] | {"merged": {
                "name": merged.name, "version": merged.version, "rank": merged.rank, "alpha": merged.alpha,
                "labels": data["model"].get("labels") or merged.labels, "metrics": merged.public_metrics,
                "review_threshold": float(merged.record.get("review_threshold", 0.6))}}
        signed = sign_manifest(data, private_key)
        Manifest.from_dict(signed, str(work / MANIFEST_NAME))  # the manifest we write must parse on a device
        (work / MANIFEST_NAME).write_text(json.dumps(signed, indent=2, ensure_ascii=False), encoding="utf-8")
        if data["health_checks"]:
            from .health import check_bundle

            progress(f"running {len(data['health_checks'])} health check(s) on the built graph")
            check_bundle(work, private_key.public_key(), data["health_checks"], what=f"bundle {out.name}",
                         where=str(health_checks))
        progress("archive")
        archive = pack_bundle(work, out.parent / f".{out.name}.epb.tmp")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        final_archive = out.with_name(out.name + ".epb")
        os.replace(archive, final_archive)
        return BuildResult(out, final_archive, signed, fit.to_dict())
    finally:
        shutil.rmtree(work, ignore_errors=True)
        Path(out.parent / f".{out.name}.epb.tmp").unlink(missing_ok=True)


def bottleneck_plan(inputs: list[AdapterInput], slots: str | None, activation: str | None) -> dict | None:
    """The graph's bottleneck slots: the points the bottleneck adapters use plus ``slots``'s placement,
    with one activation. Raises :class:`UsageError` for an unknown placement or activation, and
    :class:`AdapterError` when adapters disagree on their activation (one graph applies one)."""
    if slots is not None:
        check_choice(slots, (*PLACEMENTS, "none"), "bottleneck slot placement",
                     hint="--bottleneck-slots houlsby: after the attention and the MLP blocks; pfeiffer: after the MLP")
    if activation is not None:
        check_choice(activation, ACTIVATIONS, "bottleneck activation", hint_flag="--bottleneck-activation")
    ours = [a for a in inputs if a.method == "bottleneck"]
    acts = {a.activation for a in ours} | ({activation} if activation else set())
    if len(acts) > 1:
        who = ", ".join(f"{a.name} ({a.activation})" for a in ours)
        raise AdapterError(f"bottleneck adapters disagree on their non-linearity: {who}"
                           + (f", --bottleneck-activation {activation}" if activation else ""),
                           hint="one graph applies one non-linearity: retrain with the same --non-linearity, "
                                "or build them into separate bundles")
    points = {p for a in ours for p in a.target_modules} | set(PLACEMENTS.get(slots or "none", ()))
    if not points:
        return None
    return {"points": sorted(points), "activation": acts.pop() if acts else "relu"}


def check_prefix_room(inputs: list[AdapterInput], context: int, where: str) -> None:
    """Refuse a prefix adapter whose virtual tokens leave no room for a prompt in ``context``."""
    for a in inputs:
        if a.method in PREFIX_METHODS and a.virtual_tokens + 2 > context:
            raise AdapterError(f"adapter {a.name!r} puts {a.virtual_tokens} virtual tokens before every prompt; "
                               f"{where} holds {context} tokens", hint="train it with far fewer --virtual-tokens, "
                                                                       "or choose a target with a longer context")
