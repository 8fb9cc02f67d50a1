"""The anytime-valid risk test (offramp.backend.sequential) on simulated streams of shadow checks: its
false-alarm rate on healthy streams checked continuously, how soon it flags a policy at twice its
epsilon with 1% of rows checked, and how it clears."""

from __future__ import annotations

import math

import numpy as np
import pytest

from offramp.backend.sequential import ABOVE, BELOW, AlarmConfig, Bets, EProcess, Observations, RiskAlarm

RATES = (0.01, 0.05, 0.25, 1.0)


def observations(rng: np.random.Generator, rows: int, risk: float, rate: float) -> Observations:
    """``rows`` rows with disagreement probability ``risk``, each checked with probability ``rate``:
    Z = D / q where checked, 0 elsewhere (the view ShadowChecks hands the test)."""
    disagree = rng.random(rows) < risk
    checked = rng.random(rows) < rate
    nonzero = np.full(int((disagree & checked).sum()), 1.0 / rate)
    return Observations(nonzero, rows - len(nonzero), bet_scale=rate, z_max=1.0 / rate)


def rows_until(alarm: RiskAlarm, change: str, stream, limit: int) -> int | None:
    """Feeds the stream's batches until the alarm reports ``change``; the rows it took, or None."""
    rows = 0
    while rows < limit:
        observed = next(stream)
        rows += observed.rows
        if alarm.advance(alarm.growth(observed), observed.rows) == change:
            return rows
    return None


def stream(rng: np.random.Generator, risk: float, rate: float, batch: int):
    while True:
        yield observations(rng, batch, risk, rate)


def test_each_bet_keeps_the_wealth_positive_and_refuses_a_bad_bound():
    bets = Bets.against(ABOVE, 0.05)
    # The worst case for "above": every row checked at the smallest rate and none disagreeing.
    worst = bets.log_growth(Observations(np.array([]), 10_000, bet_scale=1.0))
    assert np.isfinite(worst).all()
    below = Bets.against(BELOW, 0.05)
    assert np.isfinite(below.log_growth(Observations(np.full(100, 100.0), 0, z_max=100.0))).all()
    with pytest.raises(ValueError, match="z_max"):
        below.log_growth(Observations(np.array([200.0]), 0, z_max=100.0))
    with pytest.raises(ValueError, match="bet scale"):
        bets.log_growth(Observations(np.array([]), 1, bet_scale=0.0))


def test_evidence_is_additive_over_parts_of_one_stream():
    """Instances add their log-growth: the two halves of a stream give what the whole gives."""
    rng = np.random.default_rng(0)
    alarm = RiskAlarm(AlarmConfig(0.05))
    first, second = observations(rng, 500, 0.1, 0.25), observations(rng, 700, 0.1, 0.25)
    whole = Observations(
        np.concatenate([first.nonzero, second.nonzero]), first.zeros + second.zeros, 0.25, 4.0
    )
    for direction in (ABOVE, BELOW):
        parts = alarm.growth(first)[direction] + alarm.growth(second)[direction]
        np.testing.assert_allclose(parts, alarm.growth(whole)[direction], rtol=1e-12)


