"""The calibration report: a Markdown summary and PNG plots of one calibrated policy.

The guarantee is a statement about the certifying rows (the calibration rows nothing was fitted on,
``CalibratedExitPolicy.split.certify``), and ``offramp calibrate`` prints its figures on them, so
every figure and table here is computed on those rows and says so; the expected calibration error is
shown on the fit rows as well, where the temperatures were fitted. Figures: accuracy and agreement
with the full model against compute along the candidate path, with the chosen point and the 1 - ε
bound; reliability diagrams before and after temperature scaling; the exit-rate profile. Tables: the
expected calibration error, per true class, per full-model class (class-conditional guarantee) and
per cohort.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offramp.backend.policy import ExitRule, Policy
from offramp.build.calibrate import CalibrationData, simulate_exits
from offramp.build.markdown import markdown_table
from offramp.build.risk_control import NEVER, CalibratedExitPolicy, candidate_outcomes, exit_confidences
from offramp.build.temperature import reliability_bins


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or in CI
    import matplotlib.pyplot as plt

    return plt


def _exit_labels(logits: np.ndarray, temperatures: Sequence[float]) -> np.ndarray:
    """(E, n) every exit's label as the cascade computes it (-1 for a row with a non-finite logit)."""
    return np.stack([c.label for c in exit_confidences(logits, temperatures)])


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class AnsweredRows:
    """Rows answered under one set of served exit rules, beside the full model's answers."""

    taken: np.ndarray  # (n,) the exit each row answers at
    answer: np.ndarray  # (n,) the label given
    full: np.ndarray  # (n,) the last exit's label
    truth: np.ndarray  # (n,)
    cost: np.ndarray  # (n,) compute fraction spent on each row

    @classmethod
    def under(
        cls, rules: tuple[ExitRule, ...], logits: np.ndarray, truth: np.ndarray, exit_costs: np.ndarray
    ) -> AnsweredRows:
        """``rules`` applied to logits (E, n, C) with labels ``truth`` (n,), as the cascade would."""
        taken = simulate_exits(logits, rules)  # (n,)
        exit_labels = _exit_labels(logits, [rule.temperature for rule in rules])  # (E, n)
        answer = exit_labels[taken, np.arange(len(taken))]
        return cls(taken, answer, exit_labels[-1], truth, exit_costs[taken])

    @property
    def rows(self) -> int:
        return len(self.taken)

    def subset(self, members: np.ndarray) -> AnsweredRows:
        return AnsweredRows(
            self.taken[members],
            self.answer[members],
            self.full[members],
            self.truth[members],
            self.cost[members],
        )

    def figures(self) -> list[str]:
        """Table cells: accuracy, full-model accuracy, agreement with the full model, mean compute."""
        if not self.rows:
            return ["", "", "", ""]
        return [
            f"{(self.answer == self.truth).mean():.2%}",
            f"{(self.full == self.truth).mean():.2%}",
            f"{(self.answer == self.full).mean():.2%}",
            f"{self.cost.mean():.3f}",
        ]


FIGURES_HEAD = ["accuracy", "full-model accuracy", "agreement with full", "mean compute"]


def _format_threshold(threshold: float | tuple[float, ...], metric: str) -> str:
    if isinstance(threshold, tuple):
        return "per class [" + ", ".join(_format_threshold(t, metric) for t in threshold) + "]"
    return "never" if threshold == NEVER[metric] else f"{threshold:.4f}"


def _format_optional(value: float, spec: str) -> str:
    return "none" if math.isnan(value) else format(value, spec)


def _bound_label(risk: str) -> str:
    """What the guarantee bounds from below, 1 - risk, in words."""
    return "agreement with the full model" if risk == "disagreement" else f"1 − {risk}"


