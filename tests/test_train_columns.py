"""Data whose columns have other names (issue 26, item 7): `--prompt-column`, `--completion-column`,
`--text-column`, `--label-column` or one `--columns` mapping, for `edgepeft train` and `edgepeft eval`;
`--task classification` on `text,category` works as the README says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgepeft.errors import DataError
from edgepeft.train.data import load_dataset


def _csv(path, header, rows):
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=os.environ | {"EDGEPEFT_DEBUG": ""})


def test_columns_map_by_option_by_mapping_and_by_task(tmp_path):
    bakery = _csv(tmp_path / "bakery.csv", "question,answer,id",
                  [(f"do you sell rye bread {i}", "yes every morning", str(i)) for i in range(6)])
    ds = load_dataset(bakery, task=None, eval_data=None, eval_split=0.0, seed=1,
                      columns={"prompt": "question", "completion": "answer"})
    assert ds.shape == "prompt_completion" and ds.train[0]["completion"] == "yes every morning"
    assert ds.columns == {"prompt": "question", "completion": "answer"}
    same = load_dataset(bakery, task=None, eval_data=None, eval_split=0.0, seed=1,
                        columns="prompt=question,completion=answer")
    assert same.sha256 == ds.sha256
    # --task classification on text,category: the usual name is taken, and said
    inbox = _csv(tmp_path / "inbox.csv", "text,category",
                 [(f"invoice {i} is wrong", "billing") for i in range(4)] + [(f"parcel {i} late", "shipping")
                                                                            for i in range(4)])
    ds = load_dataset(inbox, task="classification", eval_data=None, eval_split=0.25, seed=1)
    assert ds.shape == "classification" and ds.labels == ["billing", "shipping"]
    assert ds.columns == {"label": "category"}
    with pytest.raises(DataError, match="no column 'body'") as ei:
        load_dataset(inbox, task=None, eval_data=None, eval_split=0.0, seed=1, columns={"text": "body"})
    assert "text, category" in ei.value.message
    with pytest.raises(DataError, match="ROLE=COLUMN"):
        load_dataset(inbox, task=None, eval_data=None, eval_split=0.0, seed=1, columns="txt=text")
    # without a task or a mapping the old refusal stands, and now names the mapping too
    with pytest.raises(DataError, match="look like a classifier") as ei:
        load_dataset(inbox, task=None, eval_data=None, eval_split=0.0, seed=1)


def test_train_and_eval_take_the_same_column_options(tmp_path, tmp_path_factory):
    from test_runtime_support import cached_bundle

    from edgepeft.train.tiny import tiny_bert

    base = tiny_bert(tmp_path / "bert")
    inbox = _csv(tmp_path / "inbox.csv", "text,category",
                 [(f"invoice {i} is wrong", "billing") for i in range(6)] + [(f"parcel {i} late", "shipping")
                                                                            for i in range(6)])
    r = _cli("train", "--data", inbox, "--task", "classification", "--base", base, "--out", tmp_path / "a",
             "--steps", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "'category' as label" in r.stderr
    body = _csv(tmp_path / "body.csv", "body,kind", [(f"invoice {i} is wrong", "billing") for i in range(6)] +
                [(f"parcel {i} late", "shipping") for i in range(6)])
    r = _cli("train", "--data", body, "--text-column", "body", "--label-column", "kind", "--base", base, "--out",
             tmp_path / "b", "--steps", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "b" / "edgepeft_training.json").read_text())
    assert rec["data"]["columns"] == {"text": "body", "label": "kind"}
    # eval on the device runtime, the fixture bundle's sentiment adapter, data with its own column names
    built = cached_bundle("encoder", tmp_path_factory)
    reviews = _csv(tmp_path / "reviews.csv", "review,verdict", [("good product", "positive"), ("awful", "negative"),
                                                                ("great service", "positive"), ("bad", "negative")])
    r = _cli("eval", built["bundle"], "--adapter", "sentiment", "--trusted-key", built["public_key"], "--data",
             reviews, "--columns", "text=review,label=verdict")
    assert r.returncode == 0 and "4 examples" in r.stdout, r.stdout + r.stderr
    r = _cli("eval", built["bundle"], "--adapter", "sentiment", "--trusted-key", built["public_key"], "--data",
             reviews, "--text-column", "review", "--columns", "text=body")
    assert r.returncode != 0 and "disagree" in r.stderr
