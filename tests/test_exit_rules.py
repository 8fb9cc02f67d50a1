"""Exit rules beyond one confidence number: each family's decision against a plain float64 NumPy
reading of its definition, the cascade serving exactly what the calibration simulates, the learned
score's monotonicity, and the policy file's formats."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy.special import expit, logsumexp, softmax, xlogy

from offramp.backend.cascade import CascadeBatch, run_cascade
from offramp.backend.contract import HIDDEN_IN
from offramp.backend.exit_rules import SCORE_SIGNS, LabelHistory, rule_passes, rule_value
from offramp.backend.policy import POLICY_FORMAT, ExitRule, Policy, PolicyError
from offramp.build.calibrate import simulate_exits
from offramp.build.rule_families import DISTANCE_QUANTILE, fit_exit_score, rule_template, scaled_exits
from offramp.kernels.confidence import compute_confidence
from offramp.kernels.testing import mixed_logits
from tests.fakes import FakeNetwork

EXITS, ROWS, CLASSES = 4, 600, 5


def exit_logits(seed: int = 0) -> np.ndarray:
    """(E, N, C) float32: rows whose label settles at different depths, peaked and outlier-heavy rows
    among them (flat logits would hide entropy and margin bugs), and mixed_logits' awkward rows (NaN,
    infinities, ties, saturated) at every exit."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, CLASSES, ROWS)
    settles = rng.integers(0, EXITS, ROWS)  # the exit from which a row's label is its truth
    logits = rng.standard_cauchy((EXITS, ROWS, CLASSES)).clip(-30, 30) * rng.uniform(0.2, 3.0, (1, ROWS, 1))
    for k in range(EXITS):
        logits[k, np.arange(ROWS), truth] += np.where(k >= settles, 4.0 + 2.0 * k, 0.0)
    awkward = np.stack([mixed_logits(CLASSES, rng)[0] for _ in range(EXITS)])  # (E, M, C)
    return np.concatenate([logits.astype(np.float32), awkward], axis=1)


def reference_values(logits: np.ndarray, rule: ExitRule) -> tuple[np.ndarray, np.ndarray]:
    """Per exit and row, in float64 from the definitions (policy.ExitRule's comments): the value the
    rule thresholds (NaN where invalid), and its gate (valid and, with novelty gates, energy and the
    distance to the label's centre at most their limits). (E, N) each."""
    values, gates = [], []
    previous = np.full(logits.shape[1], -1)
    streak = np.zeros(logits.shape[1], dtype=int)
    for k in range(logits.shape[0]):
        with np.errstate(invalid="ignore", over="ignore"):
            z = (logits[k].astype(np.float32) / np.float32(rule.temperature)).astype(np.float64)
        valid = np.isfinite(z).all(axis=1)
        z = np.where(valid[:, None], z, 0.0)
        p = softmax(z, axis=1)  # (N, C); exp(z - max) / sum: z - logsumexp(z) would round away near 3e38
        top = np.sort(p, axis=1)
        label = np.where(valid, z.argmax(axis=1), -1)
        max_prob, margin, entropy = top[:, -1], top[:, -1] - top[:, -2], -xlogy(p, p).sum(axis=1)
        streak = np.where((label == previous) & valid, streak + 1, 1)
        previous = label
        if rule.metric == "score":
            q = np.clip(max_prob, 1e-6, 1 - 1e-6)
            features = np.stack([np.ones_like(q), np.log(q / (1 - q)), entropy, margin, streak >= 2], axis=1)
            value = expit(features @ np.asarray(rule.score_weights))
        else:
            value = {"max_prob": max_prob, "entropy": entropy, "margin": margin}[rule.metric]
        if rule.patience:
            d = rule.patience_discount
            discounted = d * value if rule.metric == "entropy" else 1 - d * (1 - value)
            value = np.where(streak >= rule.patience, discounted, value)
        gate = valid.copy()
        if rule.energy_limit is not None:
            gate &= -logsumexp(z, axis=1) <= rule.energy_limit
        if rule.distance_limit is not None:
            centre = np.asarray(rule.class_centres, dtype=np.float64)[np.maximum(label, 0)]  # (N, C)
            gate &= np.sqrt(((z - centre) ** 2).sum(axis=1)) <= rule.distance_limit
        values.append(np.where(valid, value, np.nan))
        gates.append(gate)
    return np.stack(values), np.stack(gates)