def _summary(policy: Policy, calibrated: CalibratedExitPolicy, served: AnsweredRows) -> str:
    result = calibrated.result
    certifying, fit = calibrated.calibration_rows, calibrated.fit_rows
    if calibrated.method == "learn_then_test":
        sample, accepted = "the sample the guarantee is about", "certified"
        test = f"p-value {result.p_value:.3g}"
    else:
        sample, accepted = "the rows the thresholds were chosen on (no guarantee)", "accepted"
        test = "no test"
    if result.candidate == 0:
        chosen = "chosen: candidate 0, no early exit"
    else:
        chosen = f"chosen: candidate {result.candidate}, the least expected compute among them ({test})"
    fitted = (
        "the temperatures were" if calibrated.path.kind == "shared" else "the temperatures and the path were"
    )
    accuracy, full_accuracy, agreement, _ = served.figures()
    lines = [
        f"# Calibration report: policy `{policy.version}`",
        "",
        f"- method: {calibrated.method}; {calibrated.guarantee}",
        f"- risk: {calibrated.risk}, ε = {calibrated.epsilon}, "
        f"δ = {_format_optional(calibrated.delta, 'g')}, p-value: {calibrated.p_value}",
        f"- rows: {certifying + fit} calibration rows (data {calibrated.data_fingerprint}): "
        f"**{certifying} certifying rows**, {sample} and the rows of every figure and table below unless "
        f"it says otherwise; {fit} fit rows, on which {fitted} fitted before the test",
        f"- candidate path: {calibrated.path.kind}, {len(calibrated.path)} candidates from 'no early exit' "
        f"on; {result.certified} {accepted} past it; {chosen}",
        f"- on the {certifying} certifying rows, under the global thresholds: calibration risk "
        f"{result.risk:.4f}; expected compute {result.expected_cost:.3f} (ideal speed-up "
        f"{1 / result.expected_cost:.2f}x); exit-rate profile: "
        + ", ".join(f"exit {k}: {rate:.1%}" for k, rate in enumerate(result.exit_rates)),
        f"- accuracy {accuracy} (full model {full_accuracy}), agreement with the full model {agreement} "
        "(same rows, same thresholds)",
        f"- rule: {calibrated.rule}"
        + "".join(f"; certified compute of the {family} rule {c:.3f}" for family, c in calibrated.tried),
        f"- thresholds per exit ({calibrated.metric}): "
        + ", ".join(_format_threshold(rule.threshold, calibrated.metric) for rule in policy.exits[:-1])
        + "; temperatures: "
        + ", ".join(f"{t:.3f}" for t in calibrated.temperatures),
        *(f"- warning: {w}" for w in calibrated.warnings),
    ]
    return "\n".join(lines)


def _candidate_path_figure(
    path: Path, calibrated: CalibratedExitPolicy, logits: np.ndarray, truth: np.ndarray
) -> str:
    """Accuracy and agreement along the path (left); the guaranteed quantity near its bound (right)."""
    outcomes = candidate_outcomes(logits, calibrated.temperatures, calibrated.path, calibrated.risk, truth)
    exit_labels = _exit_labels(logits, calibrated.temperatures)  # (E, n)
    answers = exit_labels[outcomes.taken, np.arange(len(truth))]  # (K, n)
    cost = np.asarray(calibrated.exit_costs)[outcomes.taken].mean(axis=1)  # (K,)
    accuracy = (answers == truth).mean(axis=1)  # (K,)
    agreement = (answers == exit_labels[-1]).mean(axis=1)  # (K,)
    bounded = 1.0 - outcomes.losses.mean(axis=1)  # (K,) what the guarantee bounds: 1 - risk
    chosen = calibrated.result.candidate
    bound = 1.0 - calibrated.epsilon
    bound_label = _bound_label(calibrated.risk)
    delta = _format_optional(calibrated.delta, "g")

    plt = _pyplot()
    figure, (whole, near) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    whole.plot(cost, accuracy, color="tab:blue", label="accuracy")
    whole.plot(cost, agreement, color="tab:green", label="agreement with the full model")
    whole.scatter(
        [cost[chosen]] * 2, [accuracy[chosen], agreement[chosen]], color="tab:red", zorder=3, label="chosen"
    )
    whole.scatter([cost[0]], [accuracy[0]], color="black", marker="x", zorder=3, label="full model")
    whole.set_title(f"the whole candidate path, {len(truth)} certifying rows", fontsize=10)
    whole.set_ylabel("fraction of certifying rows")

    # The bound sits within a few ε of 1: only a zoom shows the chosen point's margin above it.
    span = 3 * max(calibrated.epsilon, 0.002)
    low, high = max(bound - span, 0.0), max(1.0, float(bounded.max())) + span / 10
    shown = bounded >= low
    near.plot(cost, bounded, color="tab:green", lw=1, label=bound_label)
    if calibrated.method == "learn_then_test":  # its certified candidates are the run 0..certified
        run = slice(0, calibrated.result.certified + 1)
        near.plot(cost[run], bounded[run], color="tab:green", lw=3, label="certified (fixed-sequence run)")
    near.axhline(bound, color="tab:red", ls="--", lw=1, label=f"1 − ε = {bound:g}")
    near.scatter(
        [cost[chosen]],
        [bounded[chosen]],
        color="tab:red",
        zorder=3,
        label=f"chosen: compute {cost[chosen]:.3f}, {bounded[chosen]:.4f}",
    )
    near.set_xlim(cost[shown].min() - 0.02, cost[shown].max() + 0.02)
    near.set_ylim(low, high)
    near.set_title(
        f"near the bound ({calibrated.method}, ε = {calibrated.epsilon}, δ = {delta})", fontsize=10
    )
    near.set_ylabel(bound_label)
    for axis in (whole, near):
        axis.set_xlabel("mean compute fraction")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    if calibrated.method != "learn_then_test":
        bound_note = "The search only keeps the calibration risk under ε: nothing bounds it on fresh rows."
    else:
        bound_note = (
            "The certified candidates (the fixed-sequence run) are drawn thick. The bound is on the risk of "
            "fresh rows: on the certifying rows the chosen candidate sits above it by the margin that "
            "certifying from a finite sample needs."
        )
        if calibrated.per_class == "class_conditional":
            bound_note += (
                " Every tested full-model class must meet the bound as well (see its table), so the "
                "marginal curve can sit well above it."
            )
    return (
        f"![accuracy and agreement vs compute along the candidate path]({path.name})\n\n"
        f"The candidate path ({len(cost)} candidates, from 'no early exit' at compute {cost[0]:.2f} to the "
        f"most aggressive), every candidate evaluated on the {len(truth)} certifying rows. Left: accuracy "
        f"and agreement with the full model; the chosen candidate in red. Right: {bound_label} (1 − risk) "
        f"near the bound 1 − ε = {bound:g}; the chosen candidate at compute {cost[chosen]:.3f}, "
        f"{bounded[chosen]:.4f} (1 − the calibration risk above). {bound_note}"
    )


