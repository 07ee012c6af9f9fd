"""Bad input fails before any long work, with a hint, and leaves nothing in --out.

Also: data formats, label handling, the answer-only loss mask, and the CLI.
"""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from edgepeft.errors import DataError, MissingExtraError, ModelError, TrainError, UsageError
from edgepeft.train import TrainOptions, train
from edgepeft.train.data import load_dataset


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from edgepeft.train.tiny import tiny_llama

    return str(tiny_llama(tmp_path_factory.mktemp("llama") / "m"))


def expect(exc_type, tmp_path, match=None, **kw):
    out = tmp_path / "out"
    kw.setdefault("out", str(out))
    with pytest.raises(exc_type, match=match) as info:
        train(progress=False, **kw)
    assert info.value.hint, "every error names a fix"
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    return info.value


# --- data -------------------------------------------------------------------------------------

def test_formats_jsonl_csv_and_saved_dataset_agree(tmp_path):
    rows = [{"text": f"refund my card {i}", "label": "legit" if i % 2 else "fraud"} for i in range(10)]
    a = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), task=None, eval_data=None, eval_split=0.2, seed=1)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    b = load_dataset(str(tmp_path / "d.csv"), task=None, eval_data=None, eval_split=0.2, seed=1)
    assert a.shape == b.shape == "classification" and a.sha256 == b.sha256 and a.labels == ["fraud", "legit"]
    assert len(a.eval) == 2 and {r["label"] for r in a.eval} == {0, 1}  # stratified
    import datasets
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                               "test": datasets.Dataset.from_list(rows[8:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    c = load_dataset(str(tmp_path / "saved"), task=None, eval_data=None, eval_split=0.5, seed=1)
    assert len(c.train) == 8 and len(c.eval) == 2  # the saved test split is the eval split


def test_misnamed_columns_name_the_rename(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    err = expect(DataError, tmp_path, match="expected column", data=path)
    assert "question -> prompt" in err.hint and "answer -> completion" in err.hint


def test_text_beside_a_label_like_column_is_refused_not_trained_as_a_language_model(tmp_path):
    (tmp_path / "d.csv").write_text("text,intent\n" + "".join(f"message {i},{'fraud' if i % 2 else 'legit'}\n"
                                                                for i in range(8)))
    err = expect(DataError, tmp_path, match="text \\+ intent look like a classifier", data=str(tmp_path / "d.csv"))
    assert "intent -> label" in err.hint and "--task causal-lm" in err.hint
    # an unnamed column of repeating short values reads as a label too; unique ids do not
    rows = [{"text": f"note {i}", "kind": "a" if i % 2 else "b", "id": i} for i in range(8)]
    expect(DataError, tmp_path, match="text \\+ kind", data=write_jsonl(tmp_path / "k.jsonl", rows))
    plain = [{"text": f"note {i}", "id": i} for i in range(8)]
    assert load_dataset(write_jsonl(tmp_path / "p.jsonl", plain), task=None, eval_data=None, eval_split=0.2,
                        seed=1).shape == "text"
    # choosing the task explicitly settles it
    assert load_dataset(str(tmp_path / "d.csv"), task="causal-lm", eval_data=None, eval_split=0.2,
                        seed=1).shape == "text"


def test_empty_dataset(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    expect(DataError, tmp_path, match="no records", data=str(tmp_path / "e.jsonl"))


def test_missing_file_and_unknown_format(tmp_path):
    expect(DataError, tmp_path, match="does not exist", data=str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.parquet").write_text("x")
    expect(DataError, tmp_path, match="format", data=str(tmp_path / "d.parquet"))


def test_labels_that_do_not_match(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "spam"}, {"text": "b", "label": "ham"},
                                              {"text": "c", "label": "eggs"}])
    err = expect(DataError, tmp_path, match="'eggs'", data=path, labels="spam,ham")
    assert "--labels" in err.hint
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    expect(DataError, tmp_path, match="only one label", data=one)


def test_bad_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    expect(DataError, tmp_path, match="last turn", data=path)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "completion": ""}])
    expect(DataError, tmp_path, match="completion", data=path)


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, match", [
    ({"rank": 0}, TrainError, "rank"),
    ({"rank": -4}, TrainError, "rank"),
    ({"learning_rate": 0.0}, TrainError, "learning rate"),
    ({"method": "dora"}, UsageError, "method"),
    ({"eval_split": 1.5}, UsageError, "eval split"),
    ({"labels": "only"}, UsageError, "labels"),
])
def test_bad_options_fail_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match) as info:
        TrainOptions(data="d.jsonl", out="o", **kw)
    assert info.value.hint


def test_out_exists_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="already exists") as info:
        train(data="whatever.jsonl", out=str(tmp_path / "out"), progress=False)
    assert "--overwrite" in info.value.hint


def test_resume_without_checkpoint(tmp_path):
    expect(TrainError, tmp_path, match="no checkpoint", data="d.jsonl", resume=True)


def test_qlora_without_bitsandbytes(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    err = expect(MissingExtraError, tmp_path, match="bitsandbytes", data="d.jsonl", method="qlora")
    assert "pip install" in err.hint


def test_base_not_found(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}] * 4)
    expect(ModelError, tmp_path, match="does not exist", data=path, base=str(tmp_path / "no-such-model"))


def test_unknown_target_module(tmp_path, llama):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}] * 4)
    err = expect(TrainError, tmp_path, match="'qkv'", data=path, base=llama, target_modules="q_proj,qkv")
    assert "q_proj" in err.hint and "down_proj" in err.hint


