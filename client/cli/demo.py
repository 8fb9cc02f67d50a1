"""``offramp demo``: build, serve and measure an early-exit model against its full model."""

from __future__ import annotations

import argparse

from offramp.client.cli.subcommand import DEFAULT_REPOSITORY, DEFAULT_WORKDIR, Subcommand


class DemoCommand(Subcommand):
    name = "demo"
    help = "build, serve and measure the early-exit CNN against the full one"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.build.fashion_mnist import FASHION_CNN
        from offramp.build.text_data import TEXT_TASKS

        add = parser.add_argument
        add("--workdir", default=str(DEFAULT_WORKDIR))
        add("--repository", default=str(DEFAULT_REPOSITORY))
        add(
            "--model",
            default=FASHION_CNN,
            choices=(FASHION_CNN, *TEXT_TASKS),
            help="the CNN (minutes) or a MiniLM text classifier (its first build takes much longer)",
        )
        add("--epochs", type=int, help="training epochs (default: the recipe's, CNN 3, TREC 5, RT 2)")
        add("--concurrency", type=int, default=8)
        add("--rows-per-request", type=int, default=16)
        add(
            "--no-tune",
            action="store_true",
            help="serve every exit with the segments over BLS, instead of what offramp tune picks here",
        )

    def run(self, args: argparse.Namespace) -> int:
        from offramp.client.tools.demo import main_demo

        return main_demo(args)
