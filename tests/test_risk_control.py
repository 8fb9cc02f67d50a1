"""Calibrated exit policies: the Learn-then-Test guarantee in simulation on real exit logits, and the
procedure's contracts (monotone in epsilon, fallbacks, invalid rows, temperatures, p-values, policy form).

The simulation treats a pool of real Fashion-MNIST exit logits as the population: each calibration
set is drawn i.i.d. from it, and the risk of the chosen policy is the pool's (the population's) risk,
computed exactly. That is the guarantee as stated ("with probability >= 1 - delta over the calibration
sample, the risk is <= epsilon"). A held-out test half instead adds its own sampling noise (and, drawn
without replacement from a finite pool, is anti-correlated with the calibration half), which the
guarantee does not cover; that design is reported, not asserted.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings

import numpy as np
import pytest
from scipy.stats import binom

from offramp.backend.policy import RULE_FAMILIES, Policy
from offramp.build.calibrate import simulate_exits
from offramp.build.risk_control import (
    NEVER,
    CalibrationWarning,
    EmpiricalSearch,
    LearnThenTest,
    binomial_p_value,
    build_candidates,
    calibrate_exit_policy,
    candidate_losses,
    candidate_outcomes,
    certify,
    exit_evidence,
    exits_taken,
    fit_split,
    fitted_path,
    fixed_sequence_test,
    hoeffding_bentkus_p_value,
    shared_path,
    validated_calibration_rows,
    within_reach,
)
from offramp.build.rule_families import rule_template
from offramp.build.temperature import (
    expected_calibration_error,
    fit_temperature,
    fit_temperatures,
    negative_log_likelihood,
    reliability_bins,
)
from tests.fakes import synthetic_exits

EPSILON, DELTA = 0.05, 0.1
DRAWS, CALIBRATION_ROWS, MIN_GROUP_ROWS = 400, 2000, 50


# ---------------------------------------------------------------------------------------------
# (a) the guarantee, in simulation on real exit logits


@pytest.fixture(scope="module")
def population(real_exits):
    """Temperatures, the per-class path and each rule family's rules fitted on 2,000 rows; the other
    rows are the population. Paths: "global" (confidence), "per_class", and one shared path per
    other rule family, as ``build_candidates`` makes them."""
    logits, labels, costs = real_exits
    fit, pool = population_split(logits.shape[1])
    temperatures = fit_temperatures(logits[:, fit], labels[fit])
    paths = {
        "global": shared_path("max_prob", logits.shape[0], logits.shape[2]),
        "per_class": fitted_path(
            logits[:, fit], temperatures, "max_prob", per_class=True, fit_labels=labels[fit]
        ),
    }
    for family in RULE_FAMILIES[1:]:
        template = rule_template(family, "max_prob", logits[:, fit], temperatures)
        paths[family] = shared_path(template[0].metric, logits.shape[0], logits.shape[2], template=template)
    return logits[:, pool], costs, temperatures, paths


def population_split(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, pool) row indices of the real exits: what fits rules and temperatures, and the population."""
    return fit_split(rows, 0.2, seed=1)


@pytest.fixture(scope="module")
def population_labels(real_exits):
    """(N,) the true labels of the population's rows."""
    logits, labels, _ = real_exits
    return labels[population_split(logits.shape[1])[1]]


def draw_weights(rows: int, draws: int, size: int, seed: int) -> np.ndarray:
    """(draws, rows) multiplicities of ``size`` rows drawn i.i.d. (with replacement) per draw."""
    picks = np.random.default_rng(seed).integers(0, rows, (draws, size))
    flat = (picks + rows * np.arange(draws)[:, None]).ravel()
    return np.bincount(flat, minlength=draws * rows).reshape(draws, rows).astype(np.float64)


def split_weights(rows: int, draws: int, size: int, seed: int) -> np.ndarray:
    """(draws, rows) 0/1: ``size`` rows drawn without replacement per draw (the rest is its test half)."""
    order = np.argsort(np.random.default_rng(seed).random((draws, rows)), axis=1)
    weights = np.zeros((draws, rows))
    np.put_along_axis(weights, order[:, :size], 1.0, axis=1)
    return weights


