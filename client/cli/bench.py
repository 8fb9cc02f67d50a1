"""``offramp bench``: early exit against the full model under perf_analyzer; writes benchmarks/."""

from __future__ import annotations

import argparse
import sys

from offramp.client.cli.options import add_config_options, config_from_args
from offramp.client.cli.subcommand import Subcommand


class BenchCommand(Subcommand):
    name = "bench"
    help = "early exit against the full model under perf_analyzer; writes benchmarks/"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.client.tools.bench import WORKLOADS, BenchConfig
        from offramp.client.tools.spike import SpikeConfig

        add_config_options(parser, BenchConfig, {"quick": BenchConfig.quick_defaults()})
        add_config_options(parser.add_argument_group("the spike benchmark (--spike)"), SpikeConfig)
        parser.add_argument(
            "--report-only",
            action="store_true",
            help="rewrite BENCHMARKS.md and the plots from saved results",
        )
        parser.epilog = f"workloads: {', '.join(sorted(WORKLOADS))}"

    def run(self, args: argparse.Namespace) -> int:
        from offramp.client.tools.bench import BenchConfig, main_bench
        from offramp.client.tools.spike import SpikeConfig, main_spike

        try:
            config = config_from_args(BenchConfig, args, BenchConfig.quick_defaults() if args.quick else {})
            spike = config_from_args(SpikeConfig, args)
        except ValueError as error:
            print(f"offramp bench: error: {error}", file=sys.stderr)
            return 2
        if spike.spike:
            return main_spike(config, spike)
        if config.workloads == (
            "generation",
        ):  # the decoder's modes: their own benchmark (offramp generate bench)
            from offramp.client.tools.generation_bench import GenerationBenchConfig, main_generation_bench

            quick = GenerationBenchConfig.quick_defaults() | {"quick": True} if args.quick else {}
            return main_generation_bench(GenerationBenchConfig(**quick))
        return main_bench(config, report_only=args.report_only)
