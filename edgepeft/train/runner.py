"""``train()``: one run from options to a published adapter directory.

Order matters: every cheap check (options, output directory, bitsandbytes,
data file and columns, labels, base path, tokenizer, target modules, resume
checkpoint) runs before the base weights are loaded, so bad input fails fast
and leaves nothing behind.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .._extras import quiet_optional_kernel_notice, require
from ..errors import EdgePeftError, TrainError, UsageError
from .options import PROMPT_METHODS, TrainOptions


@dataclass
class TrainResult:
    """What :func:`train` returns: where the adapter went, and the record written with it."""

    out: Path
    record: dict
    model: object = field(default=None, repr=False)  # the trained PeftModel, still in memory

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]


def _check_paths(opts: TrainOptions) -> None:
    out, partial = opts.out_path, opts.partial_path
    if out.exists() and not opts.overwrite:
        raise UsageError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", hint="choose another --out")
    has_ckpt = (partial / "checkpoint.pt").is_file()
    if opts.resume and not has_ckpt:
        raise TrainError(f"there is no checkpoint to resume in {partial}",
                         hint="drop --resume to start a new run")
    if has_ckpt and not opts.resume:
        raise TrainError(f"an interrupted run left a checkpoint in {partial}",
                         hint=f"add --resume to continue it, or delete {partial} to start over")


def train(options: TrainOptions | None = None, *, on_step=None, on_plan=None, **kwargs) -> TrainResult:
    """Fine-tune a LoRA/QLoRA adapter and publish it to ``options.out``.

    Pass a :class:`TrainOptions` or its fields as keyword arguments.
    ``on_step(step, loss)`` is called after each optimizer step. ``on_plan(lines)``
    receives, before the weights load, the few lines that say which task, base
    and columns were chosen and why (default: printed on stderr unless
    ``progress`` is off).

    Raises (all before the base weights load): :class:`UsageError` (bad option,
    ``out`` exists), :class:`DataError` (file, columns, labels),
    :class:`ModelError` (base not found or unusable), :class:`MissingExtraError`
    (``qlora`` without bitsandbytes, no ``train`` extra), :class:`TrainError`
    (rank, target modules, resume mismatch). During training:
    :class:`TrainingInterrupted` after Ctrl-C (a checkpoint was saved), or
    :class:`TrainError` when the loss diverges.
    """
    opts = options if options is not None else TrainOptions(**kwargs)
    if options is not None and kwargs:
        raise UsageError("pass either TrainOptions or keyword options, not both", hint="merge them into one")
    with warnings.catch_warnings():
        # transformers'/peft's deprecation notices name their own internals, nothing a user can act on
        warnings.simplefilter("ignore", FutureWarning)
        return _train(opts, on_step, on_plan)


def _train(opts: TrainOptions, on_step, on_plan) -> TrainResult:
    wall = time.monotonic()
    _check_paths(opts)
    require("torch", "transformers", "peft", "accelerate", "tqdm", "matplotlib", feature="edgepeft train")
    quiet_optional_kernel_notice()
    from . import modelprep

    if opts.method == "qlora":
        modelprep.check_qlora_available()
    from ..models.base import load_tokenizer, resolve_base
    from .data import load_dataset
    from .encode import encode_causal, encode_classification

    ds = load_dataset(opts.data, task=opts.task, eval_data=opts.eval_data, eval_split=opts.eval_split,
                      seed=opts.seed, labels=opts.labels, slice_column=opts.slice_column, columns=opts.columns)
    task = "classification" if ds.shape == "classification" else "causal-lm"
    if task == "classification" and opts.method in PROMPT_METHODS:
        raise TrainError(f"{opts.method} is exported for decoders only: a classifier's graph has no key/value "
                         "cache to put a prefix in", hint="train a classifier with --method bottleneck or lora")
    source = resolve_base(opts.base, task=task)
    tok = load_tokenizer(source)
    if tok.pad_token_id is None:
        raise TrainError(f"the tokenizer of {source.name} has neither a pad nor an EOS token",
                         hint="use a base whose tokenizer defines one")
    lines = plan_lines(opts, task, source, ds) + opts.resolve_defaults(task, len(ds.train), len(ds.eval))
    if on_plan is not None:
        on_plan(lines)
    elif opts.progress:
        print("\n".join(lines), file=sys.stderr, flush=True)
    if task == "classification":
        train_items = encode_classification(ds.train, tok, opts.max_length)
        eval_items = encode_classification(ds.eval, tok, opts.max_length)
        dropped = 0
    else:
        train_items, dropped = encode_causal(ds.train, tok, opts.max_length, opts.data)
        eval_items, _ = encode_causal(ds.eval, tok, opts.max_length, opts.data) if ds.eval else ([], 0)

    import torch
    from accelerate import Accelerator

    meta = {"resume_key": opts.resume_key(), "data_sha256": ds.sha256}
    resume_blob = _resume_blob(opts, meta) if opts.resume else None
    accelerator = Accelerator(mixed_precision=_mixed_precision(opts.precision))
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes != launched:
        raise TrainError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes}",
                         hint="start with `accelerate launch` (add --cpu for several CPU processes)")
    if opts.progress is False:
        _quiet()
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    prepared = modelprep.prepare(opts, source, task, ds.labels, tok, accelerator.device)
    model = prepared.model
    if opts.method != "qlora":  # the 4-bit base was placed when it loaded
        model.to(accelerator.device)

    def evaluate(tag: str) -> dict | None:
        if not ds.eval or not accelerator.is_main_process:
            return None
        from . import evaluate as ev

        m = accelerator.unwrap_model(model) if tag == "adapter" else model
        bs = max(opts.batch_size, 8)
        if task == "classification":
            return ev.classification_metrics(m, ds.eval, eval_items, ds.labels, pad_id=tok.pad_token_id,
                                             batch_size=bs, device=accelerator.device, slice_column=ds.slice_column)
        return ev.causal_metrics(m, tok, ds.eval, eval_items, batch_size=bs, device=accelerator.device,
                                 generate_limit=opts.eval_generate, max_new_tokens=opts.max_new_tokens)

    baseline = None
    if opts.eval_before and not resume_blob:
        with model.disable_adapter():
            baseline = evaluate("base")
    elif resume_blob:
        baseline = resume_blob["meta"].get("baseline")
    meta["baseline"] = baseline

    from . import loop

    partial = opts.partial_path
    state = loop.run(model, train_items, opts=opts, accelerator=accelerator, pad_id=tok.pad_token_id,
                     checkpoint_dir=partial, meta=meta, resume_blob=resume_blob, on_step=on_step)
    accelerator.wait_for_everyone()
    final = evaluate("adapter")
    losses = [v for _, v in state.losses]
    metrics = {
        "schema": 1, "task": task,
        "train": {"steps": state.step, "examples": len(train_items), "dropped_too_long": dropped,
                  "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                  "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 6) if losses else None},
        "eval": final,
        "baseline": baseline,
    }
    result = None
    if accelerator.is_main_process:
        notes = {"warnings": barely_moved(metrics, opts), "previous": previous_version(opts.init_adapter)}
        result = _publish(opts, task, source, prepared, ds, state, metrics, wall, accelerator, tok, notes)
        if on_plan is None and opts.progress:  # the CLI prints them itself, at the end of its summary
            for note in notes["warnings"]:
                print(f"warning: {note}", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    return result or TrainResult(opts.out_path, {"metrics": metrics}, accelerator.unwrap_model(model))


_SHAPES = {"messages": "messages (chat turns; loss on the assistant's answers)",
           "prompt_completion": "prompt + completion (loss on the completion)",
           "text": "text (plain text: loss on every token)"}


def plan_lines(opts: TrainOptions, task: str, source, ds) -> list[str]:
    """What this run will do and why, in a few lines, before anything heavy loads."""
    from ..models.base import embedded_key

    why = "--task" if opts.task else ("the data has a label column" if task == "classification"
                                      else "the data has no label column")
    if opts.base is None:
        origin = f"embedded, the default for {task}"
    elif embedded_key(opts.base):
        origin = "embedded"
    else:
        origin = "hub" if source.is_hub else source.path
    if task == "classification":
        labels = ", ".join(ds.labels or [])
        cols = f"text -> label ({len(ds.labels or [])} labels: {labels}; a new classification head)"
        if ds.slice_column:
            cols += f"; per-slice figures by {ds.slice_column!r}"
    else:
        cols = _SHAPES[ds.shape]
    if ds.columns:
        cols += "; from the data's " + ", ".join(f"{c!r} as {r}" for r, c in ds.columns.items())
    held = f"from {opts.eval_data}" if opts.eval_data else \
        (f"{opts.eval_split:.0%} held out of the training data" if ds.eval else "no evaluation")
    cont = f", continuing from {opts.init_adapter} (--init-adapter)" if opts.init_adapter else ""
    return [f"edgepeft train: {task} ({why}) on {source.name} ({origin}), {method_summary(opts)}{cont}",
            f"  columns: {cols}",
            f"  examples: {len(ds.train)} train, {len(ds.eval)} eval ({held})"]


def method_summary(opts: TrainOptions) -> str:
    """The family and its size in a few words: ``lora r=8``, ``prefix-tuning 20 virtual tokens``, ..."""
    if opts.method in PROMPT_METHODS:
        return f"{opts.method} {opts.virtual_tokens} virtual tokens"
    if opts.method == "bottleneck":
        size = opts.bottleneck_size or "hidden/16"
        return f"bottleneck size {size} ({opts.placement}, {opts.non_linearity})"
    return f"{opts.method} r={opts.rank}"


MOVED = 0.02  # a held-out loss that fell by less than this fraction "barely moved"


def barely_moved(metrics: dict, opts: TrainOptions) -> list[str]:
    """A warning when the held-out loss fell by less than :data:`MOVED` of the bare base's: what to try."""
    before, after = (metrics.get("baseline") or {}).get("loss"), (metrics.get("eval") or {}).get("loss")
    if before is None or after is None or before <= 0 or (before - after) / before >= MOVED:
        return []
    passes = f"--steps {max(2 * metrics['train']['steps'], 40)}"
    return [f"the held-out loss barely moved ({before:.4g} -> {after:.4g}, {metrics['train']['steps']} steps at lr "
            f"{opts.learning_rate:g}): the adapter has learnt little. Try more passes ({passes}, or --epochs; "
            f"max_steps= / epochs= in Python) or a larger learning rate (--lr {opts.learning_rate * 3:g}; "
            "learning_rate= in Python), or more examples"]


