"""Exit policies calibrated with a stated guarantee: Learn-then-Test over a path of candidates.

Everything here is NumPy/SciPy on per-exit logits (exits, N, C), labels (N,) and per-exit compute
costs; nothing needs a server or torch.

The guarantee (method :class:`LearnThenTest`). Let ``R(policy)`` be the expected loss of a policy on
a fresh row from the distribution the calibration rows were drawn from (i.i.d.). With probability at
least ``1 - delta`` over the draw of the calibration rows, the chosen policy has ``R <= epsilon``.
The procedure is Learn-then-Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021, "Learn then Test:
Calibrating Predictive Algorithms to Achieve Risk Control", arXiv:2110.01052) with fixed-sequence
testing: the candidates ``0, 1, ..., K-1`` form a path fixed before the calibration losses are seen,
ordered from the most conservative (candidate 0: no early exit, whose risk is 0) to the most
aggressive; the nulls ``H_j: R(candidate j) > epsilon`` are tested in that order with a valid
p-value each and testing stops at the first ``p_j > delta``. Every candidate before the stop is
certified (the family-wise error of the certified set is at most ``delta``, so any choice among them
keeps the guarantee); the one with the least expected compute on the calibration rows is chosen.
Only the order of the path matters for validity; it is never chosen by looking at the certification
rows' losses (see :func:`shared_path` and :func:`fitted_path`).

Risks (the loss of one row under a policy, ``answer`` = the label at the exit the row takes, ``full``
= the label of the last exit, the full model's prediction):

- ``"disagreement"`` (default): ``1[answer != full]``, in {0, 1}; needs no labels.
- ``"error_increase"``: ``1[answer wrong and full right]``, in {0, 1}. It is an upper bound of the
  per-row error-rate increase ``1[answer wrong] - 1[full wrong]``, so controlling it controls the
  accuracy lost to early exit (conservatively: rows the early exit gets right and the full model
  wrong are not credited).
- ``"error_increase_net"``: ``1[answer wrong] - 1[full wrong]`` in [-1, 1], the exact increase. It is
  not a {0, 1} loss, so only the Hoeffding–Bentkus p-value applies, to the loss shifted to
  ``(loss + 1) / 2`` in [0, 1] against ``(epsilon + 1) / 2``. That bound ignores the small variance of
  the increase and is loose; prefer ``"error_increase"`` unless gains must be credited.

p-values (for ``H: R > epsilon`` from n rows with mean loss ``r``):

- ``"binomial"``: exact for {0, 1} losses, ``p = P(Binomial(n, epsilon) <= n r)``.
- ``"hoeffding_bentkus"``: for losses in [0, 1] (Bates, Angelopoulos, Lei, Malik, Jordan 2021,
  "Distribution-free, risk-controlling prediction sets", J. ACM; arXiv:2101.02703),
  ``p = min(exp(-n h(min(r, epsilon), epsilon)), e P(Binomial(n, epsilon) <= ceil(n r)))`` with
  ``h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b))``.

Policy semantics (the same as ``build.calibrate.simulate_exits`` and the cascade, which call the same
functions of ``offramp.backend.exit_rules``): at exit ``k`` a row leaves when its rule's value (max-prob,
entropy, margin or a learned score of ``logits_k / T_k``, discounted by patience) passes
``threshold_k`` and the rule's gates (validity, a novelty limit) hold, a per-class threshold being
indexed by the row's label at that exit; the last exit always answers; a row with a non-finite logit
never passes (its label is -1), so it never leaves early.

Rule families (``rule=``, ``build/rule_families.py``): each is one threshold per exit along the path,
everything else in its rules fixed before the test (data-free, or fitted on the fit split), so each
is certified exactly as a confidence threshold is. :func:`calibrate_best_rule` tries several families
and keeps the one with the least certified compute; each is certified at ``delta / families``
(Bonferroni), so with probability at least ``1 - delta`` every family's certified candidates hold at
once, and the one kept with them, however it was chosen.

Per-class thresholds (``per_class=``) and per-cohort thresholds (``cohorts=``) are documented on
:func:`calibrate_exit_policy`. :class:`EmpiricalSearch` is the same search with the test replaced by
"empirical risk <= epsilon": it has NO guarantee, and is kept to compare against.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.special import xlogy
from scipy.stats import binom

from offramp.backend.exit_rules import NEVER, RULE_METRICS, passes_threshold, rule_gate, rule_value
from offramp.backend.policy import RULE_FAMILIES, ExitRule, Policy, Rung
from offramp.build.rule_families import FITTED_FAMILIES, rule_template, scaled_exits
from offramp.build.temperature import fit_temperatures
from offramp.kernels.confidence import Confidence, compute_confidence

RISKS = ("disagreement", "error_increase", "error_increase_net")
P_VALUES = ("binomial", "hoeffding_bentkus")
PER_CLASS = (None, "marginal", "class_conditional")
LOSS_BOUNDS = {"disagreement": (0.0, 1.0), "error_increase": (0.0, 1.0), "error_increase_net": (-1.0, 1.0)}


class CalibrationWarning(UserWarning):
    """A calibration that fell back or certified nothing; the result records the same message."""


# ---------------------------------------------------------------------------------------------
# p-values and fixed-sequence testing


def binomial_p_value(losses: Any, rows: Any, epsilon: float) -> np.ndarray:
    """Exact p-value of ``H: risk > epsilon`` from ``losses`` (count of 1s) among ``rows`` {0, 1} losses.

    ``p = P(Binomial(rows, epsilon) <= losses)`` (the binomial test of Learn-then-Test,
    Angelopoulos et al. 2021, arXiv:2110.01052). Broadcasts; ``epsilon <= 0`` gives 1 (nothing can be
    certified), no rows give 1.
    """
    losses = np.asarray(losses, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    if epsilon <= 0:
        return np.ones(np.broadcast(losses, rows).shape)
    if epsilon >= 1:
        return np.where(rows > 0, 0.0, 1.0) * np.ones(np.broadcast(losses, rows).shape)
    # Counts of a {0, 1} loss are integers; round away float noise from sums of weights.
    p = binom.cdf(np.floor(losses + 1e-9), rows, epsilon)
    return np.where(rows > 0, p, 1.0)


def hoeffding_bentkus_p_value(mean: Any, rows: Any, epsilon: float) -> np.ndarray:
    """Hoeffding–Bentkus p-value of ``H: risk > epsilon`` for losses in [0, 1] with sample ``mean``.

    Bates, Angelopoulos, Lei, Malik, Jordan 2021, "Distribution-free, risk-controlling prediction
    sets" (arXiv:2101.02703), as used by Learn-then-Test:
    ``min(exp(-n h(min(mean, eps), eps)), e * P(Binomial(n, eps) <= ceil(n mean)))``, clipped to 1.
    Non-decreasing in ``mean``, non-increasing in ``epsilon``; ``epsilon <= 0`` gives 1.
    """
    mean = np.clip(np.asarray(mean, dtype=np.float64), 0.0, 1.0)
    rows = np.asarray(rows, dtype=np.float64)
    shape = np.broadcast(mean, rows).shape
    if epsilon <= 0:
        return np.ones(shape)
    if epsilon >= 1:
        return np.where(rows > 0, 0.0, 1.0) * np.ones(shape)
    a = np.minimum(mean, epsilon)
    divergence = xlogy(a, a / epsilon) + xlogy(1 - a, (1 - a) / (1 - epsilon))
    hoeffding = np.exp(-rows * divergence)
    bentkus = math.e * binom.cdf(np.ceil(rows * mean - 1e-9), rows, epsilon)
    p = np.minimum(np.minimum(hoeffding, bentkus), 1.0)
    return np.where(rows > 0, p, 1.0)


def fixed_sequence_test(p_values: Any, delta: float) -> np.ndarray:
    """Index of the last candidate of the leading run with ``p <= delta`` along the last axis; -1 if none.

    Fixed-sequence testing (Learn-then-Test, Angelopoulos et al. 2021): hypotheses are tested in
    their given order at level ``delta`` each and testing stops at the first non-rejection, which
    controls the family-wise error at ``delta`` with no multiplicity correction. Shape (..., K) in,
    (...) out.
    """
    rejected = np.asarray(p_values) <= delta  # (..., K)
    run = np.cumprod(rejected, axis=-1)  # 1 while every earlier hypothesis was rejected
    return run.sum(axis=-1) - 1


def check_accuracy_bound(max_accuracy_loss: float | None) -> None:
    """ValueError unless ``max_accuracy_loss`` is None or a fraction in [0, 1)."""
    if max_accuracy_loss is not None and not 0 <= max_accuracy_loss < 1:
        raise ValueError(f"max_accuracy_loss must lie in [0, 1), not {max_accuracy_loss}")


def within_reach(epsilon: float, rows: int, delta: float, p_value: str = "binomial") -> bool:
    """Whether ``rows`` rows without a single loss would reject ``H: risk > epsilon`` at ``delta``: if
    not, no candidate past "no early exit" can be certified on that many rows, whatever they hold
    (binomial: ``(1 - epsilon) ** rows <= delta``, so at least ``log(delta) / log(1 - epsilon)`` rows)."""
    return bool(p_values_of(np.zeros((1, rows)), "error_increase", p_value, epsilon)[0] <= delta)


def p_values_of(losses: np.ndarray, risk: str, p_value: str, epsilon: float) -> np.ndarray:
    """p-values (K,) of ``H_j: risk > epsilon`` from per-row losses (K, n) of one group."""
    if p_value not in P_VALUES:
        raise ValueError(f"unknown p-value {p_value!r}; expected one of {P_VALUES}")
    rows = losses.shape[1]
    if p_value == "binomial":
        if LOSS_BOUNDS[risk] != (0.0, 1.0):
            raise ValueError(f"the binomial p-value needs a {{0, 1}} loss; risk {risk!r} is not one")
        return binomial_p_value(losses.sum(axis=1), rows, epsilon)
    low, high = LOSS_BOUNDS[risk]
    mean = (losses.mean(axis=1) - low) / (high - low) if rows else np.zeros(losses.shape[0])
    return hoeffding_bentkus_p_value(mean, rows, (epsilon - low) / (high - low))


# ---------------------------------------------------------------------------------------------
# Methods: what makes a candidate acceptable


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class RiskBound:
    """One bound every certified candidate must meet: the mean of ``losses`` (K, n), the per-row loss
    of ``risk`` under each candidate, at most ``epsilon``."""

    losses: np.ndarray
    risk: str
    epsilon: float


@dataclass(frozen=True)
class LearnThenTest:
    """Certified: fixed-sequence Learn-then-Test at level ``delta`` (see the module docstring)."""

    epsilon: float
    delta: float = 0.1
    p_value: str = "binomial"

    name = "learn_then_test"

    def accepted(self, bounds: Sequence[RiskBound], delta: float | None = None) -> np.ndarray:
        """(K,) bool: the certified candidates, given every bound that must hold.

        A candidate is tested with the largest p-value over the bounds (an intersection-union test:
        under ``H_j`` some bound fails and that bound's p-value is valid), so the certified candidates
        meet every bound (each group's risk, a joint accuracy bound) together, with probability at least
        ``1 - delta``. Candidate 0 (no early exit, risk 0) is always accepted.
        """
        if self.epsilon <= 0:  # no loss at all: no finite sample shows it, so no early exit
            return np.arange(bounds[0].losses.shape[0]) == 0
        delta = self.delta if delta is None else delta
        p = self.p_values(bounds)
        p[0] = 0.0
        last = int(fixed_sequence_test(p, delta))
        return np.arange(len(p)) <= last

    def p_values(self, bounds: Sequence[RiskBound]) -> np.ndarray:
        """(K,) the largest p-value over the bounds, per candidate."""
        return np.max([p_values_of(b.losses, b.risk, self.p_value, b.epsilon) for b in bounds], axis=0)

    def describe(self, delta: float) -> str:
        return (
            f"learn-then-test, fixed-sequence, {self.p_value} p-values: with probability >= {1 - delta:.4g} "
            f"over the calibration rows, the risk is <= {self.epsilon:.4g}"
        )


@dataclass(frozen=True)
class EmpiricalSearch:
    """NO GUARANTEE: every candidate whose calibration (empirical) risk is <= ``epsilon`` is accepted.

    Thresholds chosen this way overshoot ``epsilon`` on fresh data about half the time, since the pick
    sits where the calibration risk just meets it (tests/test_risk_control.py prints the rate); kept
    as a baseline and for comparison only.
    """

    epsilon: float
    delta: float = float("nan")  # no confidence level: present so results read the same
    p_value: str = "none"

    name = "empirical_search"

    def accepted(self, bounds: Sequence[RiskBound], delta: float | None = None) -> np.ndarray:
        if self.epsilon <= 0:  # "risk <= 0" is never shown by finitely many rows: no early exit
            return np.arange(bounds[0].losses.shape[0]) == 0
        ok = np.all(
            [
                b.losses.mean(axis=1) <= b.epsilon if b.losses.shape[1] else np.ones(len(b.losses), bool)
                for b in bounds
            ],
            axis=0,
        )
        ok[0] = True
        return ok

    def p_values(self, bounds: Sequence[RiskBound]) -> np.ndarray:
        return np.full(bounds[0].losses.shape[0], np.nan)

    def describe(self, delta: float) -> str:
        return f"empirical search, calibration risk <= {self.epsilon:.4g}: NO statistical guarantee"


Method = LearnThenTest | EmpiricalSearch


# ---------------------------------------------------------------------------------------------
# Candidate paths


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class CandidatePath:
    """Candidates ordered from the most conservative (index 0: no early exit) to the most aggressive.

    ``thresholds`` holds the early exits' thresholds only (the last exit always answers): (K, E-1)
    for one threshold per exit, (K, E-1, C) for one per class (indexed by the row's label at that
    exit). Every step relaxes every threshold or keeps it, so a row's exit never moves later.
    ``template`` holds, per exit, the family's rule that the thresholds complete (patience, a novelty
    limit, a score's weights); empty: plain ``metric`` thresholds.
    """

    metric: str
    levels: np.ndarray  # (K,) the path's parameter (lambda or alpha), 0 for candidate 0
    thresholds: np.ndarray  # (K, E-1) or (K, E-1, C), float64 holding float32 values
    kind: str  # "shared", "per_exit" or "per_class"
    template: tuple[ExitRule, ...] = ()

    def __post_init__(self) -> None:
        if self.metric not in RULE_METRICS:
            raise ValueError(f"unknown exit metric {self.metric!r}; expected one of {RULE_METRICS}")
        if self.template and {r.metric for r in self.template} != {self.metric}:
            raise ValueError(f"the template's rules threshold another value than {self.metric!r}")
        if len(self.levels) != len(self.thresholds):
            raise ValueError("one level per candidate")
        sign = -1.0 if self.metric == "entropy" else 1.0
        steps = np.diff(sign * self.thresholds, axis=0)
        if (steps > 0).any():
            raise ValueError("a candidate path must relax (or keep) every threshold at every step")

    def __len__(self) -> int:
        return len(self.levels)

    @property
    def per_class(self) -> bool:
        return self.thresholds.ndim == 3

    @property
    def num_exits(self) -> int:
        return self.thresholds.shape[1] + 1

    @property
    def base_rules(self) -> tuple[ExitRule, ...]:
        """Per exit, the rule the path's thresholds complete (its threshold and temperature unset)."""
        return self.template or (ExitRule(self.metric),) * self.num_exits

    def rules(self, candidate: int, temperatures: Sequence[float]) -> tuple[ExitRule, ...]:
        """The policy's exit rules for ``candidate``; the last exit's threshold is never consulted."""
        thresholds = []
        for k in range(self.num_exits - 1):
            value = self.thresholds[candidate, k]
            thresholds.append(tuple(float(v) for v in value) if self.per_class else float(value))
        thresholds.append(NEVER[self.metric])
        return tuple(
            replace(rule, threshold=threshold, temperature=float(t))
            for rule, threshold, t in zip(self.base_rules, thresholds, temperatures, strict=True)
        )


def _as_float32_values(values: np.ndarray) -> np.ndarray:
    # exits_by_threshold compares in float32: store exactly the float32 value it will use.
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def shared_path(
    metric: str,
    num_exits: int,
    num_classes: int,
    steps: int = 401,
    smallest: float = 1e-6,
    template: tuple[ExitRule, ...] = (),
) -> CandidatePath:
    """One threshold shared by every early exit, along ``lambda`` in (0, 1]: a geometric grid from
    ``smallest`` (fine where confident exits live) merged with a linear one (fine further out).

    max_prob: exit if ``p >= 1 - lambda (1 - 1/C)``; entropy: exit if ``H <= lambda log C``;
    margin and score: exit if the value is ``>= 1 - lambda``. Candidate 0 (lambda = 0) uses thresholds
    no row passes, so it is exactly "no early exit" even for rows whose float32 max-prob rounds to 1.
    The path depends on no data (a ``template``, the rules it completes, may).
    """
    lam, values = _shared_values(metric, num_classes, steps, smallest)
    thresholds = np.repeat(values[:, None], num_exits - 1, axis=1)  # (K, E-1)
    return _without_repeats(CandidatePath(metric, lam, thresholds, "shared", template))


def _shared_values(
    metric: str, num_classes: int, steps: int, smallest: float
) -> tuple[np.ndarray, np.ndarray]:
    """The shared path's levels (K,) and thresholds (K,), from "no early exit" on."""
    half = (steps - 1) // 2
    lam = np.unique(
        np.concatenate([[0.0], np.geomspace(smallest, 1.0, half), np.linspace(0.0, 1.0, steps - half)])
    )
    if metric == "max_prob":
        values = 1.0 - lam * (1.0 - 1.0 / num_classes)
    elif metric == "entropy":
        values = lam * math.log(num_classes)
    elif metric in ("margin", "score"):
        values = 1.0 - lam
    else:
        raise ValueError(f"unknown exit metric {metric!r}; expected one of {RULE_METRICS}")
    values = _as_float32_values(values)
    values[0] = NEVER[metric]
    return lam, values


def _without_repeats(path: CandidatePath) -> CandidatePath:
    flat = path.thresholds.reshape(len(path), -1)
    keep = np.ones(len(path), dtype=bool)
    keep[1:] = (flat[1:] != flat[:-1]).any(axis=1)
    return CandidatePath(path.metric, path.levels[keep], path.thresholds[keep], path.kind, path.template)


def _risk_matched_thresholds(
    value: np.ndarray, loss: np.ndarray, rows: int, metric: str, levels: np.ndarray
) -> np.ndarray:
    """Per level alpha, the loosest threshold whose rows passing have sum(loss) / rows <= alpha.

    ``value`` (n,) are finite confidences of the group's rows, ``loss`` (n,) in {0, 1} the loss of
    exiting there. Returns (len(levels),) thresholds, NEVER where no threshold qualifies.
    """
    out = np.full(len(levels), NEVER[metric])
    if len(value) == 0:
        return out
    order = np.argsort(value if metric == "entropy" else -value, kind="stable")
    ordered = value[order]
    cumulative = np.cumsum(loss[order]) / rows  # (n,) non-decreasing
    # A threshold passes every row with the same value, so cuts sit at the end of runs of ties.
    ends = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True))
    last = np.searchsorted(cumulative[ends], levels, side="right") - 1  # (L,) index into ends, -1: none
    out[last >= 0] = ordered[ends[last[last >= 0]]]
    return out


