"""Which exits to keep, and how to serve them, from costs measured on the serving machine.

A served exit is not free: each one is a call (over BLS, a round trip through tritonserver and a
second Python stub) and a confidence evaluation, paid for every batch that still has rows in it. On
a small model these fixed costs can exceed what the exits save, so the best set of exits depends
on the machine, the segment mode and the traffic, not on the network alone. ``offramp tune``
measures the costs (``client/tools/tune.py``); this module is the pure part: the candidates, each
certified under the same guarantee, and the cost model that ranks them.

The cost model counts CPU seconds per answered row. On a server whose CPUs are saturated (the
regime a throughput figure describes) rows per second is the CPU count divided by that, so the
ratio of two candidates' CPU per row predicts their throughput ratio. For a batch of ``n`` rows of
which a share ``s_j`` enters kept segment ``j``::

    cpu(n) = request + sum_j [ P_j * (hop + call_j + exit) + row_j * n * s_j ]
    P_j = 1 - (1 - s_j) ** n          # the chance that any row of the batch enters segment j

``call_j``/``row_j`` are the in-process ONNX Runtime cost of the merged segment per call and per
row; ``hop`` is the extra CPU of a BLS call (zero with the segments in the orchestrator's process);
``exit`` the cascade's work per exit evaluated; ``request`` the orchestrator's fixed work per
execute. Treating rows as independent in ``P_j`` is the approximation: easy rows arrive mixed. The
last exit alone (the whole network in one call) costs at least the full model's measured CPU per row
plus its exit's evaluation (and hop): the same network with more work around it.

The guarantee. The calibration rows are split, seeded: on a third (the selection rows) every set's
exit rates at epsilon are estimated by a plain search (no guarantee, an estimate for ranking), and
the measured costs rank the sets; only the chosen set is then certified, by Learn-then-Test at delta
on the other rows, which the choice never saw, so its guarantee is the one ``offramp calibrate``
gives. Certifying every set at delta / m instead (the union bound) left nothing certifiable: TREC's
calibration rows at delta / 32 certified no early exit for any set. The rule family is part of the
choice the same way: each set is estimated under every family of ``TUNED_RULES`` on the selection rows,
and the pick is certified under its own family on the others.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from offramp.build.risk_control import (
    CalibratedExitPolicy,
    CalibrationWarning,
    EmpiricalSearch,
    LearnThenTest,
    calibrate_exit_policy,
    fit_split,
)

SEGMENT_MODES = ("bls", "in_process")
MAX_CANDIDATE_SETS = 64  # sets of exits ranked (a 12-exit model has 2,048)
# Rule families a set is estimated under: the data-free ones. The fitted families (score, novelty) would
# take a fit split out of the rows that certify the pick.
TUNED_RULES = ("confidence", "patience")
SELECTION_FRACTION = 1 / 3  # of the calibration rows, where sets are ranked; the rest certify the pick


@dataclass(frozen=True)
class CallCost:
    """Seconds of one call on ``rows`` rows: ``per_call + per_row * rows``."""

    per_call: float
    per_row: float

    def of(self, rows: float) -> float:
        return self.per_call + self.per_row * rows

    @classmethod
    def fit(cls, rows: Sequence[int], seconds: Sequence[float]) -> CallCost:
        """Least squares over measured (rows, seconds); both terms kept non-negative (a negative
        intercept is measurement noise on a call whose fixed part is small)."""
        x, y = np.asarray(rows, dtype=float), np.asarray(seconds, dtype=float)
        if len(x) < 2 or np.ptp(x) == 0:
            raise ValueError("a call cost needs timings at two or more batch sizes")
        slope, intercept = np.polyfit(x, y, 1)
        if intercept < 0:
            return cls(0.0, max(float(np.sum(x * y) / np.sum(x * x)), 0.0))
        return cls(float(intercept), max(float(slope), 0.0))


@dataclass(frozen=True)
class ServingCosts:
    """What the cost model needs, measured on the serving machine (CPU seconds)."""

    ranges: Mapping[tuple[int, int], CallCost]  # (first, last) original segment -> merged, in process
    hop: float  # extra CPU of one BLS segment call: tritonserver, the segment stub, the BLS client
    request: float  # the orchestrator's fixed work per execute, and tritonserver's for the request
    exit: float  # the cascade's work per exit evaluated in an execute
    full_per_row: float  # the full model served on its own: CPU per answered row
    rows_per_execute: float  # rows an execute carries at the measured load

    def to_dict(self) -> dict:
        return {
            "ranges": {f"{a}-{b}": [c.per_call, c.per_row] for (a, b), c in sorted(self.ranges.items())},
            "hop_s": self.hop,
            "request_s": self.request,
            "exit_s": self.exit,
            "full_per_row_s": self.full_per_row,
            "rows_per_execute": self.rows_per_execute,
        }


def segment_ranges(kept: Sequence[int]) -> list[tuple[int, int]]:
    """The original segments each kept exit's merged segment covers: [(first, last)]."""
    starts = [0, *(k + 1 for k in kept[:-1])]
    return list(zip(starts, kept, strict=True))


def survival(exit_rates: Sequence[float]) -> tuple[float, ...]:
    """Share of rows entering each segment, from the share answering at each exit."""
    left, shares = 1.0, []
    for rate in exit_rates:
        shares.append(max(left, 0.0))
        left -= rate
    return tuple(shares)


