"""``offramp soak``: perf_analyzer against the early-exit CNN for minutes, then stability checks."""

from __future__ import annotations

import argparse
import sys

from offramp.client.cli.options import add_config_options, config_from_args
from offramp.client.cli.subcommand import Subcommand


class SoakCommand(Subcommand):
    name = "soak"
    help = "perf_analyzer against the early-exit CNN for 10 min, then checks memory, processes and latency"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.client.tools.soak import SoakConfig

        add_config_options(parser, SoakConfig)

    def run(self, args: argparse.Namespace) -> int:
        from offramp.client.tools.soak import SoakConfig, main_soak

        # A run shorter than the default window is one window long.
        duration = args.duration_s if args.duration_s is not None else SoakConfig.duration_s
        try:
            config = config_from_args(SoakConfig, args, {"window_s": min(SoakConfig.window_s, duration)})
        except ValueError as error:
            print(f"offramp soak: error: {error}", file=sys.stderr)
            return 2
        return main_soak(config)
