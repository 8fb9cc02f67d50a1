"""``offramp tune``: keep the exits that pay on this machine, from measured serving costs."""

from __future__ import annotations

import argparse
import sys

from offramp.client.cli.options import add_config_options, config_from_args
from offramp.client.cli.subcommand import Subcommand


class TuneCommand(Subcommand):
    name = "tune"
    help = "measure serving costs here, keep the exits that pay (or the full model), write that build"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.client.tools.tune import TuneConfig

        add_config_options(parser, TuneConfig)

    def run(self, args: argparse.Namespace) -> int:
        from offramp.client.tools.tune import TuneConfig, main_tune

        try:
            config = config_from_args(TuneConfig, args)
        except ValueError as error:
            print(f"offramp tune: error: {error}", file=sys.stderr)
            return 2
        return main_tune(config)