def _reliability_figure(
    path: Path, calibrated: CalibratedExitPolicy, logits: np.ndarray, truth: np.ndarray
) -> str:
    """Per exit, reliability before (T = 1) and after temperature scaling, on the certifying rows."""
    plt = _pyplot()
    num_exits = logits.shape[0]
    figure, axes = plt.subplots(1, num_exits, figsize=(3.4 * num_exits, 3.9), squeeze=False, sharey=True)
    for k, axis in enumerate(axes[0]):
        errors = []
        for temperature, color, label in [
            (1.0, "tab:gray", "before: T = 1"),
            (calibrated.temperatures[k], "tab:blue", "after: the policy's T per exit"),
        ]:
            bins = reliability_bins(logits[k], truth, temperature)
            filled = bins.counts > 0
            axis.plot(
                bins.confidence[filled], bins.accuracy[filled], marker="o", ms=3, color=color, label=label
            )
            errors.append(bins.expected_calibration_error())
        axis.plot([0, 1], [0, 1], color="black", lw=0.5, label="perfectly calibrated")
        axis.set_title(
            f"exit {k}: T = {calibrated.temperatures[k]:.2f}\nECE {errors[0]:.3f} → {errors[1]:.3f}",
            fontsize=9,
        )
        axis.set_xlabel("confidence (max prob)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy, {len(truth)} certifying rows")
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return (
        f"![reliability before and after temperature scaling]({path.name})\n\n"
        f"Reliability diagrams on the {len(truth)} certifying rows, which the temperatures were not fitted "
        "on: whether the scaling carries over to rows it did not see. 15 equal-width confidence bins; empty "
        "bins are left out. The table below gives the fit rows too."
    )