def simulated_choices(
    loss: np.ndarray,
    cost: np.ndarray,
    weights: np.ndarray,
    groups: list[np.ndarray],
    epsilon: float = EPSILON,
    delta: float = DELTA,
    accuracy: tuple[np.ndarray, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates LTT (binomial, fixed sequence) and the empirical search choose, for every draw.

    ``loss``/``cost`` (K, N) per candidate and row, ``weights`` (S, N) the draws, ``groups`` boolean
    masks (N,) of extra groups that must each hold (class-conditional), tested where they have at
    least MIN_GROUP_ROWS rows; ``accuracy``: each row's accuracy loss (K, N) and its bound, held
    jointly. Mirrors ``calibrate_exit_policy`` in matrix form: (S,), (S,).
    """
    rows = weights.sum(axis=1, keepdims=True)  # (S, 1)
    mean_cost = weights @ cost.T / rows  # (S, K)
    p_values, empirical_ok = [], []
    for members in [np.ones(loss.shape[1], dtype=bool), *groups]:
        w = weights * members  # (S, N)
        count, losses = w.sum(axis=1, keepdims=True), w @ loss.T  # (S, 1), (S, K)
        tested = count >= MIN_GROUP_ROWS
        p_values.append(np.where(tested, binomial_p_value(losses, count, epsilon), 0.0))
        empirical_ok.append(~tested | (losses <= epsilon * count))
    if accuracy is not None:
        accuracy_loss, bound = accuracy
        count, losses = weights.sum(axis=1, keepdims=True), weights @ accuracy_loss.T  # (S, 1), (S, K)
        p_values.append(binomial_p_value(losses, count, bound))
        empirical_ok.append(losses <= bound * count)
    p = np.max(p_values, axis=0)
    p[:, 0] = 0.0
    certified = np.arange(loss.shape[0])[None, :] <= fixed_sequence_test(p, delta)[:, None]
    ok = np.all(empirical_ok, axis=0)
    ok[:, 0] = True
    ltt = np.where(certified, mean_cost, np.inf).argmin(axis=1)
    empirical = np.where(ok, mean_cost, np.inf).argmin(axis=1)
    return ltt, empirical


@pytest.mark.parametrize(
    "variant", ["global", "per_class_marginal", "per_class_conditional", *RULE_FAMILIES[1:]]
)
def test_learn_then_test_risk_exceeds_epsilon_in_at_most_delta_of_calibration_draws(population, variant):
    """The guarantee per rule family: "global" is the confidence family's shared path; patience, score
    and novelty are theirs, their rules fitted on rows outside the population."""
    logits, costs, temperatures, paths = population
    started = time.perf_counter()
    path = paths["per_class" if variant.startswith("per_class") else variant]
    evidence = exit_evidence(logits, temperatures, path.base_rules)
    taken = exits_taken(evidence, path)  # (K, N)
    loss = candidate_losses(taken, evidence.label)  # (K, N) disagreement with the last exit
    cost = costs[taken]  # (K, N)
    full = evidence.label[-1]
    classes = [full == c for c in range(logits.shape[2])] if variant == "per_class_conditional" else []

    weights = draw_weights(logits.shape[1], DRAWS, CALIBRATION_ROWS, seed=7)
    ltt, empirical = simulated_choices(loss, cost, weights, classes)
    # The population risk of every candidate; class-conditional: the worst of overall and each class.
    risk = np.max([loss.mean(axis=1)] + [loss[:, m].mean(axis=1) for m in classes], axis=0)  # (K,)
    ltt_rate, empirical_rate = float(np.mean(risk[ltt] > EPSILON)), float(np.mean(risk[empirical] > EPSILON))

    split = split_weights(logits.shape[1], DRAWS, CALIBRATION_ROWS, seed=8)
    split_ltt, split_empirical = simulated_choices(loss, cost, split, classes)
    rest = 1.0 - split
    test_risk = np.max(
        [rest @ loss.T / rest.sum(1, keepdims=True)]
        + [(rest * m) @ loss.T / (rest * m).sum(1, keepdims=True) for m in classes],
        axis=0,
    )  # (S, K)
    draws = np.arange(DRAWS)
    draw_cost = weights @ cost.T / CALIBRATION_ROWS  # (S, K)
    held_out = test_risk[draws, split_ltt] > EPSILON, test_risk[draws, split_empirical] > EPSILON
    print(
        f"\n{variant}: {len(path)} candidates, eps={EPSILON} delta={DELTA}, {DRAWS} draws of "
        f"{CALIBRATION_ROWS} rows from {logits.shape[1]}\n"
        f"  population risk > eps: LTT {ltt_rate:.3f}, empirical {empirical_rate:.3f}; "
        f"mean risk LTT {risk[ltt].mean():.4f}, empirical {risk[empirical].mean():.4f}; "
        f"mean cost LTT {draw_cost[draws, ltt].mean():.3f}, "
        f"empirical {draw_cost[draws, empirical].mean():.3f}\n"
        f"  held-out half risk > eps (reported only): LTT {held_out[0].mean():.3f}, "
        f"empirical {held_out[1].mean():.3f}\n"
        f"  {time.perf_counter() - started:.2f} s"
    )
    slack = 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)
    assert ltt_rate <= DELTA + slack, f"LTT violated eps in {ltt_rate:.3f} of draws (delta {DELTA})"
    assert ltt.mean() > 1, "the simulation should certify more than 'no early exit'"
    assert empirical_rate >= ltt_rate


def test_the_least_compute_of_every_rule_family_holds_in_all_but_delta_of_calibration_draws(population):
    """``--rule all``: each family certified at delta / families on the same draw, the least certified
    compute kept; the kept policy's population risk passes epsilon in at most delta of the draws."""
    logits, costs, temperatures, paths = population
    weights = draw_weights(logits.shape[1], DRAWS, CALIBRATION_ROWS, seed=12)
    draws = np.arange(DRAWS)
    risks, draw_costs = [], []  # per family, (S,) each: the population risk and the draw's cost of its choice
    for family in ("global", *RULE_FAMILIES[1:]):
        evidence = exit_evidence(logits, temperatures, paths[family].base_rules)
        taken = exits_taken(evidence, paths[family])  # (K, N)
        loss, cost = candidate_losses(taken, evidence.label), costs[taken]  # (K, N) each
        chosen = simulated_choices(loss, cost, weights, [], EPSILON, DELTA / len(RULE_FAMILIES))[0]  # (S,)
        risks.append(loss.mean(axis=1)[chosen])
        draw_costs.append((weights @ cost.T / CALIBRATION_ROWS)[draws, chosen])
    kept = np.argmin(draw_costs, axis=0)  # (S,) the family with the least certified compute, per draw
    rate = float(np.mean(np.asarray(risks)[kept, draws] > EPSILON))
    print(f"\nall families: kept {np.bincount(kept, minlength=len(RULE_FAMILIES))}, risk > eps in {rate:.3f}")
    slack = 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)  # the draws' own binomial noise around delta
    assert rate <= DELTA + slack
    assert np.mean(np.asarray(draw_costs)[kept, draws]) < 0.9, "early exit should pay on this model"


ACCURACY_BOUND = 0.01  # tighter than EPSILON's disagreement on the quick CNN: most disagreements are losses


def test_a_joint_accuracy_bound_holds_with_the_risk_in_all_but_delta_of_calibration_draws(
    population, population_labels
):
    """``max_accuracy_loss``: disagreement <= epsilon AND accuracy loss <= its bound, tested together
    with the larger p-value; both hold at once in all but delta of the draws, where certifying the
    disagreement alone breaks the accuracy bound far more often (so the check can fail)."""
    logits, costs, temperatures, paths = population
    path = paths["global"]
    evidence = exit_evidence(logits, temperatures, path.base_rules)
    taken = exits_taken(evidence, path)  # (K, N)
    disagreement = candidate_losses(taken, evidence.label)  # (K, N)
    accuracy = candidate_losses(taken, evidence.label, "error_increase", population_labels)  # (K, N)
    cost = costs[taken]
    weights = draw_weights(logits.shape[1], DRAWS, CALIBRATION_ROWS, seed=13)
    joint = simulated_choices(disagreement, cost, weights, [], accuracy=(accuracy, ACCURACY_BOUND))[0]
    alone = simulated_choices(disagreement, cost, weights, [])[0]

    def violated(chosen: np.ndarray) -> np.ndarray:
        return (disagreement.mean(axis=1)[chosen] > EPSILON) | (
            accuracy.mean(axis=1)[chosen] > ACCURACY_BOUND
        )

    rate, rate_alone = float(violated(joint).mean()), float(violated(alone).mean())
    print(
        f"\njoint accuracy bound {ACCURACY_BOUND}: some bound broken in {rate:.3f} of {DRAWS} draws "
        f"(delta {DELTA}); disagreement certified alone: {rate_alone:.3f}"
    )
    slack = 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)  # the draws' own binomial noise around delta
    assert rate <= DELTA + slack
    assert rate_alone > DELTA + slack, "the accuracy bound should bind on this model, or this shows nothing"
    assert joint.mean() > 1, "the simulation should certify more than 'no early exit'"
    # The procedure itself chooses what the simulation chooses, on a few of the draws.
    pool_rows = np.arange(logits.shape[1])
    for index in range(3):
        rows = np.repeat(pool_rows, weights[index].astype(int))
        result = calibrate_exit_policy(
            logits[:, rows], costs, LearnThenTest(EPSILON, DELTA), labels=population_labels[rows],
            temperatures=temperatures, path=path, fit_fraction=0, max_accuracy_loss=ACCURACY_BOUND,
        )  # fmt: skip
        assert result.result.candidate == joint[index]
        assert result.result.accuracy_loss == pytest.approx(accuracy[joint[index], rows].mean())
        assert result.to_policy("v", "fp").provenance["max_accuracy_loss"] == ACCURACY_BOUND


