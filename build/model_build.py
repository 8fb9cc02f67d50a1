"""``offramp build``: one build for every kind of model, dispatched from a :class:`BuildConfig`.

- text, attach mode (a fine-tuned transformers classifier): ``build/text_attach.py``;
- text, joint mode (a base encoder, or the packaged MiniLM recipes): ``build/text_recipes.py``;
- images, ResNet or stem-plus-stages with the user's weights: ``build/vision.py``;
- the Fashion-MNIST CNN recipe: ``build/recipes.py``.

Each checks the model and the data before it trains anything, reuses a build made with the same
settings, and builds into a folder that replaces the output folder only once it is complete.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from offramp.build.artifacts import ModelArtifacts
from offramp.build.build_config import FASHION_CNN, PACKAGED_MINILM, BuildConfig, ConfigError
from offramp.build.tabular import DataFileError
from offramp.build.text_data import TextDataError, TextSource
from offramp.build.transformer import (
    ExitPlacementError,
    UnsupportedModel,
    is_sequence_classifier,
    load_model_config,
    longest_sequence,
)

DEFAULT_MAX_LENGTH = 128  # tokens, where a build from files names none
# Problems with what the user gave (the config, the data, the model): a message, not a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataFileError, TextDataError, UnsupportedModel, ExitPlacementError, FileNotFoundError,
)  # fmt: skip


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def build_model(config: BuildConfig, progress: bool = True) -> ModelArtifacts:
    """Builds (or reuses) what ``config`` describes into ``config.out``; returns its manifest."""
    if config.kind == "text":
        return _build_text(config, progress)
    if config.model.architecture == FASHION_CNN:
        return _build_fashion_cnn(config, progress)
    return _build_vision(config, progress)


def text_model_path(path: str) -> Path:
    """A text model's folder: the packaged MiniLM by its name, else the path given."""
    if path == PACKAGED_MINILM:
        from offramp.build.transformer import minilm_path

        return minilm_path()
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(
            f"model.path {path}: no such folder (a transformers save_pretrained folder, or {PACKAGED_MINILM})"
        )
    return folder


def text_mode(config: BuildConfig, model_path: Path) -> str:
    """The training mode asked for, else attach for a fine-tuned classifier and joint for a base encoder."""
    if config.train.mode is not None:
        return config.train.mode
    return "attach" if is_sequence_classifier(load_model_config(model_path)) else "joint"


def _build_text(config: BuildConfig, progress: bool) -> ModelArtifacts:
    model, data, split, train = config.model, config.data, config.split, config.train
    if not progress:  # transformers draws its own bars while it loads and saves weights
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if data.dataset == "fashion-mnist":
        raise ConfigError("data.dataset fashion-mnist is images: give model.architecture")
    model_path = text_model_path(model.path)
    source = TextSource(
        task=data.dataset, train=data.train, calibration=data.calibration, test=data.test,
        text_column=data.text_column, label_column=data.label_column, class_names=data.labels,
    )  # fmt: skip
    fractions = source.split_fractions(split.calibration, split.test)
    # A length the model takes: the default is capped at its position embeddings, a length given is checked.
    longest = longest_sequence(load_model_config(model_path))
    max_length = _or(data.max_length, min(DEFAULT_MAX_LENGTH, longest))
    if text_mode(config, model_path) == "attach":
        from offramp.build.text_attach import AttachSettings, build_attached_classifier

        if train.distill_weight is not None:
            raise ConfigError("attach mode always distils; train.label_weight mixes the labels in")

        settings = AttachSettings(
            max_length=max_length,
            exit_layers=model.exits,
            fractions=fractions,
            seed=split.seed,
            max_train_rows=train.max_train_rows,
            epochs=_or(train.epochs, AttachSettings.epochs),
            batch_size=_or(train.batch_size, AttachSettings.batch_size),
            learning_rate=_or(train.learning_rate, AttachSettings.learning_rate),
            weight_decay=_or(train.weight_decay, AttachSettings.weight_decay),
            head_dropout=_or(train.head_dropout, AttachSettings.head_dropout),
            label_weight=_or(train.label_weight, AttachSettings.label_weight),
            distill_temperature=_or(train.distill_temperature, AttachSettings.distill_temperature),
        )
        return build_attached_classifier(
            config.out,
            source,
            model_path,
            name=config.name,
            settings=settings,
            progress=progress,
            threads=train.threads,
        )
    from offramp.build.text_recipes import TextTrainSettings, build_text_classifier

    if train.label_weight is not None:
        raise ConfigError(
            "train.label_weight weighs labels against the final head's output: an attach-mode setting"
        )
    settings = TextTrainSettings(
        epochs=_or(train.epochs, TextTrainSettings.epochs),
        max_length=max_length,
        max_train_rows=train.max_train_rows,
        seed=split.seed,
        batch_size=_or(train.batch_size, TextTrainSettings.batch_size),
        learning_rate=_or(train.learning_rate, TextTrainSettings.learning_rate),
        weight_decay=_or(train.weight_decay, TextTrainSettings.weight_decay),
        exit_layers=model.exits,
        head_dropout=_or(train.head_dropout, TextTrainSettings.head_dropout),
        fractions=fractions,
        distill_weight=_or(train.distill_weight, TextTrainSettings.distill_weight),
        distill_temperature=_or(train.distill_temperature, TextTrainSettings.distill_temperature),
    )
    return build_text_classifier(
        config.out, source, settings=settings, name=config.name, model_path=model_path, probe=train.probe,
        progress=progress, threads=train.threads,
    )  # fmt: skip


