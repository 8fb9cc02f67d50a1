"""The cascade on NumPy with a fake network: exits, compaction, scatter, per-row constraints."""

from __future__ import annotations

import numpy as np
import pytest

from offramp.backend.cascade import CascadeBatch, CascadeResult, run_cascade
from offramp.backend.contract import FLAG_DEADLINE, FLAG_DEPTH_CAP, FLAG_FORCED_FULL
from offramp.backend.policy import ExitRule, Policy
from tests.fakes import FakeNetwork

COSTS = (0.3, 0.6, 1.0)


def policy(
    threshold: float | tuple[float, ...] = 0.6, metric: str = "max_prob", route: str = "segments"
) -> Policy:
    return Policy("test", "fp", (ExitRule(metric, threshold),) * 3, full_depth_route=route)


def cascade(net: FakeNetwork, batch: CascadeBatch, pol: Policy, with_full: bool = False) -> CascadeResult:
    side = (net.side_input,) if net.side_input else ()
    return run_cascade(batch, net.run_segment, pol, COSTS, side, net.run_full if with_full else None)


def assert_same_rows(a: CascadeResult, b: CascadeResult, rows_of_a: slice | np.ndarray) -> None:
    for field in ("logits", "label", "exit", "confidence", "cost"):
        np.testing.assert_array_equal(getattr(a, field)[rows_of_a], getattr(b, field), err_msg=field)


def test_mixed_batch_exits_at_several_depths():
    net = FakeNetwork()
    result = cascade(net, CascadeBatch.plain(net.inputs(200), 3), policy(0.6))
    counts = np.bincount(result.exit, minlength=3)
    assert (counts > 0).all(), f"the fixture should exercise every exit, got {counts}"
    assert result.rows_per_segment == (200, 200 - counts[0], counts[2])
    np.testing.assert_array_equal(result.cost, np.asarray(COSTS, dtype=np.float32)[result.exit])


def test_a_row_is_the_same_alone_in_a_batch_and_after_compaction():
    net = FakeNetwork()
    inputs = net.inputs(64)
    together = cascade(net, CascadeBatch.plain(inputs, 3), policy(0.6))
    for row in range(64):
        alone = cascade(
            net, CascadeBatch.plain({k: v[row : row + 1] for k, v in inputs.items()}, 3), policy(0.6)
        )
        assert_same_rows(together, alone, slice(row, row + 1))
    # Reversed order: other batch-mates, other compaction positions, same answers.
    reverse = np.arange(63, -1, -1)
    reversed_result = cascade(
        net, CascadeBatch.plain({k: v[reverse] for k, v in inputs.items()}, 3), policy(0.6)
    )
    assert_same_rows(together, reversed_result, reverse)


def test_segments_see_only_the_survivors_in_their_original_order():
    net = FakeNetwork(side_input="ATTENTION_MASK")
    result = cascade(net, CascadeBatch.plain(net.inputs(100), 3), policy(0.6))
    ids = np.arange(100)
    for index, seen in enumerate(net.calls):
        np.testing.assert_array_equal(seen, ids[result.exit >= index])


def test_nobody_exits_early():
    net = FakeNetwork()
    result = cascade(net, CascadeBatch.plain(net.inputs(32), 3), policy(1.01))
    assert (result.exit == 2).all()
    assert result.rows_per_segment == (32, 32, 32)


def test_everyone_exits_at_the_first_exit():
    net = FakeNetwork()
    result = cascade(net, CascadeBatch.plain(net.inputs(32), 3), policy(0.0))
    assert (result.exit == 0).all()
    assert result.rows_per_segment == (32, 0, 0)
    assert len(net.calls) == 1


@pytest.mark.parametrize("metric,threshold", [("entropy", 0.8), ("margin", 0.4)])
def test_other_metrics_and_per_class_thresholds(metric, threshold):
    net = FakeNetwork()
    batch = CascadeBatch.plain(net.inputs(200), 3)
    scalar = cascade(net, batch, policy(threshold, metric))
    per_class = cascade(net, batch, policy((threshold,) * 4, metric))
    assert_same_rows(scalar, per_class, slice(None))
    assert 0 < (scalar.exit < 2).sum() < 200
    # Tightening one class's threshold can only keep rows of that class longer.
    strict = 0.0 if metric == "entropy" else 1.01
    stricter = cascade(net, batch, policy((strict, threshold, threshold, threshold), metric))
    class0 = (scalar.label == 0) & (scalar.exit < 2)
    assert (stricter.exit[class0] >= scalar.exit[class0]).all()


def test_forced_rows_never_exit_early_by_segments_or_by_the_full_model():
    net = FakeNetwork()
    inputs = net.inputs(40)
    base = CascadeBatch.plain(inputs, 3)
    force = np.arange(40) % 3 == 0
    batch = CascadeBatch(inputs, force, base.min_exit, base.max_exit)
    by_segments = cascade(net, batch, policy(0.0))
    assert (by_segments.exit[force] == 2).all() and (by_segments.exit[~force] == 0).all()
    by_full = cascade(net, batch, policy(0.0, route="full_model"), with_full=True)
    assert (by_full.exit[force] == 2).all() and (by_full.cost[force] == 1.0).all()
    np.testing.assert_allclose(by_full.logits[force], by_segments.logits[force], rtol=0, atol=0)


