"""Exit-rule families: what each fixes per exit before Learn-then-Test certifies its threshold path.

Every family is one threshold per exit on one value (``offramp.backend.exit_rules`` computes it, for
the cascade and for the calibration alike); what else a family's rules hold is fixed here, before the
certification, from data-free defaults or from the FIT rows (calibration rows the certification does
not use), so the candidates' order is never learnt from the rows that test it:

- ``confidence``: the value is max-prob, entropy or margin; nothing else (data-free).
- ``patience``: max-prob, discounted where the label has held at the last ``PATIENCE`` exits
  (data-free defaults, not tuned: ``benchmarks/exit_rules.md`` reports what they certify).
- ``score``: a learned exit score, a logistic model of "this exit's label is the last exit's" over
  the logit of max-prob, entropy, margin and agreement with the previous exit, with an intercept per
  exit (the exit index), fitted on the fit rows with sign constraints that make it monotone.
- ``novelty``: max-prob, gated per exit by an energy limit (the ``NOVELTY_QUANTILE`` quantile of the
  fit rows' energy scores at that exit) and a distance limit (each label's median logits on the fit
  rows, and the ``DISTANCE_QUANTILE`` quantile of the fit rows' distance to their label's), so
  most in-domain rows may leave there and rows more novel than nearly all of them may not. The
  energy alone let confident foreign rows through (pixel-shuffled clothes left at the first exit more
  often than clothes); the distance stops them (``benchmarks/live_guarantee.md``, section 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from scipy.optimize import minimize

from offramp.backend.exit_rules import (
    SCORE,
    SCORE_SIGNS,
    LabelHistory,
    energy,
    logit_distance,
    score_features,
)
from offramp.backend.policy import RULE_FAMILIES, ExitRule
from offramp.kernels.confidence import Confidence, compute_confidence

# Families whose rules are fitted on rows: they need a fit split whatever the temperatures.
FITTED_FAMILIES = ("score", "novelty")
PATIENCE = 2  # exits the label must have held, this one included
PATIENCE_DISCOUNT = 0.25  # the share of its uncertainty a row whose label held still counts
NOVELTY_QUANTILE = 0.95  # of the fit rows' energy: the energy limit
DISTANCE_QUANTILE = 0.95  # of the fit rows' distance to their label's median logits: the distance limit
SCORE_L2 = 1e-3  # ridge on the score's weights (not its intercepts): keeps separable fits finite


def scaled_exits(
    exit_logits: np.ndarray, temperatures: Sequence[float]
) -> list[tuple[np.ndarray, Confidence, LabelHistory]]:
    """Per exit, as the cascade computes them: logits (n, C) divided by the exit's temperature in
    float32, their confidence, and the rows' label history after that exit."""
    num_exits, rows, _ = exit_logits.shape
    if len(temperatures) != num_exits:
        raise ValueError(f"{len(temperatures)} temperatures for {num_exits} exits")
    history = LabelHistory.fresh(rows)
    out = []
    for k in range(num_exits):
        scaled = exit_logits[k].astype(np.float32) / np.float32(temperatures[k])  # (n, C)
        confidence = compute_confidence(scaled)
        history = history.after(confidence.label)
        out.append((scaled, confidence, history))
    return out


def rule_template(
    family: str,
    metric: str,
    fit_logits: np.ndarray | None,  # (E, F, C): the fit rows, for the fitted families
    temperatures: Sequence[float],
) -> tuple[ExitRule, ...]:
    """One rule per exit (threshold to be set by the path, temperature the exit's) of ``family``.

    ``metric`` is the confidence family's value; the other families threshold their own (max-prob,
    patience-discounted or novelty-gated, or the learned score), so that ``--rule all`` compares every
    family with the confidence rule the user asked for."""
    if family not in RULE_FAMILIES:
        raise ValueError(f"unknown rule family {family!r}; expected one of {RULE_FAMILIES}")
    if family == "confidence":
        return tuple(ExitRule(metric, temperature=float(t)) for t in temperatures)
    plain = tuple(ExitRule("max_prob", temperature=float(t)) for t in temperatures)
    if family == "patience":
        return tuple(replace(r, patience=PATIENCE, patience_discount=PATIENCE_DISCOUNT) for r in plain)
    if fit_logits is None or fit_logits.shape[1] == 0:
        raise ValueError(f"the {family} family is fitted on rows: it needs a fit split")
    exits = scaled_exits(fit_logits, temperatures)
    if family == "novelty":
        limits = novelty_limits(exits)
        distances = distance_gates(exits)
        return tuple(
            replace(r, energy_limit=limit, distance_limit=distance, class_centres=means)
            for r, limit, (distance, means) in zip(plain, limits, distances, strict=True)
        )
    weights = fit_exit_score(exits)
    return tuple(replace(r, metric=SCORE, score_weights=w) for r, w in zip(plain, weights, strict=True))


