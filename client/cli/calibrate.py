"""``offramp calibrate``: exit thresholds with a stated guarantee, from held-out data."""

from __future__ import annotations

import argparse
from pathlib import Path

from offramp.client.cli.subcommand import DEFAULT_WORKDIR, Subcommand


class CalibrateCommand(Subcommand):
    name = "calibrate"
    help = "calibrate exit thresholds with a stated guarantee"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.build.calibrate import METHODS
        from offramp.build.risk_control import P_VALUES, PER_CLASS, RISKS
        from offramp.kernels.confidence import METRICS

        add = parser.add_argument
        add("--artifacts", default=str(DEFAULT_WORKDIR / "fashion_cnn"))
        add("--data", help=".npz with the model's inputs, labels (and cohorts); default: the recipe's split")
        add("--out", default=str(DEFAULT_WORKDIR / "policy.json"))
        add("--epsilon", type=float, default=0.01, help="allowed risk (default 1%%)")
        add("--delta", type=float, default=0.05, help="the guarantee holds with probability 1-delta")
        add("--method", choices=METHODS, default=METHODS[0],
            help="ltt: Learn-then-Test (guarantee); empirical: plain search, NO guarantee")  # fmt: skip
        add("--risk", choices=RISKS, default=RISKS[0])
        add("--metric", choices=METRICS, default=METRICS[0])
        add("--p-value", choices=P_VALUES, default=P_VALUES[0])
        add("--per-class", choices=[p for p in PER_CLASS if p], help="per-class thresholds")
        add("--bonferroni", action="store_true", help="one guarantee for all cohorts at once")
        add("--min-group-rows", type=int, default=50, help="smaller cohorts fall back to global")
        add("--report", help="folder for report.md and its plots")
        add("--evaluate-test", action="store_true", help="also judge the policy on the recipe's test split")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.build.artifacts import ModelArtifacts
        from offramp.build.calibrate import CalibrationData, calibrate_artifacts, recipe_calibration_data

        artifacts_dir = Path(args.artifacts)
        artifacts = ModelArtifacts.load(artifacts_dir)
        names = [spec.name for spec in artifacts.inputs]
        if args.data:
            data = CalibrationData.from_npz(Path(args.data), names)
        else:
            data = recipe_calibration_data(artifacts, artifacts_dir)
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
        print(f"  achieved calibration risk {provenance['achieved_risk']:.4f}, "
              f"expected compute {provenance['expected_cost']:.3f}")  # fmt: skip
        print("  exit-rate profile: " + ", ".join(f"{r:.1%}" for r in provenance["exit_rate_profile"]))
        for warning in calibrated.warnings:
            print(f"  warning: {warning}")
        if args.evaluate_test:
            from offramp.build.calibrate import evaluate_policy

            test = recipe_calibration_data(artifacts, artifacts_dir, "test")
            figures = evaluate_policy(artifacts, artifacts_dir, policy, test)
            print(f"  test split ({figures['rows']} rows): disagreement with full {figures['disagreement']:.2%}, "
                  f"accuracy {figures['accuracy']:.2%} (full {figures['full_accuracy']:.2%}), "
                  f"compute {figures['compute']:.3f}")  # fmt: skip
        if args.report:
            from offramp.build.calibration_report import write_calibration_report

            report = write_calibration_report(Path(args.report), policy, calibrated, logits, data, artifacts.class_names)
            print(f"  report: {report}")
        return 0
