"""Text data from the user's files: CSV, JSON Lines and Parquet read alike; every problem with small or
imperfect data is a clear error (file, line, what) before any training; splits by share or by count;
no half-written output folder after an error."""

from __future__ import annotations

import re

import numpy as np
import pytest

from offramp.build.build_cache import staged_build
from offramp.build.tabular import DataFileError, read_columns, write_columns
from offramp.build.text_data import (
    TextDataError,
    TextDataset,
    TextSource,
    rows_needed_per_class,
    split_dataset,
)
from offramp.client.cli.main import main
from tests.tiny_text import CLASSES, corpus, tiny_classifier_folder

FRACTIONS = (0.7, 0.15, 0.15)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_the_three_formats_give_the_same_rows(tmp_path, suffix):
    texts, labels = corpus(30)
    path = write_columns(tmp_path / f"train{suffix}", {"review": texts, "y": labels})
    data = TextSource(train=path, text_column="review", label_column="y").splits(FRACTIONS, seed=0)
    everything = [*data.train.texts, *data.calibration.texts, *data.test.texts]
    assert sorted(everything) == sorted(texts) and data.train.class_names == tuple(sorted(CLASSES))
    for part in (data.train, data.calibration, data.test):
        assert [labels[texts.index(t)] for t in part.texts] == [part.class_names[i] for i in part.labels]


def test_integer_labels_are_classes_in_numeric_order(tmp_path):
    texts, _ = corpus(40)
    labels = [i % 11 for i in range(40)]  # 0..10: numeric order puts 10 after 9, not after 1
    path = write_columns(tmp_path / "train.jsonl", {"text": texts, "label": labels})
    splits = TextSource(train=path).splits((None, 0, 0), seed=0)
    assert splits.train.class_names == tuple(str(i) for i in range(11))
    assert [splits.train.class_names[i] for i in splits.train.labels[:3]] == [
        str(labels[texts.index(t)]) for t in splits.train.texts[:3]
    ]


def test_missing_file_and_column_are_named(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        read_columns(tmp_path / "absent.csv", ["text"])
    path = write_columns(tmp_path / "t.csv", {"sentence": ["a b"], "label": ["x"]})
    with pytest.raises(DataFileError, match=r"t.csv: no column 'text'; its columns are 'sentence', 'label'"):
        TextSource(train=path).splits(FRACTIONS, seed=0)
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    with pytest.raises(DataFileError, match="unknown data file type '.xlsx'"):
        read_columns(tmp_path / "t.xlsx", ["text"])


def test_non_utf8_and_empty_text_name_their_line(tmp_path):
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"text,label\nfine,a\ncaf\xe9 au lait,b\n")
    with pytest.raises(DataFileError, match=r"broken.csv, line 3: not valid UTF-8"):
        TextSource(train=broken).splits(FRACTIONS, seed=0)
    empty = write_columns(tmp_path / "empty.jsonl", {"text": ["fine", "   "], "label": ["a", "b"]})
    with pytest.raises(TextDataError, match=r"empty.jsonl, line 2: empty text in column 'text'"):
        TextSource(train=empty).splits(FRACTIONS, seed=0)
    unlabelled = write_columns(tmp_path / "nolabel.parquet", {"text": ["fine", "also"], "label": ["a", None]})
    with pytest.raises(TextDataError, match=r"nolabel.parquet, row 2: no usable label"):
        TextSource(train=unlabelled).splits(FRACTIONS, seed=0)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl, line 2: not JSON"):
        TextSource(train=bad_json).splits(FRACTIONS, seed=0)


