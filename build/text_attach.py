"""Attach mode for text: exit heads on a fine-tuned classifier that stays exactly as it is.

The checkpoint (a ``*ForSequenceClassification`` model of a supported family, ``build/transformer.py``)
is frozen, backbone and head. Its own head is the last exit, so the last exit and ``<name>_full`` give
the checkpoint's logits. A mean-pooling head goes after each earlier exit layer and is trained by
self-distillation: its target is the final head's output distribution on the same row (cross-entropy
with soft targets, i.e. the KL divergence to the final head up to a constant), so unlabelled in-domain
text is enough, and what it learns is to agree with the final head, which is the risk the calibration
then bounds. ``label_weight`` mixes the one-hot label into the target where a row has one.

The backbone being frozen, a row's features never change: one pass of the encoder over the training
rows gives every exit's pooled hidden state and the final head's logits (``features.npz``, a stage a
rebuild reuses), then the heads train on those in seconds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from offramp.build.artifacts import ModelArtifacts
from offramp.build.build_cache import CachedBuild, build_key, folder_digest, staged_build
from offramp.build.export import artifacts_from_network
from offramp.build.text_data import DEFAULT_FRACTIONS, Share, TextSource, TextSplits
from offramp.build.text_recipes import (
    PooledHeads,
    checked_model_settings,
    data_key,
    package_version,
    predict_by_length,
    torch_threads,
)
from offramp.build.train import (
    TrainConfig,
    exit_accuracies,
    exit_agreements,
    recorded_settings,
    seed_everything,
    train_exits,
)
from offramp.build.transformer import (
    TOKENIZER_DIR,
    AttachedClassifier,
    encode_texts,
    encoder_family,
    load_model_config,
    load_sequence_classifier,
    load_tokenizer,
    pooled_layer_features,
    save_tokenizer,
    transformer_costs,
)

FEATURES_FILE = "features.npz"  # the training rows' pooled features and final-head logits (a reusable stage)
HEADS_FILE = "exit_heads.pt"  # the early exit heads' weights; the rest is the checkpoint's
# Enters the build key: bump it when the steps change what a build makes.
ATTACH_VERSION = 1


@dataclass(frozen=True)
class AttachSettings:
    """What an attach-mode build depends on (all of it enters the build key)."""

    max_length: int = 128
    exit_layers: tuple[int, ...] | None = None  # None: an exit after every block
    fractions: tuple[Share | None, Share, Share] = DEFAULT_FRACTIONS
    seed: int = 0
    max_train_rows: int | None = None
    # Heads over pooled features train in seconds, so many epochs at a head-sized rate.
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    head_dropout: float = 0.1
    label_weight: float = (
        0.0  # 0: pure self-distillation; 1: the labels alone (rows without one: distillation)
    )
    distill_temperature: float = 1.0

    def head_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=self.seed,
            distill_weight=1.0 - self.label_weight,
            distill_temperature=self.distill_temperature,
        )


def model_class_names(model_path: Path) -> tuple[str, ...]:
    """The checkpoint's classes, in its order (its ``id2label``)."""
    config = load_model_config(model_path)
    return tuple(str(config.id2label[i]) for i in range(config.num_labels))


def build_attached_classifier(
    out_dir: Path | str,
    source: TextSource,
    model_path: Path | str,
    *,
    name: str,
    settings: AttachSettings = AttachSettings(),
    progress: bool = True,
    threads: int | None = None,
) -> ModelArtifacts:
    """Attaches exit heads to the fine-tuned classifier at ``model_path``, distils them on ``source``'s
    training rows, evaluates every exit on its test rows and exports to ``out_dir``; reuses a build with
    the same key. The model and the data are checked before anything is trained."""
    out_dir, model_path = Path(out_dir), Path(model_path)
    with torch_threads(threads):
        checked_model_settings(model_path, settings.max_length, settings.exit_layers)
        checkpoint = folder_digest(model_path)
        cache = CachedBuild.look_up(
            out_dir, name=name, mode="attach", **data_key(source.record()), model=checkpoint,
            settings=recorded_settings(asdict(settings)), recipe=ATTACH_VERSION,
        )  # fmt: skip
        if cache.reusable is not None:
            return cache.reusable
        splits = source.splits(settings.fractions, settings.seed, model_class_names(model_path))
        classifier = load_sequence_classifier(model_path)
        with staged_build(out_dir) as work:
            return _attach_and_export(
                work, source, splits, classifier, model_path, checkpoint, name, settings, progress, cache
            )


