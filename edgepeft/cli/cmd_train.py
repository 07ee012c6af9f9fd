"""``edgepeft train``: fine-tune an adapter of any family (thin wrapper over :func:`edgepeft.train.train`).

Imports nothing heavy at module level, so ``edgepeft train --help`` is instant.
EdgePeftError propagates; the CLI group turns it into one line.
"""

from __future__ import annotations

import dataclasses
import json

import click

from edgepeft.cli.columns import column_options, pop_columns
from edgepeft.models.base import BASE_HELP  # torch-free, like the options below
from edgepeft.train.options import (  # torch-free: keeps --help
    DEFAULT_LR,
    MAX_AUTO_EPOCHS,
    METHODS,
    MIN_STEPS,
    NON_LINEARITIES,
    PLACEMENTS,
    SMALL_DATA_LR,
    SMALL_DATA_ROWS,
    SMALL_EVAL,
    TrainOptions,  # instant
)

# Defaults live in TrainOptions only; the options below read them from there.
D = {f.name: f.default for f in dataclasses.fields(TrainOptions)}

EPILOG = """\b
Data shapes (JSON Lines, CSV, or a datasets directory):
  chat        {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
  pairs       {"prompt": "...", "completion": "..."}      (optional "system")
  plain text  {"text": "..."}
  classifier  {"text": "...", "label": "fraud"}           (optional "slice")
Other column names: --prompt-column question --completion-column answer, or
--columns text=body,label=category (the same options for `edgepeft eval`).
\b
Methods: lora, qlora (4-bit NF4 base), prompt-tuning and prefix-tuning (PEFT; decoders),
bottleneck (small layers after the attention and/or MLP blocks; decoders and classifiers).
Every family is built, signed, shipped and hot-swapped on devices like LoRA.
\b
Output: OUT/ holds the adapter (PEFT's format; bottleneck: edgepeft's, documented in
edgepeft/models/bottleneck.py), edgepeft_training.json (options, data hash,
base fingerprint, metrics) and loss_curve.png. While training, checkpoints live
in OUT.partial/; Ctrl-C saves one and --resume continues from it.
Several GPUs: accelerate launch --num_processes 4 "$(which edgepeft)" train ...
(same options; --batch-size is per process).
"""


@click.command("train", epilog=EPILOG, short_help="Fine-tune an adapter (LoRA, QLoRA, prompt, prefix, bottleneck).")
@click.option("--data", required=True, help="Training data: .jsonl/.json/.csv/.tsv file or a datasets directory.")
@click.option("--out", required=True, type=click.Path(), help="Adapter directory to create.")
@click.option("--base", default=None, help=f"{BASE_HELP} [default: smollm2-135m-instruct; all-minilm-l6-v2 for "
              "classification].")
@click.option("--task", type=click.Choice(["causal-lm", "classification"]), default=None,
              help="[default: classification when the data has a label column, else causal-lm; text beside a "
                   "label-like column is refused until you rename it or choose].")
@click.option("--method", type=click.Choice(list(METHODS)), default=D["method"], show_default=True,
              help="qlora: 4-bit NF4 base via bitsandbytes, with gradient checkpointing; prompt-tuning / "
                   "prefix-tuning: decoders only.")
@click.option("--rank", "-r", type=int, default=D["rank"], show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha [default: 2 x rank].")
@click.option("--dropout", type=float, default=D["dropout"], show_default=True, help="LoRA dropout.")
@click.option("--target-modules", default=None,
              help="LoRA: comma-separated module names [default: attention + MLP projections of the architecture].")
@click.option("--virtual-tokens", type=int, default=D["virtual_tokens"], show_default=True,
              help="Prompt/prefix tuning: virtual tokens before every prompt (key/value positions on the device).")
@click.option("--prompt-init", default=None, metavar="TEXT",
              help="Prompt/prefix tuning: start the soft prompt (its embeddings) or the prefix (its keys and "
                   "values) from this text [default: tokens sampled from the vocabulary].")
@click.option("--prefix-projection", is_flag=True, help="Prefix tuning: train through PEFT's MLP reparametrisation.")
@click.option("--bottleneck-size", type=int, default=None, help="Bottleneck width [default: hidden size / 16].")
@click.option("--placement", type=click.Choice(list(PLACEMENTS)), default=D["placement"], show_default=True,
              help="Bottleneck: houlsby (after attention and MLP) or pfeiffer (after the MLP only).")
@click.option("--non-linearity", type=click.Choice(list(NON_LINEARITIES)), default=D["non_linearity"],
              show_default=True, help="Bottleneck non-linearity (the bundle's bottleneck slots apply the same one).")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute activations in the backward pass: less memory, slower (not with prefix-tuning).")
@click.option("--epochs", type=float, default=None,
              help=f"Passes over the training split [default: 1; under {SMALL_DATA_ROWS} rows, enough passes for "
                   f"{MIN_STEPS} optimizer steps, at most {MAX_AUTO_EPOCHS}].")
@click.option("--steps", "max_steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--lr", "learning_rate", type=float, default=None,
              help="Peak learning rate [default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()
                                                              if k != "qlora")
              + f"; under {SMALL_DATA_ROWS} rows LoRA takes "
              + ", ".join(f"{v:g} ({t})" for (m, t), v in SMALL_DATA_LR.items() if m == "lora") + "].")
