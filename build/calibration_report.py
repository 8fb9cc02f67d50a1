"""The calibration report: a Markdown summary and PNG plots of one calibrated policy.

Pareto curve (accuracy and agreement vs compute fraction along the candidate path, chosen point
marked), reliability diagrams per exit before and after temperature scaling, the exit-rate profile,
and tables per true class and per cohort of accuracy, agreement with the full model and compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offramp.backend.policy import Policy
from offramp.build.calibrate import CalibrationData, simulate_exits
from offramp.build.risk_control import CalibratedExitPolicy, exit_confidences, exits_taken
from offramp.build.temperature import reliability_bins


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or in CI
    import matplotlib.pyplot as plt

    return plt


def _group_rows(name: str, mask: np.ndarray, answer: np.ndarray, full: np.ndarray, truth: np.ndarray, cost: np.ndarray) -> str:
    if not mask.any():
        return f"| {name} | 0 | | | | |"
    return (
        f"| {name} | {int(mask.sum())} | {(answer[mask] == truth[mask]).mean():.2%} | "
        f"{(full[mask] == truth[mask]).mean():.2%} | {(answer[mask] == full[mask]).mean():.2%} | {cost[mask].mean():.3f} |"
    )


def _format_threshold(threshold: float | tuple[float, ...]) -> str:
    if isinstance(threshold, tuple):
        return "per class [" + ", ".join(f"{t:.4f}" for t in threshold) + "]"
    return f"{threshold:.4f}"


def write_calibration_report(
    directory: Path,
    policy: Policy,
    calibrated: CalibratedExitPolicy,
    logits: np.ndarray,
    data: CalibrationData,
    class_names: tuple[str, ...],
) -> Path:
    """Writes ``report.md`` and its PNGs into ``directory``; returns the Markdown path."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    num_exits, rows, _ = logits.shape
    costs = np.asarray(calibrated.exit_costs)
    truth = data.labels
    confidences = exit_confidences(logits, calibrated.temperatures)
    exit_labels = np.stack([c.label for c in confidences])  # (E, N)
    full = exit_labels[-1]

    # Pareto curve along the candidate path, on every calibration row.
    taken = exits_taken(confidences, calibrated.path)  # (K, N)
    answers = exit_labels[taken, np.arange(rows)]  # (K, N)
    path_cost = costs[taken].mean(axis=1)
    path_accuracy = (answers == truth).mean(axis=1)
    path_agreement = (answers == full).mean(axis=1)
    chosen = simulate_exits(logits, policy.exits)
    chosen_answer = exit_labels[chosen, np.arange(rows)]
    chosen_cost = costs[chosen]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.plot(path_cost, path_accuracy, label="accuracy", color="tab:blue")
    axis.plot(path_cost, path_agreement, label="agreement with the full model", color="tab:green")
    axis.scatter([chosen_cost.mean()], [(chosen_answer == truth).mean()], color="tab:red", zorder=3,
                 label=f"chosen ({calibrated.method}, ε={calibrated.epsilon}, δ={calibrated.delta})")  # fmt: skip
    axis.scatter([costs[-1]], [(full == truth).mean()], color="black", marker="x", zorder=3, label="full model")
    axis.set_xlabel("mean compute fraction")
    axis.set_ylabel("fraction of calibration rows")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(directory / "pareto.png", dpi=110)
    plt.close(figure)

    # Reliability before and after temperature scaling, per exit.
    figure, axes = plt.subplots(1, num_exits, figsize=(3.2 * num_exits, 3.2), squeeze=False)
    ece_lines = []
    for k, axis in enumerate(axes[0]):
        for temperature, style, label in [(1.0, "tab:gray", "T=1"), (calibrated.temperatures[k], "tab:blue", "fitted")]:
            bins = reliability_bins(logits[k], truth, temperature)
            filled = bins.counts > 0
            axis.plot(bins.confidence[filled], bins.accuracy[filled], marker="o", ms=3, color=style,
                      label=f"{label} T={temperature:.2f} ECE={bins.expected_calibration_error():.3f}")  # fmt: skip
            ece_lines.append((k, label, temperature, bins.expected_calibration_error()))
        axis.plot([0, 1], [0, 1], color="black", lw=0.5)
        axis.set_title(f"exit {k}")
        axis.set_xlabel("confidence")
        axis.legend(fontsize=6, loc="upper left")
    axes[0][0].set_ylabel("accuracy")
    figure.tight_layout()
    figure.savefig(directory / "reliability.png", dpi=110)
    plt.close(figure)

    # Exit-rate profile.
    rates = np.bincount(chosen, minlength=num_exits) / rows
    figure, axis = plt.subplots(figsize=(4.8, 3.2))
    axis.bar([f"exit {k}\n({costs[k]:.2f})" for k in range(num_exits)], rates, color="tab:blue")
    axis.set_ylabel("fraction of rows")
    axis.set_title("exit-rate profile (compute fraction per exit)")
    figure.tight_layout()
    figure.savefig(directory / "exit_rates.png", dpi=110)
    plt.close(figure)

    header = "| group | rows | accuracy | full-model accuracy | agreement with full | compute |\n|---|---|---|---|---|---|"
    class_table = [header] + [
        _group_rows(name, truth == c, chosen_answer, full, truth, chosen_cost) for c, name in enumerate(class_names)
    ]
    cohort_table = []
    if data.cohorts is not None:
        cohort_table = [header] + [
            _group_rows(str(name), data.cohorts == name, chosen_answer, full, truth, chosen_cost)
            for name in sorted(set(data.cohorts.tolist()))
        ]
    provenance = policy.provenance
    lines = [
        f"# Calibration report: policy `{policy.version}`",
        "",
        f"- method: {calibrated.method}; {calibrated.guarantee}",
        f"- risk: {calibrated.risk}, ε = {calibrated.epsilon}, δ = {calibrated.delta}, p-value: {calibrated.p_value}",
        f"- calibration rows: {calibrated.calibration_rows} (+ {calibrated.fit_rows} fit rows); data {calibrated.data_fingerprint}",
        f"- achieved calibration risk {provenance['achieved_risk']:.4f}; expected compute {provenance['expected_cost']:.3f} "
        f"(ideal speed-up {1 / provenance['expected_cost']:.2f}x)",
        f"- accuracy {(chosen_answer == truth).mean():.2%} (full model {(full == truth).mean():.2%}), "
        f"agreement with the full model {(chosen_answer == full).mean():.2%}",
        "- thresholds per exit (" + calibrated.metric + "): "
        + ", ".join(_format_threshold(r.threshold) for r in policy.exits[:-1]) + "; temperatures: "
        + ", ".join(f"{t:.3f}" for t in calibrated.temperatures),
        "- exit-rate profile: " + ", ".join(f"exit {k}: {r:.1%}" for k, r in enumerate(rates)),
        *(f"- warning: {w}" for w in calibrated.warnings),
        "",
        "![accuracy vs compute](pareto.png)",
        "",
        "![reliability](reliability.png)",
        "",
        "![exit rates](exit_rates.png)",
        "",
        "## Expected calibration error",
        "",
        "| exit | scaling | temperature | ECE |",
        "|---|---|---|---|",
        *(f"| {k} | {label} | {t:.3f} | {ece:.4f} |" for k, label, t, ece in ece_lines),
        "",
        "## Per true class",
        "",
        *class_table,
    ]
    if cohort_table:
        lines += ["", "## Per cohort", "", *cohort_table]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