def novelty_limits(
    exits: Sequence[tuple[np.ndarray, Confidence, LabelHistory]], quantile: float = NOVELTY_QUANTILE
) -> list[float]:
    """Per exit, the ``quantile`` of the (valid) rows' energy: the limit a row's energy must not pass."""
    limits = []
    for scaled, confidence, _ in exits:
        values = energy(scaled, confidence)[confidence.valid]
        limits.append(float(np.quantile(values, quantile)) if len(values) else 0.0)
    return limits


def distance_gates(
    exits: Sequence[tuple[np.ndarray, Confidence, LabelHistory]], quantile: float = DISTANCE_QUANTILE
) -> list[tuple[float, tuple[tuple[float, ...], ...]]]:
    """Per exit, a distance gate: each label's centre, the coordinate-wise median logits of the (valid)
    rows the exit gives that label (of all valid rows, for a label none has; a median, so that a few
    rows of huge logits cannot move it), and the limit, the ``quantile`` of the rows' distance to their
    label's centre (an order statistic: rows whose float32 distance overflows count as the farthest)."""
    gates = []
    for scaled, confidence, _ in exits:
        valid = confidence.valid
        rows, label = scaled[valid], confidence.label[valid]
        overall = np.median(rows, axis=0) if len(rows) else np.zeros(scaled.shape[1])
        centres = np.stack(
            [
                np.median(rows[label == c], axis=0) if (label == c).any() else overall
                for c in range(scaled.shape[1])
            ]
        ).astype(np.float32)  # (C, C)
        distances = logit_distance(scaled, confidence, centres)[valid]
        limit = float(np.quantile(distances, quantile, method="inverted_cdf")) if len(distances) else 0.0
        limit = min(limit, float(np.finfo(np.float32).max))  # finite, as a policy's limits are
        gates.append((limit, tuple(tuple(float(v) for v in row) for row in centres)))
    return gates


def fit_exit_score(exits: Sequence[tuple[np.ndarray, Confidence, LabelHistory]]) -> list[tuple[float, ...]]:
    """Per exit, the learned score's weights (bias, then one per ``SCORE_FEATURES``): one logistic model
    of "the exit's label is the last exit's" over every early exit's valid rows, the slopes shared and
    sign-constrained (``SCORE_SIGNS``: monotone in confidence), an intercept per early exit. The last
    exit always answers; its weights repeat the one before (never consulted)."""
    final = exits[-1][1].label
    features, targets, exit_of = [], [], []
    for k, (_, confidence, history) in enumerate(exits[:-1]):
        x = score_features(confidence, history)[:, 1:].astype(np.float64)  # (n, 4)
        # Valid rows whose figures are finite: a row of logits near the float32 range has a NaN entropy
        # (it never leaves early), and one NaN would stop the whole fit at its start.
        usable = confidence.valid & np.isfinite(x).all(axis=1)
        features.append(x[usable])
        targets.append((confidence.label == final)[usable].astype(np.float64))
        exit_of.append(np.full(int(usable.sum()), k))
    x, y, exit_index = np.concatenate(features), np.concatenate(targets), np.concatenate(exit_of)
    early = len(exits) - 1
    one_hot = np.eye(early)[exit_index]  # (n, early)
    design = np.concatenate([one_hot, x], axis=1)  # (n, early + 4)
    slopes = slice(early, None)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = design @ w
        # Mean logistic loss, stably: log(1 + e^z) - y z.
        value = np.mean(np.logaddexp(0.0, z) - y * z) + SCORE_L2 * np.sum(w[slopes] ** 2)
        gradient = design.T @ (1.0 / (1.0 + np.exp(-z)) - y) / len(y)
        gradient[slopes] += 2 * SCORE_L2 * w[slopes]
        return value, gradient

    bounds = [(None, None)] * early + [(0, None) if s > 0 else (None, 0) for s in SCORE_SIGNS[1:]]
    fitted = minimize(loss, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B", bounds=bounds).x
    weights = [(float(fitted[k]), *(float(v) for v in fitted[slopes])) for k in range(early)]
    return [*weights, weights[-1]]
