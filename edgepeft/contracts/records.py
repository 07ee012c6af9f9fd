"""Labelled-data files as both sides read them: ``edgepeft train`` on the server and ``edgepeft eval`` on a device.

Accepted files: JSON Lines (``.jsonl``, or ``.json`` holding lines or one array) and CSV (``.csv``,
``.tsv``); a directory written by ``datasets.Dataset.save_to_disk`` is read by the caller's
``read_directory`` (the server's, :mod:`edgepeft.train.data`: it needs the ``datasets`` library).
Accepted shapes:

- decoders: ``messages`` (chat turns with ``role``/``content``), ``prompt`` +
  ``completion`` (optional ``system``), or plain ``text``;
- classifiers: ``text`` + ``label`` (optional slice column for per-slice metrics).

Everything here raises :class:`DataError` with a hint naming the fix, and is plain Python (no numpy,
no torch), so bad data fails in milliseconds and a device can read what training reads.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import DataError

SHAPES = ("messages", "prompt_completion", "text", "classification")
ROLES = ("system", "user", "assistant")
# what a column of the data may be mapped to (--columns ROLE=COL)
COLUMN_ROLES = ("prompt", "completion", "text", "label", "messages", "system")
# Column names people often use, and what we expect instead.
_RENAMES = {
    "instruction": "prompt", "input": "prompt", "question": "prompt", "query": "prompt",
    "response": "completion", "output": "completion", "answer": "completion", "target": "completion",
    "conversations": "messages", "chat": "messages", "dialog": "messages",
    "sentence": "text", "content": "text", "utterance": "text",
    "labels": "label", "class": "label", "intent": "label", "category": "label",
}




def read_records(path: str, read_directory=None) -> tuple[list[dict], list[dict] | None]:
    """Rows of ``path`` as dicts, plus a ready-made eval split when the file has one. A directory goes to
    ``read_directory(path)`` (a saved datasets directory); without one it is refused."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data {p} does not exist", hint="check the path given to --data")
    if p.is_dir():
        if read_directory is None:
            raise DataError(f"{p} is a directory", hint="pass a .jsonl, .json, .csv or .tsv file")
        return read_directory(p)
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p} is not UTF-8 text", hint="save it as UTF-8 JSON Lines or CSV") from exc
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _parse_json(p, text), None
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        return [dict(r) for r in rows], None
    raise DataError(f"cannot tell the format of {p.name}",
                    hint="use a .jsonl, .json, .csv or .tsv file, or a directory saved by datasets.save_to_disk")


def _parse_json(p: Path, text: str) -> list[dict]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p} is not valid JSON: {exc}", hint="fix the file or write one JSON object per line") from exc
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n} is not valid JSON: {exc.msg}",
                                hint="JSON Lines needs one complete JSON object per line") from exc
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{p}: record {n} is a {type(row).__name__}, not an object",
                            hint='write objects such as {"prompt": ..., "completion": ...}')
    return rows


def detect_shape(rows: list[dict], task: str | None, source: str, slice_column: str | None = None) -> str:
    """Which of :data:`SHAPES` the rows have; a :class:`DataError` naming the columns otherwise.

    With no ``task`` given, ``text`` beside a column that looks like a label
    (:func:`label_like_column`) is refused as ambiguous rather than silently
    trained as plain text for a language model.
    """
    if not rows:
        raise DataError(f"{source} holds no records", hint="add training examples; see examples/ for the shapes")
    cols = set(rows[0])
    if task == "classification" or (task is None and "label" in cols):
        if {"text", "label"} <= cols:
            return "classification"
        _missing(cols, ["text", "label"], source, "classification")
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        suspect = label_like_column(rows, cols - {"text", "slice", slice_column}) if task is None else None
        if suspect:
            raise DataError(f"{source}: columns text + {suspect} look like a classifier's data, but there is no "
                            f"'label' column, so this would train a language model on the text alone",
                            hint=f"for a classifier: --task classification, or --label-column {suspect} (or rename "
                                 f"columns: {suspect} -> label); for a language model on the text: --task causal-lm "
                                 "(in Python: task=, columns={'label': ...})")
        return "text"
    _missing(cols, ["messages"], source, "causal-lm", alt="or prompt + completion, or text")
    raise AssertionError("unreachable")  # _missing always raises


def label_like_column(rows: list[dict], candidates: set) -> str | None:
    """The first candidate column that reads as a label: a usual label name (intent, class, category...),
    or short values that repeat (at most half of them distinct, over four records or more)."""
    named = sorted(c for c in candidates if _RENAMES.get(str(c).lower()) == "label")
    if named:
        return named[0]
    for col in sorted(c for c in candidates if c is not None):
        values = [r.get(col) for r in rows if r.get(col) not in (None, "")]
        if len(values) < 4 or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            continue
        if all(len(str(v)) <= 40 for v in values) and 2 <= len(set(map(str, values))) <= len(values) // 2:
            return col
    return None


