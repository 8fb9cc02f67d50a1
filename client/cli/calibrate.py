"""``offramp calibrate``: exit thresholds with a stated guarantee, from held-out data."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from offramp.client.cli.subcommand import DEFAULT_WORKDIR, Subcommand, lacks_artifacts


class CalibrateCommand(Subcommand):
    name = "calibrate"
    help = "calibrate exit thresholds with a stated guarantee"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.build.calibrate import METHODS, PATHS, RULE_CHOICES, TEMPERATURES
        from offramp.build.risk_control import P_VALUES, PER_CLASS, RISKS
        from offramp.kernels.confidence import METRICS

        add = parser.add_argument
        add("--artifacts", default=str(DEFAULT_WORKDIR / "fashion_cnn"), help="the build's folder")
        add(
            "--data",
            help="labelled rows of the kinds the build takes (text: CSV/TSV/JSON Lines/Parquet "
            "with an optional 'cohort' column; images: class folders or .npz), or an .npz of the model's "
            "inputs, 'labels' and 'cohorts'; default: the build's own calibration split",
        )
        add(
            "--shadow",
            metavar="DIR",
            help="the live rows a served policy's shadow checks kept "
            "(offramp_shadow_store_path): certify on live traffic, disagreement with the full model only",
        )
        add("--shadow-since-h", type=float, help="with --shadow: only rows kept in the last this many hours")
        add("--text-column", help="--data's text column (default: the build's)")
        add("--label-column", help="--data's label column (default: the build's)")
        add("--out", help="the policy file to write (default: policy.json in the artifacts folder)")
        add("--epsilon", type=float, default=0.01, help="allowed risk (default 1%%)")
        add("--delta", type=float, default=0.05, help="the guarantee holds with probability 1-delta")
        add("--method", choices=METHODS, default=METHODS[0],
            help="ltt: Learn-then-Test (guarantee); empirical: plain search, NO guarantee")  # fmt: skip
        add("--risk", choices=RISKS, default=RISKS[0])
        add("--max-accuracy-loss", type=float, metavar="EPSILON",
            help="also certify, jointly with --risk, that accuracy falls at most this far below the full "
            "model's (0.005: half a point); needs labelled rows")  # fmt: skip
        add("--rule", choices=RULE_CHOICES, default=RULE_CHOICES[0],
            help="the exit rule family: a confidence threshold, patience (the label held at the last exits), "
            "a learned monotone exit score, a confidence threshold with novelty gates (energy, and distance "
            "to the label's centre in logit space); all: "
            "each at delta / families, the least certified compute kept")  # fmt: skip
        add("--metric", choices=METRICS, default=METRICS[0], help="the confidence rule's figure")
        add(
            "--path",
            choices=PATHS,
            default=PATHS[0],
            help="shared: one data-free threshold for every exit; per_exit: shaped on the fit split",
        )
        add(
            "--temperature",
            choices=TEMPERATURES,
            default=TEMPERATURES[0],
            help="fit: per exit on the fit split; one: none (a data-free rule then certifies on every row)",
        )
        add("--p-value", choices=P_VALUES, default=P_VALUES[0])
        add("--per-class", choices=[p for p in PER_CLASS if p], help="per-class thresholds")
        add("--bonferroni", action="store_true", help="one guarantee for all cohorts at once")
        add("--ladder", type=float, nargs="+", default=(), metavar="EPSILON",
            help="further risk levels above --epsilon, each certified as a rung the SLO controller may "
            "climb to under load (delta is split across rungs)")  # fmt: skip
        add("--min-group-rows", type=int, default=50, help="smaller cohorts fall back to global")
        add("--report", help="folder for report.md and its plots")
        add("--evaluate-test", action="store_true", help="also judge the policy on the build's test split")
        add("--evaluate-data", metavar="PATH",
            help="also judge the policy (every rung) on other labelled rows of yours, "
            "of --data's kinds")  # fmt: skip
        add("--check-draws", type=int, metavar="N",
            help="check the guarantee on data calibration did not use: N calibration draws (with "
            "replacement) from the judged rows (--evaluate-test or --evaluate-data; else the calibration "
            "rows), each calibrated with these settings, every rung's risk measured on all the judged "
            "rows; says whether the share of draws breaking a bound stays within delta")  # fmt: skip
        add("--quiet", action="store_true", help="no progress bars")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.build.artifacts import MANIFEST, ModelArtifacts
        from offramp.build.calibrate import (
            CalibrationSettings,
            calibrate_artifacts,
            data_file_rows,
            held_out_data,
            shadow_rows,
        )
        from offramp.build.model_build import user_errors

        artifacts_dir = Path(args.artifacts)
        if lacks_artifacts(
            "calibrate", artifacts_dir, MANIFEST, "pass a build's folder (offramp build prints it)"
        ):
            return 2
        try:
            settings = CalibrationSettings(
                epsilon=args.epsilon,
                delta=args.delta,
                method=args.method,
                risk=args.risk,
                max_accuracy_loss=args.max_accuracy_loss,
                rule=args.rule,
                metric=args.metric,
                path=args.path,
                temperature=args.temperature,
                p_value=args.p_value,
                per_class=args.per_class,
                bonferroni=args.bonferroni,
                min_group_rows=args.min_group_rows,
                ladder=tuple(args.ladder),
            )
        except ValueError as error:
            print(f"offramp calibrate: error: {error}", file=sys.stderr)
            return 2
        artifacts = ModelArtifacts.load(artifacts_dir)
        if args.shadow and (args.data or args.risk != "disagreement" or args.max_accuracy_loss is not None):
            print("offramp calibrate: error: --shadow rows carry the full model's answers, not true labels: "
                  "use them alone (no --data), with --risk disagreement and no --max-accuracy-loss",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.evaluate_test and args.evaluate_data:
            print("offramp calibrate: error: judge on one set of rows: --evaluate-test or --evaluate-data",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.check_draws is not None and args.check_draws < 1:
            print(f"offramp calibrate: error: --check-draws needs at least 1 draw: {args.check_draws}",
                  file=sys.stderr)  # fmt: skip
            return 2
        columns = (args.text_column, args.label_column)
        try:
            if args.shadow:
                since = None if args.shadow_since_h is None else time.time() - args.shadow_since_h * 3600.0
                data = shadow_rows(artifacts, Path(args.shadow), since)
            elif args.data:
                data = data_file_rows(artifacts, artifacts_dir, Path(args.data), *columns)
            else:
                data = held_out_data(artifacts, artifacts_dir)
            judged = None
            if args.evaluate_test:
                judged = ("test split", held_out_data(artifacts, artifacts_dir, "test"))
            elif args.evaluate_data:
                judged = (
                    args.evaluate_data,
                    data_file_rows(artifacts, artifacts_dir, Path(args.evaluate_data), *columns),
                )
        except (*user_errors(), ValueError) as error:
            print(f"offramp calibrate: error: {error}", file=sys.stderr)
            return 2
        # The rows --check-draws draws from and judges on: the judged ones, else the calibration rows.
        checked = judged[1] if judged is not None else data
        if args.check_draws and checked.cohorts is not None:
            print("offramp calibrate: error: --check-draws checks a policy without cohorts: judge rows "
                  "without a cohort column", file=sys.stderr)  # fmt: skip
            return 2
        policy, calibrated, logits = calibrate_artifacts(
            artifacts, artifacts_dir, data, progress=not args.quiet, **asdict(settings)
        )
        out = Path(args.out) if args.out else artifacts_dir / "policy.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        policy.save(out)
        provenance = policy.provenance
        print(f"policy {policy.version} -> {out}")
        print(f"  {calibrated.guarantee}")
        if calibrated.tried:
            print("  certified compute per rule: " + ", ".join(f"{r} {c:.3f}" for r, c in calibrated.tried))
        print(f"  rule: {policy.rule}")
        print(f"  achieved calibration risk {provenance['achieved_risk']:.4f}, "
              f"expected compute {provenance['expected_cost']:.3f}")  # fmt: skip
        if "achieved_accuracy_loss" in provenance:
            print(f"  achieved calibration accuracy loss {provenance['achieved_accuracy_loss']:.4f}")
        print("  exit-rate profile: " + ", ".join(f"{r:.1%}" for r in provenance["exit_rate_profile"]))
        for rung, (epsilon, _) in enumerate(calibrated.rungs, start=1):
            print(
                f"  rung {rung}: epsilon {epsilon:g}, expected compute "
                f"{policy.rungs[rung - 1].expected_cost:.3f}"
            )
        for warning in calibrated.warnings:
            print(f"  warning: {warning}")
        checked_logits = logits
        if judged is not None:
            from offramp.build.calibrate import exit_logits_from_onnx, rung_figures

            where, rows = judged
            checked_logits = exit_logits_from_onnx(
                artifacts, artifacts_dir, rows.inputs, progress=not args.quiet
            )
            epsilons = (args.epsilon, *(r.epsilon for r in policy.rungs))
            figures = rung_figures(policy, checked_logits, artifacts.exit_costs, rows.labels)
            for rung, (epsilon, f) in enumerate(zip(epsilons, figures, strict=True)):
                which = (
                    f"{where} ({len(rows.labels)} rows)"
                    if rung == 0
                    else f"{where}, rung {rung} (epsilon {epsilon:g})"
                )
                print(
                    f"  {which}: disagreement with full {f.disagreement:.2%}, "
                    f"accuracy {f.accuracy:.2%} (full {f.full_accuracy:.2%}), compute {f.compute:.3f}"
                )
        if args.check_draws:
            from tqdm import tqdm

            from offramp.build.guarantee_check import check_guarantee

            with tqdm(total=args.check_draws, desc="calibration draws", disable=args.quiet) as bar:
                check = check_guarantee(
                    checked_logits, artifacts.exit_costs, checked.labels, settings, args.check_draws,
                    draw_rows=len(data.labels), progress=lambda _: bar.update(),
                )  # fmt: skip
            for line in check.lines():
                print(f"  {line}")
        if args.report:
            from offramp.build.calibration_report import write_calibration_report

            report = write_calibration_report(
                Path(args.report), policy, calibrated, logits, data, artifacts.class_names
            )
            print(f"  report: {report}")
        return 0
