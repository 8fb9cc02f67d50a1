"""The live risk alarm in a real server: a policy certified at epsilon 0.05 on Fashion-MNIST serves
Fashion-MNIST, then handwritten digits it has never seen (on which its early exits often disagree with
its full depth), then Fashion-MNIST again. The shadow checks (1% of early rows, more for the first rows
and while the exit profile moves) run at full depth from the orchestrator's worker thread over BLS after
the answers went out; the alarm rises within 1,000 foreign rows, both orchestrator instances go to
conservative mode (every row at full depth, flagged), and the in-domain rows after clear it. The audit
lines and the metrics say so."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from offramp.backend.contract import FLAG_CONSERVATIVE
from offramp.backend.orchestrator import ServingOptions
from offramp.backend.shadow import ShadowConfig
from offramp.build.calibrate import CalibrationData, calibrate_artifacts
from offramp.build.foreign_images import load_digits_as_fashion
from offramp.build.repository import RepositoryOptions, write_repository
from tests.reliability_support import infer, metric_values, wait_for
from tests.served_reference import Reference

pytestmark = pytest.mark.integration
EPSILON = 0.05
ROWS_PER_REQUEST = 16


def disagrees(reference: Reference, images: np.ndarray) -> np.ndarray:
    """(N,) bool, in process: the policy's answer differs from the full network's."""
    answer = reference({"IMAGE": images})
    return answer.label != reference.full.run({"IMAGE": images})["LOGITS"].argmax(axis=1)


def disagreement(reference: Reference, images: np.ndarray) -> float:
    """The policy's risk on ``images``: the share of rows whose answer differs from the full network's."""
    return float(np.mean(disagrees(reference, images)))


def thinned_to_risk(reference: Reference, images: np.ndarray, risk: float) -> np.ndarray:
    """``images`` in their order with just enough of their disagreeing rows left out that the policy's
    risk on what is left is ``risk``."""
    disagreeing = disagrees(reference, images)
    agreeing = int((~disagreeing).sum())
    keep_disagreeing = int(risk * agreeing / (1 - risk))
    keep = ~disagreeing | (np.cumsum(disagreeing) <= keep_disagreeing)
    return images[keep]


def serve_until(server, model, images, done) -> tuple[int, list[dict]]:
    """Sends ``images`` in requests of 16 rows until ``done(outputs)``; the rows sent and the answers."""
    answers = []
    for start in range(0, len(images), ROWS_PER_REQUEST):
        outcome = infer("grpc", server, model, {"IMAGE": images[start : start + ROWS_PER_REQUEST]})
        assert outcome.ok, outcome.error
        answers.append(outcome.outputs)
        if done(outcome.outputs):
            return start + ROWS_PER_REQUEST, answers
    return len(images), answers


def conservative(outputs) -> bool:
    return bool((outputs["FLAGS"] & FLAG_CONSERVATIVE).all())


def test_foreign_images_raise_the_risk_alarm_and_in_domain_rows_clear_it(
    quick_cnn, fashion_test, tmp_path, running_server, execution_env
):
    artifacts, directory = quick_cnn
    images, labels = fashion_test
    calibration = CalibrationData({"IMAGE": images[5000:8000]}, labels[5000:8000])
    policy, _, _ = calibrate_artifacts(artifacts, directory, calibration, epsilon=EPSILON, delta=0.05)
    # Digits, not the photograph's crops: the two-block CNN with pooled early heads disagrees with its
    # full depth on 12% of the crops only (0.30 for the one-block CNN before it), on 20% of the digits.
    foreign = load_digits_as_fashion()[0][:2000]
    before = images[:1000]
    # The premise, measured in process on the same ONNX files: in domain the risk is within epsilon
    # (0.047 here), on the digits it is far above (0.20 here, 37% of the early answers).
    reference = Reference(artifacts, directory, policy)
    assert disagreement(reference, images[1000:5000]) < EPSILON
    assert disagreement(reference, foreign) > 3 * EPSILON
    # After the alarm: in-domain rows at half epsilon. At the 0.039 of the plain rows the time to clear
    # is a property of the statistics, not of the server, and widely spread (the betting test, simulated
    # on Bernoulli rows: median 3,100 rows, 1 run in 3 past 4,000, so a model trained a little
    # differently in a full suite failed); at 0.025: median 580 rows, 99th percentile 1,700.
    after = thinned_to_risk(reference, images[1000:5000], EPSILON / 2)
    assert len(after) >= 3800 and abs(disagreement(reference, after) - EPSILON / 2) < 0.002

    serving = ServingOptions(
        audit_path=str(tmp_path / "audit" / "rows.jsonl"),
        shadow=ShadowConfig(rate=0.01),
        shared_state_dir=str(tmp_path / "shared"),
    )
    options = RepositoryOptions(execution_env=execution_env, serving=serving)  # two orchestrator instances
    write_repository(artifacts, directory, policy, tmp_path / "repo", options)
    name = artifacts.name
    with running_server(tmp_path / "repo") as server:
        _, answers = serve_until(server, name, before, lambda outputs: False)
        assert not any(conservative(a) for a in answers)
        assert max(metric_values(server, "offramp_risk_alarm").values(), default=0) == 0

        # The switch. Expected: a few hundred rows (half the foreign early rows checked once the drift
        # monitor sees the profile move, over a third of them disagreeing, each checked disagreement
        # bringing about 2 nats against the 6.5 the test needs; 528, 592 and 736 seen in three runs on
        # the digits, 192 and 304 on the crops with the one-block CNN); the goal is 1,000.
        switch_rows, _ = serve_until(server, name, foreign, conservative)
        assert switch_rows <= 1000, switch_rows
        # Both instances act on the same evidence: the one with the lower process id decides, the other
        # takes its state (each deciding alone, one kept its alarm after the other cleared, 2 runs in 3).

        def alarms() -> dict[str, float]:
            return metric_values(server, "offramp_risk_alarm")

        assert wait_for(lambda: set(alarms().values()) == {1.0}, 10), alarms()
        outcome = infer("grpc", server, name, {"IMAGE": after[:64]})
        assert conservative(outcome.outputs) and (outcome.outputs["EXIT"] == artifacts.num_exits - 1).all()

        # In domain again: every row is evidence in conservative mode (its early answer is known); at a
        # risk of epsilon / 2 the best bet's log-wealth grows by about 0.013 per row and 6.2 nats are
        # needed (the level, the grid's 6 bets, the start's weight): about 500 rows, 1,700 at the 99th
        # percentile in simulation. The requests see it later: rows reach the test in hand-overs (each
        # instance's every second) and the other instance takes the decision from shared state (every
        # 0.25 s): 2 to 3 s, at this test's pace (1,240 rows a second here) about 3,000 rows past the
        # point in three runs (3,472 to 3,856 rows in all). The stream is the thinned rows twice: over
        # 7,600, some 6 s here; a slower machine sends fewer rows in the same delay.
        clearing = time.monotonic()
        clear_rows, answers = serve_until(
            server, name, np.concatenate([after, after]), lambda outputs: not conservative(outputs)
        )
        clearing = time.monotonic() - clearing
        assert not conservative(answers[-1]), clear_rows
        assert wait_for(lambda: set(alarms().values()) == {0.0}, 10), alarms()
        outcome = infer("grpc", server, name, {"IMAGE": after[:256]})
        assert not (outcome.outputs["FLAGS"] & FLAG_CONSERVATIVE).any()
        assert (outcome.outputs["EXIT"] < artifacts.num_exits - 1).any()  # early exits again

        checked = metric_values(server, "offramp_shadow_checks_total")
        disagreed = metric_values(server, "offramp_shadow_disagreements_total")
        failed = metric_values(server, "offramp_shadow_failed_rows")
        raised = metric_values(server, "offramp_risk_alarms_total")
    print(
        f"rows until conservative after the switch: {switch_rows}; in-domain rows until clear: {clear_rows}"
        f" ({clear_rows / clearing:.0f} rows/s)"
    )
    assert sum(checked.values()) > 0 and sum(disagreed.values()) > 0
    assert sum(failed.values()) == 0  # every check's BLS call from the worker thread answered
    assert sum(raised.values()) >= 1

    records = [
        json.loads(line)
        for path in (tmp_path / "audit").glob("rows.*.jsonl")
        for line in path.read_text().splitlines()
    ]
    events = [r for r in records if r.get("kind") == "risk_alarm"]
    assert {"raised", "cleared"} <= {e["event"] for e in events}
    assert all(e["epsilon"] == EPSILON and e["policy_version"] == policy.version for e in events)
    shadowed = [r for r in records if r.get("kind") == "shadow"]
    assert shadowed and not all(r["agree"] for r in shadowed)
    assert all(
        r["agree"] == (r["label"] == r["full_label"]) and r["exit"] < artifacts.num_exits - 1
        for r in shadowed
    )
    forced = [r for r in records if "kind" not in r and "conservative" in r["flags"]]
    assert forced and any(r["policy_exit"] < artifacts.num_exits - 1 for r in forced)