def cpu_per_row(kept: Sequence[int], entering: Sequence[float], mode: str, costs: ServingCosts) -> float:
    """Predicted CPU seconds per answered row of serving ``kept`` exits in ``mode`` (module doc)."""
    if mode not in SEGMENT_MODES:
        raise ValueError(f"segment mode {mode!r}: one of {SEGMENT_MODES}")
    n = costs.rows_per_execute
    hop = costs.hop if mode == "bls" else 0.0
    total = costs.request
    for (first, last), share in zip(segment_ranges(kept), entering, strict=True):
        called = 1.0 - (1.0 - share) ** n
        cost = costs.ranges[(first, last)]
        total += called * (hop + cost.per_call + costs.exit) + cost.per_row * n * share
    if len(kept) == 1:
        # The last exit alone is the whole network behind the orchestrator: never cheaper than the full
        # model served on its own (measured) plus its exit's evaluation, whatever the in-process timing
        # of the same network says. On a tiny TREC encoder the two measures of it differed, and tune
        # predicted 1.16x for serving the full network with more work around it.
        return max(total / n, costs.full_per_row + (hop + costs.exit) / n)
    return total / n


def exit_sets(num_exits: int, limit: int = MAX_CANDIDATE_SETS) -> list[tuple[int, ...]]:
    """Sets of exits to keep, each ending at the last exit, fewest early exits first. All of them
    when there are at most ``limit``; else every set up to the largest size that stays within it."""
    early = range(num_exits - 1)
    sets: list[tuple[int, ...]] = []
    for size in range(num_exits):
        more = [(*c, num_exits - 1) for c in itertools.combinations(early, size)]
        if sets and len(sets) + len(more) > limit:
            break
        sets.extend(more)
    return sets


@dataclass(frozen=True)
class Candidate:
    """One set of exits, calibrated: its policy and the share of rows entering each kept segment."""

    kept: tuple[int, ...]
    calibrated: CalibratedExitPolicy
    entering: tuple[float, ...]  # share of the calibration rows entering each kept segment

    @property
    def expected_compute(self) -> float:
        """Mean compute fraction (the network's multiply-accumulates) of the calibration rows."""
        return self.calibrated.result.expected_cost

    @property
    def rule(self) -> str:
        """The rule family its policy was calibrated under."""
        return self.calibrated.rule


def selection_split(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (selection, certification) of the calibration rows (module doc)."""
    return fit_split(rows, SELECTION_FRACTION, seed)


def calibrated_set(
    exit_logits: np.ndarray,
    exit_costs: Sequence[float],
    labels: np.ndarray | None,
    kept: tuple[int, ...],
    method: LearnThenTest | EmpiricalSearch,
    rule: str = "confidence",
    max_accuracy_loss: float | None = None,
) -> Candidate:
    """The set ``kept`` calibrated by ``method`` under the ``rule`` family, with the accuracy bound where
    one is given (``calibrate_exit_policy``). exit_logits: (E, N, C) every exit's logits."""
    with warnings.catch_warnings():
        if len(kept) == 1:  # the full model alone: that nothing leaves early is the point, not news
            warnings.simplefilter("ignore", CalibrationWarning)
        calibrated = calibrate_exit_policy(
            exit_logits[list(kept)], [exit_costs[k] for k in kept], method, labels=labels, rule=rule,
            max_accuracy_loss=max_accuracy_loss,
        )  # fmt: skip
    return Candidate(kept, calibrated, survival(calibrated.result.exit_rates))


def estimated_candidates(
    exit_logits: np.ndarray,
    exit_costs: Sequence[float],
    labels: np.ndarray | None,
    epsilon: float,
    sets: Sequence[tuple[int, ...]],
    rules: Sequence[str] = TUNED_RULES,
    max_accuracy_loss: float | None = None,
) -> list[Candidate]:
    """Every set under every family of ``rules`` by a plain search at ``epsilon`` (and the accuracy bound
    where one is given) on the selection rows: estimates to rank by. The last exit alone answers every
    row whatever the family: it is listed once."""
    return [
        calibrated_set(
            exit_logits, exit_costs, labels, kept, EmpiricalSearch(epsilon), rule, max_accuracy_loss
        )
        for kept in sets
        for rule in (rules if len(kept) > 1 else rules[:1])
    ]


@dataclass(frozen=True)
class Choice:
    """The ranking: every (candidate, mode) with its predicted CPU per row, and the pick."""

    ranked: tuple[tuple[Candidate, str, float], ...]  # ascending CPU per row
    full_per_row: float

    @property
    def best(self) -> tuple[Candidate, str, float]:
        return self.ranked[0]

    @property
    def serves_full_model(self) -> bool:
        """No set of exits is predicted to beat the full model served on its own."""
        return self.best[2] >= self.full_per_row

    @property
    def predicted_speedup(self) -> float:
        return self.full_per_row / self.best[2] if self.best[2] > 0 else math.inf


def choose(
    candidates: Sequence[Candidate], costs: ServingCosts, modes: Sequence[str] = SEGMENT_MODES
) -> Choice:
    ranked = sorted(
        ((c, mode, cpu_per_row(c.kept, c.entering, mode, costs)) for c in candidates for mode in modes),
        key=lambda item: item[2],
    )
    return Choice(tuple(ranked), costs.full_per_row)
