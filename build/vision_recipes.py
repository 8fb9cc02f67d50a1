"""The measured vision build: a ResNet-18 brought to offramp as a team would bring it, built in attach and
in joint mode, calibrated, and served. Writes ``benchmarks/vision_exits.md`` (and the figures as JSON)::

    .venv/bin/python -m offramp.build.vision_recipes

1. The team's data: a class-per-folder PNG copy of Fashion-MNIST (Debian's ``dataset-fashion-mnist``):
   ``train/`` the first ``train_images`` of its training set, ``test/`` its whole test set. The train
   folder's calibration split is carved out of it (``calibration_fraction``, stratified, seeded).
2. The team's fine-tuned model: torchvision's ``resnet18`` (3 input channels, the PNGs converted to
   RGB as torchvision's ``ImageFolder`` does; 10 classes), trained on the training split with
   cross-entropy at its own head only, saved as a ``state_dict``.
3. Two builds from the same folders and preprocessing: ``attach`` (those weights frozen, exit heads
   distilled) and ``joint`` (backbone and heads from scratch, the team's epochs).
4. Each calibrated by Learn-then-Test (disagreement with the full model at most 1% with probability at
   least 95%) on the calibration split, served by the embedded tritonserver, and sent the test folder
   through gRPC: as preprocessed tensors, and as the PNG files' bytes.

Small images (28 px, Fashion-MNIST's own size) and few epochs: the whole run fits a 2-core machine.
Every stage is reused when its inputs did not change (the team's weights by key, the builds by
``CachedBuild``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from offramp.backend.environment import prepare_execution_env
from offramp.backend.image import IMAGE_BYTES_INPUT, IMAGE_INPUT, ImageSpec, encode_png
from offramp.build.artifacts import ModelArtifacts
from offramp.build.build_cache import build_key
from offramp.build.calibrate import CalibrationData, calibrate_artifacts
from offramp.build.fashion_mnist import CLASS_NAMES, DEFAULT_DIR, load_fashion_mnist
from offramp.build.image_data import ImageSplits, load_image_splits
from offramp.build.markdown import markdown_table
from offramp.build.repository import RepositoryOptions, full_model_name, write_repository
from offramp.build.resnet import resnet
from offramp.build.train import TrainConfig, seed_everything, train_exits
from offramp.build.vision import build_vision_classifier
from offramp.client.grpc_client import OfframpClient, Predictions
from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts

RESULTS = Path("benchmarks/vision_exits")
# Fashion-MNIST's pixel statistics, the team's normalization (the same for the three RGB channels).
FASHION_PREPROCESS = ImageSpec(channels=3, size=28, mean=(0.286,) * 3, std=(0.353,) * 3)


@dataclass(frozen=True)
class VisionExperiment:
    train_images: int = 20_000
    calibration_fraction: float = 0.25
    team_epochs: int = 3
    joint_epochs: int = 3
    attach_epochs: int = 10  # exit heads over cached features: seconds per epoch
    batch_size: int = 128
    learning_rate: float = 3e-3
    seed: int = 0
    epsilon: float = 0.01
    delta: float = 0.05
    rows_per_request: int = 16
    concurrency: int = 4

    def train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(
            epochs=epochs, batch_size=self.batch_size, learning_rate=self.learning_rate, seed=self.seed
        )


def write_image_folders(out: Path, train_images: int, data_dir: Path = DEFAULT_DIR) -> tuple[Path, Path]:
    """``out/train`` and ``out/test``: one folder per class of PNG files (written once)."""
    folders = []
    for split, count in (("train", train_images), ("test", None)):
        folder = out / split
        folders.append(folder)
        if folder.exists():
            continue
        images, labels = load_fashion_mnist(split, data_dir)
        staging = out / f".{split}.partial"
        for row, (image, label) in enumerate(zip(images[:count], labels[:count])):
            class_dir = staging / CLASS_NAMES[label].replace("/", "_")  # "t-shirt/top" is no folder name
            class_dir.mkdir(parents=True, exist_ok=True)
            (class_dir / f"{row:05d}.png").write_bytes(encode_png(np.rint(image * 255).astype(np.uint8)))
        staging.rename(folder)  # whole or not at all
    return folders[0], folders[1]


class _OwnHeadOnly(nn.Module):
    """A plain classifier as train_exits takes it: its one output as the only exit."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.network(images)]


