"""The cost model and the certified exit sets of ``offramp tune`` (pure logic, no server)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from offramp.build.exit_selection import (
    TUNED_RULES,
    CallCost,
    Candidate,
    ServingCosts,
    calibrated_set,
    choose,
    cpu_per_row,
    estimated_candidates,
    exit_sets,
    segment_ranges,
    selection_split,
    survival,
)
from offramp.build.risk_control import LearnThenTest
from offramp.client.tools.bench_summary import FORWARD_FULL, FULL, SEGMENTS_FULL
from offramp.client.tools.tune import ArmCost, serving_costs


def test_call_cost_fit_recovers_a_line_and_keeps_terms_non_negative() -> None:
    rows = [1, 8, 16, 32]
    fitted = CallCost.fit(rows, [0.002 + 0.0005 * r for r in rows])
    assert fitted.per_call == pytest.approx(0.002)
    assert fitted.per_row == pytest.approx(0.0005)
    # Noise that puts the intercept below zero: a line through the origin instead.
    through_origin = CallCost.fit([1, 2, 4], [0.0009, 0.0021, 0.0041])
    assert through_origin.per_call == 0.0 and through_origin.per_row > 0
    with pytest.raises(ValueError, match="two or more batch sizes"):
        CallCost.fit([8, 8], [0.1, 0.1])


def test_ranges_and_survival() -> None:
    assert segment_ranges((2,)) == [(0, 2)]
    assert segment_ranges((0, 2, 5)) == [(0, 0), (1, 2), (3, 5)]
    assert survival((0.5, 0.3, 0.2)) == pytest.approx((1.0, 0.5, 0.2))


def test_exit_sets_all_end_at_the_last_exit_and_respect_the_limit() -> None:
    sets = exit_sets(4)
    assert len(sets) == 8 and all(s[-1] == 3 for s in sets) and sets[0] == (3,)
    assert len(set(sets)) == len(sets)
    # 12 exits, 2^11 sets: cut at the largest whole number of early exits within the limit.
    assert len(exit_sets(12, limit=64)) == 1 + 11  # 55 pairs more would pass 64
    assert len(exit_sets(12, limit=70)) == 1 + 11 + 55


def _costs(**overrides: float) -> ServingCosts:
    ranges = {
        (a, b): CallCost(0.001 * (b - a + 1), 0.0001 * (b - a + 1)) for a in range(3) for b in range(a, 3)
    }
    values = {
        "hop": 0.003,
        "request": 0.002,
        "exit": 0.0005,
        "full_per_row": 0.0006,
        "rows_per_execute": 16.0,
    }
    values.update(overrides)
    return ServingCosts(ranges=ranges, **values)


def test_cpu_per_row_by_hand() -> None:
    costs = _costs()
    # Exits (0, 2): 16 rows enter segment 0; half of them segments 1-2 merged.
    n, half = 16.0, 0.5
    called = 1 - (1 - half) ** n
    expected = (
        0.002
        + (0.003 + 0.001 + 0.0005) + 0.0001 * n
        + called * (0.003 + 0.002 + 0.0005) + 0.0002 * n * half
    ) / n  # fmt: skip
    assert cpu_per_row((0, 2), (1.0, half), "bls", costs) == pytest.approx(expected)
    in_process = cpu_per_row((0, 2), (1.0, half), "in_process", costs)
    assert in_process == pytest.approx(expected - (0.003 + called * 0.003) / n)
    # A segment no row enters costs nothing.
    assert cpu_per_row((0, 2), (1.0, 0.0), "bls", costs) == pytest.approx(
        (0.002 + 0.003 + 0.001 + 0.0005 + 0.0001 * n) / n
    )
    with pytest.raises(ValueError, match="segment mode"):
        cpu_per_row((2,), (1.0,), "grpc", costs)


def test_the_last_exit_alone_never_costs_less_than_the_full_model_and_its_exit() -> None:
    # The whole network timed in process far under the full model served (two measures of one network
    # that differ): it is the same network with an orchestrator around it, so the full model's CPU per
    # row plus the exit's evaluation (and the hop over BLS) is its floor.
    costs = _costs(full_per_row=0.005)
    n = costs.rows_per_execute
    assert cpu_per_row((2,), (1.0,), "in_process", costs) == pytest.approx(0.005 + 0.0005 / n)
    assert cpu_per_row((2,), (1.0,), "bls", costs) == pytest.approx(0.005 + (0.003 + 0.0005) / n)
    assert choose([Candidate((2,), None, (1.0,))], costs).serves_full_model  # type: ignore[arg-type]
    # Where the model says more, the model stands.
    cheap = _costs(full_per_row=0.0001)
    assert cpu_per_row((2,), (1.0,), "in_process", cheap) == pytest.approx(
        (0.002 + 0.003 + 0.0005) / n + 0.0003
    )


def _logits(rows: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three exits, each the last exit's logits plus less noise: (3, N, 4) logits and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, rows)
    last = rng.normal(size=(rows, 4))
    last[np.arange(rows), labels] += rng.uniform(0, 8, rows)  # easy rows and hard ones
    exits = [last + rng.normal(scale=noise, size=last.shape) for noise in (1.0, 0.5)] + [last]
    return np.stack(exits).astype(np.float32), labels


def test_sets_are_estimated_on_the_selection_rows_and_the_pick_certified_on_the_rest() -> None:
    logits, labels = _logits()
    select, certify = selection_split(len(labels))
    assert len(select) == round(len(labels) / 3) and not set(select) & set(certify)
    assert len(select) + len(certify) == len(labels)
    sets = exit_sets(3)
    candidates = estimated_candidates(logits[:, select], (0.3, 0.6, 1.0), labels[select], 0.02, sets)
    # Each set under each data-free family; the last exit alone once (no family changes what it does).
    assert [(c.kept, c.rule) for c in candidates] == [
        (kept, rule) for kept in sets for rule in (TUNED_RULES if len(kept) > 1 else TUNED_RULES[:1])
    ]
    assert {c.rule for c in candidates} == {"confidence", "patience"}
    for candidate in candidates:
        assert candidate.calibrated.method == "empirical_search" and candidate.entering[0] == 1.0
        assert len(candidate.entering) == len(candidate.kept)
    assert next(c for c in candidates if c.kept == (2,)).expected_compute == pytest.approx(1.0)
    assert any(c.expected_compute < 0.9 for c in candidates)  # some set leaves early here
    pick = calibrated_set(
        logits[:, certify], (0.3, 0.6, 1.0), labels[certify], (0, 2), LearnThenTest(0.02, 0.05)
    )
    assert pick.calibrated.method == "learn_then_test" and pick.calibrated.delta == 0.05
    assert pick.expected_compute < 1.0  # certified on its own rows at the full delta, it still exits
    patient = calibrated_set(
        logits[:, certify], (0.3, 0.6, 1.0), labels[certify], (0, 1, 2), LearnThenTest(0.02, 0.05), "patience"
    )
    assert patient.rule == "patience" and all(r.patience for r in patient.calibrated.rules()[:-1])


def test_an_accuracy_bound_is_estimated_and_certified_with_the_disagreement() -> None:
    """``offramp tune --max-accuracy-loss``: the estimates rank the sets under both bounds, and the pick is
    certified under both; a bound tighter than the disagreement's only ever costs compute."""
    logits, labels = _logits()
    select, certify = selection_split(len(labels))
    sets = exit_sets(3)
    plain = estimated_candidates(logits[:, select], (0.3, 0.6, 1.0), labels[select], 0.05, sets)
    bounded = estimated_candidates(
        logits[:, select], (0.3, 0.6, 1.0), labels[select], 0.05, sets, max_accuracy_loss=0.01
    )
    assert [c.kept for c in bounded] == [c.kept for c in plain]
    assert all(b.expected_compute >= p.expected_compute for b, p in zip(bounded, plain, strict=True))
    assert any(b.expected_compute > p.expected_compute for b, p in zip(bounded, plain, strict=True))
    pick = calibrated_set(
        logits[:, certify], (0.3, 0.6, 1.0), labels[certify], (0, 2), LearnThenTest(0.05, 0.05),
        max_accuracy_loss=0.01,
    )  # fmt: skip
    assert pick.calibrated.max_accuracy_loss == 0.01
    assert pick.calibrated.result.accuracy_loss <= 0.01


