"""Named text builds: fine-tune a multi-exit MiniLM on Rotten Tomatoes or TREC, evaluate, export.

``build_text_classifier`` trains (or reuses, by key) the encoder and its exit heads together, refits
the heads on the frozen fine-tuned encoder where that clearly helps on the calibration split, measures
each exit's test accuracy and a frozen-backbone probe baseline, exports ONNX segments with symbolic
batch and sequence axes, and saves the tokenizer beside them. ``text_results`` runs it for both tasks
and writes ``benchmarks/text_exits.md``::

    python -m offramp.build.text_recipes --task trec --task rotten_tomatoes --out artifacts/text
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from offramp.build.artifacts import ModelArtifacts
from offramp.build.build_cache import CachedBuild, build_key, folder_digest, staged_build
from offramp.build.export import artifacts_from_network
from offramp.build.markdown import markdown_table
from offramp.build.text_data import DEFAULT_FRACTIONS, TEXT_TASKS, TextDataError, TextSource, TextSplits
from offramp.build.train import (
    DISTILLATION_DEFAULTS,
    TrainConfig,
    exit_accuracies,
    exit_agreements,
    predict_exits,
    recorded_settings,
    seed_everything,
    train_exits,
)
from offramp.build.transformer import (
    TOKENIZER_DIR,
    MultiExitEncoder,
    TrimmedToLongest,
    checked_exit_layers,
    encode_texts,
    load_model_config,
    load_pretrained_encoder,
    load_tokenizer,
    longest_sequence,
    minilm_path,
    pooled_layer_features,
    save_tokenizer,
    transformer_costs,
)

CHECKPOINT = "checkpoint.pt"  # the exported model's weights (after the head refit)
JOINT_CHECKPOINT = "checkpoint_joint.pt"  # after joint fine-tuning, before the head refit
ENCODER_CONFIG_DIR = (
    "encoder"  # config.json of the backbone, to rebuild the PyTorch model from the checkpoint
)
RESULTS_FILE = Path("benchmarks/text_exits.md")
# Enters the build key: bump it when the recipe's steps change what a build makes (2: the refit's sign test).
RECIPE_VERSION = 2

# Each packaged task's recipe beyond the default settings: what the demo, the benchmark and
# examples/<task>.toml build. Both train 5 epochs with self-distillation of the early exits (a quarter of
# their loss, temperature 2). On TREC's test split that took the certified max-prob policy (1% disagreement,
# delta 0.05) from 1.63x to 2.13x ideal speed-up and patience from 1.74x to 2.84x, the last exit at 91.28%
# against 92.03% at 2 epochs, within one standard error on 803 rows. On Rotten Tomatoes it took max-prob to
# 2.17x but lost 0.68 points of accuracy, and patience to 2.19x at 0.05 points: the benchmark serves the
# rule family that certifies the least compute, so the recipe pays there too (benchmarks/exit_rules.md).
TEXT_RECIPES: dict[str, dict[str, object]] = {
    "trec": {"epochs": 5, "distill_weight": 0.25, "distill_temperature": 2.0},
    "rotten_tomatoes": {"epochs": 5, "distill_weight": 0.25, "distill_temperature": 2.0},
}


@dataclass(frozen=True)
class TextTrainSettings:
    """What the fine-tuning and the probe depend on (all of it enters the build key)."""

    epochs: int = 2
    max_length: int = 64
    max_train_rows: int | None = None  # a subset of the training split, for quick builds
    seed: int = 0
    batch_size: int = 32
    # One learning rate for backbone and heads (train_exits has one optimizer group): 1e-4 is at the high
    # end of BERT fine-tuning rates, so the freshly initialised heads still learn within 2 epochs.
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    exit_layers: tuple[int, ...] | None = None  # None: an exit after every block
    head_dropout: float = 0.1
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    probe_epochs: int = 20  # heads on frozen features: cheap, so trained longer
    probe_learning_rate: float = 3e-3
    # After joint fine-tuning, retrain the heads on the frozen fine-tuned encoder (probe epochs and rate)
    # and swap in, per exit, the refit head where it is clearly better on the calibration split.
    refit_heads: bool = True
    # Self-distillation of the early exits towards the last exit (build/train.py), in the joint training
    # and the head refit; 0: labels alone.
    distill_weight: float = 0.0
    distill_temperature: float = 1.0

    def head_config(self, distilled: bool = True) -> TrainConfig:
        """Training of heads alone on pooled features: the refit (``distilled`` as the joint training),
        the probe baseline (not: it measures the frozen encoder's layers on the labels)."""
        return TrainConfig(
            epochs=self.probe_epochs,
            batch_size=64,
            learning_rate=self.probe_learning_rate,
            weight_decay=self.weight_decay,
            seed=self.seed,
            distill_weight=self.distill_weight if distilled else 0.0,
            distill_temperature=self.distill_temperature,
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=self.seed,
            max_train_rows=self.max_train_rows,
            distill_weight=self.distill_weight,
            distill_temperature=self.distill_temperature,
        )


def text_splits_of(artifacts: ModelArtifacts) -> TextSplits:
    """The split an existing text build used (either mode), e.g. to calibrate its exits on the same
    calibration rows: its data read again (a changed file is an error) and split as the build split it."""
    build = artifacts.build
    source = TextSource.from_record(build.get("data") or {"task": build["task"]})
    model_classes = artifacts.class_names if build.get("mode") == "attach" else None
    return source.splits(tuple(build["fractions"]), build["seed"], model_classes)


def build_text_classifier(
    out_dir: Path | str,
    data: str | TextSource = "rotten_tomatoes",
    *,
    settings: TextTrainSettings | None = None,
    name: str | None = None,
    model_path: Path | str | None = None,
    probe: bool = True,
    progress: bool = True,
    threads: int | None = None,
    **overrides: object,
) -> ModelArtifacts:
    """Fine-tunes a multi-exit encoder on ``data`` and exports it to ``out_dir``; reuses a build with the
    same key.

    ``data`` is a packaged task (``trec``, ``rotten_tomatoes``) or a :class:`TextSource` of files.
    ``settings`` (or keyword ``overrides`` of its fields: ``epochs``, ``max_length``, ``max_train_rows``,
    ``seed``, ...) decide the training; ``model_path`` is a local folder of a supported encoder family with
    its tokenizer (default: the packaged all-MiniLM-L6-v2). ``threads`` sets torch's intra-op threads for
    the build (None: as they are); it does not enter the key. The manifest's ``build`` records per-exit
    and probe test accuracy, split sizes, the tokenizer folder and max length, and timings. The data and
    the model are checked before any training; the build happens in a folder beside ``out_dir`` that
    replaces it only when the build is done.
    """
    source = data if isinstance(data, TextSource) else TextSource(task=data)
    with torch_threads(threads):
        return _build_text_classifier(out_dir, source, settings, name, model_path, probe, progress, overrides)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's intra-op thread count set for a block, then restored.

    On a shared machine one thread is fastest: default thread counts made a model 8x slower on 2
    busy cores (docs/embedded-server.md, 'Threads'), and a MiniLM training step here ran 3x faster
    with 1 thread than with 2.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Settings each expensive stage depends on: a stage is reused from an earlier build in the same folder
# when these agree, even where later settings (head refit, export) changed.
TRAIN_FIELDS = (
    "epochs", "max_length", "max_train_rows", "seed", "batch_size", "learning_rate", "weight_decay",
    "exit_layers", "head_dropout", "fractions", "distill_weight", "distill_temperature",
)  # fmt: skip
PROBE_FIELDS = (
    "max_length", "max_train_rows", "seed", "weight_decay", "head_dropout", "fractions", "probe_epochs",
    "probe_learning_rate",
)  # fmt: skip


def data_key(record: dict) -> dict:
    """What of a data record enters build keys: a packaged task as ``task`` (the key text of the builds
    made before files were supported), files as ``data``: their contents' sha256 and the columns, not
    where they lie, so a build is found again from another checkout or folder."""
    if "task" in record:
        return {"task": record["task"]}
    files = {part: file["sha256"] for part, file in record["files"].items()}
    return {"data": {**record, "files": files}}


def _stage_key(
    stage: str, data: dict, model_digest: str, settings: dict, fields: Sequence[str], train_rows: int
) -> str:
    """Key of one stage; the row cap enters as the rows actually used (a cap above the split = no cap)."""
    # A record made before distillation existed has no distillation fields: it trained at the defaults.
    parts = {f: settings.get(f, DISTILLATION_DEFAULTS.get(f)) for f in fields if f != "max_train_rows"}
    parts = recorded_settings(parts)
    return build_key(stage=stage, **data_key(data), model=model_digest, train_rows=train_rows, **parts)


def checked_model_settings(model_path: Path, max_length: int, exit_layers: Sequence[int] | None) -> None:
    """The model's family is supported, its position embeddings take ``max_length`` tokens and its
    blocks have the ``exit_layers``; else the error saying which (before anything is trained)."""
    config = load_model_config(model_path)
    longest = longest_sequence(config)  # refuses an unsupported family
    if max_length > longest:
        raise TextDataError(f"max_length {max_length}: {model_path} takes at most {longest} tokens")
    checked_exit_layers(config.num_hidden_layers, exit_layers)


def _build_text_classifier(
    out_dir: Path | str,
    source: TextSource,
    settings: TextTrainSettings | None,
    name: str | None,
    model_path: Path | str | None,
    probe: bool,
    progress: bool,
    overrides: dict[str, object],
) -> ModelArtifacts:
    settings = settings or TextTrainSettings()
    if overrides:
        settings = TextTrainSettings(**{**asdict(settings), **overrides})
    out_dir = Path(out_dir)
    if name is None and source.task is None:
        raise ValueError("a build from files needs a name")
    name = name or f"{source.task}_minilm"
    model_path = Path(model_path) if model_path is not None else minilm_path()
    record = source.record()
    cache = CachedBuild.look_up(
        out_dir,
        name=name,
        **data_key(record),
        settings=recorded_settings(asdict(settings)),
        model=folder_digest(model_path),
        probe=probe,
        recipe=RECIPE_VERSION,
    )
    if cache.reusable is not None:
        return cache.reusable
    checked_model_settings(model_path, settings.max_length, settings.exit_layers)
    splits = source.splits(settings.fractions, settings.seed)
    with staged_build(out_dir) as work:
        artifacts = _train_and_export(
            work, source, record, splits, settings, name, model_path, probe, progress, cache
        )
    return artifacts


def _train_and_export(
    out_dir: Path,
    source: TextSource,
    record: dict,
    splits: TextSplits,
    settings: TextTrainSettings,
    name: str,
    model_path: Path,
    probe: bool,
    progress: bool,
    cache: CachedBuild,
) -> ModelArtifacts:
    previous = cache.previous
    timings: dict[str, float] = {}
    tokenizer = load_tokenizer(save_tokenizer(model_path, out_dir, settings.max_length))
    train_rows = min(len(splits.train), settings.max_train_rows or len(splits.train))
    model_digest = folder_digest(model_path)
    train_key = _stage_key("train", record, model_digest, asdict(settings), TRAIN_FIELDS, train_rows)
    probe_key = _stage_key("probe", record, model_digest, asdict(settings), PROBE_FIELDS, train_rows)
    train = (*encode_texts(tokenizer, splits.train.texts[:train_rows]), splits.train.labels[:train_rows])
    calibration = (*encode_texts(tokenizer, splits.calibration.texts), splits.calibration.labels)
    test = (*encode_texts(tokenizer, splits.test.texts), splits.test.labels)
    class_names = splits.train.class_names

    probe_accuracy: list[float] = []
    probe_reusable = _previous_stage_key(previous, "probe", PROBE_FIELDS) == probe_key
    if probe and probe_reusable and previous.get("probe_test_accuracy"):
        probe_accuracy = previous["probe_test_accuracy"]
        timings["probe_seconds"] = previous.get("timings", {}).get("probe_seconds")
    elif probe:
        started = time.perf_counter()
        probe_accuracy = frozen_probe_accuracies(
            load_pretrained_encoder(model_path), train, test, len(class_names), settings, progress=progress
        )
        timings["probe_seconds"] = round(time.perf_counter() - started, 1)

    seed_everything(settings.seed)
    model = MultiExitEncoder(
        load_pretrained_encoder(model_path), len(class_names), settings.exit_layers, settings.head_dropout
    )
    joint_checkpoint = _previous_joint_checkpoint(out_dir, previous)
    if _previous_stage_key(previous, "train", TRAIN_FIELDS) == train_key and joint_checkpoint is not None:
        model.load_state_dict(torch.load(joint_checkpoint))
        if joint_checkpoint.name != JOINT_CHECKPOINT:
            torch.save(model.state_dict(), out_dir / JOINT_CHECKPOINT)
        model.eval()
        losses = previous["epoch_losses"]
        timings["train_seconds"] = previous.get("timings", {}).get("train_seconds")
    else:
        started = time.perf_counter()
        losses = train_exits(
            TrimmedToLongest(model), list(train[:2]), train[2], settings.train_config(), progress=progress
        )
        timings["train_seconds"] = round(time.perf_counter() - started, 1)
        torch.save(model.state_dict(), out_dir / JOINT_CHECKPOINT)
    model.encoder.config.save_pretrained(str(out_dir / ENCODER_CONFIG_DIR))

    network = model.segmented(settings.max_length)
    started = time.perf_counter()
    joint_logits = predict_by_length(network.exit_logits, *test[:2])
    joint_accuracy = exit_accuracies(joint_logits, test[2])
    timings["test_seconds"] = round(time.perf_counter() - started, 1)
    accuracy, refit, logits = joint_accuracy, None, joint_logits
    if settings.refit_heads:
        started = time.perf_counter()
        refit = refit_exit_heads(model, train, calibration, settings, progress=progress)
        timings["refit_seconds"] = round(time.perf_counter() - started, 1)
        if refit["refit_exits"]:
            logits = predict_by_length(network.exit_logits, *test[:2])
            accuracy = exit_accuracies(logits, test[2])
    torch.save(model.state_dict(), out_dir / CHECKPOINT)

    started = time.perf_counter()
    # count_macs sees the linear layers only; attention's T x T matmuls are added at a typical length.
    cost_length = int(round(float(test[1].sum(axis=1).mean())))
    artifacts = artifacts_from_network(
        name,
        network,
        class_names,
        out_dir,
        costs=transformer_costs(model, cost_length),
        progress=progress,
        exit_test_accuracy=tuple(accuracy),
        # The full network is the same modules as the chain of segments without the early heads, so its
        # logits are the last exit's (the tests check the exported files agree).
        full_test_accuracy=accuracy[-1],
    )
    timings["export_seconds"] = round(time.perf_counter() - started, 1)
    build = {
        "key": cache.key,
        "recipe": "text_classifier",
        "recipe_version": RECIPE_VERSION,
        "mode": "joint",
        "task": source.task,
        "data": record,
        "model": model_path.name if model_path.name != "model" else model_path.parent.name,
        "model_path": str(model_path),
        "model_sha256": model_digest,
        "exit_layers": list(model.exit_layers),
        "tokenizer_dir": TOKENIZER_DIR,
        "max_length": settings.max_length,
        "settings": asdict(settings),
        "seed": settings.seed,
        "fractions": list(settings.fractions),
        "split_sizes": splits.sizes(),
        "train_rows": train_rows,
        "test_class_counts": splits.test.class_counts(),
        "exit_test_accuracy": accuracy,
        "exit_test_agreement": exit_agreements(logits),
        "joint_exit_test_accuracy": joint_accuracy,  # before the head refit
        "head_refit": refit,
        "probe_test_accuracy": probe_accuracy,  # per layer, frozen backbone; the last is the baseline
        "probe_baseline_accuracy": probe_accuracy[-1] if probe_accuracy else None,
        "cost_sequence_length": cost_length,
        "epoch_losses": losses,
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
    }
    artifacts = replace(artifacts, build=build)
    artifacts.save(out_dir)
    return artifacts


def _previous_stage_key(previous: dict, stage: str, fields: Sequence[str]) -> str | None:
    """The stage key of an earlier build, recomputed from its recorded settings."""
    if not previous.get("settings") or not previous.get("model_sha256"):
        return None  # a build keyed by where its model lay: its stages are not reused
    record = previous.get("data") or {"task": previous["task"]}
    return _stage_key(
        stage, record, previous["model_sha256"], previous["settings"], fields, previous["train_rows"]
    )


def _previous_joint_checkpoint(out_dir: Path, previous: dict) -> Path | None:
    """The jointly trained weights of an earlier build: its own file, or the checkpoint of a build without
    refit."""
    if (out_dir / JOINT_CHECKPOINT).exists():
        return out_dir / JOINT_CHECKPOINT
    if previous and not previous.get("settings", {}).get("refit_heads") and (out_dir / CHECKPOINT).exists():
        return out_dir / CHECKPOINT
    return None


def package_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def load_text_classifier(out_dir: Path | str) -> MultiExitEncoder:
    """The trained PyTorch model of a build (backbone rebuilt from its saved config, weights from the
    checkpoint)."""
    from transformers import AutoConfig, AutoModel

    out_dir = Path(out_dir)
    artifacts = ModelArtifacts.load(out_dir)
    config = AutoConfig.from_pretrained(str(out_dir / ENCODER_CONFIG_DIR), local_files_only=True)
    settings = artifacts.build["settings"]
    model = MultiExitEncoder(
        AutoModel.from_config(config, attn_implementation="eager"),
        artifacts.num_classes,
        artifacts.build["exit_layers"],
        settings["head_dropout"],
    )
    model.load_state_dict(torch.load(out_dir / CHECKPOINT))
    return model.eval()


def predict_by_length(exit_logits_of, ids: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Every exit's logits (exits, N, C) for token rows, batched by similar length (less padding), in row
    order."""
    order = np.argsort(mask.sum(axis=1), kind="stable")
    logits = predict_exits(TrimmedToLongest(exit_logits_of), [ids[order], mask[order]], batch_size=batch_size)
    out = np.empty_like(logits)
    out[:, order] = logits
    return out


def tiny_encoder_folder(
    directory: Path | str,
    *,
    layers: int = 2,
    hidden_size: int = 32,
    seed: int = 0,
    tokenizer_from: Path | None = None,
) -> Path:
    """A randomly initialised BERT (``layers`` blocks, ``hidden_size`` wide) saved with a real tokenizer
    (MiniLM's by default): a stand-in for MiniLM that builds in seconds, for tests."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from or minilm_path()), local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def quick_text_classifier(
    out_dir: Path | str,
    task: str = "trec",
    *,
    rows: int = 512,
    seed: int = 0,
    progress: bool = False,
    threads: int = 1,
) -> ModelArtifacts:
    """A text build small enough for tests (seconds): a tiny random BERT (2 blocks, hidden 32) with
    MiniLM's tokenizer, ``rows`` training rows, 2 epochs. The stand-in encoder is saved under
    ``out_dir/source_encoder``."""
    out_dir = Path(out_dir)
    with torch_threads(threads):
        tiny_encoder_folder(out_dir / "source_encoder", seed=seed)
    settings = quick_text_build(out_dir, task, rows, seed)
    return build_text_classifier(out_dir, task, progress=progress, threads=threads, **settings)


def quick_text_build(out_dir: Path, task: str = "trec", rows: int = 512, seed: int = 0) -> dict[str, object]:
    """The arguments of ``build_text_classifier`` that make :func:`quick_text_classifier`'s build (its
    key)."""
    return {
        "name": f"{task}_tiny",
        "model_path": Path(out_dir) / "source_encoder",
        "epochs": 2,
        "max_train_rows": rows,
        "seed": seed,
        "learning_rate": 1e-3,
        "probe_epochs": 5,
    }


def served_text_classifier(
    workdir: Path | str, task: str, epochs: int | None = None, quick: bool = False
) -> tuple[ModelArtifacts, Path]:
    """The fine-tuned MiniLM the demo and the benchmark serve for ``task`` (its recipe, ``epochs`` where
    given), reused when cached: ``<workdir>/<task>_minilm``, or with ``quick`` the tiny stand-in (tests)
    in ``<workdir>/<task>_tiny``."""
    if quick:
        directory = Path(workdir) / f"{task}_tiny"
        return quick_text_classifier(directory, task), directory
    directory = Path(workdir) / f"{task}_minilm"
    settings = {**TEXT_RECIPES[task], **({"epochs": epochs} if epochs is not None else {})}
    return build_text_classifier(directory, task, threads=2, **settings), directory


# --- the frozen-backbone probe baseline ------------------------------------------------------------


class PooledHeads(nn.Module):
    """Exit classifiers over pooled features (N, exits, H): the exits' heads with the pooling done once."""

    def __init__(self, classifiers: Sequence[nn.Module], dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleList(classifiers)

    @classmethod
    def fresh(cls, exits: int, hidden_size: int, num_classes: int, dropout: float = 0.1) -> PooledHeads:
        return cls([nn.Linear(hidden_size, num_classes) for _ in range(exits)], dropout)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [head(self.dropout(features[:, i])) for i, head in enumerate(self.classifiers)]


def frozen_probe_accuracies(
    encoder: nn.Module,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    num_classes: int,
    settings: TextTrainSettings,
    progress: bool = False,
) -> list[float]:
    """Test accuracy of a head per layer trained on the frozen pretrained encoder (the last: the baseline).

    ``train`` and ``test`` are (ids, mask, labels).
    """
    # A head after each block (the embeddings' depth, index 0, is no layer of the baseline's).
    train_features = pooled_layer_features(encoder, train[0], train[1], progress=progress).pooled[:, 1:]
    test_features = pooled_layer_features(encoder, test[0], test[1], progress=progress).pooled[:, 1:]
    seed_everything(settings.seed)
    heads = PooledHeads.fresh(
        train_features.shape[1], train_features.shape[2], num_classes, settings.head_dropout
    )
    train_exits(heads, [train_features], train[2], settings.head_config(distilled=False), progress=False)
    return exit_accuracies(predict_exits(heads, [test_features]), test[2])


def refit_exit_heads(
    model: MultiExitEncoder,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    calibration: tuple[np.ndarray, np.ndarray, np.ndarray],
    settings: TextTrainSettings,
    progress: bool = False,
) -> dict[str, list]:
    """Retrains the exit heads on the frozen fine-tuned encoder and swaps in, per exit, the refit head
    where it is clearly better on the calibration split. Returns both heads' calibration accuracy and
    the exits swapped.

    Joint fine-tuning runs backbone and heads at one learning rate (train_exits has one optimizer
    group), which leaves the fresh early heads under-trained: on TREC, exit 1 scored 59% where a head
    on the frozen *pretrained* encoder's first layer scored 76%. Heads over pooled features train in
    seconds at a head-sized rate. "Clearly" is a paired sign test at two standard errors: with b rows
    only the refit head gets right and c rows only the joint head gets right, swap if
    b - c > 2 sqrt(b + c). A plain "higher accuracy" rule swapped the later, co-adapted heads on
    differences of 2-4 calibration rows, and lost up to a point on test.
    """
    layers = list(model.exit_layers)
    train_features = pooled_layer_features(model.encoder, train[0], train[1], progress=progress).pooled[
        :, layers
    ]
    calibration_features = pooled_layer_features(
        model.encoder, calibration[0], calibration[1], progress=progress
    )
    calibration_features = calibration_features.pooled[:, layers]
    joint = PooledHeads([head.classifier for head in model.heads], settings.head_dropout).eval()
    refit = copy.deepcopy(joint)  # warm start from the jointly trained heads
    train_exits(refit, [train_features], train[2], settings.head_config(), progress=False)
    labels = calibration[2]
    joint_right = predict_exits(joint, [calibration_features]).argmax(axis=2) == labels  # (exits, N)
    refit_right = predict_exits(refit, [calibration_features]).argmax(axis=2) == labels
    swapped = []
    for i in range(len(model.heads)):
        only_refit = int((refit_right[i] & ~joint_right[i]).sum())
        only_joint = int((joint_right[i] & ~refit_right[i]).sum())
        if only_refit - only_joint > 2.0 * np.sqrt(only_refit + only_joint):
            model.heads[i].classifier.load_state_dict(refit.classifiers[i].state_dict())
            swapped.append(i)
    model.eval()
    return {
        "calibration_accuracy_joint": joint_right.mean(axis=1).tolist(),
        "calibration_accuracy_refit": refit_right.mean(axis=1).tolist(),
        "refit_exits": swapped,
    }


# --- results -------------------------------------------------------------------------------------


def text_results(
    out_root: Path | str,
    tasks: Sequence[str] = TEXT_TASKS,
    *,
    results_path: Path | str | None = RESULTS_FILE,
    command: str | None = None,
    progress: bool = True,
    **settings: object,
) -> dict[str, ModelArtifacts]:
    """Builds (or reuses) one text classifier per task under ``out_root/<task>``, prints per-exit and
    probe accuracy, and writes them as Markdown to ``results_path`` (None: do not write)."""
    built = {}
    for task in tasks:
        started = time.perf_counter()
        recipe = {**TEXT_RECIPES[task], **settings}
        built[task] = build_text_classifier(Path(out_root) / task, task, progress=progress, **recipe)
        print(f"{task}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    report = results_markdown(built, command)
    print(report)
    if results_path is not None:
        results_path = Path(results_path)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(report)
    return built


def _percents(values: Sequence[float]) -> list[str]:
    return [f"{100 * v:.1f}" for v in values]


def _slashed(values: Sequence[float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


def results_markdown(built: dict[str, ModelArtifacts], command: str | None = None) -> str:
    """The report of ``text_results``: per-exit and probe accuracy, data, settings and timings."""
    lines = ["# Multi-exit MiniLM text classifiers: per-exit test accuracy", ""]
    if command:
        lines += ["Made by:", "", "```", command, "```", ""]
    exits = max(a.num_exits for a in built.values())
    accuracy_rows = []
    for task, a in built.items():
        probe = a.build.get("probe_baseline_accuracy")
        probe_cell = "-" if probe is None else f"{100 * probe:.1f}"
        accuracy_rows.append([task, *_percents(a.exit_test_accuracy), probe_cell])
        joint = a.build.get("joint_exit_test_accuracy")
        if a.build.get("head_refit") and joint:
            accuracy_rows.append([f"{task}, joint heads before refit", *_percents(joint), ""])
    lines += [
        markdown_table(
            ["task", *(f"exit {i + 1}" for i in range(exits)), "frozen probe, last layer"], accuracy_rows
        ),
        "",
        "Accuracy in percent on the test split; exit k follows block k of 6, and the last exit is the full",
        "network. First row per task: the exported model. Backbone and heads are fine-tuned together",
        "(equal exit-loss weights); then each head is refit on the frozen fine-tuned encoder and the refit",
        "head replaces the joint one only where it is clearly better on the calibration split (paired sign",
        "test at two standard errors; test data never chooses).",
        "",
    ]
    for task, a in built.items():
        refit = a.build.get("head_refit")
        if refit:
            kept = ", ".join(str(i + 1) for i in refit["refit_exits"]) or "none"
            lines.append(
                f"- {task}: calibration accuracy joint {_slashed(refit['calibration_accuracy_joint'])}, "
                f"refit {_slashed(refit['calibration_accuracy_refit'])}; refit heads kept at exits {kept}"
            )
    lines += [
        "",
        "Frozen probe: the same head trained on the same rows over the pretrained encoder, kept frozen",
        "(one head per layer; the last layer's is the baseline). Per layer:",
        "",
    ]
    for task, a in built.items():
        probe = a.build.get("probe_test_accuracy") or []
        if probe:
            lines.append(f"- {task}: {_slashed(probe)}")
    data_rows = []
    for task, a in built.items():
        b, t = a.build, a.build.get("timings", {})
        sizes, s = b["split_sizes"], b["settings"]
        seconds = [t.get(f"{stage}_seconds", "-") for stage in ("train", "probe", "refit", "test", "export")]
        data_rows.append([
            task, f"{b['train_rows']} / {sizes['train']}", sizes["calibration"], sizes["test"], s["epochs"],
            s["seed"], *seconds, " ".join(f"{c:.2f}" for c in a.exit_costs),
        ])  # fmt: skip
    lines += [
        "",
        markdown_table(
            ["task", "train rows used / split", "calibration", "test", "epochs", "seed", "train s", "probe s",
             "refit s", "test s", "export s", "exit cost fractions"],
            data_rows,
        ),
    ]  # fmt: skip
    first = next(iter(built.values())).build
    s = first["settings"]
    split = "/".join(str(round(100 * f)) for f in s["fractions"])
    lengths = ", ".join(str(a.build["cost_sequence_length"]) for a in built.values())
    lines += [
        "",
        f"Settings: batch {s['batch_size']}, AdamW with one-cycle learning rate {s['learning_rate']} for "
        "backbone "
        f"and heads, weight decay {s['weight_decay']}, equal exit-loss weights, max length {s['max_length']} "
        f"(each batch padded to its longest row); split {split} train/calibration/test, stratified by label, "
        f"seed {s['seed']} (also the training seed). Exit cost fractions count linear layers and attention "
        f"matmuls at the test split's mean token length ({lengths}).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs, torch "
        f"{first['torch']} "
        f"({first['torch_threads']} threads), transformers {first['transformers']}. Timings are wall-clock "
        "seconds on that shared machine, as recorded by the build.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m offramp.build.text_recipes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--task", action="append", choices=TEXT_TASKS, help="repeatable; default both")
    parser.add_argument("--epochs", type=int, default=None, help="default: the task's recipe")
    parser.add_argument("--max-length", type=int, default=TextTrainSettings.max_length)
    parser.add_argument(
        "--max-train-rows", type=int, default=None, help="train on the first N rows of the train split"
    )
    parser.add_argument("--seed", type=int, default=TextTrainSettings.seed)
    parser.add_argument(
        "--out", type=Path, default=Path("artifacts/text"), help="one folder per task under it"
    )
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help="Markdown report to write")
    parser.add_argument("--no-probe", action="store_true", help="skip the frozen-backbone probe baseline")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy machine)"
    )
    args = parser.parse_args(argv)
    command = "python -m offramp.build.text_recipes " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    text_results(
        args.out,
        args.task or TEXT_TASKS,
        results_path=args.results,
        command=command,
        progress=not args.quiet,
        probe=not args.no_probe,
        **({"epochs": args.epochs} if args.epochs is not None else {}),
        max_length=args.max_length,
        max_train_rows=args.max_train_rows,
        seed=args.seed,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
