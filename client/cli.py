"""The ``offramp`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_WORKDIR = Path(".cache/offramp")
DEFAULT_REPOSITORY = Path("model_repository")


def _build(args: argparse.Namespace) -> int:
    from offramp.build.recipes import build_fashion_mnist_cnn, quick_train_config
    from offramp.build.train import TrainConfig

    train = quick_train_config() if args.quick else TrainConfig(epochs=args.epochs, seed=args.seed)
    artifacts = build_fashion_mnist_cnn(Path(args.out), train=train, data_dir=args.data)
    for index, (accuracy, cost) in enumerate(zip(artifacts.exit_test_accuracy, artifacts.exit_costs)):
        print(f"exit {index}: test accuracy {accuracy:.2%}, compute fraction {cost:.3f}")
    print(f"full network: test accuracy {artifacts.full_test_accuracy:.2%}; artifacts in {args.out}")
    return 0


def _repository(args: argparse.Namespace) -> int:
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
    env = None if args.no_execution_env else prepare_execution_env(Path(args.execution_env) if args.execution_env else None)
    options = RepositoryOptions(target=args.target, execution_env=env)
    for model_dir in write_repository(artifacts, artifacts_dir, policy, Path(args.repository), options):
        print(model_dir)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from offramp.build.artifacts import ModelArtifacts
    from offramp.build.calibrate import CalibrationData, calibrate_artifacts, recipe_calibration_data

    artifacts_dir = Path(args.artifacts)
    artifacts = ModelArtifacts.load(artifacts_dir)
    names = [spec.name for spec in artifacts.inputs]
    data = CalibrationData.from_npz(Path(args.data), names) if args.data else recipe_calibration_data(artifacts, artifacts_dir)
    policy, calibrated, logits = calibrate_artifacts(
        artifacts,
        artifacts_dir,
        data,
        epsilon=args.epsilon,
        delta=args.delta,
        method=args.method,
        risk=args.risk,
        metric=args.metric,
        p_value=args.p_value,
        per_class=args.per_class,
        bonferroni=args.bonferroni,
        min_group_rows=args.min_group_rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    policy.save(out)
    provenance = policy.provenance
    print(f"policy {policy.version} -> {out}")
    print(f"  {calibrated.guarantee}")
    print(f"  achieved calibration risk {provenance['achieved_risk']:.4f}, expected compute {provenance['expected_cost']:.3f}")
    print("  exit-rate profile: " + ", ".join(f"{r:.1%}" for r in provenance["exit_rate_profile"]))
    for warning in calibrated.warnings:
        print(f"  warning: {warning}")
    if args.evaluate_test:
        from offramp.build.calibrate import evaluate_policy

        figures = evaluate_policy(artifacts, artifacts_dir, policy, recipe_calibration_data(artifacts, artifacts_dir, "test"))
        print(f"  test split ({figures['rows']} rows): disagreement with full {figures['disagreement']:.2%}, "
              f"accuracy {figures['accuracy']:.2%} (full {figures['full_accuracy']:.2%}), compute {figures['compute']:.3f}")  # fmt: skip
    if args.report:
        from offramp.build.calibration_report import write_calibration_report

        report = write_calibration_report(Path(args.report), policy, calibrated, logits, data, artifacts.class_names)
        print(f"  report: {report}")
    return 0


def _policy(args: argparse.Namespace) -> int:
    from offramp.backend.policy import Policy
    from offramp.client.policy_control import PolicyControl, PolicyControlError, policy_diff

    control = PolicyControl(Path(args.repository), args.model, args.url, args.admin_key)
    try:
        if args.action == "list":
            for version in control.versions():
                provenance = version.policy.provenance
                print(f"{version.number:>4} {'*' if version.active else ' '} {version.policy.version:<24} "
                      f"{provenance.get('method', '?')}, expected compute {provenance.get('expected_cost', float('nan')):.3f}")  # fmt: skip
        elif args.action == "show":
            print(control.policy(args.version).to_json())
        elif args.action == "diff":
            for line in policy_diff(control.policy(args.version), control.policy(args.other)) or ["no differences"]:
                print(line)
        elif args.action == "deploy":
            number = control.deploy(Policy.load(Path(args.policy)))
            print(f"{args.model}: policy version {number} written" + (" and serving" if args.url else ""))
        elif args.action == "rollback":
            print(f"{args.model}: serving policy version {control.rollback(args.version)}")
    except PolicyControlError as error:
        print(f"offramp policy: error: {error}", file=sys.stderr)
        return 1
    return 0


def _audit(args: argparse.Namespace) -> int:
    from offramp.backend.audit import read_audit, summarize_audit

    summary = summarize_audit(read_audit([Path(p) for p in args.files]))
    total = sum(summary["exit"].values())
    print(f"{total} records")
    for field in ("policy_version", "cohort", "exit"):
        print(f"by {field}:")
        for key, count in sorted(summary[field].items(), key=lambda kv: str(kv[0])):
            print(f"  {str(key):<24} {count:>8} {count / max(total, 1):>7.1%}")
    print("by policy_version and exit:")
    for (version, exit_index), count in sorted(summary["version_exit"].items(), key=lambda kv: str(kv[0])):
        print(f"  {str(version):<24} exit {exit_index}: {count}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    import numpy as np

    from offramp.client.client import OfframpClient, predictions_to_json

    images = np.load(args.npy).astype(np.float32) if args.npy else None
    if images is None:
        from offramp.build.fashion_mnist import load_fashion_mnist

        images = load_fashion_mnist("test")[0][args.first : args.first + args.rows]
    with OfframpClient(args.url) as client:
        predictions = client.classify(
            args.model,
            images,
            force_full=args.force_full or None,
            min_exit=args.min_exit,
            max_exit=args.max_exit,
            request_id=args.request_id,
        )
    print(predictions_to_json(predictions))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from offramp.client.demo import main_demo

    return main_demo(args)


def _bench(args: argparse.Namespace) -> int:
    from offramp.client.bench import main_bench

    return main_bench(args)


def _serve(args: argparse.Namespace) -> int:
    from offramp.client.server import serve

    return serve(args)


def parser() -> argparse.ArgumentParser:
    from offramp.client.server import add_serve_arguments

    root = argparse.ArgumentParser(prog="offramp", description="Early-exit inference on Triton.")
    commands = root.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="train (or reuse) and export the multi-exit Fashion-MNIST CNN")
    build.add_argument("--out", default=str(DEFAULT_WORKDIR / "fashion_cnn"), help="artifacts folder")
    build.add_argument("--epochs", type=int, default=3)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="folder of the IDX files")
    build.add_argument("--quick", action="store_true", help="a small, fast build for tests")
    build.set_defaults(run=_build)

    repository = commands.add_parser("repository", help="write a Triton model repository from build artifacts")
    repository.add_argument("--artifacts", default=str(DEFAULT_WORKDIR / "fashion_cnn"))
    repository.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
    repository.add_argument("--target", default="embedded", choices=["embedded", "triton-onnx", "triton-tensorrt"])
    repository.add_argument("--policy", help="policy.json to serve (default: one fixed max-prob threshold)")
    repository.add_argument("--threshold", type=float, default=0.9, help="the fixed threshold without --policy")
    repository.add_argument("--execution-env", help="virtualenv of the Python stubs (default: this one)")
    repository.add_argument("--no-execution-env", action="store_true", help="use the server's own Python")
    repository.set_defaults(run=_repository)

    calibrate = commands.add_parser("calibrate", help="calibrate exit thresholds with a stated guarantee")
    calibrate.add_argument("--artifacts", default=str(DEFAULT_WORKDIR / "fashion_cnn"))
    calibrate.add_argument("--data", help=".npz with the model's inputs, labels (and cohorts); default: the recipe's split")
    calibrate.add_argument("--out", default=str(DEFAULT_WORKDIR / "policy.json"))
    calibrate.add_argument("--epsilon", type=float, default=0.01, help="allowed risk (default 1%%)")
    calibrate.add_argument("--delta", type=float, default=0.05, help="the guarantee holds with probability 1-delta")
    calibrate.add_argument("--method", choices=["ltt", "empirical"], default="ltt",
                           help="ltt: Learn-then-Test (guarantee); empirical: plain search, NO guarantee")  # fmt: skip
    calibrate.add_argument("--risk", choices=["disagreement", "error_increase", "error_increase_net"], default="disagreement")
    calibrate.add_argument("--metric", choices=["max_prob", "entropy", "margin"], default="max_prob")
    calibrate.add_argument("--p-value", choices=["binomial", "hoeffding_bentkus"], default="binomial")
    calibrate.add_argument("--per-class", choices=["marginal", "class_conditional"], help="per-class thresholds")
    calibrate.add_argument("--bonferroni", action="store_true", help="one guarantee for all cohorts at once")
    calibrate.add_argument("--min-group-rows", type=int, default=50, help="smaller cohorts fall back to global")
    calibrate.add_argument("--report", help="folder for report.md and its plots")
    calibrate.add_argument("--evaluate-test", action="store_true", help="also judge the policy on the recipe's test split")
    calibrate.set_defaults(run=_calibrate)

    serve = commands.add_parser("serve", help="start the embedded tritonserver on a repository")
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    policy = commands.add_parser("policy", help="list, show, diff, deploy or roll back live policy versions")
    policy.add_argument("action", choices=["list", "show", "diff", "deploy", "rollback"])
    policy.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
    policy.add_argument("--model", default="fashion_cnn", help="the orchestrator model")
    policy.add_argument("--url", help="gRPC address of the running server (host:port)")
    policy.add_argument("--admin-key", default=os.environ.get("OFFRAMP_ADMIN_KEY"), help="for servers off loopback")
    policy.add_argument("--version", type=int, help="show/diff: the version; rollback: the target")
    policy.add_argument("--other", type=int, help="diff: the version to compare with")
    policy.add_argument("--policy", help="deploy: the policy.json to serve")
    policy.set_defaults(run=_policy)

    audit = commands.add_parser("audit", help="summarise audit records by exit, cohort and policy version")
    audit.add_argument("files", nargs="+", help="audit JSON-lines files (rotated siblings are read too)")
    audit.set_defaults(run=_audit)

    infer = commands.add_parser("infer", help="classify images through gRPC; one JSON line per row")
    infer.add_argument("--url", default="127.0.0.1:8001")
    infer.add_argument("--model", default="fashion_cnn")
    infer.add_argument("--npy", help="a .npy of images (n, 1, 28, 28) in [0, 1]; default: Fashion-MNIST test rows")
    infer.add_argument("--first", type=int, default=0)
    infer.add_argument("--rows", type=int, default=4)
    infer.add_argument("--force-full", action="store_true")
    infer.add_argument("--min-exit", type=int)
    infer.add_argument("--max-exit", type=int)
    infer.add_argument("--request-id")
    infer.set_defaults(run=_infer)

    demo = commands.add_parser("demo", help="build, serve and measure the early-exit CNN against the full one")
    demo.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    demo.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
    demo.add_argument("--model", default="fashion_cnn", choices=["fashion_cnn", "trec", "rotten_tomatoes"],
                      help="the CNN (minutes) or a MiniLM text classifier (its first build takes much longer)")  # fmt: skip
    demo.add_argument("--epochs", type=int, help="training epochs (default: 3 for the CNN, 2 for text)")
    demo.add_argument("--concurrency", type=int, default=8)
    demo.add_argument("--rows-per-request", type=int, default=16)
    demo.set_defaults(run=_demo)

    from offramp.client.bench import add_bench_arguments

    bench = commands.add_parser("bench", help="early exit against the full model under perf_analyzer; writes benchmarks/")
    add_bench_arguments(bench)
    bench.set_defaults(run=_bench)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
