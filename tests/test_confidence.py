"""The serving-path confidence (float32, any array module) against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from offramp.kernels.confidence import compute_confidence, confidence_reference, exits_by_threshold


def logits_zoo(rng: np.random.Generator) -> np.ndarray:
    """Peaked, flat, outlier-heavy, tied and wide rows: flat logits alone hide entropy and margin bugs."""
    rows = [
        rng.normal(0, 1, 10),
        np.full(10, 3.0),  # flat: max entropy, zero margin
        np.r_[80.0, rng.normal(0, 1, 9)],  # peaked: probability 1 in float32
        np.r_[rng.normal(0, 1, 9), 1e4],  # outlier
        np.r_[5.0, 5.0, rng.normal(0, 1, 8)],  # a tie: the lower index wins
        rng.standard_cauchy(10) * 20,  # heavy tails
        np.r_[-1e4, rng.normal(0, 1, 9)],
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_float32_path_matches_the_float64_reference(temperature):
    logits = logits_zoo(np.random.default_rng(0))
    got, want = compute_confidence(logits, temperature), confidence_reference(logits, temperature)
    np.testing.assert_array_equal(got.label, want.label)
    # float32 accumulation over 10 classes: relative error ~1e-6; entropy near 0 needs an absolute bound.
    np.testing.assert_allclose(got.max_prob, want.max_prob, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.margin, want.margin, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)


def test_known_values():
    c = confidence_reference(np.array([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0]]))
    np.testing.assert_allclose(c.max_prob, [0.25, np.exp(5) / (2 * np.exp(5) + 2)])
    np.testing.assert_allclose(c.entropy[0], np.log(4))
    np.testing.assert_allclose(c.margin, [0.0, 0.0])
    np.testing.assert_array_equal(c.label, [0, 0])


def test_non_finite_rows_are_invalid_and_never_pass():
    logits = np.array(
        [[1.0, np.nan, 0.0], [np.inf, 0.0, 0.0], [-np.inf, 0.0, 0.0], [9.0, 0.0, 0.0]], np.float32
    )
    c = compute_confidence(logits)
    np.testing.assert_array_equal(c.label, [-1, -1, -1, 0])
    assert np.isnan(c.max_prob[:3]).all() and np.isnan(c.entropy[:3]).all() and np.isnan(c.margin[:3]).all()
    for metric, threshold in [("max_prob", 0.0), ("margin", 0.0), ("entropy", 99.0)]:
        np.testing.assert_array_equal(exits_by_threshold(c, metric, threshold), [False, False, False, True])


def test_thresholds_per_class_follow_the_row_label():
    c = compute_confidence(np.array([[4.0, 0.0], [0.0, 4.0]], np.float32))
    np.testing.assert_array_equal(exits_by_threshold(c, "max_prob", [0.5, 0.999]), [True, False])
    np.testing.assert_array_equal(exits_by_threshold(c, "entropy", [0.0, 1.0]), [False, True])
    with pytest.raises(ValueError, match="unknown exit metric"):
        exits_by_threshold(c, "energy", 0.5)
