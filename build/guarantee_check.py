"""Does a calibration's guarantee hold on data it never saw? Many calibration draws from held-out rows.

Learn-then-Test promises, for calibration sets drawn i.i.d. from the traffic: the chance that the policy
it certifies has a risk over epsilon is at most delta (for a ladder, that any rung's risk passes its own
epsilon; with an accuracy bound, that either bound is broken). The promise holds for every distribution,
so it must hold for the empirical distribution of any labelled rows the model never trained on. That is
what this checks: it takes such rows as the traffic, draws calibration sets of the calibration's size
from them with replacement, calibrates each draw exactly as ``offramp calibrate`` does (the same
settings: temperatures fitted on the draw's own fit split, the same rule family, ladder and bounds), and
measures every rung's risk on all the rows, which is that traffic's true risk. A violation rate over
delta, beyond the draws' own sampling error, refutes the guarantee on those rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from offramp.build.calibrate import CalibrationSettings, calibrate_logits, rung_figures
from offramp.build.risk_control import CalibrationWarning


@dataclass(frozen=True)
class RungOutcomes:
    """Each draw's certified rung on the whole population: its risk, its accuracy loss and its compute."""

    epsilon: float
    risk: np.ndarray  # (draws,)
    accuracy_loss: np.ndarray  # (draws,) rows the rung gets wrong and the full model right
    compute: np.ndarray  # (draws,) mean compute fraction per row


@dataclass(frozen=True)
class GuaranteeCheck:
    """The outcome of ``draws`` calibrations of ``draw_rows`` rows each from ``population`` rows."""

    draws: int
    draw_rows: int
    population: int
    delta: float
    max_accuracy_loss: float | None
    rungs: tuple[RungOutcomes, ...]  # rung 0 first

    def broken(self, rung: RungOutcomes) -> np.ndarray:
        """(draws,) bool: the draw's policy breaks a bound it was certified for at ``rung``."""
        over = rung.risk > rung.epsilon
        if self.max_accuracy_loss is not None:
            over |= rung.accuracy_loss > self.max_accuracy_loss
        return over

    @property
    def violation_rate(self) -> float:
        """The share of draws in which some rung broke a bound: at most delta, if the guarantee holds."""
        return float(np.any([self.broken(r) for r in self.rungs], axis=0).mean())

    @property
    def sampling_error(self) -> float:
        """Three binomial standard errors of a violation rate of delta over this many draws: a measured
        rate within delta plus this is no evidence against the guarantee."""
        return 3.0 * math.sqrt(self.delta * (1.0 - self.delta) / self.draws)

    @property
    def holds(self) -> bool:
        return self.violation_rate <= self.delta + self.sampling_error

    def lines(self) -> list[str]:
        """What the check found, for a terminal."""
        bound = "" if self.max_accuracy_loss is None else f" or accuracy loss over {self.max_accuracy_loss:g}"
        verdict = "holds" if self.holds else "DOES NOT HOLD"
        lines = [
            f"guarantee check: {self.draws} calibration draws of {self.draw_rows} rows (with replacement) "
            f"from {self.population}, each calibrated as this policy was, every rung judged on all of them",
            f"  some rung over its epsilon{bound} in {self.violation_rate:.1%} of draws "
            f"(delta {self.delta:g}, sampling error {self.sampling_error:.1%}): {verdict}",
        ]
        for index, rung in enumerate(self.rungs):
            lines.append(
                f"  rung {index} (epsilon {rung.epsilon:g}): broken in {self.broken(rung).mean():.1%}, "
                f"risk mean {rung.risk.mean():.4f} max {rung.risk.max():.4f}, "
                f"compute mean {rung.compute.mean():.3f}"
            )
        return lines


def check_guarantee(
    logits: np.ndarray,
    exit_costs: tuple[float, ...],
    labels: np.ndarray,
    settings: CalibrationSettings,
    draws: int,
    draw_rows: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> GuaranteeCheck:
    """Calibrates ``draws`` times on rows drawn from ``logits`` (E, N, C) with ``labels`` (N,) and
    measures each draw's rungs on all N rows (module doc). ``draw_rows``: rows per draw (default N, the
    calibration's own size when the population is the calibration rows). ``progress`` is told each
    finished draw's index."""
    if draws < 1:
        raise ValueError(f"the check needs at least one draw: {draws}")
    population = logits.shape[1]
    size = population if draw_rows is None else draw_rows
    if size < 2:
        raise ValueError(f"a draw needs at least 2 rows: {size}")
    picks = np.random.default_rng(seed).integers(0, population, (draws, size))  # (draws, size)
    outcomes = []  # per draw: (rungs, 3) the risk, the accuracy loss and the compute of each rung
    for draw, rows in enumerate(picks):
        with warnings.catch_warnings():
            # A draw whose rows cannot show a bound warns as a calibration would; the check counts the
            # outcome (the fallback: no early exit) instead.
            warnings.simplefilter("ignore", CalibrationWarning)
            drawn = replace(settings, seed=draw)  # the fit split drawn anew too
            policy, _ = calibrate_logits(
                logits[:, rows], exit_costs, "guarantee-check", labels[rows], None, drawn
            )
        figures = rung_figures(policy, logits, exit_costs, labels, settings.risk)
        outcomes.append([(f.risk, f.accuracy_loss, f.compute) for f in figures])
        if progress is not None:
            progress(draw)
    stacked = np.array(outcomes)  # (draws, rungs, 3)
    epsilons = (settings.epsilon, *(rung.epsilon for rung in policy.rungs))
    rungs = tuple(
        RungOutcomes(epsilon, *(stacked[:, k, f] for f in range(3))) for k, epsilon in enumerate(epsilons)
    )
    return GuaranteeCheck(draws, size, population, settings.delta, settings.max_accuracy_loss, rungs)