@pytest.mark.filterwarnings("ignore::offramp.build.risk_control.CalibrationWarning")
def test_an_accuracy_bound_needs_labels_and_a_fraction():
    logits, labels = synthetic_exits(rows=600)
    costs = (0.3, 0.6, 1.0)
    with pytest.raises(ValueError, match="needs labels"):
        calibrate_exit_policy(
            logits, costs, LearnThenTest(0.05), temperatures=(1, 1, 1), max_accuracy_loss=0.01
        )
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        calibrate_exit_policy(logits, costs, LearnThenTest(0.05), labels=labels, max_accuracy_loss=1.5)
    # A bound of 0 is never shown by finitely many rows: nothing leaves early.
    none = calibrate_exit_policy(logits, costs, LearnThenTest(0.2), labels=labels, max_accuracy_loss=0.0)
    assert none.result.candidate == 0 and "accuracy lost" in none.guarantee


def test_an_accuracy_bound_out_of_reach_of_the_rows_is_said_so():
    """A bound that loss-free rows could not show (binomial: (1 - bound) ** rows > delta) certifies no
    early exit whatever the data; the calibration warns, and the result says the bound was out of reach."""
    assert not within_reach(0.005, 874, 0.0125) and within_reach(0.005, 875, 0.0125)
    logits, labels = synthetic_exits(rows=800)  # 600 certifying rows: half a point needs 598 at delta 0.05
    with pytest.warns(CalibrationWarning, match="out of reach of 600 certifying rows"):
        result = calibrate_exit_policy(
            logits, (0.3, 0.6, 1.0), LearnThenTest(0.05, 0.01), labels=labels, max_accuracy_loss=0.005
        )
    assert result.result.candidate == 0 and not result.accuracy_bound_in_reach
    reachable = calibrate_exit_policy(
        logits, (0.3, 0.6, 1.0), LearnThenTest(0.05, 0.05), labels=labels, max_accuracy_loss=0.005
    )
    assert reachable.accuracy_bound_in_reach


