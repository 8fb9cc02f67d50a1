"""Confidence of one exit's logits: softmax, entropy, top-2 margin and argmax in one pass.

Three implementations share one contract:

- ``confidence_reference``: float64 NumPy, the ground truth the others are checked against.
- ``compute_confidence``: the array-module (``xp``) version the cascade runs on the CPU (NumPy).
- the CUDA kernel in ``confidence.cu`` with its CuPy launcher, which the cascade runs on the GPU.

Contract, per row ``z = logits / temperature`` (divided in float32 everywhere, then accumulated in
float32 on the serving paths and in float64 in the reference):

- ``max_prob = softmax(z)[argmax]``, through log-sum-exp so peaked and flat rows are stable.
- ``entropy = lse(z) - sum_i softmax(z)_i * z_i`` (natural log, nats).
- ``margin = p_top1 - p_top2`` (probabilities, so it lies in [0, 1]; 1 - 0 for a single class).
- ``label`` = the first index of the maximum (lowest index wins a tie).
- A row with any non-finite logit (NaN, +Inf, -Inf) is invalid: its three figures are NaN, its
  label is -1, and it never exits before the last exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("max_prob", "entropy", "margin")


@dataclass(frozen=True)
class Confidence:
    """Per-row confidence of one exit; every field has the batch as its only axis."""

    max_prob: Any  # (B,) float32 (float64 in the reference)
    entropy: Any  # (B,)
    margin: Any  # (B,)
    label: Any  # (B,) int64, -1 for an invalid row

    @property
    def valid(self) -> Any:
        """Rows whose logits were all finite."""
        return self.label >= 0

    def select(self, rows: Any) -> Confidence:
        """The confidence of a subset of rows (a boolean mask or an index array)."""
        return Confidence(self.max_prob[rows], self.entropy[rows], self.margin[rows], self.label[rows])

    def stacked(self, xp: Any = np) -> Any:
        """(B, 3) float32: max-prob, entropy, margin, the tensor contract's CONFIDENCE."""
        return xp.stack([self.max_prob, self.entropy, self.margin], axis=1).astype(xp.float32)


def _confidence(logits: Any, temperature: float, xp: Any, dtype: Any) -> Confidence:
    # z is rounded to float32 on every path, the reference included, so that all three agree on
    # which logit is largest and on which rows overflow; only what follows is float64 there. Dividing
    # by 1 is exact, so it is skipped: the cascade hands logits it has already scaled.
    z = logits.astype(xp.float32)
    if temperature != 1.0:
        z = z / xp.float32(temperature)
    z = z.astype(dtype, copy=False)  # (B, C)
    batch, num_classes = z.shape
    finite = xp.isfinite(z).all(axis=1)  # (B,)
    # On NumPy the common case, every row finite, skips the masking; CuPy masks always (asking
    # would wait for the device).
    all_finite = xp is np and bool(finite.all())
    if not all_finite:
        # Invalid rows are computed on zeros so that no NaN or overflow warning leaks out of them.
        z = xp.where(finite[:, None], z, dtype(0))
    label = xp.argmax(z, axis=1)  # (B,) first maximum wins
    shifted = z - z.max(axis=1, keepdims=True)  # (B, C) <= 0, 0 at the top
    weights = xp.exp(shifted)  # (B, C)
    total = weights.sum(axis=1)  # (B,) >= 1
    max_prob = 1.0 / total
    # entropy = log(total) - sum(p_i * shifted_i): the top-1 shift cancels out of lse - E[z].
    entropy = xp.maximum(xp.log(total) - (weights * shifted).sum(axis=1) / total, dtype(0))
    if num_classes > 1:
        # The second largest shifted logit (0 again where the top is tied), as exp(z_2 - z_1).
        second = xp.exp(xp.partition(shifted, num_classes - 2, axis=1)[:, num_classes - 2])  # (B,)
        margin = (1.0 - second) / total
    else:
        margin = xp.ones(batch, dtype=dtype)
    if all_finite:
        return Confidence(
            max_prob.astype(dtype, copy=False),
            entropy.astype(dtype, copy=False),
            margin.astype(dtype, copy=False),
            label.astype(xp.int64, copy=False),
        )
    nan = dtype(np.nan)
    return Confidence(
        max_prob=xp.where(finite, max_prob, nan).astype(dtype),
        entropy=xp.where(finite, entropy, nan).astype(dtype),
        margin=xp.where(finite, margin, nan).astype(dtype),
        label=xp.where(finite, label, -1).astype(xp.int64),
    )


def compute_confidence(logits: Any, temperature: float = 1.0, xp: Any = np) -> Confidence:
    """Serving-path confidence in float32 for logits of shape (B, C) on module ``xp``."""
    return _confidence(logits, temperature, xp, xp.float32)


def confidence_reference(logits: np.ndarray, temperature: float = 1.0) -> Confidence:
    """Float64 NumPy ground truth for the kernels and for ``compute_confidence``."""
    return _confidence(np.asarray(logits), temperature, np, np.float64)


def exits_by_threshold(confidence: Confidence, metric: str, threshold: Any, xp: Any = np) -> Any:
    """Rows whose confidence passes ``threshold`` for ``metric``; invalid rows never pass.

    ``threshold`` is a scalar or a per-class vector of shape (C,) indexed by the row's label.
    max_prob and margin pass at or above the threshold, entropy at or below it.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown exit metric {metric!r}; expected one of {METRICS}")
    threshold = xp.asarray(threshold, dtype=xp.float32)
    if threshold.ndim == 1:
        threshold = threshold[xp.maximum(confidence.label, 0)]  # (B,)
    value = getattr(confidence, metric)
    passes = value <= threshold if metric == "entropy" else value >= threshold
    return passes & confidence.valid