def fitted_path(
    fit_logits: np.ndarray,
    temperatures: Sequence[float],
    metric: str = "max_prob",
    per_class: bool = False,
    fit_labels: np.ndarray | None = None,
    risk: str = "disagreement",
    steps: int = 121,
    smallest: float = 1e-4,
    min_class_rows: int = 30,
    template: tuple[ExitRule, ...] = (),
    fine_steps: int = 201,
) -> CandidatePath:
    """Per-exit (or per exit and class) thresholds shaped on a FIT split, along ``alpha``.

    For each level ``alpha`` (0, then a geometric grid up to 1) and each early exit k, the threshold
    is the loosest one whose fit rows passing at exit k have an exit loss (the risk's {0, 1} loss of
    answering at k: disagreement with the last exit, or wrong where the last exit is right) of at
    most ``alpha`` per fit row; with ``per_class`` the same per (k, c) among the fit rows whose label
    at exit k is c, a class with fewer than ``min_class_rows`` such rows taking exit k's pooled
    threshold. The path is valid for Learn-then-Test only if ``fit_logits`` are NOT the rows it
    then certifies on: the shape is learnt on one split, the order tested on another.

    Fine steps at the conservative end: alpha's first step (the loosest thresholds under which no fit
    row's loss counts) is placed by the few losses a fit split of some hundred rows holds, and can
    let many certifying rows leave at once; fixed-sequence testing stops at the first step it cannot
    certify, and would certify nothing. So the path first walks ``fine_steps`` of the data-free shared
    grid from "no early exit" down to that step, each exit's threshold held at the stricter of the
    two (levels below ``smallest`` mark them).
    """
    num_exits, rows, num_classes = fit_logits.shape
    evidence = exit_evidence(fit_logits, temperatures, template or (ExitRule(metric),) * num_exits)
    full = evidence.label[-1]
    truth = None if fit_labels is None else np.asarray(fit_labels)
    if risk != "disagreement" and truth is None:
        raise ValueError(f"risk {risk!r} needs the fit rows' labels")
    levels = np.concatenate([[0.0], np.geomspace(smallest, 1.0, steps - 1)])
    shape = (len(levels), num_exits - 1) + ((num_classes,) if per_class else ())
    thresholds = np.empty(shape)
    for k in range(num_exits - 1):
        label, value, valid = evidence.label[k], evidence.value[k], evidence.gate[k]
        loss = exit_loss(label, full, truth, risk)
        pooled = _risk_matched_thresholds(value[valid], loss[valid], rows, metric, levels)
        if not per_class:
            thresholds[:, k] = pooled
            continue
        for c in range(num_classes):
            members = valid & (label == c)
            count = int(members.sum())
            if count < min_class_rows:
                thresholds[:, k, c] = pooled
            else:
                thresholds[:, k, c] = _risk_matched_thresholds(
                    value[members], loss[members], count, metric, levels
                )
    thresholds[0] = NEVER[metric]
    lam, fine = _shared_values(metric, num_classes, fine_steps, 1e-6)
    stricter = np.minimum if metric == "entropy" else np.maximum
    grid = fine[1:].reshape((-1,) + (1,) * (thresholds.ndim - 1))  # (F, 1) or (F, 1, 1)
    prefix = stricter(grid, thresholds[1][None])  # (F, E-1) or (F, E-1, C): down to alpha's first step
    return _without_repeats(
        CandidatePath(
            metric,
            np.concatenate([[0.0], smallest * lam[1:], levels[1:]]),
            np.concatenate([thresholds[:1], prefix, thresholds[1:]]),
            "per_class" if per_class else "per_exit",
            template,
        )
    )