LADDER = (0.005, 0.01, 0.02, 0.05)


def test_every_rung_of_a_ladder_holds_at_once_in_all_but_delta_of_calibration_draws(population):
    """Each rung certified at delta / K on the same draw: the chance that ANY rung's population risk
    passes its own epsilon is at most delta (Bonferroni), whatever rung the service then serves."""
    logits, costs, temperatures, paths = population
    evidence = exit_evidence(logits, temperatures, paths["global"].base_rules)
    taken = exits_taken(evidence, paths["global"])  # (K, N)
    loss, cost = candidate_losses(taken, evidence.label), costs[taken]  # (K, N) each
    risk = loss.mean(axis=1)  # (K,) the population's
    weights = draw_weights(logits.shape[1], DRAWS, CALIBRATION_ROWS, seed=11)
    chosen = [
        simulated_choices(loss, cost, weights, [], e, DELTA / len(LADDER))[0] for e in LADDER
    ]  # each (S,)
    violated = np.any([risk[c] > e for c, e in zip(chosen, LADDER, strict=True)], axis=0)  # (S,)
    uncorrected = np.any(
        [risk[simulated_choices(loss, cost, weights, [], e, DELTA)[0]] > e for e in LADDER], axis=0
    )
    draw_cost = weights @ cost.T / CALIBRATION_ROWS  # (S, K)
    print(
        f"\nladder {LADDER}: some rung's risk > its eps in {violated.mean():.3f} of {DRAWS} draws "
        f"(delta {DELTA}; without the correction {uncorrected.mean():.3f}); mean compute by rung "
        + ", ".join(f"{draw_cost[np.arange(DRAWS), c].mean():.3f}" for c in chosen)
    )
    slack = 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)
    assert violated.mean() <= DELTA + slack
    assert all((a <= b).all() for a, b in itertools.pairwise(chosen)), "a higher rung was less aggressive"