def test_choose_ranks_by_cpu_and_falls_back_to_the_full_model_when_hops_cost_too_much() -> None:
    early = Candidate((0, 2), None, (1.0, 0.2))  # type: ignore[arg-type]
    last = Candidate((2,), None, (1.0,))  # type: ignore[arg-type]
    cheap_hops = choose([early, last], _costs(hop=0.0001, full_per_row=0.0006))
    assert cheap_hops.best[0] is early and not cheap_hops.serves_full_model
    assert cheap_hops.predicted_speedup > 1
    assert [cpu for _, _, cpu in cheap_hops.ranked] == sorted(cpu for _, _, cpu in cheap_hops.ranked)
    dear = choose([early, last], _costs(hop=0.05, request=0.05, full_per_row=0.0003), ("bls",))
    assert dear.serves_full_model and dear.predicted_speedup < 1


def test_serving_costs_solve_for_the_hop_and_the_fixed_cost() -> None:
    """Arms made from known costs give those costs back: the algebra of the tune module's doc."""
    ranges = {(a, b): CallCost(0.001, 0.0002 * (b - a + 1)) for a in range(3) for b in range(a, 3)}
    full = CallCost(0.001, 0.0005)
    hop, request, exit_cost, n = 0.004, 0.003, 0.0002, 20.0
    through = request + 3 * (hop + exit_cost) + sum(ranges[(k, k)].of(n) for k in range(3))
    forward = request + hop + full.of(n)
    arms = {
        SEGMENTS_FULL: ArmCost(through, through / n, n, 3 * exit_cost),
        FORWARD_FULL: ArmCost(forward, forward / n, n, 0.0),
        FULL: ArmCost(0.01, 0.0007, n, 0.0),
    }
    costs, notes = serving_costs(ranges, full, arms, 3)
    assert notes == []
    assert costs.hop == pytest.approx(hop) and costs.request == pytest.approx(request)
    assert costs.exit == pytest.approx(exit_cost) and costs.full_per_row == 0.0007
    # Noise that makes a figure negative: zero, with a note saying so.
    cheap_through = replace_cpu(arms, SEGMENTS_FULL, forward)
    costs, notes = serving_costs(ranges, full, cheap_through, 3)
    assert costs.hop == 0.0 and any("BLS hop" in n for n in notes)
    assert math.isfinite(costs.request)


def replace_cpu(arms: dict, key: str, cpu: float) -> dict:
    arm = arms[key]
    return {
        **arms,
        key: ArmCost(cpu, cpu / arm.rows_per_execute, arm.rows_per_execute, arm.cascade_per_execute),
    }


def test_tune_refuses_a_folder_that_is_not_a_build(tmp_path, capsys) -> None:
    from offramp.client.tools.tune import TuneConfig, main_tune

    assert main_tune(TuneConfig(artifacts=tmp_path)) == 1
    error = capsys.readouterr().err
    assert error == f"offramp tune: error: {tmp_path} holds no manifest.json: pass a build's folder " + (
        "(offramp build prints it)\n"
    )
