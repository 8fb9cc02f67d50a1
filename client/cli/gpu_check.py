"""``offramp gpu-check``: the CUDA kernels and the device cascade on a GPU, against their references."""

from __future__ import annotations

import argparse

from offramp.client.cli.subcommand import Subcommand


class GpuCheckCommand(Subcommand):
    name = "gpu-check"
    help = "on a GPU: kernels against their references, speed against the bandwidth floor, device cascade"
    description = "Exit status 0 when every check passed, 1 when one failed, 2 without CuPy or a CUDA device."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.client.tools.gpu_check import run_gpu_check

        return run_gpu_check(args.quick)