def test_a_ladder_certifies_each_level_on_the_same_candidates_at_a_split_delta(tmp_path):
    logits, labels = synthetic_exits(rows=6000, seed=3)
    costs = (0.3, 0.6, 1.0)
    method = LearnThenTest(LADDER[0], 0.05)
    calibrated = calibrate_exit_policy(logits, costs, method, labels=labels, ladder=LADDER[1:])
    assert [e for e, _ in calibrated.rungs] == list(LADDER[1:])
    certifications = [calibrated.result, *(c for _, c in calibrated.rungs)]
    assert all(c.delta == pytest.approx(0.05 / len(LADDER)) for c in certifications)
    assert [c.candidate for c in certifications] == sorted(c.candidate for c in certifications)
    costs_by_rung = [c.expected_cost for c in certifications]
    assert costs_by_rung == sorted(costs_by_rung, reverse=True) and costs_by_rung[0] > costs_by_rung[-1]
    # Rung 0 alone, at the split delta, is the same choice.
    alone = calibrate_exit_policy(logits, costs, LearnThenTest(LADDER[0], 0.05 / len(LADDER)), labels=labels)
    assert alone.result.candidate == calibrated.result.candidate
    policy = calibrated.to_policy("ladder-1", "fp").validate(logits.shape[0], logits.shape[2], "fp")
    assert [r.epsilon for r in policy.rungs] == list(LADDER[1:])
    assert Policy.load(policy.save(tmp_path / "policy.json")) == policy
    assert [rung["epsilon"] for rung in policy.provenance["ladder"]] == list(LADDER[1:])
    with pytest.raises(ValueError, match="Learn-then-Test"):
        calibrate_exit_policy(logits, costs, EmpiricalSearch(0.01), labels=labels, ladder=(0.02,))
    with pytest.raises(ValueError, match="above rung 0"):
        calibrate_exit_policy(logits, costs, LearnThenTest(0.02, 0.05), labels=labels, ladder=(0.01,))


@pytest.mark.filterwarnings("ignore::offramp.build.risk_control.CalibrationWarning")
@pytest.mark.parametrize("per_class", [None, "class_conditional"])
def test_the_simulation_chooses_what_calibrate_exit_policy_chooses(population, per_class):
    logits, costs, temperatures, paths = population
    path = paths["global" if per_class is None else "per_class"]
    evidence = exit_evidence(logits, temperatures, path.base_rules)
    taken = exits_taken(evidence, path)
    loss, cost = candidate_losses(taken, evidence.label), costs[taken]
    classes = [evidence.label[-1] == c for c in range(logits.shape[2])] if per_class else []
    picks = np.random.default_rng(11).integers(0, logits.shape[1], (3, CALIBRATION_ROWS))
    weights = np.stack([np.bincount(p, minlength=logits.shape[1]) for p in picks]).astype(np.float64)
    ltt, empirical = simulated_choices(loss, cost, weights, classes)
    for index, rows in enumerate(picks):
        for method, expected in ((LearnThenTest(EPSILON, DELTA), ltt), (EmpiricalSearch(EPSILON), empirical)):
            result = calibrate_exit_policy(
                logits[:, rows], costs, method, temperatures=temperatures, path=path, per_class=per_class,
                fit_fraction=0, min_group_rows=MIN_GROUP_ROWS,
            )  # fmt: skip
            assert result.result.candidate == expected[index]