def _missing(cols: set, wanted: list[str], source: str, task: str, alt: str = "") -> None:
    found = [c for c in sorted(cols) if c in _RENAMES]
    renames = [f"{c} -> {_RENAMES[c]}" for c in found]
    mapping = ",".join(f"{_RENAMES[c]}={c}" for c in found) or ",".join(f"{w}=YOUR_COLUMN" for w in wanted)
    hint = (f"rename columns: {', '.join(renames)}; " if renames else
            f"{task} data needs the column(s) {' + '.join(wanted)} {alt}; ".replace("  ", " ")) + \
        f"or map them: --columns {mapping} (columns= in Python)"
    raise DataError(f"{source}: expected column(s) {' + '.join(wanted)} {alt} for {task}, found {sorted(cols) or 'none'}"
                    .replace("  ", " "), hint=hint)


def check_rows(rows: list[dict], shape: str, source: str, keep: str | None = None) -> list[dict]:
    """Keep only the fields the shape uses (plus the ``keep`` slice column); raise on the first bad row."""
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{source}: record {n}"
        if shape == "messages":
            msgs = row.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{where}: messages must be a non-empty list of turns",
                                hint='write [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]')
            for m in msgs:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise DataError(f"{where}: each turn needs role (system/user/assistant) and text content, got {m!r}"[:300],
                                    hint='write turns as {"role": "user", "content": "..."}')
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last turn must be the assistant's answer",
                                hint="end each conversation with the reply the model should learn")
            clean = {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
        elif shape == "prompt_completion":
            clean = {k: row.get(k) for k in ("prompt", "completion")}
            for k, v in clean.items():
                if not isinstance(v, str) or not v.strip():
                    raise DataError(f"{where}: {k} must be non-empty text", hint=f"fill in or drop records without a {k}")
            if isinstance(row.get("system"), str) and row["system"].strip():
                clean["system"] = row["system"]
        elif shape == "text":
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise DataError(f"{where}: text must be non-empty", hint="fill in or drop empty records")
            clean = {"text": row["text"]}
        else:
            text, label = row.get("text"), row.get("label")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: text must be non-empty", hint="fill in or drop empty records")
            if label is None or (isinstance(label, str) and not label.strip()) or isinstance(label, (list, dict, float)):
                raise DataError(f"{where}: label must be a name or an integer id, got {label!r}",
                                hint="give every record one label, e.g. fraud / legit")
            clean = {"text": text, "label": label}
        if keep and row.get(keep) is not None:
            clean[keep] = str(row[keep])
        out.append(clean)
    return out


def parse_columns(text) -> dict[str, str]:
    """``"prompt=question,completion=answer"`` (or a dict) -> ``{role: column}``; raises :class:`DataError`
    for an unknown role or a malformed entry."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, dict) else \
        [p.partition("=")[::2] for p in str(text).split(",") if p.strip()]
    out = {}
    for role, col in pairs:
        role, col = str(role).strip(), str(col).strip()
        if role not in COLUMN_ROLES or not col:
            raise DataError(f"column mapping {role}={col!r} is not ROLE=COLUMN with ROLE one of "
                            f"{', '.join(COLUMN_ROLES)}",
                            hint="e.g. columns prompt=question,completion=answer or text=body,label=category")
        out[role] = col
    return out


def map_columns(rows: list[dict], columns: dict[str, str], source: str, task: str | None) -> tuple[list[dict], dict]:
    """Rename the columns ``columns`` names (``{role: column}``) to the roles edgepeft reads. With the task
    given and no mapping for a missing ``label``/``text``/``prompt``/``completion``, a single column of a
    usual name for it (category, question, answer...) is taken. Returns the rows and the mapping used;
    raises :class:`DataError` naming the columns the data has."""
    if not rows:
        return rows, {}
    have = list(rows[0])
    used = dict(columns)
    for role, col in used.items():
        if col not in have:
            raise DataError(f"{source} has no column {col!r} (mapped to {role}); its columns are "
                            f"{', '.join(map(str, have))}", hint=f"map {role} to one of those columns")
    if task is not None:
        roles = ("text", "label") if task == "classification" else ("prompt", "completion")
        for role in roles:
            if role in used or role in have:
                continue
            named = [c for c in have if _RENAMES.get(str(c).lower()) == role and c not in used.values()]
            if len(named) == 1:
                used[role] = named[0]
    used = {r: c for r, c in used.items() if r != c}
    if not used:
        return rows, {}
    out = []
    for row in rows:
        row = dict(row)
        values = {role: row.pop(col, None) for role, col in used.items()}
        row.update(values)
        out.append(row)
    return out, used