def _attach_and_export(
    out_dir: Path,
    source: TextSource,
    splits: TextSplits,
    classifier: torch.nn.Module,
    model_path: Path,
    checkpoint: str,  # folder_digest of model_path
    name: str,
    settings: AttachSettings,
    progress: bool,
    cache: CachedBuild,
) -> ModelArtifacts:
    record = source.record()
    timings: dict[str, float] = {}
    tokenizer = load_tokenizer(save_tokenizer(model_path, out_dir, settings.max_length))
    train_rows = min(len(splits.train), settings.max_train_rows or len(splits.train))
    train_ids, train_mask = encode_texts(tokenizer, splits.train.texts[:train_rows])
    train_labels = splits.train.labels[:train_rows]
    test_ids, test_mask = encode_texts(tokenizer, splits.test.texts)

    seed_everything(settings.seed)
    model = AttachedClassifier(classifier, settings.exit_layers, settings.head_dropout).eval()
    features_key = build_key(
        stage="features", **data_key(record), model=checkpoint, max_length=settings.max_length,
        fractions=settings.fractions, seed=settings.seed, train_rows=train_rows,
        depths="embeddings and every block",  # the pooled features' layout (earlier builds: blocks only)
    )  # fmt: skip
    pooled, final_logits, timings["features_seconds"] = _training_features(
        out_dir, model, train_ids, train_mask, features_key, cache, progress
    )

    started = time.perf_counter()
    losses = []
    if model.early_heads:
        layers = list(model.exit_layers[:-1])
        heads = PooledHeads([head.classifier for head in model.early_heads], settings.head_dropout)
        losses = train_exits(
            heads, [pooled[:, layers]], train_labels, settings.head_config(), teacher=final_logits,
            progress=progress,
        )  # fmt: skip
    model.eval()
    timings["heads_seconds"] = round(time.perf_counter() - started, 1)
    torch.save([head.state_dict() for head in model.early_heads], out_dir / HEADS_FILE)

    network = model.segmented(settings.max_length)
    started = time.perf_counter()
    logits = predict_by_length(network.exit_logits, test_ids, test_mask)  # (exits, N, C)
    accuracy = exit_accuracies(logits, splits.test.labels)
    timings["test_seconds"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    # count_macs sees the linear layers only; attention's T x T matmuls are added at a typical length.
    cost_length = int(round(float(test_mask.sum(axis=1).mean())))
    artifacts = artifacts_from_network(
        name,
        network,
        splits.train.class_names,
        out_dir,
        costs=transformer_costs(model, cost_length),
        progress=progress,
        exit_test_accuracy=tuple(accuracy),
        full_test_accuracy=accuracy[-1],  # the last exit is the checkpoint's own head: the full model
    )
    timings["export_seconds"] = round(time.perf_counter() - started, 1)
    build = {
        "key": cache.key,
        "recipe": "text_attach",
        "recipe_version": ATTACH_VERSION,
        "mode": "attach",
        "data": record,
        "model": model_path.name,
        "model_path": str(model_path),
        "model_sha256": checkpoint,
        "family": encoder_family(classifier.config).name,
        "exit_layers": list(model.exit_layers),
        "tokenizer_dir": TOKENIZER_DIR,
        "max_length": settings.max_length,
        "settings": asdict(settings),
        "seed": settings.seed,
        "fractions": list(settings.fractions),
        "split_sizes": splits.sizes(),
        "train_rows": train_rows,
        "labelled_train_rows": int((train_labels >= 0).sum()),
        "test_class_counts": splits.test.class_counts(),
        "exit_test_accuracy": accuracy,
        "exit_test_agreement": exit_agreements(logits),
        "cost_sequence_length": cost_length,
        "epoch_losses": losses,
        "stages": {"features": features_key},
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
    }
    artifacts = replace(artifacts, build=build)
    artifacts.save(out_dir)
    return artifacts


def _training_features(
    out_dir: Path,
    model: AttachedClassifier,
    ids: np.ndarray,
    mask: np.ndarray,
    key: str,
    cache: CachedBuild,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Pooled hidden states at every depth (N, blocks + 1, H) and the final head's logits (N, C) of the
    training rows, and the seconds the encoder pass took: from the previous build's stage where its key
    is this one, else one encoder pass."""
    path = out_dir / FEATURES_FILE
    previous = cache.previous
    if previous.get("stages", {}).get("features") == key and path.exists():
        with np.load(path) as saved:
            return saved["pooled"], saved["final_logits"], previous.get("timings", {}).get("features_seconds")
    started = time.perf_counter()
    features = pooled_layer_features(model.encoder, ids, mask, progress=progress, final_head=model.heads[-1])
    np.savez(path, pooled=features.pooled, final_logits=features.final_logits)
    return features.pooled, features.final_logits, round(time.perf_counter() - started, 1)


def load_attached_classifier(out_dir: Path | str) -> AttachedClassifier:
    """The PyTorch model of an attach-mode build: its checkpoint with the trained early heads."""
    out_dir = Path(out_dir)
    build = ModelArtifacts.load(out_dir).build
    model = AttachedClassifier(
        load_sequence_classifier(build["model_path"]), build["exit_layers"], build["settings"]["head_dropout"]
    )
    for head, state in zip(model.early_heads, torch.load(out_dir / HEADS_FILE), strict=True):
        head.load_state_dict(state)
    return model.eval()