# ---------------------------------------------------------------------------------------------
# (b) monotone in epsilon; epsilon = 0 exits nowhere early


@pytest.mark.parametrize(
    "method, options",
    [
        (LearnThenTest, {}),
        (LearnThenTest, {"path": "per_class", "per_class": "class_conditional"}),
        (lambda eps: LearnThenTest(eps, p_value="hoeffding_bentkus"), {"risk": "error_increase"}),
        (lambda eps: LearnThenTest(eps, p_value="hoeffding_bentkus"), {"risk": "error_increase_net"}),
        (EmpiricalSearch, {"metric": "entropy"}),
    ],
)
def test_a_larger_epsilon_never_costs_more_and_zero_exits_nowhere_early(method, options):
    logits, labels = synthetic_exits()
    costs = (0.3, 0.6, 1.0)
    spent = []
    for epsilon in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            result = calibrate_exit_policy(logits, costs, method(epsilon), labels=labels, **options)
        spent.append(result.result.expected_cost)
        if epsilon == 0:
            assert result.result.candidate == 0
            assert result.result.exit_rates == (0.0, 0.0, 1.0)
            taken = simulate_exits(logits, result.to_policy("v", "fp").exits)
            assert (taken == 2).all()
    assert all(later <= earlier for earlier, later in itertools.pairwise(spent)), spent
    assert spent[-1] < 1.0, "the synthetic exits should let a loose epsilon exit early"


# ---------------------------------------------------------------------------------------------
# (c) small cohorts fall back; cohort overrides


def test_a_cohort_of_three_rows_falls_back_to_the_global_thresholds_with_a_warning():
    logits, labels = synthetic_exits(rows=3000)
    cohorts = np.where(np.arange(3000) % 2 == 0, "even", "odd").astype(object)
    _, certify = fit_split(3000, 0.25, seed=0)  # the rows the default split certifies on
    cohorts[certify[:3]] = "tiny"
    with pytest.warns(CalibrationWarning, match="cohort 'tiny'"):
        result = calibrate_exit_policy(
            logits, (0.3, 0.6, 1.0), LearnThenTest(0.1, 0.1), labels=labels, cohorts=cohorts
        )
    tiny = result.cohorts["tiny"]
    assert tiny.fell_back and tiny.rows == 3 and tiny.thresholds == result.thresholds
    assert any("tiny" in message and "falls back" in message for message in result.warnings)
    assert not result.cohorts["even"].fell_back and result.cohorts["even"].certified > 0
    policy = result.to_policy("v1", "fp")
    assert set(policy.cohorts) == {"even", "odd"}
    assert policy.rules_for("tiny") == policy.exits
    assert policy.provenance["cohorts"]["tiny"]["fell_back"] is True


def test_bonferroni_splits_delta_across_cohorts():
    logits, labels = synthetic_exits(rows=3000)
    cohorts = np.array(["a", "b", "c"])[np.arange(3000) % 3]
    result = calibrate_exit_policy(
        logits, (0.3, 0.6, 1.0), LearnThenTest(0.1, 0.1), labels=labels, cohorts=cohorts, bonferroni=True
    )
    assert all(math.isclose(c.delta, 0.1 / 3) for c in result.cohorts.values())
    assert result.result.delta == 0.1


def test_one_candidate_path_certified_at_several_epsilons_matches_calibrate_exit_policy():
    logits, labels = synthetic_exits(rows=3000)
    costs = np.array([0.3, 0.6, 1.0])
    cohorts = np.array(["a", "b"])[np.arange(3000) % 2]
    options = {"per_class": "class_conditional", "cohorts": cohorts, "bonferroni": True}
    rows = validated_calibration_rows(
        logits, costs, LearnThenTest(0.05), labels=labels, risk="disagreement",
        per_class="class_conditional", cohorts=cohorts,
    )  # fmt: skip
    candidates = build_candidates(rows, path="per_class")
    fit, certifying_rows = candidates.split.fit, candidates.split.certify
    assert len(fit) == 750 and len(np.union1d(fit, certifying_rows)) == 3000
    certifying = rows.subset(certifying_rows)
    outcomes = candidate_outcomes(
        certifying.exit_logits, candidates.temperatures, candidates.path, labels=certifying.labels
    )
    for epsilon in (0.05, 0.1, 0.2):  # a ladder of risk levels on one path: no refit, no re-simulation
        method = LearnThenTest(epsilon, 0.1)
        certified = certify(
            outcomes, candidates.path, costs, method, per_class="class_conditional",
            cohorts=certifying.cohorts, bonferroni=True,
        )  # fmt: skip
        whole = calibrate_exit_policy(logits, costs, method, labels=labels, path="per_class", **options)
        assert not any(c.fell_back for c in whole.cohorts.values())  # a fallback's NaNs never compare equal
        assert certified.result == whole.result and certified.cohorts == whole.cohorts
        assert whole.temperatures == candidates.temperatures
        np.testing.assert_array_equal(whole.split.certify, certifying_rows)
        assert whole.calibration_rows == 2250 and whole.fit_rows == 750


