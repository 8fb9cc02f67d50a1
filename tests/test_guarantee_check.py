"""The guarantee checked by calibration draws (``build/guarantee_check.py``) on the quick CNN's real exit
logits: a Learn-then-Test ladder keeps every rung within its epsilon in all but delta of the draws, and
the same check finds a search without a guarantee broken, so it can fail."""

from __future__ import annotations

import numpy as np
import pytest

from offramp.build.calibrate import CalibrationSettings, calibrate_logits, rung_figures, simulate_exits
from offramp.build.guarantee_check import check_guarantee
from offramp.client.cli.main import main

# 60 draws of 1,000 rows from the 10,000 test images: each draw is a whole calibration (the fit split,
# temperatures, the path, the tests), about a tenth of a second here.
DRAWS, DRAW_ROWS = 60, 1000


def test_every_rung_of_a_certified_ladder_holds_in_all_but_delta_of_the_draws(real_exits):
    logits, labels, costs = real_exits
    settings = CalibrationSettings(epsilon=0.02, delta=0.1, ladder=(0.05, 0.1))
    check = check_guarantee(logits, tuple(costs), labels, settings, DRAWS, DRAW_ROWS, seed=5)
    print("\n" + "\n".join(check.lines()))
    assert [r.epsilon for r in check.rungs] == [0.02, 0.05, 0.1]
    assert check.holds and check.violation_rate <= settings.delta + check.sampling_error
    # The rungs spend less as they allow more, draw by draw (each rung's candidates include the lower's).
    compute = np.stack([r.compute for r in check.rungs])  # (rungs, draws)
    assert (np.diff(compute, axis=0) <= 1e-12).all()


def test_a_search_without_a_guarantee_is_found_broken(real_exits):
    """The empirical search keeps the cheapest candidate whose risk on the draw is within epsilon: its
    risk on the population passes epsilon in about half the draws, which the check must report."""
    logits, labels, costs = real_exits
    settings = CalibrationSettings(epsilon=0.02, delta=0.1, method="empirical")
    check = check_guarantee(logits, tuple(costs), labels, settings, DRAWS, DRAW_ROWS, seed=5)
    print("\n" + "\n".join(check.lines()))
    assert not check.holds and "DOES NOT HOLD" in check.lines()[1]


def test_rung_figures_count_what_the_rows_answered(real_exits):
    """Disagreement, accuracy and the accuracy loss of a rung, against the same figures counted here."""
    logits, labels, costs = real_exits
    settings = CalibrationSettings(epsilon=0.05, delta=0.1)
    rows = slice(0, 2000)
    policy, _ = calibrate_logits(logits[:, rows], costs, "fingerprint", labels[rows], None, settings)
    (figures,) = rung_figures(policy, logits, costs, labels)
    taken = simulate_exits(logits, policy.exits)
    answer = logits[taken, np.arange(len(labels))].argmax(axis=1)
    full = logits[-1].argmax(axis=1)
    assert figures.disagreement == pytest.approx((answer != full).mean())
    assert figures.accuracy == pytest.approx((answer == labels).mean())
    assert figures.accuracy_loss == pytest.approx(((answer != labels) & (full == labels)).mean())
    (net,) = rung_figures(policy, logits, costs, labels, "error_increase_net")
    assert net.risk == pytest.approx((full == labels).mean() - (answer == labels).mean())
    assert figures.compute == pytest.approx(np.asarray(costs)[taken].mean())


def test_calibrate_judges_every_rung_and_checks_the_guarantee(quick_cnn, tmp_path, capsys):
    """`offramp calibrate --ladder ... --evaluate-test --check-draws N` prints each rung on the test split
    and the check's verdict; a bad draw count is refused before any row runs."""
    _, directory = quick_cnn
    common = ["calibrate", "--artifacts", str(directory), "--out", str(tmp_path / "p.json"), "--quiet"]
    assert main([*common, "--check-draws", "0"]) == 2
    assert "--check-draws needs at least 1 draw" in capsys.readouterr().err
    assert main([*common, "--evaluate-test", "--evaluate-data", "x.csv"]) == 2
    assert "--evaluate-test or --evaluate-data" in capsys.readouterr().err
    args = [*common, "--epsilon", "0.02", "--delta", "0.1", "--ladder", "0.05", "--evaluate-test"]
    assert main([*args, "--check-draws", "5"]) == 0
    out = capsys.readouterr().out
    assert "test split (" in out and "test split, rung 1 (epsilon 0.05): disagreement with full" in out
    assert "guarantee check: 5 calibration draws of" in out
    assert "rung 0 (epsilon 0.02): broken in" in out and "rung 1 (epsilon 0.05): broken in" in out