# ---------------------------------------------------------------------------------------------
# Candidates applied to rows


def exit_confidences(exit_logits: np.ndarray, temperatures: Sequence[float]) -> list[Confidence]:
    """The serving-path confidence (float32) of every exit: what the cascade thresholds."""
    if len(temperatures) != exit_logits.shape[0]:
        raise ValueError(f"{len(temperatures)} temperatures for {exit_logits.shape[0]} exits")
    return [compute_confidence(exit_logits[k], float(t)) for k, t in enumerate(temperatures)]


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class ExitEvidence:
    """What every candidate of a path is decided on, per exit and row, computed once by the serving
    code (``exit_rules``): a candidate only moves the thresholds."""

    value: np.ndarray  # (E, n) float32: the rule's value, what the threshold is compared with
    gate: np.ndarray  # (E, n) bool: valid and past the rule's gates (a novelty limit)
    label: np.ndarray  # (E, n) int64: each exit's label, -1 where the logits were not finite


def exit_evidence(
    exit_logits: np.ndarray, temperatures: Sequence[float], rules: Sequence[ExitRule]
) -> ExitEvidence:
    """The evidence of rows (logits (E, n, C)) under ``rules`` (one per exit; thresholds unused)."""
    values, gates, labels = [], [], []
    for rule, (scaled, confidence, history) in zip(
        rules, scaled_exits(exit_logits, temperatures), strict=True
    ):
        values.append(rule_value(rule, confidence, history))
        gates.append(rule_gate(rule, scaled, confidence))
        labels.append(confidence.label)
    return ExitEvidence(np.stack(values), np.stack(gates), np.stack(labels))