def test_max_length_cutting_every_answer(tmp_path, llama):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello there " * 20, "completion": "ok"}] * 4)
    expect(DataError, tmp_path, match="max_length", data=path, base=llama, max_length=16)


# --- the loss mask ----------------------------------------------------------------------------

def test_loss_covers_only_assistant_turns(llama):
    from edgepeft.models.base import BaseSource, load_tokenizer
    from edgepeft.train.encode import IGNORE, encode_causal

    tok = load_tokenizer(BaseSource("t", llama))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "cheers"}]
    (item,), dropped = encode_causal([{"messages": msgs}], tok, 256)
    kept = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != IGNORE]
    assert dropped == 0
    assert tok.decode(kept) == "hi there<|im_end|>\ncheers<|im_end|>\n"
    (plain,), _ = encode_causal([{"text": "hello there"}], tok, 256)
    assert plain["labels"] == plain["input_ids"]


# --- CLI --------------------------------------------------------------------------------------

def test_cli_help_and_error_path(tmp_path):
    from click.testing import CliRunner

    from edgepeft.cli.cmd_train import command

    runner = CliRunner()
    res = runner.invoke(command, ["--help"])
    assert res.exit_code == 0 and "--method [lora|qlora|prompt-tuning|prefix-tuning|bottleneck]" in res.output and "--resume" in res.output
    res = runner.invoke(command, ["--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, DataError)  # the CLI group formats it
    res = runner.invoke(command, ["--data", "d.jsonl", "--out", str(tmp_path / "o"), "--rank", "0"])
    assert isinstance(res.exception, TrainError) and "rank" in str(res.exception)


def test_cli_trains_tiny_model(tmp_path, llama):
    from click.testing import CliRunner

    from edgepeft.cli.cmd_train import command

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"hello {i}", "completion": "cheers"} for i in range(8)])
    res = CliRunner().invoke(command, ["--data", path, "--out", str(tmp_path / "o"), "--base", llama, "--steps", "2",
                                       "--batch-size", "4", "--no-progress", "--eval-generate", "1",
                                       "--max-new-tokens", "2", "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["train"]["steps"] == 2 and metrics["eval"]["examples"] == 1
    assert set(metrics["eval"]["answer_match"]) == {"generated", "exact", "contains", "overlap"}
    # said up front, on stderr: the task and why, the base, the columns
    assert res.stderr.splitlines()[:2] == [
        f"edgepeft train: causal-lm (the data has no label column) on m ({llama}), lora r=8",
        "  columns: prompt + completion (loss on the completion)"]


def test_summary_names_answer_overlap_not_a_contains_match_that_reads_as_failure():
    from edgepeft.cli.cmd_train import summary_lines

    ev = {"loss": 1.9, "perplexity": 6.8, "answer_match": {"generated": 11, "exact": 0.0, "contains": 0.0,
                                                           "overlap": 0.41}}
    base = {"loss": 4.4, "perplexity": 86.9, "answer_match": {"generated": 11, "exact": 0.0, "contains": 0.0,
                                                              "overlap": 0.12}}
    lines = summary_lines({"task": "causal-lm", "train": {"steps": 30, "loss_first": 3.2, "loss_last": 0.9},
                           "eval": ev, "baseline": base})
    assert "eval answer overlap with the reference (word F1, 11 greedy answers): 0.12 -> 0.41" in lines
    assert not any("contains" in line for line in lines)


def test_answer_overlap_credits_shared_words():
    from edgepeft.contracts.metrics import answer_scores

    ref = "Hi there! Restart the router. Happy surfing! — Nora"
    long = answer_scores("Hi there! Unplug it for ten seconds, then restart the router. Happy surfing! — Nora", ref)
    assert not long["contains"] and 0.6 < long["overlap"] < 1.0
    assert answer_scores("no idea", ref)["overlap"] == 0.0 and answer_scores(ref, ref)["exact"]


def test_cli_output_has_no_load_report_or_library_warnings(tmp_path):
    import subprocess
    import sys

    from edgepeft.train.tiny import tiny_bert

    bert = tiny_bert(tmp_path / "bert")
    rows = [{"text": f"word {i} " * 3, "label": "a" if i % 2 else "b"} for i in range(8)]
    proc = subprocess.run([sys.executable, "-m", "edgepeft", "train", "--data", write_jsonl(tmp_path / "d.jsonl", rows),
                           "--base", str(bert), "--out", str(tmp_path / "o"), "--steps", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LOAD REPORT" not in proc.stderr and "Warning" not in proc.stderr and "\x1b[" not in proc.stderr
    assert "a new classification head" in proc.stderr and "Loading weights" not in proc.stderr


# --- data order across processes (the accelerate launch path) --------------------------------

def test_epoch_groups_shard_disjoint_and_deterministic():
    from edgepeft.train.loop import epoch_groups, plan

    n, bs, ga, world = 23, 3, 2, 2
    shards = [epoch_groups(n, bs, ga, world, rank, seed=7, epoch=0) for rank in range(world)]
    assert shards[0] == epoch_groups(n, bs, ga, world, 0, seed=7, epoch=0)  # pure function of (seed, epoch)
    assert shards[0] != epoch_groups(n, bs, ga, world, 0, seed=7, epoch=1)
    flat = [i for shard in shards for group in shard for batch in group for i in batch]
    assert set(flat) == set(range(n)) and len(flat) == 24  # every record, padded by one wrap-around
    assert [len(s) for s in shards] == [2, 2] == [plan(n, bs, ga, world, 1.0, None).steps_per_epoch] * 2
