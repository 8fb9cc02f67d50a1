"""What an exit rule computes from a row at one exit, on any array module: the cascade's decision and
the calibration's candidates both call these functions, so what is certified is what is served.

A rule (``policy.ExitRule``) compares one figure of the row, its *value*, with a threshold: a row
passes where the value is at or above it (at or below, for entropy), is valid (finite logits), and
passes the rule's gates. Every rule family is so a one-parameter family per exit (the threshold),
which is what Learn-then-Test certifies along a path; whatever else a rule holds is fixed before the
certification (from data-free defaults, or fitted on rows the certification does not use).

- value: ``max_prob``, ``entropy`` or ``margin`` of the temperature-scaled logits (the confidence
  kernel's figures), or ``score``, a learned exit score: ``sigmoid(w . features)`` with features
  (1, logit of max-prob, entropy, margin, agreement with the previous exit's label) and weights whose
  signs make it monotone (non-decreasing in max-prob, margin and agreement; non-increasing in
  entropy), so that a more confident row never scores lower.
- patience (after PABEE, Zhou et al. 2020, "BERT Loses Patience"): where the row's label has been the
  same at the last ``patience`` exits, this one included, its uncertainty counts ``patience_discount``
  times: the value becomes ``1 - d (1 - value)`` (``d * value`` for entropy). ``d = 0`` is PABEE
  itself (the streak alone lets a row leave); ``d = 1`` ignores the streak.
- novelty gate: with an ``energy_limit``, a row leaves only where its energy score
  ``-logsumexp(z)`` (Liu et al. 2020, "Energy-based Out-of-distribution Detection"; low for inputs
  like the training data) is at most the limit, so inputs unlike the calibration data do not leave
  early on a confident-looking softmax. The energy is ``log(max_prob) - max(z)``: the confidence's
  own max-prob and one reduction over the logits, in the same pass.
- distance gate: with a ``distance_limit``, a row leaves only where its temperature-scaled logits lie
  within that Euclidean distance of ``class_centres[label]``, the centre (median) of the logits of the fit
  rows the exit gave the same label (a class-conditional distance in logit space, after Lee et al.
  2018's Mahalanobis detector, on the logits the cascade already holds). Confident rows of an unfamiliar
  domain often have ordinary energy but logits shaped unlike any class's (a too large top logit, the
  wrong runner-up classes): ``benchmarks/live_guarantee.md`` measures both gates on domain shifts.

A row's history (``LabelHistory``: the previous exit's label and how many exits in a row it has held)
travels with the row between segments, compacted with its hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from offramp.kernels.confidence import METRICS, Confidence

SCORE = "score"
RULE_METRICS = (*METRICS, SCORE)
# The learned score's features, in the order of ExitRule.score_weights (after the bias).
SCORE_FEATURES = ("max_prob_logit", "entropy", "margin", "agrees_previous")
# Sign each score weight must have for the score to be monotone in confidence (0: any, the bias).
SCORE_SIGNS = (0, 1, -1, 1, 1)
# max-prob is clipped here before its logit, so a row whose float32 max-prob rounds to 1 scores finitely.
PROBABILITY_CLIP = 1e-6
# Thresholds no row passes: max_prob, margin and score lie in [0, 1], entropy is >= 0 (NaN fails all).
NEVER = {"max_prob": 2.0, "margin": 2.0, "entropy": -1.0, SCORE: 2.0}


@dataclass(frozen=True)
class LabelHistory:
    """What a row's earlier exits said, for rules that weigh it; every field (n,)."""

    previous: Any  # int64: the label at the exit before, -1 before the first exit (or an invalid row)
    streak: Any  # int32: exits in a row, ending there, whose label was ``previous`` (0 before the first)

    @classmethod
    def fresh(cls, rows: int, xp: Any = np) -> LabelHistory:
        """Rows that have reached no exit yet."""
        return cls(xp.full(rows, -1, dtype=xp.int64), xp.zeros(rows, dtype=xp.int32))

    def after(self, label: Any, xp: Any = np) -> LabelHistory:
        """The history once this exit's ``label`` (n,) is known: a label equal to the previous (and valid)
        lengthens the streak, any other starts one of 1."""
        same = (label == self.previous) & (label >= 0)
        return LabelHistory(label.astype(xp.int64), xp.where(same, self.streak + 1, 1).astype(xp.int32))

    def agrees_previous(self) -> Any:
        """(n,) bool, on a history already ``after`` this exit: the label repeats the previous exit's."""
        return self.streak >= 2


def energy(logits: Any, confidence: Confidence, xp: Any = np) -> Any:
    """(n,) float32 energy score ``-logsumexp(z)`` of temperature-scaled logits (n, C); NaN where invalid.

    ``logsumexp(z) = max(z) - log(max_prob)`` (max-prob is ``exp(max(z) - logsumexp(z))``), so it
    takes the confidence's max-prob and one row-wise maximum. Invalid rows are reduced over zeros
    (their max-prob is NaN already), so no overflow warning leaks out of them.
    """
    finite = xp.where(confidence.valid[:, None], logits, xp.float32(0)).astype(xp.float32)
    return (xp.log(confidence.max_prob) - finite.max(axis=1)).astype(xp.float32)