def exits_taken(evidence: ExitEvidence, path: CandidatePath) -> np.ndarray:
    """(K, N) int: the exit each row takes under each candidate, as ``simulate_exits`` decides it."""
    num_exits, rows = evidence.label.shape
    if path.num_exits != num_exits:
        raise ValueError(f"a path for {path.num_exits} exits applied to {num_exits}")
    taken = np.full((len(path), rows), num_exits - 1, dtype=np.int16)
    for j in range(len(path)):
        undecided = np.ones(rows, dtype=bool)
        for k in range(num_exits - 1):
            threshold = path.thresholds[j, k]
            passes = passes_threshold(evidence.value[k], path.metric, threshold, evidence.label[k])
            leaving = undecided & passes & evidence.gate[k]
            taken[j, leaving] = k
            undecided &= ~leaving
    return taken


def exit_loss(answer: np.ndarray, full: np.ndarray, truth: np.ndarray | None, risk: str) -> np.ndarray:
    """(N,) each row's loss under ``risk`` from its answer, the full model's and the true label (N,) each."""
    if risk == "disagreement":
        return (answer != full).astype(np.float64)
    if truth is None:
        raise ValueError(f"risk {risk!r} needs labels")
    if risk == "error_increase":
        return ((answer != truth) & (full == truth)).astype(np.float64)
    if risk == "error_increase_net":
        return (answer != truth).astype(np.float64) - (full != truth).astype(np.float64)
    raise ValueError(f"unknown risk {risk!r}; expected one of {RISKS}")