def _build_fashion_cnn(config: BuildConfig, progress: bool) -> ModelArtifacts:
    """The project's residual CNN on Fashion-MNIST's IDX files; the last ``split.calibration`` training
    images are held out for calibration, and the IDX test set is the test split."""
    from offramp.build.fashion_mnist import DEFAULT_DIR
    from offramp.build.recipes import DEFAULT_TRAIN, build_fashion_mnist_cnn
    from offramp.build.train import TrainConfig

    data, split, train = config.data, config.split, config.train
    if data.dataset != "fashion-mnist":
        raise ConfigError(
            f"model.architecture {FASHION_CNN} trains on Fashion-MNIST's IDX files (data.dataset = "
            '"fashion-mnist"); for your own images use resnet18, resnet34 or resnet50'
        )
    if config.model.exits is not None or config.train.mode == "attach":
        raise ConfigError(f"{FASHION_CNN} has an exit after each of its stages and is trained jointly")
    if not isinstance(split.calibration, int):
        raise ConfigError(
            f"{FASHION_CNN} holds out the last N training images: split.calibration must be a number"
        )
    defaults = DEFAULT_TRAIN  # the recipe's: what the demo and the benchmark serve
    settings = TrainConfig(
        epochs=_or(train.epochs, defaults.epochs),
        batch_size=_or(train.batch_size, defaults.batch_size),
        learning_rate=_or(train.learning_rate, defaults.learning_rate),
        weight_decay=_or(train.weight_decay, defaults.weight_decay),
        seed=split.seed,
        max_train_rows=train.max_train_rows,
        distill_weight=_or(train.distill_weight, defaults.distill_weight),
        distill_temperature=_or(train.distill_temperature, defaults.distill_temperature),
    )
    return build_fashion_mnist_cnn(
        config.out, name=config.name, train=settings, data_dir=data.train or DEFAULT_DIR,
        calibration_rows=split.calibration, progress=progress,
    )  # fmt: skip


def _build_vision(config: BuildConfig, progress: bool) -> ModelArtifacts:
    """A torchvision ResNet or stem-plus-stages network on the user's images (``build/vision.py``)."""
    from offramp.build.build_cache import staged_build
    from offramp.build.image_data import load_image_splits
    from offramp.build.train import TrainConfig
    from offramp.build.vision import build_vision_classifier

    model, data, split, train = config.model, config.data, config.split, config.train
    if data.dataset is not None:
        raise ConfigError(
            f"data.dataset {data.dataset!r} is a packaged text set: give data.train (your images)"
        )
    shares = (split.calibration, split.test)
    if any(isinstance(share, int) and share for share in shares):
        raise ConfigError(
            "image splits take shares (0.15), not numbers of rows: give split.calibration as a share"
        )
    held_out = (
        0.0 if data.calibration else float(split.calibration),
        0.0 if data.test else float(split.test),
    )
    fractions = (round(1.0 - sum(held_out), 12), *held_out)
    preprocess = None  # measured on the training images unless the config states the network's own
    if data.mean is not None:
        from offramp.backend.image import ImageSpec

        try:
            preprocess = ImageSpec(len(data.mean), data.image_size, data.resize, data.mean, data.std)
        except ValueError as error:
            raise ConfigError(f"data: {error}") from None
    splits = load_image_splits(
        data.train, data.calibration, data.test, fractions, split.seed, data.image_size, preprocess=preprocess
    )
    defaults = TrainConfig()
    settings = TrainConfig(
        epochs=_or(train.epochs, defaults.epochs),
        batch_size=_or(train.batch_size, defaults.batch_size),
        learning_rate=_or(train.learning_rate, defaults.learning_rate),
        weight_decay=_or(train.weight_decay, defaults.weight_decay),
        seed=split.seed,
        max_train_rows=train.max_train_rows,
        distill_weight=_or(train.distill_weight, defaults.distill_weight),
        distill_temperature=_or(train.distill_temperature, defaults.distill_temperature),
    )
    mode = _or(train.mode, "attach" if model.weights else "joint")
    with staged_build(config.out) as work:
        artifacts = build_vision_classifier(
            work, name=config.name, architecture=model.architecture, weights=model.weights, splits=splits,
            exits=model.exits, mode=mode, train=settings, preprocess=splits.preprocess, progress=progress,
        )  # fmt: skip
        # Where the rows came from and how they were split: calibrate and infer read the held-out rows again.
        files = {"train": data.train, "calibration": data.calibration, "test": data.test}
        record = {
            "kind": "images",
            **{part: str(Path(path).resolve()) if path else None for part, path in files.items()},
            "fractions": list(fractions),
            "seed": split.seed,
        }
        artifacts = replace(artifacts, build={**artifacts.build, "data": record})
        artifacts.save(work)
    return artifacts


def user_errors() -> tuple[type[Exception], ...]:
    """:data:`USER_ERRORS` and the vision build's own (its data, its weights)."""
    from offramp.build.image_data import ImageDataError
    from offramp.build.vision import VisionBuildError

    return (*USER_ERRORS, ImageDataError, VisionBuildError)