def team_resnet18(out: Path, splits: ImageSplits, config: TrainConfig) -> tuple[Path, dict]:
    """The team's fine-tuned ResNet-18 as a state_dict (trained here, or reused for the same key)."""
    weights, record = out / "team_resnet18.pt", out / "team_resnet18.json"
    key = build_key(
        train=asdict(config), preprocess=FASHION_PREPROCESS.to_dict(), rows=len(splits.train.labels)
    )
    if weights.exists() and record.exists() and json.loads(record.read_text())["key"] == key:
        return weights, json.loads(record.read_text())
    seed_everything(config.seed)
    network = resnet(
        "resnet18", num_classes=len(splits.class_names)
    )  # torchvision's resnet18(num_classes=10)
    started = time.perf_counter()
    losses = train_exits(_OwnHeadOnly(network), [splits.train.images], splits.train.labels, config)
    torch.save(network.state_dict(), weights)
    trained = {"key": key, "epoch_losses": losses, "train_seconds": round(time.perf_counter() - started, 1)}
    record.write_text(json.dumps(trained, indent=2) + "\n")
    return weights, trained


def _send(url: str, call, rows: int, rows_per_request: int, concurrency: int) -> list:
    """``call(client, slice)`` over all rows, ``rows_per_request`` at a time, in order."""
    parts = [slice(s, min(s + rows_per_request, rows)) for s in range(0, rows, rows_per_request)]

    def work(part: slice):
        with OfframpClient(url) as client:
            return call(client, part)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(work, parts))


def served_figures(
    built: dict[str, tuple[ModelArtifacts, Path]],
    policies: dict,
    splits: ImageSplits,
    test_png: list[bytes],
    repository: Path,
    experiment: VisionExperiment,
) -> dict[str, dict]:
    """Each model's test split through one server: early exit (tensors, then PNG bytes) and full."""
    options = RepositoryOptions(execution_env=prepare_execution_env())
    for mode, (artifacts, directory) in built.items():
        write_repository(artifacts, directory, policies[mode], repository, options)
    images, labels = splits.test.images, splits.test.labels
    encoded = np.array(test_png, dtype=np.object_).reshape(-1, 1)
    figures = {}
    with EmbeddedTritonServer(repository, ports=ServerPorts.free()) as server:
        send = lambda call: _send(
            server.grpc_url, call, len(labels), experiment.rows_per_request, experiment.concurrency
        )  # noqa: E731
        for mode, (artifacts, _) in built.items():
            name = artifacts.name
            started = time.perf_counter()
            early = Predictions.concatenate(send(lambda c, s: c.classify(name, {IMAGE_INPUT: images[s]})))
            early_seconds = time.perf_counter() - started
            started = time.perf_counter()
            full = np.concatenate(send(lambda c, s: c.full_logits(full_model_name(name), images[s]))).argmax(
                1
            )
            full_seconds = time.perf_counter() - started
            by_bytes = Predictions.concatenate(
                send(lambda c, s: c.classify(name, {IMAGE_BYTES_INPUT: encoded[s]}))
            )
            figures[mode] = {
                "rows": len(labels),
                "early_accuracy": float((early.label == labels).mean()),
                "full_accuracy": float((full == labels).mean()),
                "agreement": float((early.label == full).mean()),
                "mean_cost": float(early.cost.mean()),
                "exit_rates": (np.bincount(early.exit, minlength=artifacts.num_exits) / len(labels)).tolist(),
                "bytes_same_label_and_exit": float(
                    ((by_bytes.label == early.label) & (by_bytes.exit == early.exit)).mean()
                ),
                "bytes_max_logit_difference": float(np.abs(by_bytes.logits - early.logits).max()),
                "early_rows_per_second": len(labels) / early_seconds,
                "full_rows_per_second": len(labels) / full_seconds,
            }
    return figures