def candidate_losses(
    taken: np.ndarray,
    exit_labels: np.ndarray,
    risk: str = "disagreement",
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """(K, N) per-row loss of every candidate, from the exits taken (K, N) and every exit's labels (E, N)."""
    answer = exit_labels[taken, np.arange(taken.shape[1])]  # (K, N)
    return exit_loss(answer, exit_labels[-1], None if labels is None else np.asarray(labels), risk)


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class CandidateOutcomes:
    """Every candidate of a path applied to a set of rows: what the certification tests."""

    taken: np.ndarray  # (K, n) the exit each row takes under each candidate
    losses: np.ndarray  # (K, n) the risk's loss of each row under each candidate
    full_label: np.ndarray  # (n,) the last exit's label, -1 where invalid: the class-conditional groups
    # (K, n) each row's "error_increase" loss, for a joint accuracy bound; None when none is asked for
    accuracy_losses: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.taken.shape[1]

    def subset(self, members: np.ndarray) -> CandidateOutcomes:
        """The rows selected by ``members`` (n,) bool."""
        accuracy = None if self.accuracy_losses is None else self.accuracy_losses[:, members]
        return CandidateOutcomes(
            self.taken[:, members], self.losses[:, members], self.full_label[members], accuracy
        )


def candidate_outcomes(
    exit_logits: np.ndarray,  # (E, n, C)
    temperatures: Sequence[float],
    path: CandidatePath,
    risk: str = "disagreement",
    labels: np.ndarray | None = None,  # (n,)
    accuracy: bool = False,
) -> CandidateOutcomes:
    """The exits taken and the losses of every candidate on the rows of ``exit_logits``; with
    ``accuracy``, also each row's accuracy loss (``"error_increase"``, needs ``labels``)."""
    evidence = exit_evidence(exit_logits, temperatures, path.base_rules)
    taken = exits_taken(evidence, path)  # (K, n)
    losses = candidate_losses(taken, evidence.label, risk, labels)  # (K, n)
    accuracy_losses = candidate_losses(taken, evidence.label, "error_increase", labels) if accuracy else None
    return CandidateOutcomes(taken, losses, evidence.label[-1], accuracy_losses)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class RowSplit:
    """Which calibration rows fitted what is chosen before the test, and which rows test it."""

    fit: np.ndarray  # (F,) sorted row indices: temperatures and a fitted path's shape
    certify: np.ndarray  # (n,) sorted row indices, disjoint from ``fit``: the guarantee's sample

    @classmethod
    def everything_certifies(cls, rows: int) -> RowSplit:
        return cls(np.arange(0), np.arange(rows))


def fit_split(rows: int, fit_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, certify): a seeded permutation cut at ``fit_fraction``, each part sorted."""
    order = np.random.default_rng(seed).permutation(rows)
    cut = round(rows * fit_fraction)
    return np.sort(order[:cut]), np.sort(order[cut:])


@dataclass(frozen=True)
class Certification:
    """The outcome of the procedure on one group of rows (all rows, or one cohort)."""

    candidate: int  # index into the path
    level: float  # the path parameter of the candidate
    thresholds: tuple[float | tuple[float, ...], ...]  # per early exit: scalar, or one per class
    risk: float  # calibration (empirical) risk of the chosen candidate
    expected_cost: float  # mean exit cost of the calibration rows under it
    exit_rates: tuple[float, ...]  # fraction of calibration rows answering at each exit
    rows: int  # calibration rows of the group
    certified: int  # candidates past candidate 0 accepted (certified, under Learn-then-Test)
    p_value: float  # largest group p-value of the choice; 0 for candidate 0 (trivially safe), NaN: empirical
    delta: float  # the level this group was tested at (delta, or delta / groups under Bonferroni)
    class_risks: dict[int, float] = field(default_factory=dict)  # per full-model class, where tested
    fell_back: bool = False  # True: the group uses the global thresholds (see the warning)
    accuracy_loss: float | None = None  # calibration "error_increase" of the choice, under an accuracy bound


@dataclass(frozen=True)
class CalibratedExitPolicy:
    """A calibrated policy with what it was calibrated on; ``to_policy`` makes the served form."""

    metric: str
    temperatures: tuple[float, ...]
    path: CandidatePath
    result: Certification  # the global thresholds
    cohorts: dict[str, Certification]  # per cohort; fell_back ones carry the global thresholds
    method: str
    guarantee: str
    risk: str
    epsilon: float
    delta: float
    p_value: str
    per_class: str | None
    bonferroni: bool
    split: RowSplit
    exit_costs: tuple[float, ...]
    data_fingerprint: str
    warnings: tuple[str, ...] = ()
    # A ladder (``ladder`` of calibrate_exit_policy): the global certification at each higher risk
    # level, ascending; the policy's own (``result``) is rung 0.
    rungs: tuple[tuple[float, Certification], ...] = ()
    rule: str = "confidence"  # the rule family (RULE_FAMILIES)
    # calibrate_best_rule: every family tried and its certified expected compute, in the order tried.
    tried: tuple[tuple[str, float], ...] = ()
    max_accuracy_loss: float | None = None  # the joint accuracy bound, where one was certified

    @property
    def calibration_rows(self) -> int:
        """The rows the procedure certified on (the guarantee's sample)."""
        return len(self.split.certify)

    @property
    def fit_rows(self) -> int:
        """The rows temperatures and the path's shape were fitted on, kept out of the certification."""
        return len(self.split.fit)

    @property
    def accuracy_bound_in_reach(self) -> bool:
        """False when the certifying rows could not show the accuracy bound whatever they held (see
        :func:`within_reach`): then nothing past "no early exit" was certified, for want of rows."""
        if self.max_accuracy_loss is None or self.method != LearnThenTest.name:
            return True
        return within_reach(self.max_accuracy_loss, self.calibration_rows, self.result.delta, self.p_value)

    @property
    def thresholds(self) -> tuple[float | tuple[float, ...], ...]:
        return self.result.thresholds

    def rules(self, cohort: str | None = None) -> tuple[ExitRule, ...]:
        """Exit rules for all rows, or for ``cohort`` (the global ones where it fell back)."""
        chosen = self.result if cohort is None else self.cohorts.get(cohort, self.result)
        return self.path.rules(chosen.candidate, self.temperatures)

    def ladder(self) -> tuple[Rung, ...]:
        """The ladder's higher rungs as the policy serves them (empty without a ladder)."""
        return tuple(
            Rung(
                epsilon=epsilon,
                exits=self.path.rules(c.candidate, self.temperatures),
                expected_cost=c.expected_cost,
                exit_rate_profile=c.exit_rates,
            )
            for epsilon, c in self.rungs
        )

    def to_policy(self, version: str, model_fingerprint: str) -> Policy:
        """The served ``Policy``: per-exit rules, cohort overrides (not for fallbacks), the ladder's
        higher rungs, provenance."""
        overrides = {name: self.rules(name) for name, c in self.cohorts.items() if not c.fell_back}
        rungs = self.ladder()
        return Policy(
            version=version,
            model_fingerprint=model_fingerprint,
            exits=self.rules(),
            rule=self.rule,
            cohorts=overrides,
            rungs=rungs,
            provenance=self.provenance(),
        )

    def provenance(self) -> dict[str, Any]:
        def summary(c: Certification) -> dict[str, Any]:
            return {
                "candidate": c.candidate,
                "level": c.level,
                "achieved_risk": c.risk,
                "expected_cost": c.expected_cost,
                "exit_rate_profile": list(c.exit_rates),
                "calibration_rows": c.rows,
                "certified_candidates": c.certified,
                "p_value": None if math.isnan(c.p_value) else c.p_value,
                "delta": None if math.isnan(c.delta) else c.delta,
                "class_risks": {str(k): v for k, v in c.class_risks.items()},
                "fell_back": c.fell_back,
                **({} if c.accuracy_loss is None else {"achieved_accuracy_loss": c.accuracy_loss}),
            }

        return {
            "method": self.method,
            "rule": self.rule,
            "rules_tried": {family: cost for family, cost in self.tried},
            "guarantee": self.guarantee,
            "risk": self.risk,
            "epsilon": self.epsilon,
            "max_accuracy_loss": self.max_accuracy_loss,
            "delta": None if math.isnan(self.delta) else self.delta,
            "p_value": self.p_value,
            "per_class": self.per_class,
            "bonferroni": self.bonferroni,
            "path": {"kind": self.path.kind, "candidates": len(self.path)},
            "calibration_rows": self.calibration_rows,
            "fit_rows": self.fit_rows,
            "exit_costs": list(self.exit_costs),
            "data_fingerprint": self.data_fingerprint,
            **{k: v for k, v in summary(self.result).items() if k != "fell_back"},
            "cohorts": {name: summary(c) for name, c in self.cohorts.items()},
            "ladder": [{"epsilon": epsilon, **summary(c)} for epsilon, c in self.rungs],
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------------
# The procedure: checked arguments -> candidates fixed on the fit split -> certification


def data_fingerprint(*arrays: np.ndarray | None) -> str:
    """sha256 (16 hex digits) over the calibration arrays, for the policy's provenance."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.astype(str).tobytes() if array.dtype.kind in "OU" else array.tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class CalibrationRows:
    """Calibration data in the form the procedure reads: checked, cohorts as strings."""

    exit_logits: np.ndarray  # (E, N, C)
    labels: np.ndarray | None  # (N,)
    cohorts: np.ndarray | None  # (N,) str, "" for a row in no cohort

    @property
    def num_rows(self) -> int:
        return self.exit_logits.shape[1]

    def subset(self, rows: np.ndarray) -> CalibrationRows:
        """The rows at indices ``rows``."""
        return CalibrationRows(
            self.exit_logits[:, rows],
            None if self.labels is None else self.labels[rows],
            None if self.cohorts is None else self.cohorts[rows],
        )


def validated_calibration_rows(
    exit_logits: np.ndarray,
    exit_costs: np.ndarray,  # (E,) float64
    method: Method,
    *,
    labels: np.ndarray | None,
    risk: str,
    per_class: str | None,
    cohorts: np.ndarray | None,
    max_accuracy_loss: float | None = None,
) -> CalibrationRows:
    """The arguments of :func:`calibrate_exit_policy` checked against each other; ValueError if not."""
    exit_logits = np.asarray(exit_logits)
    num_exits, rows, _ = exit_logits.shape
    if exit_costs.shape != (num_exits,):
        raise ValueError(f"{exit_costs.shape[0]} exit costs for {num_exits} exits")
    if risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}; expected one of {RISKS}")
    if per_class not in PER_CLASS:
        raise ValueError(f"per_class must be one of {PER_CLASS}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (rows,):
            raise ValueError(f"labels {labels.shape} for {rows} rows")
    if risk != "disagreement" and labels is None:
        raise ValueError(f"risk {risk!r} needs labels")
    check_accuracy_bound(max_accuracy_loss)
    if max_accuracy_loss is not None and labels is None:
        raise ValueError("an accuracy bound (max_accuracy_loss) needs labels")
    if cohorts is not None:
        cohorts = np.array(["" if c is None else str(c) for c in cohorts])
        if cohorts.shape != (rows,):
            raise ValueError(f"cohorts {cohorts.shape} for {rows} rows")
    if method.epsilon < 0:
        raise ValueError("epsilon must be >= 0")
    return CalibrationRows(exit_logits, labels, cohorts)


@dataclass(frozen=True)
class Candidates:
    """What is fixed before any certifying row is looked at: temperatures, the path, the split."""

    temperatures: tuple[float, ...]
    path: CandidatePath
    split: RowSplit


def build_candidates(
    rows: CalibrationRows,
    *,
    risk: str = "disagreement",
    metric: str = "max_prob",
    temperatures: Sequence[float] | None = None,
    path: CandidatePath | str = "shared",
    fit_fraction: float = 0.25,
    seed: int = 0,
    rule: str = "confidence",
) -> Candidates:
    """Temperatures, the rule family's rules and the candidate path, each fitted on the fit split when
    not given.

    Rows certify only if nothing was fitted on them: with ``temperatures`` given, a data-free rule
    family (``confidence``, ``patience``) and a data-free ``"shared"`` path (or a
    :class:`CandidatePath` built on other rows) every row certifies; otherwise a seeded
    ``fit_fraction`` of the rows (:func:`fit_split`) is set aside to fit on.
    """
    builds_path = isinstance(path, str) and path != "shared"
    fits_rule = rule in FITTED_FAMILIES and not isinstance(path, CandidatePath)
    if temperatures is None or builds_path or fits_rule:
        if fit_fraction <= 0:
            raise ValueError("fitting temperatures or a path needs a fit split (fit_fraction > 0)")
        split = RowSplit(*fit_split(rows.num_rows, fit_fraction, seed))
    else:
        split = RowSplit.everything_certifies(rows.num_rows)
    fitting = rows.subset(split.fit)
    if temperatures is None:
        if rows.labels is None:
            raise ValueError("fitting temperatures needs labels; pass temperatures=... otherwise")
        temperatures = fit_temperatures(fitting.exit_logits, fitting.labels)
    temperatures = tuple(float(t) for t in temperatures)
    num_exits, _, num_classes = rows.exit_logits.shape
    if isinstance(path, CandidatePath):
        return Candidates(temperatures, path, split)
    template = rule_template(rule, metric, fitting.exit_logits, temperatures)
    value = template[0].metric  # what the family thresholds
    if path == "shared":
        candidates = shared_path(value, num_exits, num_classes, template=template)
    elif path in ("per_exit", "per_class"):
        candidates = fitted_path(
            fitting.exit_logits, temperatures, value, path == "per_class", fitting.labels, risk,
            template=template,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown path {path!r}")
    return Candidates(temperatures, candidates, split)


@dataclass(frozen=True)
class Certified:
    """The certification of one path: global thresholds, per-cohort ones, what went wrong."""

    result: Certification  # every certifying row, under the global thresholds
    cohorts: dict[str, Certification]  # per cohort; fell_back ones carry the global thresholds
    warnings: tuple[str, ...]  # recorded, not emitted: calibrate_exit_policy emits them


def certify(
    outcomes: CandidateOutcomes,
    path: CandidatePath,
    exit_costs: np.ndarray,  # (E,)
    method: Method,
    *,
    risk: str = "disagreement",
    per_class: str | None = None,
    cohorts: np.ndarray | None = None,  # (n,) str of the certifying rows, "" for none
    bonferroni: bool = False,
    min_group_rows: int = 50,
    max_accuracy_loss: float | None = None,
) -> Certified:
    """Runs ``method`` on the candidates' ``outcomes`` over the certifying rows: globally (with the
    per-class groups of ``per_class``), then per cohort, a cohort falling back to the global
    thresholds where it is too small or certifies nothing. ``max_accuracy_loss`` bounds every group's
    accuracy loss too (the outcomes' ``accuracy_losses``). See :func:`calibrate_exit_policy`."""
    if per_class is not None and not path.per_class:
        raise ValueError("per_class needs a per-class path (path='per_class')")
    if max_accuracy_loss is not None and outcomes.accuracy_losses is None:
        raise ValueError(
            "an accuracy bound needs the outcomes' accuracy losses (candidate_outcomes(accuracy=))"
        )
    costs = np.asarray(exit_costs, dtype=np.float64)
    warn: list[str] = []

    def certify_group(group: CandidateOutcomes, delta: float, where: str) -> Certification:
        return _certify_group(
            group, path, costs, method, risk, delta, per_class, min_group_rows, max_accuracy_loss, warn, where
        )

    result = certify_group(outcomes, method.delta, "global")
    if result.certified == 0 and method.epsilon > 0:
        warn.append("global: nothing certified past 'no early exit'; every row answers at the last exit")
    overrides: dict[str, Certification] = {}
    if cohorts is not None:
        names = sorted(set(cohorts.tolist()) - {""})
        # Bonferroni: each cohort at delta / cohorts, so all cohorts hold at once w.p. >= 1 - delta.
        cohort_delta = method.delta / len(names) if bonferroni and names else method.delta
        for name in names:
            members = outcomes.subset(cohorts == name)
            if members.rows < min_group_rows:
                own = None
                reason = f"{members.rows} calibration rows (< {min_group_rows})"
            else:
                own = certify_group(members, cohort_delta, f"cohort {name!r}")
                nothing = own.certified == 0 and method.epsilon > 0
                reason = "nothing certified past 'no early exit'" if nothing else ""
            if reason:
                warn.append(f"cohort {name!r}: {reason}; falls back to the global thresholds")
                overrides[name] = _fallback(result, members, costs, cohort_delta)
            else:
                overrides[name] = own
    return Certified(result, overrides, tuple(warn))


def _certify_group(
    group: CandidateOutcomes,
    path: CandidatePath,
    costs: np.ndarray,  # (E,)
    method: Method,
    risk: str,
    delta: float,
    per_class: str | None,
    min_group_rows: int,
    max_accuracy_loss: float | None,
    warn: list[str],
    where: str,
) -> Certification:
    rows, losses, taken, full_label = group.rows, group.losses, group.taken, group.full_label
    bounds = [RiskBound(losses, risk, method.epsilon)]
    tested_classes: list[int] = []
    if per_class == "class_conditional":
        for c in np.unique(full_label[full_label >= 0]):
            members = full_label == c
            if members.sum() >= min_group_rows:
                bounds.append(RiskBound(losses[:, members], risk, method.epsilon))
                tested_classes.append(int(c))
            else:
                warn.append(
                    f"{where}: class {int(c)} has {int(members.sum())} calibration rows "
                    f"(< {min_group_rows}): no class-conditional guarantee for it, only the marginal one"
                )
    class_bounds = bounds[1:]
    if max_accuracy_loss is not None:
        assert group.accuracy_losses is not None  # certify checked it
        bounds.append(RiskBound(group.accuracy_losses, "error_increase", max_accuracy_loss))
    accepted = method.accepted(bounds, delta)  # (K,)
    cost = costs[taken].mean(axis=1) if rows else np.zeros(len(path))  # (K,)
    choice = np.flatnonzero(accepted)[np.argmin(cost[accepted])]  # ties: the most conservative
    p = method.p_values(bounds)
    exit_rates = np.bincount(taken[choice], minlength=path.num_exits) / max(rows, 1)
    value = path.thresholds[choice]
    thresholds = tuple(tuple(float(v) for v in t) if path.per_class else float(t) for t in value)
    class_risks = {
        c: float(b.losses[choice].mean()) for c, b in zip(tested_classes, class_bounds, strict=True)
    }
    accuracy_loss = None
    if group.accuracy_losses is not None:
        accuracy_loss = float(group.accuracy_losses[choice].mean()) if rows else 0.0
    return Certification(
        candidate=int(choice),
        level=float(path.levels[choice]),
        thresholds=thresholds,
        risk=float(losses[choice].mean()) if rows else 0.0,
        expected_cost=float(cost[choice]),
        exit_rates=tuple(float(r) for r in exit_rates),
        rows=rows,
        certified=int(accepted.sum()) - 1,
        p_value=float(p[choice]) if choice > 0 or method.name != "learn_then_test" else 0.0,
        delta=delta,
        class_risks=class_risks,
        accuracy_loss=accuracy_loss,
    )


def _fallback(
    global_result: Certification, group: CandidateOutcomes, costs: np.ndarray, delta: float
) -> Certification:
    """The global thresholds, with the cohort's own figures under them (for the record only)."""
    j = global_result.candidate
    rows = group.rows
    accuracy = group.accuracy_losses
    return Certification(
        candidate=j,
        level=global_result.level,
        thresholds=global_result.thresholds,
        risk=float(group.losses[j].mean()) if rows else float("nan"),
        expected_cost=float(costs[group.taken[j]].mean()) if rows else float("nan"),
        exit_rates=tuple(float(r) for r in np.bincount(group.taken[j], minlength=len(costs)) / max(rows, 1)),
        rows=rows,
        certified=0,
        p_value=float("nan"),
        delta=delta,
        fell_back=True,
        accuracy_loss=float(accuracy[j].mean()) if accuracy is not None and rows else None,
    )


def _guarantee(
    method: Method,
    per_class: str | None,
    has_cohorts: bool,
    bonferroni: bool,
    max_accuracy_loss: float | None,
) -> str:
    """The statement the calibration makes, in words, for the policy's provenance."""
    text = method.describe(method.delta)
    if max_accuracy_loss is not None:
        text += f", and with it the accuracy lost against the full model is <= {max_accuracy_loss:.4g}"
    if per_class == "class_conditional":
        text += ", for every tested full-model class and overall"
    if has_cohorts:
        text += f"; cohorts: {'all at once (Bonferroni)' if bonferroni else 'each separately'}"
    return text


def calibrate_exit_policy(
    exit_logits: np.ndarray,
    exit_costs: Sequence[float],
    method: Method,
    *,
    labels: np.ndarray | None = None,
    risk: str = "disagreement",
    metric: str = "max_prob",
    temperatures: Sequence[float] | None = None,
    path: CandidatePath | str = "shared",
    per_class: str | None = None,
    cohorts: np.ndarray | None = None,
    bonferroni: bool = False,
    min_group_rows: int = 50,
    fit_fraction: float = 0.25,
    seed: int = 0,
    ladder: Sequence[float] = (),
    rule: str = "confidence",
    max_accuracy_loss: float | None = None,
) -> CalibratedExitPolicy:
    """Calibrate exit thresholds on logits (exits, N, C) so that ``method`` holds for ``risk``.

    ``rule``: the rule family (``build/rule_families.py``; ``metric`` applies to ``confidence``);
    :func:`calibrate_best_rule` tries several.

    The steps, each callable on its own (to certify one path at several risk levels, or a path of
    another exit rule): :func:`validated_calibration_rows`, :func:`build_candidates` (temperatures,
    path, split), :func:`candidate_outcomes` on the certifying rows, and :func:`certify`.

    Fit and certify splits. What is chosen from data before the test (temperatures when not given,
    and the shape of a ``"per_exit"`` or ``"per_class"`` path) is fitted on a seeded ``fit_fraction``
    of the rows and the procedure certifies on the rest; the candidates' order is so never learnt
    from the rows that test it. When nothing is fitted (``temperatures`` given, and ``path`` is
    ``"shared"``, which is data-free, or a :class:`CandidatePath` built on other rows) every row
    certifies. ``labels`` are needed to fit temperatures and for the error risks; ``"disagreement"``
    itself needs none. The result's ``split`` holds the row indices of both parts;
    ``calibration_rows`` counts the certifying rows.

    ``path``: ``"shared"`` (:func:`shared_path`), ``"per_exit"`` or ``"per_class"``
    (:func:`fitted_path` on the fit split), or a :class:`CandidatePath`.

    Per-class thresholds (``per_class``, a per-class path). The threshold applied to a row at exit k
    is the one of its label AT EXIT k, so rows cannot be split by "their class" into fixed groups
    that each depend on one class's thresholds alone: a row's label changes from exit to exit, and
    whether it reaches exit k at all depends on the earlier exits' thresholds of other classes.
    Running an independent procedure per exit-label class is therefore not valid as such (it would
    need a union bound over the exits a row can predict different classes at). Instead the per-class
    thresholds move together along one path whose shape per (exit, class) was fitted on the fit
    split, and the guarantee is chosen with ``per_class``:

    - ``"marginal"``: Learn-then-Test on all rows; the marginal risk is <= epsilon w.p. >= 1 - delta.
    - ``"class_conditional"``: the groups are the rows' FULL-MODEL class (the last exit's label, a
      partition fixed before any threshold is chosen and known without labels); each step of the
      path is tested with the largest p-value over all rows and every class with at least
      ``min_group_rows`` calibration rows (an intersection-union test), so with probability >=
      1 - delta, SIMULTANEOUSLY, every tested class's risk among rows the full model labels with it
      is <= epsilon, and so is the marginal risk (a mixture of class risks; it is also tested
      directly, which covers the classes too small to test). No Bonferroni split is needed. Classes
      below ``min_group_rows`` get a warning and only the marginal guarantee.

    Cohorts (``cohorts``, one string per row; "" for none). Each cohort with at least
    ``min_group_rows`` calibration rows runs the same procedure on its own rows (same path, risk,
    epsilon, per-class mode). Per-group validity (default): for each cohort separately, its risk is
    <= epsilon with probability >= 1 - delta. ``bonferroni=True`` tests each cohort at
    delta / (number of cohorts) instead, making the statement hold for all cohorts at once with
    probability >= 1 - delta. A cohort that is too small, or whose procedure certifies nothing past
    "no early exit", falls back to the global thresholds (a ``CalibrationWarning`` and a record in
    ``warnings``); it then has no guarantee of its own: the global thresholds are certified on all
    rows together (marginal over cohorts).

    A ladder (``ladder``: further risk levels above ``method.epsilon``, for a service that trades
    risk for speed under load). The same candidates are certified globally at each level, on the same
    certifying rows; rung 0 is ``method.epsilon`` itself (with its cohorts and per-class groups). With
    K levels in all, every certification runs at ``delta / K`` (Bonferroni): with probability >=
    1 - delta, every rung's risk is at most its own epsilon SIMULTANEOUSLY, so a service may move
    between rungs at any time without losing the guarantee of the rung it serves. Learn-then-Test
    only (an empirical search has no delta to split).

    A joint accuracy bound (``max_accuracy_loss``, needs ``labels``): every certification also tests
    ``"error_increase"`` (early answer wrong where the full model is right) at ``max_accuracy_loss``,
    with the same rows and the largest of the two p-values (an intersection-union test, no split of
    delta): with probability >= 1 - delta the policy's ``risk`` is <= epsilon AND the accuracy it loses
    against the full model is <= ``max_accuracy_loss``, both at once. Disagreement alone bounds the
    accuracy lost only by epsilon itself, and on a hard task most disagreements are losses; a user who
    states both gets both. Each rung of a ladder keeps the same accuracy bound.
    """
    costs = np.asarray(exit_costs, dtype=np.float64)
    levels = ladder_levels(method, ladder)
    if levels:
        method = replace(method, delta=method.delta / (len(levels) + 1))
    rows = validated_calibration_rows(
        exit_logits, costs, method, labels=labels, risk=risk, per_class=per_class, cohorts=cohorts,
        max_accuracy_loss=max_accuracy_loss,
    )  # fmt: skip
    candidates = build_candidates(
        rows,
        risk=risk,
        metric=metric,
        temperatures=temperatures,
        path=path,
        fit_fraction=fit_fraction,
        seed=seed,
        rule=rule,
    )
    certifying = rows.subset(candidates.split.certify)
    outcomes = candidate_outcomes(
        certifying.exit_logits, candidates.temperatures, candidates.path, risk, certifying.labels,
        accuracy=max_accuracy_loss is not None,
    )  # fmt: skip
    certified = certify(
        outcomes,
        candidates.path,
        costs,
        method,
        risk=risk,
        per_class=per_class,
        cohorts=certifying.cohorts,
        bonferroni=bonferroni,
        min_group_rows=min_group_rows,
        max_accuracy_loss=max_accuracy_loss,
    )
    rungs = tuple(
        (
            epsilon,
            certify(
                outcomes,
                candidates.path,
                costs,
                replace(method, epsilon=epsilon),
                risk=risk,
                max_accuracy_loss=max_accuracy_loss,
            ).result,
        )
        for epsilon in levels
    )
    calibrated = CalibratedExitPolicy(
        metric=candidates.path.metric,
        temperatures=candidates.temperatures,
        path=candidates.path,
        result=certified.result,
        cohorts=certified.cohorts,
        method=method.name,
        guarantee=_guarantee(method, per_class, rows.cohorts is not None, bonferroni, max_accuracy_loss),
        risk=risk,
        epsilon=float(method.epsilon),
        delta=float(method.delta),
        p_value=method.p_value,
        per_class=per_class,
        bonferroni=bonferroni,
        split=candidates.split,
        exit_costs=tuple(float(c) for c in costs),
        data_fingerprint=data_fingerprint(rows.exit_logits, rows.labels, rows.cohorts),
        warnings=certified.warnings,
        rungs=rungs,
        rule=rule,
        max_accuracy_loss=max_accuracy_loss,
    )
    if not calibrated.accuracy_bound_in_reach:
        assert max_accuracy_loss is not None  # in reach otherwise
        needed = (  # loss-free rows the binomial test needs; a bound of 0 no finite number shows
            f"the binomial test needs {math.ceil(math.log(method.delta) / math.log(1 - max_accuracy_loss))}"
            if max_accuracy_loss > 0
            else "no number of rows shows a bound of 0"
        )
        out_of_reach = (
            f"the accuracy bound {max_accuracy_loss:g} is out of reach of {calibrated.calibration_rows} "
            f"certifying rows at delta {method.delta:.4g}: even rows without a loss would not show it "
            f"({needed}: calibrate on more labelled rows, or state a looser bound)"
        )
        calibrated = replace(calibrated, warnings=(*calibrated.warnings, out_of_reach))
    for message in calibrated.warnings:
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    return calibrated


def calibrate_best_rule(
    exit_logits: np.ndarray,
    exit_costs: Sequence[float],
    method: Method,
    *,
    rules: Sequence[str] = RULE_FAMILIES,
    **options: Any,
) -> CalibratedExitPolicy:
    """:func:`calibrate_exit_policy` for every family of ``rules``, each at ``delta / len(rules)``; the
    one with the least certified expected compute is returned (the first of them on a tie).

    Valid by Bonferroni: each family's certification errs with probability at most
    ``delta / len(rules)``, so all of them hold at once with probability at least ``1 - delta``, and
    any certified candidate of any family, this one included, has its risk within epsilon. The
    result records every family's certified compute (``tried``); its warnings are its own.
    """
    if not rules or len(set(rules)) != len(rules):
        raise ValueError(f"rules must name distinct families, not {list(rules)}")
    share = replace(method, delta=method.delta / len(rules))
    results = []
    for family in rules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            results.append(calibrate_exit_policy(exit_logits, exit_costs, share, rule=family, **options))
    best = min(results, key=lambda r: r.result.expected_cost)
    for message in best.warnings:
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    clauses = best.guarantee.removeprefix(share.describe(share.delta))  # per-class and cohort clauses
    guarantee = (
        f"{method.describe(method.delta)}{clauses}; {len(rules)} rule families ({', '.join(rules)}), each "
        f"certified at delta / {len(rules)} = {share.delta:.4g}, the least compute kept ({best.rule})"
    )
    tried = tuple((r.rule, r.result.expected_cost) for r in results)
    return replace(best, guarantee=guarantee, delta=float(method.delta), tried=tried)


def ladder_levels(method: Method, ladder: Sequence[float]) -> tuple[float, ...]:
    """The ladder's risk levels above rung 0 (``method.epsilon``), ascending, checked."""
    levels = tuple(sorted({float(e) for e in ladder} - {float(method.epsilon)}))
    if not levels:
        return ()
    if not isinstance(method, LearnThenTest):
        raise ValueError("a ladder needs Learn-then-Test: an empirical search has no delta to split")
    if levels[0] < method.epsilon or levels[-1] >= 1:
        raise ValueError(
            f"ladder levels must lie above rung 0's epsilon {method.epsilon} and below 1: {list(ladder)}"
        )
    return levels