def test_a_held_out_label_training_never_saw_is_named(tmp_path):
    texts, labels = corpus(60)
    train = write_columns(tmp_path / "train.csv", {"text": texts, "label": labels})
    held_out = {"text": ["snow and rain", "a new thing"], "label": ["weather", "news"]}
    test = write_columns(tmp_path / "test.csv", held_out)
    with pytest.raises(TextDataError, match=r"test.csv, line 3: label 'news' never occurs in the training"):
        TextSource(train=train, test=test).splits(FRACTIONS, seed=0)
    # Attach mode: the labels are the model's, whatever the training file holds (here, none at all).
    unlabelled = write_columns(tmp_path / "unlabelled.csv", {"text": texts})
    splits = TextSource(train=unlabelled, calibration=train, test=train).splits((1.0, 0.0, 0.0), 0, CLASSES)
    assert not splits.train.labelled and splits.test.labelled
    with pytest.raises(TextDataError, match="is not one of the model's labels"):
        TextSource(train=unlabelled, calibration=train, test=test).splits((1.0, 0.0, 0.0), 0, CLASSES)
    with pytest.raises(TextDataError, match="rows have no labels; the calibration rows need them"):
        TextSource(train=unlabelled).splits(FRACTIONS, 0, CLASSES)


def dataset(counts: dict[str, int]) -> TextDataset:
    labels = np.repeat(np.arange(len(counts)), list(counts.values()))
    return TextDataset("d", [f"text {i}" for i in range(len(labels))], labels, tuple(counts))


def test_too_few_rows_per_class_states_the_minimum():
    assert rows_needed_per_class(0.15, 0.15) == 7  # floor(7 * 0.15) = 1 in each held-out part, 5 to train
    with pytest.raises(TextDataError, match=r"class 'rare' has 4 rows: .* needs at least 7 rows per class"):
        split_dataset(dataset({"common": 100, "rare": 4}), FRACTIONS, seed=0)
    split_dataset(dataset({"common": 100, "rare": 7}), FRACTIONS, seed=0)


def test_row_counts_are_exact_and_shares_are_per_class():
    data = dataset({"a": 500, "b": 300, "c": 37})
    splits = split_dataset(data, (None, 200, 0.1), seed=0)
    assert len(splits.calibration) == 200  # shared out by size, largest remainders: exactly what was asked
    assert np.bincount(splits.test.labels).tolist() == [50, 30, 3]
    assert len(splits.train) == len(data) - 200 - 83
    with pytest.raises(TextDataError, match="leave no training rows"):
        split_dataset(data, (None, 800, 0.1), seed=0)


def test_staged_build_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "out"
    with staged_build(out) as work:
        (work / "manifest.json").write_text("first")
    assert (out / "manifest.json").read_text() == "first"
    with pytest.raises(RuntimeError):
        with staged_build(out) as work:
            (work / "manifest.json").write_text("half")
            raise RuntimeError("training failed")
    assert (out / "manifest.json").read_text() == "first"  # the earlier build, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_build_errors_come_before_training_and_leave_no_folder(tmp_path, capsys):
    """`offramp build` on imperfect data: exit status 2, one line naming the problem, no output folder."""
    model = tiny_classifier_folder(tmp_path / "model", "bert", layers=2)
    texts, labels = corpus(60)
    train = write_columns(tmp_path / "train.csv", {"text": texts, "label": labels})
    cases = {
        "unseen label": (
            ["--test", str(write_columns(tmp_path / "t.csv", {"text": ["x"], "label": ["news"]}))],
            "label 'news' is not one of the model's labels",
        ),
        "missing column": (["--text-column", "review"], "no column 'review'"),
        "missing file": (["--calibration", str(tmp_path / "absent.csv")], "absent.csv: no such file"),
        "too long": (["--max-length", "500"], "max_length 500: .* takes at most 66 tokens"),
        "bad exits": (["--exits", "1,5"], "exit_layers must be increasing block counts in 0..2"),
        "few rows": (["--calibration-share", "0.01"], "needs at least 100 rows per class"),
    }
    capsys.readouterr()
    for name, (flags, message) in cases.items():
        out = tmp_path / "out" / name.replace(" ", "_")
        argv = ["build", "--model", str(model), "--train", str(train), "--out", str(out), "--quiet", *flags]
        status = main(argv)
        error = capsys.readouterr().err
        assert status == 2 and error.startswith("offramp build: error: "), (name, error)
        assert re.search(message, error), (name, error)
        assert not out.exists() and not list((tmp_path / "out").glob(f".{out.name}*")), name