# ---------------------------------------------------------------------------------------------
# (d) invalid rows


def test_rows_with_non_finite_logits_never_exit_early():
    logits, labels = synthetic_exits(rows=2000)
    bad = np.arange(0, 2000, 10)
    logits[0, bad, 1] = np.nan
    logits[1, bad[::2], 0] = np.inf
    logits[:, bad[1::4], 2] = -np.inf  # invalid at every exit, the last included
    result = calibrate_exit_policy(
        logits,
        (0.3, 0.6, 1.0),
        LearnThenTest(0.3, 0.1),
        labels=labels,
        path="per_class",
        per_class="marginal",
    )
    assert result.result.exit_rates[0] > 0.3, "loose thresholds: most valid rows should leave early"
    valid = exit_evidence(logits, result.temperatures, result.path.base_rules).label >= 0  # (E, N)
    taken = exits_taken(exit_evidence(logits, result.temperatures, result.path.base_rules), result.path)
    assert (taken[:, ~valid[0]] >= 1).all()
    assert (taken[:, ~valid[0] & ~valid[1]] == 2).all()
    served = simulate_exits(logits, result.to_policy("v", "fp").exits)
    assert (served[~valid[0]] != 0).all() and (served[~valid[1]] == 2).all()
    assert all(math.isfinite(t) for t in result.temperatures)


