"""Read, check and split training data before any model is loaded.

The files and shapes are :mod:`edgepeft.contracts.records`' (``edgepeft eval`` reads them too);
here: a directory written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` with a ``test``
or ``validation`` split uses it as the evaluation split), labels, hashing and the train/eval split.

Everything here raises :class:`DataError` with a hint naming the fix, and is
torch-free so bad data fails in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..contracts import records
from ..contracts.records import COLUMN_ROLES, check_rows, detect_shape, map_columns, parse_columns  # noqa: F401
from ..errors import DataError


@dataclass
class Dataset:
    """Checked records of one shape, split into train and eval."""

    shape: str
    train: list[dict]
    eval: list[dict]
    source: str
    sha256: str
    labels: list[str] | None = None  # classification: names in id order
    slice_column: str | None = None
    columns: dict | None = None  # role -> the data's column, where they differ

    def summary(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "shape": self.shape,
                "train_examples": len(self.train), "eval_examples": len(self.eval),
                "labels": self.labels, "slice_column": self.slice_column, "columns": self.columns or None}


def read_records(path: str) -> tuple[list[dict], list[dict] | None]:
    """Rows of ``path`` as dicts (:func:`edgepeft.contracts.records.read_records`), a saved datasets
    directory included, plus a ready-made eval split when there is one."""
    return records.read_records(path, read_directory=read_saved_dataset)


def read_saved_dataset(p: Path) -> tuple[list[dict], list[dict] | None]:
    if not ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        raise DataError(f"directory {p} is not a saved Hugging Face dataset",
                        hint="pass a directory written by Dataset.save_to_disk, or a .jsonl/.csv file")
    from .._extras import require
    require("datasets", feature="reading a saved datasets directory")
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # datasets raises many types for a broken directory
        raise DataError(f"cannot read the dataset in {p}: {exc}", hint="re-save it with save_to_disk") from exc
    if isinstance(ds, datasets.DatasetDict):
        train_name = "train" if "train" in ds else next(iter(ds))
        eval_name = next((n for n in ("validation", "test", "eval") if n in ds), None)
        return ds[train_name].to_list(), (ds[eval_name].to_list() if eval_name else None)
    return ds.to_list(), None


def resolve_labels(rows: list[dict], given: list[str] | None, source: str) -> list[str]:
    """Label names in id order; integer labels are ids into ``given``. Rewrites rows to int ids."""
    raw = [r["label"] for r in rows]
    ints = [v for v in raw if isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())]
    if given is None:
        if ints and len(ints) == len(raw):
            ids = sorted({int(v) for v in raw})
            if ids[0] < 0:
                raise DataError(f"{source}: negative label id {ids[0]}", hint="use ids 0..N-1 or label names")
            names = [str(i) for i in range(ids[-1] + 1)]
        else:
            names = sorted({str(v) for v in raw})
        if len(names) < 2:
            raise DataError(f"{source}: only one label ({names[0] if names else 'none'}) in the data",
                            hint="a classifier needs examples of at least two labels")
    else:
        names = list(given)
    index = {n: i for i, n in enumerate(names)}
    for n, r in enumerate(rows, 1):
        v = r["label"]
        if str(v) in index:
            r["label"] = index[str(v)]
        elif (isinstance(v, int) or str(v).lstrip("-").isdigit()) and given is not None and 0 <= int(v) < len(names):
            r["label"] = int(v)
        else:
            raise DataError(f"{source}: record {n} has label {v!r}, which is not one of {names}",
                            hint="fix the record or list every label with --labels a,b,c")
    return names


def content_hash(rows: list[dict]) -> str:
    """SHA-256 of the records as canonical JSON: the same data gives the same hash in any file format."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def split_rows(rows: list[dict], fraction: float, seed: int, key: str | None) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split; stratified by ``key`` (the label) so every class is seen in eval."""
    if fraction <= 0:
        return list(rows), []
    rng = random.Random(seed)
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.get(key) if key else None, []).append(i)
    held = set()
    for idx in groups.values():
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if k == 0 and len(idx) >= 4 and key is not None:
            k = 1
        held.update(idx[:k])
    if not held and len(rows) >= 2:
        held.add(rng.randrange(len(rows)))
    train = [r for i, r in enumerate(rows) if i not in held]
    if not train:
        raise DataError(f"holding out {fraction:.0%} leaves no training data",
                        hint="add records or lower --eval-split")
    return train, [r for i, r in enumerate(rows) if i in held]


def load_dataset(data: str, *, task: str | None, eval_data: str | None, eval_split: float, seed: int,
                 labels: list[str] | None = None, slice_column: str | None = None,
                 columns: dict | None = None) -> Dataset:
    """Read ``data`` (and ``eval_data``), map its columns (:func:`map_columns`), check every record,
    resolve labels and split.

    Raises :class:`DataError` for a missing file, an unknown format, an empty
    dataset, missing or misnamed columns, bad records, or labels outside ``labels``.
    """
    rows, ready_eval = read_records(data)
    rows, used = map_columns(rows, parse_columns(columns), data, task)
    if ready_eval:
        ready_eval, _ = map_columns(ready_eval, used, data + " (eval split)", None)
    shape = detect_shape(rows, task, data, slice_column)
    if task == "causal-lm" and shape == "classification":
        raise DataError(f"{data} looks like classification data (text + label) but the task is causal-lm",
                        hint="drop --task causal-lm, or rename the label column")
    if slice_column and not any(slice_column in r for r in rows):
        raise DataError(f"slice column {slice_column!r} is not in {data}",
                        hint="name an existing column, or drop --slice-column")
    col = slice_column or ("slice" if any("slice" in r for r in rows) else None)
    rows = check_rows(rows, shape, data, col)
    if eval_data:
        ev_rows, _ = read_records(eval_data)
        if not ev_rows:
            raise DataError(f"{eval_data} holds no records", hint="add evaluation examples or drop --eval-data")
        ev_rows, _ = map_columns(ev_rows, used, eval_data, None)
        ev_shape = detect_shape(ev_rows, "classification" if shape == "classification" else task, eval_data,
                                slice_column)
        if ev_shape != shape:
            raise DataError(f"{eval_data} has shape {ev_shape} but {data} has shape {shape}",
                            hint="give evaluation data the same columns as the training data")
        ready_eval = check_rows(ev_rows, shape, eval_data, col)
    elif ready_eval is not None:
        ready_eval = check_rows(ready_eval, shape, data + " (eval split)", col) if ready_eval else None
    names = None
    if shape == "classification":
        names = resolve_labels(rows + (ready_eval or []), labels, data)
    sha = content_hash(rows + (ready_eval or []))
    if ready_eval:
        train, held = rows, ready_eval
    else:
        train, held = split_rows(rows, eval_split, seed, "label" if shape == "classification" else None)
    return Dataset(shape, train, held, data, sha, names, col, used)