def test_healthy_streams_watched_continuously_raise_at_most_alpha_false_alarms():
    """Streams at the risk epsilon itself (the hardest healthy case) and below, with a checking rate
    drawn per run and redrawn mid-stream (the boosts), events restarting the wealth at random times, and
    the alarm looked at after every batch of 200 rows. Ville's inequality bounds the share of runs
    that ever alarm by alpha = 0.2 (a large alpha, so the bound is tested where it has room to fail).

    The margin: with N runs the count of false alarms is Binomial(N, p), p <= alpha; the bound allows
    3 standard deviations above alpha N (a valid test fails this check with probability under 0.3%).
    The same streams watched by a naive test (a one-sided z-test at level alpha of the running mean
    against epsilon, looked at after every batch) do exceed the bound: the harness can tell an invalid
    test from a valid one.
    """
    rng = np.random.default_rng(20)
    alpha, runs, rows, batch = 0.2, 60, 60_000, 200
    false_alarms = naive_alarms = 0
    for run in range(runs):
        epsilon = float(rng.choice([0.02, 0.05, 0.1]))
        risk = epsilon if run % 3 else epsilon / 2
        alarm = RiskAlarm(AlarmConfig(epsilon, alpha=alpha, restart_rows=500))
        total = naive_raised = raised = 0
        z_sum = z_sq = 0.0
        rate = float(rng.choice(RATES))
        for _ in range(rows // batch):
            if rng.random() < 0.05:  # a boost begins or ends
                rate = float(rng.choice(RATES))
            if rng.random() < 0.01:  # the drift monitor reports a move
                alarm.event()
            observed = observations(rng, batch, risk, rate)
            raised |= alarm.advance(alarm.growth(observed), observed.rows) == "raised"
            total += observed.rows
            z_sum += observed.nonzero.sum()
            z_sq += (observed.nonzero**2).sum()
            mean = z_sum / total
            sd = math.sqrt(max(z_sq / total - mean**2, 1e-12) / total)
            naive_raised |= total >= 1000 and (mean - epsilon) / sd > 0.8416  # one-sided at level alpha
            if raised and naive_raised:
                break
        false_alarms += raised
        naive_alarms += naive_raised
    bound = alpha * runs + 3 * math.sqrt(runs * alpha * (1 - alpha))
    assert false_alarms <= bound, (false_alarms, naive_alarms, runs)
    assert naive_alarms > bound, (naive_alarms, false_alarms, runs)


def test_twice_epsilon_with_one_percent_checks_is_flagged():
    """epsilon 0.05, live risk 0.1, 1% of rows checked: the rows until the alarm, over 20 runs.

    Bound: the best bet of the grid near rho = 1/16 grows the log-wealth by about 2 eps q log(1 +
    rho/eps) - rho q = 1.9e-4 per row, and the alarm needs log(1/alpha) + log(grid size) + log(1 /
    first weight) = 3.0 + 1.8 + 1.4 = 6.2 nats: about 33,000 rows on average by Wald's identity. Every
    run must raise within 200,000 rows (6x that) and the median within 50,000 (the random walk's
    spread makes the median earlier than the mean; 50,000 leaves half again over the mean)."""
    rng = np.random.default_rng(7)
    taken = [
        rows_until(RiskAlarm(AlarmConfig(0.05)), "raised", stream(rng, 0.1, 0.01, 100), 200_000)
        for _ in range(20)
    ]
    assert None not in taken, taken
    assert np.median(taken) <= 50_000, sorted(taken)


def test_a_sudden_shift_after_a_long_healthy_run_is_flagged_soon():
    """100,000 rows with no disagreement grind the first start's wealth down; the periodic restarts
    (every 500 rows) keep a fresh one near, so a jump to a risk of 0.5 with a quarter of rows checked
    (boosted checks) is flagged within 1,000 rows: the start made at most 500 rows before the shift
    needs log(1 / (alpha w)) = 3.0 + log(2 * 201 * 202) = 14.3 nats, and each checked disagreement
    brings about log(1 + 0.5 / 0.05) = 2.4 of them, at 0.125 disagreements checked per row."""
    rng = np.random.default_rng(3)
    alarm = RiskAlarm(AlarmConfig(0.05))
    assert rows_until(alarm, "raised", stream(rng, 0.0, 0.25, 100), 100_000) is None
    assert rows_until(alarm, "raised", stream(rng, 0.5, 0.25, 50), 1000) is not None


def test_an_alarm_clears_when_the_risk_is_back_below_epsilon_and_not_while_above():
    rng = np.random.default_rng(11)
    alarm = RiskAlarm(AlarmConfig(0.05))
    assert rows_until(alarm, "raised", stream(rng, 0.5, 1.0, 50), 2000) is not None
    assert alarm.raised and alarm.alarms == 1
    # Still above epsilon (conservative mode checks every row): no clear over 20,000 rows.
    assert rows_until(alarm, "cleared", stream(rng, 0.08, 1.0, 100), 20_000) is None
    # Back to a healthy policy: cleared within 2,000 rows (each row of risk 0.01 grows the best bet's
    # log-wealth by about 0.03 nats, and the clear needs about 3.0 + log 6 = 4.8 nats: ~160 rows).
    assert rows_until(alarm, "cleared", stream(rng, 0.01, 1.0, 100), 2000) is not None
    assert not alarm.raised


def test_restarts_weigh_late_starts_less():
    process = EProcess(Bets.against(ABOVE, 0.05), restart_rows=100)
    process.advance(np.zeros(len(process.bets.rhos)), 1000)
    assert process.starts == {"event": 0, "periodic": 11}
    process.start("event")
    # No growth yet: the evidence is the sum of the weights made so far, under 1.
    weights = 0.5 / 2 + sum(0.5 / (i * (i + 1)) for i in range(1, 12))
    assert process.log_value == pytest.approx(math.log(weights))
