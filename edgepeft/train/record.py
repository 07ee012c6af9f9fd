"""What a finished run leaves in ``--out``, written beside it and renamed in at the end.

Layout of ``--out`` (a standard PEFT adapter directory plus three files)::

    adapter_config.json, adapter_model.safetensors   PeftModel.from_pretrained loads these
    edgepeft_training.json                           the training record (schema below)
    edgepeft_labels.json                             classifiers only: label names in id order
    loss_curve.png                                   train loss per step (+ eval loss)

While training, ``<out>.partial/`` holds ``checkpoint.pt`` (for ``--resume``)
and the adapter being assembled (``<out>.partial/adapter``). Only when the
adapter, record and plot are all written is that directory renamed to
``<out>``; ``<out>.partial`` is then removed. A crash leaves ``<out>`` untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..fsio import atomic_path, write_atomic

RECORD = "edgepeft_training.json"
LABELS = "edgepeft_labels.json"
PLOT = "loss_curve.png"
RECORD_SCHEMA = 1


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def labels_file(labels: list[str]) -> dict:
    """What travels with a classifier adapter so a device can name its predictions."""
    return {"labels": labels, "id2label": {str(i): n for i, n in enumerate(labels)},
            "label2id": {n: i for i, n in enumerate(labels)}, "problem_type": "single_label_classification"}


def plot_losses(path: Path, losses: list, eval_points: list, title: str) -> None:
    """Loss curve PNG (matplotlib, Agg backend, so it works without a display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, lw=1, alpha=0.5, label="train loss")
        k = max(1, len(values) // 20)
        if k > 1:
            smooth = [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, lw=2, label=f"train loss (mean of {k})")
    pts = [(s, v) for s, v in eval_points if v is not None]
    if pts:
        ax.scatter(*zip(*pts), color="tab:red", zorder=3, label="held-out loss (step 0: bare base)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def build_record(*, opts, task: str, base, prepared, dataset, state, metrics: dict, wall_seconds: float,
                 accelerator, versions: dict) -> dict:
    """The training record: enough to reproduce the run and for a rollout gate to judge it."""
    return {
        "schema": RECORD_SCHEMA,
        "kind": "edgepeft.training",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": task,
        "method": opts.method,
        "base": {"name": base.name, "path": base.path, "gguf_file": base.gguf_file,
                 "fingerprint": prepared.fingerprint, "model_type": prepared.model_type},
        "adapter": (prepared.adapter or {"rank": opts.rank, "alpha": opts.alpha, "dropout": opts.dropout})
        | {"target_modules": prepared.target_modules, "modules_to_save": prepared.modules_to_save,
           "trainable_params": prepared.trainable_params, "total_params": prepared.total_params},
        "data": dataset.summary(),
        "labels": dataset.labels,
        "options": opts.to_dict(),
        "metrics": metrics,
        "loss_curve": state.losses,
        "runtime": {"train_seconds": round(state.seconds, 2), "wall_seconds": round(wall_seconds, 2),
                    "device": str(accelerator.device), "processes": accelerator.num_processes,
                    "mixed_precision": str(accelerator.mixed_precision), "versions": versions},
    }


def read_record(adapter_dir: str | os.PathLike) -> dict:
    """The training record of a finished adapter directory; raises :class:`~edgepeft.errors.DataError`
    when the directory has none or it is not a JSON object."""
    from ..errors import DataError

    path = Path(adapter_dir) / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{adapter_dir} has no {RECORD}", hint="pass a directory written by `edgepeft train`") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON: {exc}", hint="train the adapter again") from exc
    if not isinstance(record, dict) or "metrics" not in record:
        raise DataError(f"{path} is not an edgepeft training record", hint="train the adapter again")
    return record


def publish(staged: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``staged`` directory to ``out`` by rename (same filesystem, atomic per step)."""
    if out.exists():
        if not overwrite:
            from ..errors import UsageError
            raise UsageError(f"{out} already exists", hint="pass --overwrite or choose another --out")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, out)
