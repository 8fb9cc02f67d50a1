"""``offramp repository``: write a Triton model repository from build artifacts and a policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from offramp.client.cli.subcommand import DEFAULT_REPOSITORY, DEFAULT_WORKDIR, Subcommand, lacks_artifacts

if TYPE_CHECKING:
    from offramp.backend.orchestrator import ServingOptions


class RepositoryCommand(Subcommand):
    name = "repository"
    help = "write a Triton model repository from build artifacts"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.build.repository import TARGETS

        parser.add_argument("--artifacts", default=str(DEFAULT_WORKDIR / "fashion_cnn"))
        parser.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
        parser.add_argument("--target", default=TARGETS[0], choices=TARGETS)
        parser.add_argument(
            "--policy",
            help="policy.json to serve (default: the artifacts folder's policy.json, which offramp calibrate "
            "writes, else one fixed max-prob threshold)",
        )
        parser.add_argument(
            "--threshold", type=float, default=0.9, help="the fixed threshold without --policy"
        )
        parser.add_argument("--execution-env", help="virtualenv of the Python stubs (default: this one)")
        parser.add_argument("--no-execution-env", action="store_true", help="use the server's own Python")
        parser.add_argument(
            "--serving", action="append", default=[], metavar="NAME=VALUE",
            help="an orchestrator serving option (offramp.backend.orchestrator.ServingOptions: audit_path, "
            "drift_conservative, slo_p99_ms, slo_shed_max_exit, segments_in_process, ...; shadow checks: "
            "shadow_rate, shadow_store_path, ...); repeatable",
        )  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        from offramp.backend.environment import prepare_execution_env
        from offramp.backend.policy import Policy
        from offramp.build.artifacts import MANIFEST, ModelArtifacts
        from offramp.build.repository import RepositoryOptions, write_repository
        from offramp.client.serving.server import python_backend_directory

        artifacts_dir = Path(args.artifacts)
        if lacks_artifacts(
            "repository", artifacts_dir, MANIFEST, "pass a build's folder (offramp build prints it)"
        ):
            return 2
        artifacts = ModelArtifacts.load(artifacts_dir)
        policy_file = Path(args.policy) if args.policy else artifacts_dir / "policy.json"
        if policy_file.exists():
            policy = Policy.load(policy_file)
            print(f"policy {policy.version} from {policy_file}")
        elif args.policy:
            print(f"offramp repository: error: {policy_file}: no such policy file", file=sys.stderr)
            return 2
        else:
            policy = Policy.fixed(artifacts.fingerprint, artifacts.num_exits, threshold=args.threshold)
            print(f"no {policy_file}: serving one fixed max-prob threshold {args.threshold} (offramp "
                  "calibrate makes a policy with a guarantee)")  # fmt: skip
        try:
            serving = serving_options(args.serving)
            serving.check_against(policy)
        except ValueError as error:
            print(f"offramp repository: error: --serving: {error}", file=sys.stderr)
            return 2
        env = None
        if not args.no_execution_env:
            env = prepare_execution_env(Path(args.execution_env) if args.execution_env else None)
        options = RepositoryOptions(target=args.target, execution_env=env, serving=serving)
        repository = Path(args.repository)
        for model_dir in write_repository(artifacts, artifacts_dir, policy, repository, options):
            print(model_dir)
        # The backend folder a by-hand tritonserver needs (offramp serve would assemble it too).
        backends = python_backend_directory()
        print(f"serve it: offramp serve --repository {repository}")
        print("or by hand: " + by_hand_command(repository.resolve(), backends))
        return 0


def serving_options(assignments: list[str]) -> ServingOptions:
    """``ServingOptions`` from ``name=value`` texts, each typed as the field's default (bools: true/false);
    the shadow checks' settings are ``shadow_<field>``. The options' own checks (a rate out of range,
    say) raise ValueError with their message."""
    from offramp.backend.orchestrator import ServingOptions

    defaults = ServingOptions()
    names = [name for name in defaults.__dataclass_fields__ if name != "shadow"]
    kinds = {name: type(getattr(defaults, name)) for name in names}
    for name in defaults.shadow.__dataclass_fields__:
        kinds[f"shadow_{name}"] = type(getattr(defaults.shadow, name))
    parameters = {}
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not equals or name not in kinds:
            raise ValueError(f"{assignment!r} is not NAME=VALUE with NAME one of {', '.join(kinds)}")
        if not _parses(kinds[name], value):
            raise ValueError(f"{name}: {value!r} is not a {kinds[name].__name__}")
        parameters[f"offramp_{name}"] = value
    return ServingOptions.from_parameters(parameters)


def _parses(kind: type, text: str) -> bool:
    if kind is bool:
        return text.lower() in ("true", "false")
    try:
        kind(text)
    except ValueError:
        return False
    return True


def by_hand_command(repository: Path, backends: Path) -> str:
    """The README's by-hand ``tritonserver`` command for ``repository``, with this machine's paths."""
    from offramp.client.serving.server import tritonserver_binary, tritonserver_libs_directory

    return (
        f"LD_LIBRARY_PATH={tritonserver_libs_directory()} {tritonserver_binary()} "
        f"--model-repository={repository} --backend-directory={backends} --disable-auto-complete-config "
        "--allow-gpu-metrics=false --pinned-memory-pool-byte-size=0 --exit-timeout-secs=10 "
        "--grpc-address=127.0.0.1 --http-address=127.0.0.1"
    )