def previous_version(init_adapter: str | None) -> dict | None:
    """The figures of the adapter a run continued from (``--init-adapter``), to show beside the new ones."""
    if not init_adapter:
        return None
    from . import record

    try:
        rec = record.read_record(init_adapter)
    except EdgePeftError:
        return None
    return {"path": str(init_adapter), "version": rec.get("version"), "eval": (rec.get("metrics") or {}).get("eval")}


def _publish(opts, task, source, prepared, ds, state, metrics, wall, accelerator, tok, notes=None) -> TrainResult:
    from . import record

    partial = opts.partial_path
    staged = partial / "adapter"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    model = accelerator.unwrap_model(prepared.model)
    model.save_pretrained(str(staged), safe_serialization=True)
    if ds.labels:
        record.write_json(staged / record.LABELS, record.labels_file(ds.labels))
    rec = record.build_record(opts=opts, task=task, base=source, prepared=prepared, dataset=ds, state=state,
                              metrics=metrics, wall_seconds=time.monotonic() - wall, accelerator=accelerator,
                              versions=_versions())
    rec.update({k: v for k, v in (notes or {}).items() if v})
    points = [(0, (metrics["baseline"] or {}).get("loss")), (state.step, (metrics["eval"] or {}).get("loss"))]
    record.plot_losses(staged / record.PLOT, state.losses, points, f"{source.name} + {method_summary(opts)}")
    record.write_json(staged / record.RECORD, rec)
    record.publish(staged, opts.out_path, opts.overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    return TrainResult(opts.out_path, rec, model)


def _resume_blob(opts: TrainOptions, meta: dict) -> dict:
    from . import loop

    blob = loop.read_checkpoint(opts.partial_path)
    old = blob.get("meta", {})
    if old.get("data_sha256") != meta["data_sha256"]:
        raise TrainError("the data changed since the checkpoint was written",
                         hint=f"resume with the same data, or delete {opts.partial_path} to start over")
    changed = sorted(k for k, v in meta["resume_key"].items() if old.get("resume_key", {}).get(k) != v)
    if changed:
        raise TrainError(f"options changed since the checkpoint was written: {', '.join(changed)}",
                         hint=f"resume with the same options, or delete {opts.partial_path} to start over")
    return blob


def _mixed_precision(precision: str) -> str | None:
    """Accelerate's mixed_precision for --precision; "auto" defers to `accelerate launch --mixed_precision`."""
    import torch
    from accelerate import PartialState

    if precision == "fp32":
        return "no"
    if precision != "auto":
        return precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # the launcher's choice
    on_gpu = PartialState().device.type == "cuda"
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("edgepeft", "torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
