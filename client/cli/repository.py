"""``offramp repository``: write a Triton model repository from build artifacts and a policy."""

from __future__ import annotations

import argparse
from pathlib import Path

from offramp.client.cli.subcommand import DEFAULT_REPOSITORY, DEFAULT_WORKDIR, Subcommand

class RepositoryCommand(Subcommand):
    name = "repository"
    help = "write a Triton model repository from build artifacts"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.build.repository import TARGETS

        parser.add_argument("--artifacts", default=str(DEFAULT_WORKDIR / "fashion_cnn"))
        parser.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
        parser.add_argument("--target", default=TARGETS[0], choices=TARGETS)
        parser.add_argument("--policy", help="policy.json to serve (default: one fixed max-prob threshold)")
        parser.add_argument("--threshold", type=float, default=0.9, help="the fixed threshold without --policy")
        parser.add_argument("--execution-env", help="virtualenv of the Python stubs (default: this one)")
        parser.add_argument("--no-execution-env", action="store_true", help="use the server's own Python")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.backend.environment import prepare_execution_env
        from offramp.backend.policy import Policy
        from offramp.build.artifacts import ModelArtifacts
        from offramp.build.repository import RepositoryOptions, write_repository

        artifacts_dir = Path(args.artifacts)
        artifacts = ModelArtifacts.load(artifacts_dir)
        policy = (
            Policy.load(Path(args.policy))
            if args.policy
            else Policy.fixed(artifacts.fingerprint, artifacts.num_exits, threshold=args.threshold)
        )
        env = None
        if not args.no_execution_env:
            env = prepare_execution_env(Path(args.execution_env) if args.execution_env else None)
        options = RepositoryOptions(target=args.target, execution_env=env)
        for model_dir in write_repository(artifacts, artifacts_dir, policy, Path(args.repository), options):
            print(model_dir)
        return 0
