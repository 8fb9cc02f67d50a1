"""The ``offramp`` command line: the registry of subcommands."""

from __future__ import annotations

import argparse
import sys

from offramp.client.cli.audit import AuditCommand
from offramp.client.cli.bench import BenchCommand
from offramp.client.cli.build import BuildCommand
from offramp.client.cli.calibrate import CalibrateCommand
from offramp.client.cli.demo import DemoCommand
from offramp.client.cli.deploy import DeployCommand
from offramp.client.cli.generate import GenerateCommand
from offramp.client.cli.gpu_check import GpuCheckCommand
from offramp.client.cli.health import HealthCommand
from offramp.client.cli.infer import InferCommand
from offramp.client.cli.input_data import InputDataCommand
from offramp.client.cli.policy import PolicyCommand
from offramp.client.cli.repository import RepositoryCommand
from offramp.client.cli.serve import ServeCommand
from offramp.client.cli.soak import SoakCommand
from offramp.client.cli.stats import StatsCommand
from offramp.client.cli.subcommand import Subcommand
from offramp.client.cli.tune import TuneCommand

# In the order `offramp --help` lists them: the pipeline first, then operations, then measurement.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    BuildCommand(),
    CalibrateCommand(),
    TuneCommand(),
    RepositoryCommand(),
    ServeCommand(),
    DeployCommand(),
    HealthCommand(),
    InferCommand(),
    PolicyCommand(),
    StatsCommand(),
    AuditCommand(),
    DemoCommand(),
    GenerateCommand(),
    BenchCommand(),
    InputDataCommand(),
    SoakCommand(),
    GpuCheckCommand(),
)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="offramp", description="Early-exit inference on Triton.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        sub = commands.add_parser(
            subcommand.name, help=subcommand.help, description=subcommand.description or subcommand.help
        )
        subcommand.add_arguments(sub)
        sub.set_defaults(run=subcommand.run)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