def test_rows_all_forced_to_the_full_model_run_no_segment():
    net = FakeNetwork()
    inputs = net.inputs(6)
    base = CascadeBatch.plain(inputs, 3)
    batch = CascadeBatch(inputs, np.ones(6, dtype=bool), base.min_exit, base.max_exit)
    result = cascade(net, batch, policy(0.0, route="full_model"), with_full=True)
    assert result.rows_per_segment == (0, 0, 0) and len(net.calls) == 3  # the full model's own three
    assert (result.exit == 2).all() and (result.cost == 1.0).all() and (result.policy_exit == -1).all()
    assert (result.flags == FLAG_FORCED_FULL).all()


def test_an_empty_batch_runs_no_segment():
    net = FakeNetwork()
    result = cascade(net, CascadeBatch.plain(net.inputs(0), 3), policy(0.6))
    assert result.rows_per_segment == (0, 0, 0) and not net.calls
    assert result.logits.shape == (0, 0) and result.exit.shape == result.policy_exit.shape == (0,)


def test_min_and_max_exit_bound_each_row():
    net = FakeNetwork()
    inputs = net.inputs(30)
    base = CascadeBatch.plain(inputs, 3)
    min_exit = np.where(np.arange(30) < 10, 1, 0)
    max_exit = np.where(np.arange(30) >= 20, 0, 2)
    batch = CascadeBatch(inputs, base.force_full, min_exit, max_exit)
    result = cascade(net, batch, policy(1.01))  # nobody is confident enough
    assert (result.exit[:20] == 2).all()
    assert (result.exit[20:] == 0).all()  # the depth cap answers regardless of confidence
    eager = cascade(net, batch, policy(0.0))  # everybody is confident
    assert (eager.exit[:10] == 1).all() and (eager.exit[10:] == 0).all()


def test_non_finite_logits_never_exit_early():
    net = FakeNetwork()
    original = net.run_segment

    def poisoned(index, tensors, need_hidden):
        hidden, logits = original(index, tensors, need_hidden)
        ids = (tensors["X"] if index == 0 else tensors["hidden_in"])[:, 0]
        logits[ids % 2 == 0, 1] = np.nan
        return hidden, logits

    result = run_cascade(CascadeBatch.plain(net.inputs(20), 3), poisoned, policy(0.0), COSTS)
    assert (result.exit[::2] == 2).all() and (result.label[::2] == -1).all()
    assert np.isnan(result.confidence[::2]).all()
    assert (result.exit[1::2] == 0).all()


def test_without_compaction_the_answers_are_the_same_but_the_whole_batch_runs_on():
    net = FakeNetwork()
    batch = CascadeBatch.plain(net.inputs(100), 3)
    compacted = cascade(net, batch, policy(0.6))
    whole = run_cascade(batch, FakeNetwork().run_segment, policy(0.6), COSTS, compact=False)
    assert_same_rows(compacted, whole, slice(None))
    assert whole.rows_per_segment == (100, 100, 100)
    assert compacted.rows_per_segment[2] < 100


def test_cohorts_use_their_own_rules_and_unknown_rows_the_global_ones():
    net = FakeNetwork()
    inputs = net.inputs(60)
    strict = (ExitRule("max_prob", 1.01, temperature=2.0),) * 3
    pol = Policy("p", "fp", (ExitRule("max_prob", 0.0),) * 3, cohorts={"high_risk": strict})
    base = CascadeBatch.plain(inputs, 3)
    rule_set = np.where(np.arange(60) % 2 == 0, 1, 0)
    result = run_cascade(
        CascadeBatch(inputs, base.force_full, base.min_exit, base.max_exit, rule_set=rule_set),
        net.run_segment,
        pol,
        COSTS,
    )
    assert (result.exit[0::2] == 2).all() and (result.exit[1::2] == 0).all()
    # The cohort's temperature scales its logits and confidence; the global rows keep theirs.
    alone = run_cascade(CascadeBatch.plain(inputs, 3), FakeNetwork().run_segment, policy(1.01), COSTS)
    np.testing.assert_allclose(result.logits[0::2], alone.logits[0::2] / 2.0, rtol=1e-6)


def test_a_passed_deadline_takes_the_next_exit_and_says_so():
    net = FakeNetwork()
    inputs = net.inputs(10)
    base = CascadeBatch.plain(inputs, 3)
    deadline = np.where(np.arange(10) < 5, 0.0, np.inf)  # half the rows are out of time already
    force = np.arange(10) == 0  # forced rows ignore deadlines
    batch = CascadeBatch(inputs, force, base.min_exit, base.max_exit, deadline=deadline)
    result = run_cascade(batch, net.run_segment, policy(1.01), COSTS, clock=lambda: 1.0)
    assert result.exit.tolist() == [2, 0, 0, 0, 0, 2, 2, 2, 2, 2]
    assert result.flags.tolist() == [FLAG_FORCED_FULL] + [FLAG_DEADLINE] * 4 + [0] * 5


def test_flags_say_why_a_row_answered():
    net = FakeNetwork()
    inputs = net.inputs(4)
    base = CascadeBatch.plain(inputs, 3)
    batch = CascadeBatch(inputs, base.force_full, base.min_exit, np.array([0, 1, 2, 2]))
    result = run_cascade(batch, net.run_segment, policy(1.01), COSTS)
    assert result.flags.tolist() == [FLAG_DEPTH_CAP, FLAG_DEPTH_CAP, 0, 0]