RULES = {
    "confidence, max-prob": ExitRule("max_prob", 0.8, temperature=1.3),
    "confidence, entropy per class": ExitRule("entropy", (0.3, 0.6, 0.2, 0.9, 0.5)),
    "confidence, margin": ExitRule("margin", 0.6, temperature=0.7),
    "patience (PABEE: the streak alone)": ExitRule("max_prob", 0.999, patience=2, patience_discount=0.0),
    "patience, discounted": ExitRule("max_prob", 0.9, temperature=1.5, patience=2, patience_discount=0.25),
    "patience on entropy, 3 exits": ExitRule("entropy", 0.2, patience=3, patience_discount=0.5),
    "learned score": ExitRule("score", 0.7, score_weights=(-2.0, 0.6, -0.4, 1.2, 1.5)),
    "novelty gate": ExitRule("max_prob", 0.7, energy_limit=-6.0),
    # Label c's centre: 8 at c, -1 elsewhere; rows within 12 of their label's centre may leave.
    "novelty gates, energy and distance": ExitRule(
        "max_prob",
        0.7,
        temperature=1.2,
        energy_limit=-4.0,
        distance_limit=12.0,
        class_centres=tuple(tuple(8.0 if i == c else -1.0 for i in range(CLASSES)) for c in range(CLASSES)),
    ),
}


@pytest.mark.parametrize("name", RULES)
def test_rule_passes_follows_the_rule_s_definition(name: str) -> None:
    rule = RULES[name]
    logits = exit_logits()
    values, gates = reference_values(logits, rule)
    history = LabelHistory.fresh(logits.shape[1])
    compared = 0
    for k in range(EXITS):
        scaled = logits[k] / np.float32(rule.temperature)
        confidence = compute_confidence(scaled)
        history = history.after(confidence.label)
        got = rule_passes(rule, scaled, confidence, history)
        threshold = np.asarray(rule.threshold)
        if threshold.ndim:
            threshold = threshold[np.maximum(confidence.label, 0)]
        with np.errstate(invalid="ignore"):
            want = gates[k] & (values[k] <= threshold if rule.metric == "entropy" else values[k] >= threshold)
            # float32 serving figures against float64 truth: rows within 1e-4 of the threshold (the
            # kernels' error bound is far smaller) may fall either way and are not compared.
            clear = ~(np.abs(values[k] - threshold) < 1e-4)
        # Rows of logits near the float32 range (mixed_logits' "extreme range") overflow the serving
        # path's entropy to NaN: they never leave early, where the float64 reading may let them.
        overflowed = gates[k] & np.isnan(rule_value(rule, confidence, history))
        assert not got[overflowed].any()
        clear &= ~overflowed
        np.testing.assert_array_equal(got[clear], want[clear], err_msg=f"exit {k}")
        compared += int(clear.sum())
        assert 0 < want.sum() < gates[k].sum(), f"exit {k}: the rule should split the valid rows"
    assert compared > 0.98 * EXITS * logits.shape[1]


def test_invalid_rows_break_a_streak_and_never_pass() -> None:
    label = np.array([[2, 2, 1], [2, -1, 1], [2, 2, 1]])  # (exits, rows): row 1 invalid at exit 1
    history = LabelHistory.fresh(3)
    for k in range(3):
        history = history.after(label[k])
    np.testing.assert_array_equal(history.streak, [3, 1, 3])
    logits = np.array([[np.nan, 1.0], [9.0, 0.0]], dtype=np.float32)
    confidence = compute_confidence(logits)
    held = LabelHistory(np.array([-1, 0]), np.array([5, 5], dtype=np.int32))  # a streak even for the NaN row
    rule = ExitRule("max_prob", 0.5, patience=2, patience_discount=0.0, energy_limit=100.0)
    np.testing.assert_array_equal(rule_passes(rule, logits, confidence, held), [False, True])