# ---------------------------------------------------------------------------------------------
# (e) temperatures


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    true_logits = rng.normal(0.0, 2.0, (20000, 10))
    probabilities = np.exp(true_logits - true_logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    labels = (probabilities.cumsum(1) > rng.random((20000, 1))).argmax(1)  # labels drawn from the model
    for temperature in (0.4, 1.0, 2.5):
        observed = (true_logits * temperature).astype(np.float32)  # over-/under-confident by T
        fitted = fit_temperature(observed, labels)
        assert abs(fitted / temperature - 1) < 0.03, (temperature, fitted)
        nll = negative_log_likelihood(observed, labels, fitted)
        assert nll <= negative_log_likelihood(observed, labels, fitted * 1.05)
        assert nll <= negative_log_likelihood(observed, labels, fitted / 1.05)
        if temperature != 1.0:
            assert expected_calibration_error(observed, labels, fitted) < expected_calibration_error(
                observed, labels
            )
    bins = reliability_bins(observed, labels, fitted, bins=10)
    assert bins.rows == 20000 and len(bins.edges) == 11
    filled = bins.counts > 0
    assert (
        (bins.confidence[filled] >= bins.edges[:-1][filled])
        & (bins.confidence[filled] <= bins.edges[1:][filled])
    ).all()


def test_temperature_fit_skips_rows_with_non_finite_logits():
    logits, labels = synthetic_exits(rows=2000)
    clean = fit_temperature(logits[2], labels)
    dirty = logits[2].copy()
    dirty[::7, 0] = np.nan
    assert fit_temperature(dirty, labels) == pytest.approx(
        fit_temperature(logits[2][np.isfinite(dirty).all(1)], labels[np.isfinite(dirty).all(1)])
    )
    assert math.isfinite(clean)


# ---------------------------------------------------------------------------------------------
# (f) p-values and the fixed-sequence test


def test_binomial_p_value_is_the_binomial_cdf():
    for k, n, eps in [(0, 45, 0.05), (3, 100, 0.05), (40, 1000, 0.05), (7, 7, 0.5), (12, 200, 0.1)]:
        assert binomial_p_value(k, n, eps) == pytest.approx(binom.cdf(k, n, eps), rel=1e-12)
    assert binomial_p_value(0, 45, 0.05) == pytest.approx(0.95**45)
    assert binomial_p_value(0, 1000, 0.0) == 1.0
    assert binomial_p_value(0, 0, 0.05) == 1.0
    np.testing.assert_allclose(
        binomial_p_value(np.array([[0, 5], [10, 20]]), np.array([[100], [200]]), 0.05),
        binom.cdf([[0, 5], [10, 20]], [[100], [200]], 0.05),
    )


def test_hoeffding_bentkus_is_monotone_bounded_and_no_sharper_than_the_exact_test():
    for n in (10, 100, 1000):
        means = np.arange(n + 1) / n  # every mean n {0, 1} losses can have
        for eps in (0.01, 0.05, 0.2):
            p = hoeffding_bentkus_p_value(means, n, eps)
            assert ((p >= 0) & (p <= 1)).all()
            assert (np.diff(p) >= -1e-15).all(), "non-decreasing in the mean"
            assert (p[means >= eps] == 1.0).all()
            exact = binomial_p_value(np.arange(n + 1), n, eps)
            assert (p >= exact - 1e-12).all(), "HB is a bound: never below the exact binomial p-value"
        by_eps = [float(hoeffding_bentkus_p_value(0.03, n, e)) for e in (0.035, 0.05, 0.1, 0.2)]
        assert all(b <= a for a, b in itertools.pairwise(by_eps)), "non-increasing in epsilon"
    # Zero losses: the Hoeffding term (1 - eps)^n is the smaller one.
    assert hoeffding_bentkus_p_value(0.0, 45, 0.05) == pytest.approx(0.95**45)
    assert hoeffding_bentkus_p_value(0.5, 0, 0.05) == 1.0


def test_fixed_sequence_test_stops_at_the_first_non_rejection():
    p = np.array([[0.0, 0.01, 0.2, 0.01], [0.0, 0.05, 0.09, 0.1], [0.3, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(fixed_sequence_test(p, 0.1), [1, 3, -1])


def test_the_binomial_test_needs_a_zero_one_loss():
    logits, labels = synthetic_exits(rows=1000)
    with pytest.raises(ValueError, match="binomial"):
        calibrate_exit_policy(
            logits, (0.3, 0.6, 1.0), LearnThenTest(0.05), labels=labels, risk="error_increase_net"
        )
    with pytest.raises(ValueError, match="labels"):
        calibrate_exit_policy(
            logits, (0.3, 0.6, 1.0), LearnThenTest(0.05), risk="error_increase", temperatures=(1, 1, 1)
        )


# ---------------------------------------------------------------------------------------------
# The served form


@pytest.mark.parametrize(
    "path, per_class", [("shared", None), ("per_exit", None), ("per_class", "class_conditional")]
)
def test_the_policy_round_trips_and_the_cascade_takes_the_calibrated_exits(tmp_path, path, per_class):
    logits, labels = synthetic_exits(rows=3000)
    result = calibrate_exit_policy(
        logits, (0.3, 0.6, 1.0), LearnThenTest(0.05, 0.1), labels=labels, path=path, per_class=per_class
    )
    assert result.result.certified > 0
    policy = result.to_policy("ltt-1", "fp").validate(num_exits=3, num_classes=5, fingerprint="fp")
    loaded = Policy.load(policy.save(tmp_path / "policy.json"))
    assert loaded == policy
    provenance = loaded.provenance
    for key in (
        "method",
        "guarantee",
        "epsilon",
        "delta",
        "achieved_risk",
        "expected_cost",
        "exit_rate_profile",
        "data_fingerprint",
    ):
        assert key in provenance, key
    assert loaded.exits[-1].threshold == NEVER["max_prob"]
    assert [rule.temperature for rule in loaded.exits] == list(result.temperatures)
    # The served rules take, row for row, the exits the calibration measured.
    _, certify = fit_split(3000, 0.25, seed=0)
    taken = simulate_exits(logits[:, certify], loaded.exits)
    evidence = exit_evidence(logits[:, certify], result.temperatures, result.path.base_rules)
    np.testing.assert_array_equal(taken, exits_taken(evidence, result.path)[result.result.candidate])
    np.testing.assert_allclose(np.bincount(taken, minlength=3) / len(certify), result.result.exit_rates)