def _exit_rate_figure(path: Path, calibrated: CalibratedExitPolicy, served: AnsweredRows) -> str:
    plt = _pyplot()
    costs = calibrated.exit_costs
    rates = np.bincount(served.taken, minlength=len(costs)) / served.rows  # (E,)
    figure, axis = plt.subplots(figsize=(4.8, 3.4))
    bars = axis.bar([f"exit {k}\n(compute {c:.2f})" for k, c in enumerate(costs)], rates, color="tab:blue")
    axis.bar_label(bars, labels=[f"{r:.1%}" for r in rates], fontsize=8)
    axis.set_ylim(0, max(rates.max() * 1.15, 0.05))
    axis.set_ylabel(f"fraction of the {served.rows} certifying rows")
    axis.set_title("exit-rate profile, global thresholds", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return (
        f"![exit-rate profile]({path.name})\n\n"
        f"The exit each of the {served.rows} certifying rows answers at under the global thresholds (the "
        "profile stored in the policy, the drift monitor's reference)."
    )


def _calibration_error_table(calibrated: CalibratedExitPolicy, logits: np.ndarray, labels: np.ndarray) -> str:
    """ECE before and after scaling on the certifying rows, and on the fit rows the scaling came from."""
    row_sets = [("certifying", calibrated.split.certify), ("fit", calibrated.split.fit)]
    row_sets = [(name, rows) for name, rows in row_sets if len(rows)]
    head = ["exit", "temperature"] + [
        f"ECE, {len(rows)} {name} rows, {scaling}"
        for name, rows in row_sets
        for scaling in ("T = 1", "scaled")
    ]
    table = []
    for k, temperature in enumerate(calibrated.temperatures):
        cells = [k, f"{temperature:.3f}"]
        for _, rows in row_sets:
            for scaling in (1.0, temperature):
                bins = reliability_bins(logits[k, rows], labels[rows], scaling)
                cells.append(f"{bins.expected_calibration_error():.4f}")
        table.append(cells)
    return (
        "## Expected calibration error\n\n"
        "On the certifying rows (held out from the temperature fit, as in the diagrams) and on the fit "
        "rows the temperatures were fitted on (in-sample: how well the fit went there).\n\n"
        + markdown_table(head, table)
    )


def _class_table(served: AnsweredRows, class_names: Sequence[str]) -> str:
    table = [
        [name, int((served.truth == c).sum()), *served.subset(served.truth == c).figures()]
        for c, name in enumerate(class_names)
    ]
    return (
        "## Per true class\n\n"
        f"The {served.rows} certifying rows by their true class, under the global thresholds.\n\n"
        + markdown_table(["true class", "rows", *FIGURES_HEAD], table)
    )


def _class_conditional_table(
    calibrated: CalibratedExitPolicy, served: AnsweredRows, class_names: Sequence[str]
) -> str:
    """The groups of the class-conditional guarantee: rows by the class the full model gives them."""
    class_risks = calibrated.result.class_risks
    table = [
        [
            name,
            int((served.full == c).sum()),
            f"{class_risks[c]:.4f}" if c in class_risks else "",
            "tested" if c in class_risks else "too few rows: only the marginal guarantee",
        ]
        for c, name in enumerate(class_names)
    ]
    return (
        "## Per full-model class (class-conditional guarantee)\n\n"
        f"The {served.rows} certifying rows by the full model's class, under the global thresholds. With "
        "probability >= 1 − δ, every tested class's risk (on rows the full model gives that class) and the "
        f"marginal risk are all <= ε = {calibrated.epsilon}.\n\n"
        + markdown_table(["full-model class", "rows", "calibration risk", "guarantee"], table)
    )


def _cohort_table(
    policy: Policy,
    calibrated: CalibratedExitPolicy,
    logits: np.ndarray,
    truth: np.ndarray,
    cohorts: np.ndarray,
) -> str:
    """Each cohort's certifying rows under the rules it is served with (its own, or the global ones)."""
    costs = np.asarray(calibrated.exit_costs)
    table = []
    for name in sorted(set(cohorts.tolist())):
        members = cohorts == name
        answered = AnsweredRows.under(policy.rules_for(name), logits[:, members], truth[members], costs)
        certification = calibrated.cohorts.get(name)
        if certification is None:
            thresholds, delta, risk = "global (no cohort)", "", ""
        else:
            thresholds = "global (fell back)" if certification.fell_back else "own"
            delta, risk = _format_optional(certification.delta, ".4g"), f"{certification.risk:.4f}"
        table.append([name or "(none)", answered.rows, thresholds, delta, risk, *answered.figures()])
    head = ["cohort", "rows", "thresholds", "cohort's δ", "calibration risk", *FIGURES_HEAD]
    return (
        "## Per cohort\n\n"
        f"Each cohort's certifying rows ({len(truth)} in all) under the thresholds it is served with. A "
        "cohort that fell back has no guarantee of its own; its calibration risk is under the global "
        "thresholds.\n\n" + markdown_table(head, table)
    )


def write_calibration_report(
    directory: Path,
    policy: Policy,
    calibrated: CalibratedExitPolicy,
    logits: np.ndarray,
    data: CalibrationData,
    class_names: tuple[str, ...],
) -> Path:
    """Writes ``report.md`` and its PNGs into ``directory``; returns the Markdown path.

    ``logits`` (E, N, C) and ``data`` are every calibration row, in the order ``calibrated`` was
    calibrated on (its ``split`` indexes them).
    """
    split = calibrated.split
    if len(split.fit) + len(split.certify) != logits.shape[1]:
        raise ValueError(
            f"{logits.shape[1]} rows given for a policy calibrated on {len(split.fit) + len(split.certify)}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    certifying_logits = logits[:, split.certify]  # (E, n, C)
    truth = data.labels[split.certify]  # (n,)
    served = AnsweredRows.under(policy.exits, certifying_logits, truth, np.asarray(calibrated.exit_costs))
    sections = [
        _summary(policy, calibrated, served),
        _candidate_path_figure(directory / "pareto.png", calibrated, certifying_logits, truth),
        _reliability_figure(directory / "reliability.png", calibrated, certifying_logits, truth),
        _exit_rate_figure(directory / "exit_rates.png", calibrated, served),
        _calibration_error_table(calibrated, logits, data.labels),
        _class_table(served, class_names),
    ]
    if calibrated.result.class_risks:
        sections.append(_class_conditional_table(calibrated, served, class_names))
    if data.cohorts is not None:
        sections.append(
            _cohort_table(policy, calibrated, certifying_logits, truth, data.cohorts[split.certify])
        )
    path = directory / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