def every_exit_logits(net: FakeNetwork, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """(E, N, C) the fake network's logits at every exit, all rows through every segment."""
    every_exit, current = [], dict(inputs)
    for k in range(net.num_exits):
        hidden, logits = net.run_segment(k, current, True)
        every_exit.append(logits)
        current = {HIDDEN_IN: hidden}
    return np.stack(every_exit)


@pytest.mark.parametrize(
    "name", ["patience, discounted", "learned score", "novelty gate", "fitted novelty gates", "mixed"]
)
def test_the_cascade_serves_the_exits_the_calibration_simulates(name: str) -> None:
    """The cascade (rows compacted between segments, their label history with them) takes, row for row,
    the exits that ``simulate_exits`` (what Learn-then-Test certifies) computes on all rows at once."""
    net = FakeNetwork(num_exits=EXITS, num_classes=4, features=8)
    inputs = net.inputs(500)
    if name == "mixed":  # a different family at each exit
        rules = (
            RULES["learned score"],
            RULES["patience, discounted"],
            RULES["novelty gate"],
            RULES["novelty gate"],
        )
    elif name == "fitted novelty gates":  # both gates, fitted on other rows of the same network
        fit = every_exit_logits(net, net.inputs(400, seed=2))
        rules = rule_template("novelty", "max_prob", fit, (1.0,) * EXITS)
    else:
        rules = (RULES[name],) * EXITS
    if name != "fitted novelty gates":
        # The fake network's logits are smaller than a trained model's: a looser novelty limit lets rows
        # leave at every exit.
        rules = tuple(r if r.energy_limit is None else replace(r, energy_limit=-2.5) for r in rules)
    rules = tuple(replace(r, threshold=t) for r, t in zip(rules, (0.55, 0.75, 0.9, 1.0), strict=True))
    policy = Policy("test", "fp", rules, full_depth_route="segments")
    result = run_cascade(CascadeBatch.plain(inputs, EXITS), net.run_segment, policy, (0.25, 0.5, 0.75, 1.0))
    simulated = simulate_exits(every_exit_logits(net, inputs), rules)
    np.testing.assert_array_equal(result.exit, simulated)
    assert len(np.unique(simulated)) == EXITS, "every exit should answer some rows"


def test_the_fitted_exit_score_is_monotone_in_confidence() -> None:
    logits = exit_logits(seed=3)
    exits = scaled_exits(logits, (1.0,) * EXITS)
    weights = fit_exit_score(exits)
    assert len(weights) == EXITS
    for w in weights:
        assert all(v * sign >= 0 for v, sign in zip(w, SCORE_SIGNS, strict=True)), w
    slopes = np.asarray(weights[0][1:])
    assert np.abs(slopes).sum() > 0, "the fit should use the figures, not the intercept alone"
    # Monotone on rows, not just by the signs: a row made more confident (its top logit raised) at the
    # same exit, with the same history, never scores lower.
    rule = ExitRule("score", 0.5, score_weights=weights[1])
    scaled, confidence, history = exits[1]
    sharper = scaled.copy()
    valid = confidence.valid
    sharper[np.flatnonzero(valid), confidence.label[valid]] += 1.0
    before = reference_values(np.stack([exits[0][0], scaled]), rule)[0][1]
    after = reference_values(np.stack([exits[0][0], sharper]), rule)[0][1]
    assert (after[valid] >= before[valid] - 1e-12).all()
    assert (after[valid] > before[valid]).mean() > 0.5


def test_rule_templates_fix_what_the_path_does_not_move() -> None:
    fit = exit_logits(seed=5)
    temperatures = (1.0, 1.2, 0.9, 1.1)
    patience, score, novelty = (
        rule_template(f, "max_prob", fit, temperatures) for f in ("patience", "score", "novelty")
    )
    assert [r.temperature for r in patience] == list(temperatures)
    assert all(r.patience >= 2 and r.metric == "max_prob" for r in patience)
    assert all(r.metric == "score" and len(r.score_weights) == len(SCORE_SIGNS) for r in score)
    # The novelty limit lets about NOVELTY_QUANTILE of the fit rows' valid rows pass its gate.
    _, gates = reference_values(fit, ExitRule("max_prob", energy_limit=novelty[0].energy_limit))
    valid = np.isfinite(fit[0]).all(axis=1)
    assert 0.93 <= gates[0][valid].mean() <= 0.97  # 0.95 up to ties and the quantile's interpolation
    # The distance gate: each label's median logits over the fit rows with that label (the fit holds
    # rows of huge and infinite logits: a mean would be theirs), and a limit that about
    # DISTANCE_QUANTILE of them are within.
    for k, (rule, (scaled, confidence, _)) in enumerate(
        zip(novelty, scaled_exits(fit, temperatures), strict=True)
    ):
        ok = confidence.valid
        for c in range(CLASSES):
            mine = ok & (confidence.label == c)
            np.testing.assert_allclose(rule.class_centres[c], np.median(scaled[mine], axis=0), rtol=1e-6)
        distance_only = ExitRule(
            "max_prob", temperature=rule.temperature, distance_limit=rule.distance_limit,
            class_centres=rule.class_centres,
        )  # fmt: skip
        within = reference_values(fit, distance_only)[1][k][ok].mean()
        assert abs(within - DISTANCE_QUANTILE) <= 0.02, f"exit {k}: {within:.3f} of the fit rows pass"
    with pytest.raises(ValueError, match="fit split"):
        rule_template("score", "max_prob", None, temperatures)


def test_the_distance_gate_stops_confident_rows_the_energy_gate_lets_through() -> None:
    """Rows sharper than any the fit rows showed (their logits scaled up: max-prob higher, energy lower,
    the pattern of a confident foreign input) pass the energy gate wherever the originals did, and the
    distance gate stops them: they lie far from every label's centre."""

    def rows_like_a_trained_model(seed: int) -> np.ndarray:  # (E, N, C): the label's logit 6 above, noise
        rng = np.random.default_rng(seed)
        label = rng.integers(0, CLASSES, ROWS)
        return (6.0 * np.eye(CLASSES)[label] + rng.normal(0, 1, (EXITS, ROWS, CLASSES))).astype(np.float32)

    rule = replace(
        rule_template("novelty", "max_prob", rows_like_a_trained_model(5), (1.0,) * EXITS)[0], threshold=0.9
    )
    rows = rows_like_a_trained_model(6)[0]
    sharp = rows * np.float32(4.0)
    energy_only = replace(rule, distance_limit=None, class_centres=())

    def leaving(r: ExitRule, logits: np.ndarray) -> np.ndarray:
        confidence = compute_confidence(logits)
        return rule_passes(r, logits, confidence, LabelHistory.fresh(len(logits)).after(confidence.label))

    assert (leaving(energy_only, sharp) >= leaving(energy_only, rows)).all()
    assert leaving(energy_only, sharp).mean() > 0.9
    assert leaving(rule, rows).mean() > 0.5, "ordinary rows should still leave"
    assert leaving(rule, sharp).mean() < 0.01


# ---------------------------------------------------------------------------------------------
# The policy file


def format_one_policy() -> dict:
    """A policy.json as offramp wrote it before rule families (no format, no rule, plain rules)."""
    return {
        "version": "ltt-0123456789",
        "model_fingerprint": "fp",
        "exits": [
            {"metric": "max_prob", "threshold": 0.93, "temperature": 1.4},
            {"metric": "max_prob", "threshold": [0.9, 0.8, 0.7], "temperature": 1.1},
            {"metric": "max_prob", "threshold": 2.0, "temperature": 1.0},
        ],
        "cohorts": {},
        "full_depth_route": "full_model",
        "provenance": {"method": "learn_then_test", "exit_rate_profile": [0.5, 0.3, 0.2]},
    }


def test_a_format_1_policy_still_loads_as_confidence_thresholds(tmp_path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(format_one_policy()))
    policy = Policy.load(path).validate(3, 3, "fp")
    assert policy.format == 1 and policy.rule == "confidence"
    assert policy.exits[1] == ExitRule("max_prob", (0.9, 0.8, 0.7), 1.1)
    assert all(r.patience == 0 and r.energy_limit is None and not r.score_weights for r in policy.exits)


def test_a_policy_round_trips_with_every_rule_family(tmp_path) -> None:
    rules = (
        RULES["learned score"],
        RULES["patience, discounted"],
        RULES["novelty gates, energy and distance"],
    )
    policy = Policy("v", "fp", rules, rule="score")
    loaded = Policy.load(policy.save(tmp_path / "policy.json")).validate(3, CLASSES, "fp")
    assert loaded == policy and loaded.format == POLICY_FORMAT


@pytest.mark.parametrize("written", [POLICY_FORMAT + 1, "2", 0])
def test_a_policy_of_an_unknown_format_is_refused(written) -> None:
    data = {**format_one_policy(), "format": written}
    with pytest.raises(PolicyError, match="format"):
        Policy.from_dict(data)


def test_a_score_rule_whose_weights_are_not_monotone_is_refused() -> None:
    bad = ExitRule("score", 0.5, score_weights=(0.0, 1.0, 0.5, 1.0, 1.0))  # rewards entropy
    with pytest.raises(PolicyError, match="monotone"):
        Policy("v", "fp", (bad,) * 3).validate(3, CLASSES)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_centres": ()}, "go together"),
        ({"distance_limit": None}, "go together"),
        ({"distance_limit": float("inf")}, "distance_limit"),
        ({"class_centres": ((0.0,) * CLASSES,) * (CLASSES - 1)}, "class_centres"),
        ({"class_centres": ((0.0,) * (CLASSES - 1) + (float("nan"),),) * CLASSES}, "class_centres"),
    ],
)
def test_a_malformed_distance_gate_is_refused(change: dict, message: str) -> None:
    bad = replace(RULES["novelty gates, energy and distance"], **change)
    with pytest.raises(PolicyError, match=message):
        Policy("v", "fp", (bad,) * 3).validate(3, CLASSES)
