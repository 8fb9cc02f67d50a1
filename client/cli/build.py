"""``offramp build``: train (or reuse) and export a multi-exit model."""

from __future__ import annotations

import argparse

from offramp.client.cli.subcommand import DEFAULT_WORKDIR, Subcommand


class BuildCommand(Subcommand):
    name = "build"
    help = "train (or reuse) and export the multi-exit Fashion-MNIST CNN"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", default=str(DEFAULT_WORKDIR / "fashion_cnn"), help="artifacts folder")
        parser.add_argument("--epochs", type=int, default=3)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="folder of the IDX files")
        parser.add_argument("--quick", action="store_true", help="a small, fast build for tests")

    def run(self, args: argparse.Namespace) -> int:
        from pathlib import Path

        from offramp.build.recipes import build_fashion_mnist_cnn, quick_train_config
        from offramp.build.train import TrainConfig

        train = quick_train_config() if args.quick else TrainConfig(epochs=args.epochs, seed=args.seed)
        artifacts = build_fashion_mnist_cnn(Path(args.out), train=train, data_dir=args.data)
        for index, (accuracy, cost) in enumerate(zip(artifacts.exit_test_accuracy, artifacts.exit_costs)):
            print(f"exit {index}: test accuracy {accuracy:.2%}, compute fraction {cost:.3f}")
        print(f"full network: test accuracy {artifacts.full_test_accuracy:.2%}; artifacts in {args.out}")
        return 0
