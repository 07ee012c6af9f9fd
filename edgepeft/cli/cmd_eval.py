"""``edgepeft eval BUNDLE --data FILE``: an adapter's held-out figures on the device runtime, beside training's.

The same metrics as ``edgepeft train`` reports (definitions in
:mod:`edgepeft.contracts.metrics`), computed through :class:`~edgepeft.runtime.Engine`
on the bundle as shipped (quantized graph, adapter file), next to the figures
the bundle carries from the adapter's training record. A gap between the two
columns is what export and quantization cost on this task.
"""

from __future__ import annotations

import json

import click

from ..contracts.metrics import ANSWER_MAX_NEW_TOKENS, ANSWER_PROMPTS
from ..errors import DataError, UsageError
from .columns import column_options, pop_columns
from .keys import trusted_keys


def _pick_adapter(engine, name: str | None) -> tuple[str | None, dict]:
    """(adapter to run, its manifest facts: version, labels, metrics); merged bundles run with None."""
    m = engine.manifest
    merged = m.model.get("merged")
    if name is None:
        names = [a.name for a in m.adapters]
        if merged and not names:
            return None, merged
        if len(names) == 1:
            name = names[0]
        elif names:
            raise UsageError(f"the bundle carries {len(names)} adapters", hint=f"pass --adapter with one of: {', '.join(names)}")
        else:
            return None, {"name": None, "labels": m.model.get("labels"), "metrics": {}}
    entry = m.adapter(name) if any(a.name == name for a in m.adapters) else None
    if entry is None:
        known = ", ".join(a.name for a in m.adapters) or "none"
        raise UsageError(f"the bundle has no adapter named {name!r}", hint=f"its adapters: {known}")
    return name, {"name": name, "version": entry.version, "labels": list(entry.labels or []), "metrics": entry.metrics}


def _saved_dataset(path):
    """A saved datasets directory: read by the server's reader, which needs ``datasets`` (edgepeft[train]);
    checked first, so a device (which has neither) never loads the training package."""
    from .._extras import require

    require("datasets", feature="reading a saved datasets directory")
    from ..train.data import read_saved_dataset

    return read_saved_dataset(path)


def _rows(path: str, task: str, labels: list[str] | None, slice_column: str | None,
          columns: dict | None = None) -> tuple[list[dict], str | None]:
    from ..contracts.records import check_rows, detect_shape, map_columns, read_records

    rows, split = read_records(path, read_directory=_saved_dataset)
    rows, _ = map_columns(rows + (split or []), columns or {}, path, task)
    shape = detect_shape(rows, task, path, slice_column)
    if slice_column and not any(slice_column in r for r in rows):
        raise DataError(f"slice column {slice_column!r} is not in {path}", hint="name an existing column, or drop --slice-column")
    col = slice_column or ("slice" if any("slice" in r for r in rows) else None)
    rows = check_rows(rows, shape, path, col)
    if task == "classification":
        for r in rows:  # integer ids name labels by position, as in training
            v = r["label"]
            if str(v) not in (labels or []) and str(v).lstrip("-").isdigit() and 0 <= int(v) < len(labels or []):
                r["label"] = labels[int(v)]
    return rows, col


@click.command("eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True),
              help="Labelled data in the training shapes (.jsonl/.json/.csv/.tsv or a datasets directory).")
@click.option("--adapter", help="Adapter to evaluate. [default: the bundle's only adapter, or its merged one]")
@click.option("--trusted-key", "trusted_key", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (.pub) the device trusts; repeatable. [default: $EDGEPEFT_TRUSTED_KEYS]")
@click.option("--slice-column", default=None, help="Column for per-slice figures. [default: 'slice' if present]")
@click.option("--generate", "n_generate", type=click.IntRange(0, 100000), default=ANSWER_PROMPTS,
              show_default=True, help="Decoders: prompts to answer greedily for answer match (as training's --eval-generate).")
@click.option("--max-new-tokens", type=click.IntRange(1, 100000), default=ANSWER_MAX_NEW_TOKENS,
              show_default=True, help="Decoders: tokens per generated answer.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Inference threads. [default: the bundle target's]")
@column_options
@click.option("--json", "as_json", is_flag=True, help="Print both sets of figures as JSON.")
def command(bundle, data, adapter, trusted_key, slice_column, n_generate, max_new_tokens, threads, as_json,
            **column_kw):
    """Score BUNDLE's adapter on --data with the device runtime, beside its training record's figures."""
    from ..contracts.metrics import manifest_metrics
    from ..runtime.engine import Engine
    from ..runtime.evaluate import classifier_metrics, decoder_metrics

    engine = Engine(bundle, trusted_keys(trusted_key), threads=threads)
    name, facts = _pick_adapter(engine, adapter)
    rows, col = _rows(data, engine.task, facts.get("labels"), slice_column, pop_columns(column_kw))
    if engine.task == "classification":
        if not facts.get("labels"):
            raise UsageError("the bare base has no classification head", hint="pass --adapter NAME")
        device = classifier_metrics(engine, rows, adapter=name, labels=list(facts["labels"]), slice_column=col)
    else:
        device = decoder_metrics(engine, rows, adapter=name, generate=n_generate, max_new_tokens=max_new_tokens)
    record = manifest_metrics(facts.get("metrics"))
    quant = engine.manifest.quantization.get("weights")
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "adapter": name, "version": facts.get("version"), "data": data,
                               "quantization": quant, "device": device,
                               "training_record": {"eval": record.get("eval"), "baseline": record.get("baseline"),
                                                   "record_sha256": record.get("record_sha256")}}, indent=2))
        return
    target = (engine.manifest.target or {}).get("name")
    merged = engine.manifest.model.get("merged")
    who = f"adapter {name} v{facts.get('version')}" if name else \
        f"merged adapter {merged['name']} v{merged['version']}" if merged else "the bare base"
    click.echo(f"{who} on {data}: {device['examples']} examples, {quant} bundle for {target}")
    trained = record.get("eval") or {}
    mine, theirs = dict(_figures(engine.task, device)), dict(_figures(engine.task, trained))
    table = [("figure", f"training record ({trained.get('examples', '?')} held-out, PyTorch)",
              f"this device (edgepeft {quant})")]
    table += [(k, _num(theirs.get(k)), _num(v)) for k, v in mine.items()]
    widths = [max(len(r[i]) for r in table) for i in range(2)]
    for r in table:
        click.echo(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    if not trained:
        click.echo("(the bundle carries no training figures for this adapter)")


def _figures(task: str, m: dict) -> list[tuple[str, object]]:
    """The figures worth a row, by name, from one held-out metrics dict (training's or the device's)."""
    if task == "classification":
        rows = [(k, m.get(k)) for k in ("accuracy", "macro_f1", "loss")] + [("flagged for review", m.get("needs_review"))]
        return rows + [(f"accuracy, slice {k}", v.get("accuracy")) for k, v in sorted((m.get("slices") or {}).items())]
    am = m.get("answer_match") or {}
    return [("loss", m.get("loss")), ("perplexity", m.get("perplexity")),
            ("answer overlap (word F1)", am.get("overlap")), ("answer exact match", am.get("exact"))]


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
