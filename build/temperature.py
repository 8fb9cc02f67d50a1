"""Per-exit temperature scaling, expected calibration error and reliability-diagram bins.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides an exit's
logits by one positive scalar ``T`` fitted to minimise the negative log-likelihood of held-out labels.
It never changes a row's label (argmax), only how confident the exit says it is, so it moves which
rows pass a confidence threshold. Rows with a non-finite logit are invalid under the confidence
contract (``kernels/confidence.py``) and take no part in any fit or figure here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from offramp.kernels.confidence import confidence_reference

# The search interval for T: wide enough for any sane exit, narrow enough that a separable fit
# (NLL falling towards T -> 0) stops at a finite value, with a warning.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _finite_rows(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits (N, C) and labels (N,) expected, got {logits.shape} and {labels.shape}")
    keep = np.isfinite(logits).all(axis=1) & (labels >= 0) & (labels < logits.shape[1])
    return logits[keep].astype(np.float64), labels[keep].astype(np.int64)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL (nats) of ``labels`` under ``softmax(logits / temperature)``, over the finite rows."""
    z, y = _finite_rows(logits, labels)
    if len(y) == 0:
        raise ValueError("no finite rows to score")
    z = z / temperature  # (N, C)
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    tolerance: float = 1e-5,
) -> float:
    """The temperature minimising the NLL of one exit's logits (N, C) on ``labels`` (N,).

    A bounded Brent search over ``log T`` (``scipy.optimize.minimize_scalar``, deterministic). The
    NLL is convex in ``1 / T``, hence unimodal in ``log T``, so the search finds the global minimum
    within ``bounds``; an optimum on a bound is returned with a warning.
    """
    z, y = _finite_rows(logits, labels)
    if len(y) == 0:
        raise ValueError("no finite rows with a valid label to fit a temperature on")
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        return float(np.mean(logsumexp(scaled, axis=1) - scaled[rows, y]))

    low, high = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": tolerance})
    log_t = float(result.x)
    if min(log_t - low, high - log_t) < 10 * tolerance:
        warnings.warn(
            f"temperature fit ended on its bound ({math.exp(log_t):.4g} in {bounds}): the exit's "
            "logits are (nearly) separable or degenerate on these rows",
            RuntimeWarning,
            stacklevel=2,
        )
    return math.exp(log_t)


def fit_temperatures(exit_logits: np.ndarray, labels: np.ndarray) -> tuple[float, ...]:
    """One temperature per exit for logits (exits, N, C) on labels (N,), each fitted on its own."""
    return tuple(fit_temperature(exit_logits[k], labels) for k in range(exit_logits.shape[0]))


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width bins of max-prob confidence, the figures a reliability diagram draws."""

    edges: np.ndarray  # (B + 1,) from 0 to 1
    counts: np.ndarray  # (B,) rows per bin
    confidence: np.ndarray  # (B,) mean max-prob in the bin, NaN where empty
    accuracy: np.ndarray  # (B,) fraction correct in the bin, NaN where empty

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    def expected_calibration_error(self) -> float:
        """Sum over bins of (rows in bin / rows) * |accuracy - confidence|."""
        filled = self.counts > 0
        if not filled.any():
            return float("nan")
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.counts[filled] * gaps).sum() / self.counts.sum())


def reliability_bins(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = 15
) -> ReliabilityBins:
    """Reliability-diagram bins of logits (N, C) after ``temperature``, confidence = max-prob.

    Bins are (lo, hi], the first [0, hi]. Confidence comes from the float64 reference of the
    serving contract, so the diagram describes what the cascade thresholds.
    """
    z, y = _finite_rows(logits, labels)
    confidence = confidence_reference(z, temperature)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence.max_prob, side="left") - 1, 0, bins - 1)  # (N,)
    correct = (confidence.label == y).astype(np.float64)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence.max_prob, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
    return ReliabilityBins(edges=edges, counts=counts, confidence=mean_confidence, accuracy=accuracy)


def expected_calibration_error(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = 15
) -> float:
    """Expected calibration error (equal-width max-prob bins) of logits (N, C) after ``temperature``."""
    return reliability_bins(logits, labels, temperature, bins).expected_calibration_error()
