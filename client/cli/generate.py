"""``offramp generate``: the code-completion model with exits, from build to streamed completions.

offramp generate build                  train (or reuse) the code model; or --checkpoint DIR: import yours
offramp generate calibrate              draft exit and length, certified confident thresholds -> policy
offramp generate repository             write the streaming generator into a model repository
offramp generate complete "def f(x):"   stream a completion from a running server
offramp generate bench                  the modes side by side (also: offramp bench --workload generation)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offramp.client.cli.options import add_config_options, config_from_args
from offramp.client.cli.subcommand import (
    DEFAULT_GRPC_URL,
    DEFAULT_REPOSITORY,
    DEFAULT_WORKDIR,
    Subcommand,
    lacks_artifacts,
)

DEFAULT_ARTIFACTS = DEFAULT_WORKDIR / "code_llama"


def _build(args: argparse.Namespace) -> int:
    from offramp.build.decoder import ExitTraining, build_code_model, import_checkpoint, training_report

    if args.checkpoint:
        exits = tuple(int(e) for e in args.exit_layers.split(",")) if args.exit_layers else None
        out = args.out or DEFAULT_WORKDIR / (args.name or Path(args.checkpoint).name)
        artifacts, directory = import_checkpoint(Path(args.checkpoint), out, exits, args.name)
        print(f"{directory}: {artifacts.family}, exits after layers {artifacts.exit_layers}")
        return 0
    settings = ExitTraining() if args.steps is None else ExitTraining(steps=args.steps)
    artifacts, directory = build_code_model(args.workdir, settings=settings, threads=args.threads)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(training_report(artifacts))
    print(f"{directory}; report {args.report}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from offramp.backend.exit_decoder import reproducible_gemm
    from offramp.build.generation_calibrate import CalibrationSettings, calibrate_generation

    reproducible_gemm()  # decode as the server's stub does
    settings = CalibrationSettings(epsilon=args.epsilon, delta=args.delta, calibration_tasks=args.tasks)
    policy = calibrate_generation(args.artifacts, settings)
    out = args.out or args.artifacts / "generation_policy.json"
    policy.save(out)
    print(f"{out}: {policy.version}, draft exit {policy.draft_exit} x {policy.draft_length}, "
          f"confident thresholds {policy.thresholds}")  # fmt: skip
    return 0


def _repository(args: argparse.Namespace) -> int:
    from offramp.backend.environment import prepare_execution_env
    from offramp.backend.generation_policy import GenerationPolicy
    from offramp.backend.generation_service import ServiceOptions
    from offramp.build.decoder import DecoderArtifacts
    from offramp.build.generation_repository import write_generator

    artifacts = DecoderArtifacts.load(args.artifacts)
    policy_file = args.policy or args.artifacts / "generation_policy.json"
    if policy_file.exists():
        policy = GenerationPolicy.load(policy_file)
    else:
        print(
            f"no {policy_file}: serving the uncalibrated policy (confident never leaves early)",
            file=sys.stderr,
        )
        policy = GenerationPolicy.uncalibrated(len(artifacts.exit_layers), artifacts.fingerprint)
    options = ServiceOptions(audit_path=args.audit_path or "")
    model_dir = write_generator(
        args.artifacts, policy, args.repository, options, prepare_execution_env(), args.name
    )
    print(model_dir)
    return 0


def _complete(args: argparse.Namespace) -> int:
    from offramp.client.generation_client import GenerationClient, StreamFailed

    prompt = Path(args.file).read_text() if args.file else args.prompt
    if prompt is None:
        print("offramp generate complete: give a PROMPT or --file", file=sys.stderr)
        return 2
    parameters = {k: v for k, v in {
        "mode": args.mode, "max_tokens": args.max_tokens, "stop": args.stop, "deadline_ms": args.deadline_ms,
        "check": args.check, "check_schema": args.check_schema, "check_pattern": args.check_pattern,
        "request_id": args.request_id,
    }.items() if v is not None}  # fmt: skip
    try:
        completion = GenerationClient(args.url, args.model).complete(prompt, **parameters)
    except StreamFailed as error:
        print(f"offramp generate complete: {error}", file=sys.stderr)
        return 1
    if completion.error:
        print(f"offramp generate complete: {completion.error}", file=sys.stderr)
        return 1
    print(json.dumps({
        "text": completion.text, "tokens": len(completion.tokens), "exits": completion.exits,
        "attempts": completion.attempts, "flags": completion.flags, "finish_reason": completion.finish_reason,
        "time_to_first_token_ms": round(1e3 * (completion.time_to_first_token or 0.0), 2),
        "total_ms": round(1e3 * (completion.done_at - completion.sent_at), 2),
    }))  # fmt: skip
    return 0


def _bench(args: argparse.Namespace) -> int:
    from offramp.client.tools.generation_bench import GenerationBenchConfig, main_generation_bench

    try:
        config = config_from_args(
            GenerationBenchConfig, args, GenerationBenchConfig.quick_defaults() if args.quick else {}
        )
    except ValueError as error:
        print(f"offramp generate bench: error: {error}", file=sys.stderr)
        return 2
    return main_generation_bench(config)


class GenerateCommand(Subcommand):
    name = "generate"
    help = "code completion with exits: build, calibrate, repository, complete, bench"
    description = __doc__

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.client.tools.generation_bench import GenerationBenchConfig

        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")

        build = steps.add_parser("build", help="train (or reuse) the code model, or import a checkpoint")
        build.add_argument("--checkpoint", help="a Hugging Face Llama or GPT-2 folder with tokenizer.json")
        build.add_argument(
            "--exit-layers", help="comma-separated layers an exit follows (default: 4 evenly spread)"
        )
        build.add_argument("--name")
        build.add_argument("--out", type=Path, help="artifacts folder of an imported checkpoint")
        build.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
        build.add_argument("--steps", type=int, help="training steps (default: the recipe's, ExitTraining)")
        build.add_argument("--threads", type=int, default=2)
        build.add_argument("--report", type=Path, default=Path("benchmarks/code_model.md"))
        build.set_defaults(step_run=_build)

        calibrate = steps.add_parser(
            "calibrate", help="draft exit and length; certified confident thresholds"
        )
        calibrate.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS)
        calibrate.add_argument(
            "--epsilon", type=float, default=0.02, help="token disagreement per completion"
        )
        calibrate.add_argument("--delta", type=float, default=0.05)
        calibrate.add_argument("--tasks", type=int, help="calibration completions (default: all)")
        calibrate.add_argument("--out", type=Path, help="default: ARTIFACTS/generation_policy.json")
        calibrate.set_defaults(step_run=_calibrate)

        repository = steps.add_parser("repository", help="write the streaming generator into a repository")
        repository.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS)
        repository.add_argument("--policy", type=Path, help="default: ARTIFACTS/generation_policy.json")
        repository.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
        repository.add_argument("--name", help="model name (default: the artifacts' name)")
        repository.add_argument("--audit-path", help="write one JSON line per finished request here")
        repository.set_defaults(step_run=_repository)

        complete = steps.add_parser(
            "complete", help="stream a completion from a running server; print it as JSON"
        )
        complete.add_argument("prompt", nargs="?")
        complete.add_argument("--file", help="read the prompt from this file")
        complete.add_argument("--url", default=DEFAULT_GRPC_URL)
        complete.add_argument("--model", default="code_llama")
        complete.add_argument("--mode", choices=("full", "self_speculative", "confident"))
        complete.add_argument("--max-tokens", type=int)
        complete.add_argument("--stop", help="a JSON array of stop strings, e.g. '[\"\\n\"]'")
        complete.add_argument("--deadline-ms", type=int)
        complete.add_argument("--check", choices=("python_syntax", "json_schema", "regex"))
        complete.add_argument("--check-schema", help="JSON Schema (text) for --check json_schema")
        complete.add_argument("--check-pattern", help="regular expression for --check regex")
        complete.add_argument("--request-id")
        complete.set_defaults(step_run=_complete)

        bench = steps.add_parser(
            "bench", help="the decoding modes side by side on one server; writes GENERATION.md"
        )
        add_config_options(bench, GenerationBenchConfig, {"quick": GenerationBenchConfig.quick_defaults()})
        bench.set_defaults(step_run=_bench)

    def run(self, args: argparse.Namespace) -> int:
        from offramp.backend.exit_decoder import DECODER_MANIFEST

        artifacts = getattr(args, "artifacts", None)
        hint = "pass a code model's folder (offramp generate build prints it; --checkpoint DIR imports yours)"
        if artifacts is not None and lacks_artifacts(
            f"generate {args.step}", artifacts, DECODER_MANIFEST, hint
        ):
            return 2
        return args.step_run(args)