def logit_distance(logits: Any, confidence: Confidence, class_centres: Any, xp: Any = np) -> Any:
    """(n,) float32 Euclidean distance of temperature-scaled logits (n, C) to ``class_centres`` (C, C) at
    each row's label; NaN where invalid (reduced over zeros, as ``energy`` does)."""
    centres = xp.asarray(class_centres, dtype=xp.float32)  # (C, C): row c is label c's centre
    finite = xp.where(confidence.valid[:, None], logits, xp.float32(0)).astype(xp.float32)
    offset = finite - centres[xp.maximum(confidence.label, 0)]  # (n, C)
    distance = xp.sqrt((offset * offset).sum(axis=1)).astype(xp.float32)
    return xp.where(confidence.valid, distance, xp.float32(np.nan))


def score_features(confidence: Confidence, history: LabelHistory, xp: Any = np) -> Any:
    """(n, 5) float32: 1 (the bias), then ``SCORE_FEATURES``, of rows whose history is at this exit."""
    p = xp.clip(confidence.max_prob, PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    columns = (
        xp.ones_like(p),
        xp.log(p) - xp.log1p(-p),
        confidence.entropy,
        confidence.margin,
        history.agrees_previous().astype(xp.float32),
    )
    return xp.stack(columns, axis=1).astype(xp.float32)


def exit_score(weights: Any, confidence: Confidence, history: LabelHistory, xp: Any = np) -> Any:
    """(n,) float32 learned exit score in (0, 1): ``sigmoid(features @ weights)``; NaN where invalid."""
    linear = score_features(confidence, history, xp) @ xp.asarray(weights, dtype=xp.float32)  # (n,)
    score = (1.0 / (1.0 + xp.exp(-linear))).astype(xp.float32)
    return xp.where(confidence.valid, score, xp.float32(np.nan))


def rule_value(rule: Any, confidence: Confidence, history: LabelHistory, xp: Any = np) -> Any:
    """(n,) float32 what ``rule`` (a ``policy.ExitRule``) compares with its threshold, at this exit;
    ``history`` is already ``after`` this exit's labels."""
    if rule.metric == SCORE:
        value = exit_score(rule.score_weights, confidence, history, xp)
    else:
        value = getattr(confidence, rule.metric)
    if rule.patience:
        d = xp.float32(rule.patience_discount)
        discounted = d * value if rule.metric == "entropy" else 1.0 - d * (1.0 - value)
        value = xp.where(history.streak >= rule.patience, discounted, value)
    return value.astype(xp.float32)


def rule_gate(rule: Any, logits: Any, confidence: Confidence, xp: Any = np) -> Any:
    """(n,) bool: the row may leave here whatever its value: valid, and not novel where the rule
    limits the energy or the distance to its label's centre."""
    gate = confidence.valid
    if rule.energy_limit is not None:
        gate = gate & (energy(logits, confidence, xp) <= xp.float32(rule.energy_limit))
    if rule.distance_limit is not None:
        distance = logit_distance(logits, confidence, rule.class_centres, xp)
        gate = gate & (distance <= xp.float32(rule.distance_limit))  # NaN (invalid) never passes
    return gate


def passes_threshold(value: Any, metric: str, threshold: Any, label: Any, xp: Any = np) -> Any:
    """(n,) bool: ``value`` at or above ``threshold`` (at or below, for entropy); a per-class threshold
    (C,) is indexed by each row's ``label``. NaN never passes. Compared in float32, as the kernel does."""
    threshold = xp.asarray(threshold, dtype=xp.float32)
    if threshold.ndim == 1:
        threshold = threshold[xp.maximum(label, 0)]  # (n,)
    return value <= threshold if metric == "entropy" else value >= threshold


def rule_passes(rule: Any, logits: Any, confidence: Confidence, history: LabelHistory, xp: Any = np) -> Any:
    """(n,) bool: the rows ``rule`` lets leave at this exit. ``logits`` (n, C) are temperature-scaled,
    ``confidence`` their figures, ``history`` already ``after`` this exit's labels."""
    value = rule_value(rule, confidence, history, xp)
    passes = passes_threshold(value, rule.metric, rule.threshold, confidence.label, xp)
    return passes & rule_gate(rule, logits, confidence, xp)


def is_plain(rule: Any) -> bool:
    """A rule the confidence kernel decides alone: a kernel metric, no patience, no novelty gate."""
    gated = rule.energy_limit is not None or rule.distance_limit is not None
    return rule.metric in METRICS and not rule.patience and not gated
