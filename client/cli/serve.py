"""``offramp serve``: the embedded tritonserver on a repository, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse

from offramp.client.cli.subcommand import Subcommand


class ServeCommand(Subcommand):
    name = "serve"
    help = "start the embedded tritonserver on a repository"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.client.serving.server import add_serve_arguments

        add_serve_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from offramp.client.serving.server import serve

        return serve(args)