def run(workdir: Path, experiment: VisionExperiment = VisionExperiment()) -> dict:
    train_dir, test_dir = write_image_folders(workdir / "fashion_png", experiment.train_images)
    fractions = (1 - experiment.calibration_fraction, experiment.calibration_fraction, 0.0)
    splits = load_image_splits(
        train_dir, None, test_dir, fractions, experiment.seed, None, preprocess=FASHION_PREPROCESS
    )
    weights, team = team_resnet18(workdir, splits, experiment.train_config(experiment.team_epochs))
    built, policies, calibration = {}, {}, {}
    for mode, epochs in (("attach", experiment.attach_epochs), ("joint", experiment.joint_epochs)):
        directory = workdir / f"resnet18_{mode}"
        artifacts = build_vision_classifier(
            directory,
            name=f"fashion_resnet18_{mode}",
            architecture="resnet18",
            weights=weights if mode == "attach" else None,
            splits=splits,
            exits=None,
            mode=mode,
            train=experiment.train_config(epochs),
            preprocess=FASHION_PREPROCESS,
        )
        data = CalibrationData({IMAGE_INPUT: splits.calibration.images}, splits.calibration.labels)
        policy, calibrated, _ = calibrate_artifacts(
            artifacts, directory, data, epsilon=experiment.epsilon, delta=experiment.delta
        )
        built[mode], policies[mode] = (artifacts, directory), policy
        calibration[mode] = {
            "rows": calibrated.calibration_rows,
            "thresholds": [float(t) for t in calibrated.thresholds],
            "achieved_disagreement": calibrated.result.risk,
            "certified_compute": calibrated.result.expected_cost,
            "exit_rates": list(calibrated.result.exit_rates),
        }
    test_png = [path.read_bytes() for path in sorted(test_dir.glob("*/*.png"))]  # the splits' order
    served = served_figures(built, policies, splits, test_png, workdir / "repository", experiment)
    return {
        "experiment": asdict(experiment),
        "preprocess": FASHION_PREPROCESS.to_dict(),
        "rows": {
            "train": len(splits.train.labels),
            "calibration": len(splits.calibration.labels),
            "test": len(splits.test.labels),
        },  # fmt: skip
        "team": team,
        "builds": {
            mode: {
                "exit_costs": list(artifacts.exit_costs),
                "exit_test_accuracy": list(artifacts.exit_test_accuracy),
                "exit_test_agreement": artifacts.build["exit_test_agreement"],
                "train_seconds": artifacts.build["train_seconds"],
                "calibration": calibration[mode],
                "served": served[mode],
            }
            for mode, (artifacts, _) in built.items()
        },
    }


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def results_markdown(results: dict, command: str) -> str:
    experiment, builds = results["experiment"], results["builds"]
    exits = len(next(iter(builds.values()))["exit_costs"])
    rows = results["rows"]
    per_exit = []
    for mode, build in builds.items():
        per_exit.append([f"{mode}: accuracy", *map(_percent, build["exit_test_accuracy"])])
        per_exit.append(
            [f"{mode}: agreement with the final head", *map(_percent, build["exit_test_agreement"])]
        )
        per_exit.append([f"{mode}: compute fraction", *(f"{c:.3f}" for c in build["exit_costs"])])
    served = [
        [
            mode,
            f"{_percent(b['calibration']['achieved_disagreement'])}%",
            f"{b['calibration']['certified_compute']:.3f}",
            f"{_percent(b['served']['early_accuracy'])} / {_percent(b['served']['full_accuracy'])}",
            _percent(b["served"]["agreement"]),
            f"{b['served']['mean_cost']:.3f}",
            " / ".join(f"{100 * r:.1f}" for r in b["served"]["exit_rates"]),
            f"{_percent(b['served']['bytes_same_label_and_exit'])}",
        ]
        for mode, b in builds.items()
    ]
    e, seconds = experiment, {mode: f"{b['train_seconds']:.0f} s" for mode, b in builds.items()}
    certifying = builds["attach"]["calibration"]["rows"]
    return "\n".join(
        [
            "# ResNet-18 on Fashion-MNIST, brought as a team's own model",
            "",
            f"Written by `{command}`. Data: a class-per-folder PNG copy "
            f"of Fashion-MNIST; {rows['train']:,} training, {rows['calibration']:,} calibration (carved out "
            f"of the train folder, stratified) and {rows['test']:,} test images (the whole test set), "
            "28x28, converted to RGB, normalized with Fashion-MNIST's mean 0.286 and std 0.353.",
            "",
            f"The team's model: torchvision's `resnet18` (10 classes), trained for {e['team_epochs']} epochs "
            f"(AdamW, one-cycle, lr {e['learning_rate']}, batch {e['batch_size']}; "
            f"{results['team']['train_seconds']:.0f} s here), saved as a `state_dict`. `attach`: those "
            f"weights frozen, the exit heads distilled towards its head for {e['attach_epochs']} epochs over "
            f"cached features ({seconds['attach']}, the frozen network's one pass over the training images "
            f"included). `joint`: backbone and heads from scratch for {e['joint_epochs']} epochs "
            f"({seconds['joint']}). Exits after layer1, layer2, layer3 and layer4 (the network's own head). "
            "Times on a 2-core machine shared with other work: indicative only.",
            "",
            "## Per exit, on the test split",
            "",
            markdown_table(["", *(f"exit {k}" for k in range(exits))], per_exit),
            "",
            f"## Calibrated (Learn-then-Test, disagreement <= {_percent(e['epsilon'])}% w.p. >= "
            f"{_percent(1 - e['delta'])}%) and served",
            "",
            f"Certified compute: the mean compute fraction of the {certifying:,} certifying calibration rows "
            "under the chosen thresholds (the other calibration rows fit the temperatures and the "
            "candidate thresholds). Served: the test split sent through gRPC to the embedded tritonserver "
            f"({e['rows_per_request']} rows per request, concurrency {e['concurrency']}) as tensors; "
            "`<name>_full` through the same server. PNG bytes: the test folder's files sent as "
            "`IMAGE_BYTES`, decoded in the orchestrator; the share of rows with the same label and exit "
            "as their tensors.",
            "",
            markdown_table(
                [
                    "build",
                    "calibration disagreement",
                    "certified compute",
                    "accuracy early / full (served)",
                    "agreement (served)",
                    "mean compute (served)",
                    "exit rates % (served)",
                    "PNG bytes = tensors %",
                ],
                served,
            ),  # fmt: skip
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="ResNet-18 on Fashion-MNIST in attach and joint mode, measured"
    )
    parser.add_argument("--workdir", type=Path, default=Path(".cache/offramp/vision"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="writes RESULTS.md and RESULTS.json")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from RESULTS.json")
    args = parser.parse_args(argv)
    figures = args.results.with_suffix(".json")
    if args.report_only:
        results = json.loads(figures.read_text())
    else:
        results = run(args.workdir)
        figures.parent.mkdir(parents=True, exist_ok=True)
        figures.write_text(json.dumps(results, indent=2) + "\n")
    report = args.results.with_suffix(".md")
    report.write_text(results_markdown(results, "python -m offramp.build.vision_recipes"))
    print(report.read_text())


if __name__ == "__main__":
    main()