@click.option("--batch-size", type=int, default=D["batch_size"], show_default=True, help="Examples per device per micro-batch.")
@click.option("--grad-accum", type=int, default=D["grad_accum"], show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-length", type=int, default=D["max_length"], show_default=True, help="Tokens per example (longer ones are cut).")
@click.option("--warmup", type=float, default=D["warmup"], show_default=True, help="Warm-up fraction of the steps.")
@click.option("--eval-split", type=float, default=D["eval_split"], show_default=True,
              help="Held-out fraction for evaluation (0: none).")
@click.option("--eval-data", default=None, help="Separate evaluation file (overrides --eval-split).")
@click.option("--eval-before/--no-eval-before", default=None,
              help=f"Also evaluate the bare base, recorded as metrics.baseline [default: on when at most "
                   f"{SMALL_EVAL} examples are held out].")
@click.option("--eval-generate", type=int, default=D["eval_generate"], show_default=True,
              help="Decoders: held-out prompts to answer greedily for answer match.")
@click.option("--max-new-tokens", type=int, default=D["max_new_tokens"], show_default=True, help="Decoders: tokens per generated answer.")
@click.option("--labels", default=None, help="Classification: comma-separated label names in id order.")
@click.option("--slice-column", default=None, help="Column for per-slice metrics [default: 'slice' if present].")
@column_options
@click.option("--seed", type=int, default=D["seed"], show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=D["precision"], show_default=True,
              help="auto: bf16 autocast on a GPU that has it, fp32 otherwise.")
@click.option("--save-every", type=int, default=D["save_every"], show_default=True, help="Checkpoint every N steps (0: on Ctrl-C only).")
@click.option("--init-adapter", default=None, type=click.Path(exists=True, file_okay=False),
              help="Start from this adapter's weights (same base, method and size) to train its next version.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in OUT.partial/.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once training succeeds).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON at the end.")
def command(as_json: bool, **kwargs) -> None:
    """Fine-tune an adapter (LoRA, QLoRA, prompt or prefix tuning, bottleneck) on a server and write its
    directory."""
    from edgepeft.train import TrainOptions, train

    def plan(lines: list[str]) -> None:  # which task, base and columns were chosen, before the weights load
        click.echo("\n".join(lines), err=True)

    kwargs["columns"] = pop_columns(kwargs)
    result = train(TrainOptions(**kwargs), on_plan=plan)
    metrics = result.metrics
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    click.echo(f"adapter written to {result.out}")
    for line in summary_lines(metrics, result.record):
        click.echo(line)
    for note in result.record.get("warnings") or []:
        click.echo(f"warning: {note}", err=True)


SHOWN_SAMPLES = 3  # held-out answers shown before -> after at the end of training


def summary_lines(metrics: dict, record: dict | None = None) -> list[str]:
    """A few human lines from the metrics dict (before -> after where a baseline exists; the previous
    version's figures beside, for an adapter continued with --init-adapter), then a few held-out answers."""
    t = metrics["train"]
    lines = [f"train: {t['steps']} steps, loss {_num(t['loss_first'])} -> {_num(t['loss_last'])}"]
    ev, base = metrics.get("eval"), metrics.get("baseline") or {}
    if not ev:
        return lines + ["eval: none (no held-out split)"]
    previous = (record or {}).get("previous") or {}
    prev_eval = previous.get("eval") or {}
    keys = ["loss", "perplexity"] if metrics["task"] == "causal-lm" else ["loss", "accuracy", "macro_f1"]
    for k in keys:
        before = f"{_num(base.get(k))} -> " if base else ""
        beside = f"   (previous version {previous['path']}: {_num(prev_eval.get(k))})" if prev_eval else ""
        lines.append(f"eval {k}: {before}{_num(ev.get(k))}{beside}")
    am = ev.get("answer_match")
    if am and am.get("overlap") is not None:
        b = (base.get("answer_match") or {}) if base else {}
        before = f"{_num(b.get('overlap'))} -> " if b.get("overlap") is not None else ""
        lines.append(f"eval answer overlap with the reference (word F1, {am['generated']} greedy answers): "
                     f"{before}{_num(am['overlap'])}")
    return lines + sample_lines(ev, base)


def sample_lines(ev: dict, base: dict) -> list[str]:
    """Two or three held-out examples: the reference, then the bare base's answer -> the adapter's."""
    after, before = ev.get("samples") or [], {_key(s): s for s in base.get("samples") or []}
    if not after:
        return []
    lines = ["held-out examples (reference; bare base -> adapter):" if before else "held-out examples:"]
    for s in after[:SHOWN_SAMPLES]:
        lines.append(f"  {_cut(s.get('prompt') or s.get('text'), 70)}")
        lines.append(f"    reference: {_cut(s['reference'], 90)}")
        was = before.get(_key(s))
        lines.append(f"    answer:    {_cut(was['prediction'], 60) + ' -> ' if was else ''}{_cut(s['prediction'], 90)}")
    return lines


def _key(sample: dict) -> str:
    return str(sample.get("prompt") or sample.get("text"))


def _cut(text, limit: int) -> str:
    from edgepeft.runtime.health import shorten

    return shorten(" ".join(str(text).split()), limit)


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
