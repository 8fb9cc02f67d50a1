"""Shadow checks without a server: which rows are checked and how often, the bounded queue, the alarm
and conservative mode they drive, the evidence and drift windows the instances of a model share, and
the store of live rows kept for recalibration."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading

import numpy as np
import pytest

from offramp.backend.contract import FLAG_CONSERVATIVE
from offramp.backend.drift import DriftConfig, DriftMonitor
from offramp.backend.orchestrator import Orchestrator, ServingOptions
from offramp.backend.policy import ExitRule, Policy
from offramp.backend.shadow import ShadowChecks, ShadowConfig, expected_epsilon
from offramp.backend.shadow_store import ShadowStore, read_store
from offramp.backend.shared_state import SharedState, shared_directory
from offramp.backend.telemetry import ServingTelemetry
from tests.fakes import FakeNetwork
from tests.test_monitoring import RecordingSink
from tests.test_orchestrator import SPEC, FakeRequest

EXITS = 3
CLASSES = 4


class RecordingAudit:
    def __init__(self):
        self.rows = []

    def record(self, rows, sampled=True):
        self.rows.extend(rows)


def full_model(shift: int):
    """A full network whose answer is the row's feature 0 plus ``shift`` (mod the classes): with shift 0
    it agrees with every early answer the batches below send, with 1 it disagrees with all of them."""

    def run_full(inputs):
        label = (inputs["X"][:, 0].astype(np.int64) + shift) % CLASSES
        return np.eye(CLASSES, dtype=np.float32)[label]  # (n, C) logits

    return run_full


def batch(rng, rows, exits=None, cohort=""):
    """A served batch: each row's early answer is its feature 0, its exit drawn uniformly."""
    labels = rng.integers(0, CLASSES, rows)
    policy_exit = rng.integers(0, EXITS, rows) if exits is None else np.full(rows, exits)
    return {
        "labels": labels,
        "policy_exit": policy_exit,
        "policy_label": labels,
        "free": np.ones(rows, dtype=bool),
        "conservative": False,
        "cohorts": np.full(rows, cohort, dtype=object),
        "inputs": {"X": labels[:, None].astype(np.float32)},  # (n, 1)
        "request_ids": [f"r{i}" for i in range(rows)],
        "rows": np.arange(rows),
    }


def checks(config: ShadowConfig, epsilon=0.05, **kwargs) -> tuple[ShadowChecks, RecordingSink]:
    sink = RecordingSink()
    telemetry = ServingTelemetry(sink, "m", "i", publish_interval_s=0.0)
    return ShadowChecks(
        config, EXITS, epsilon, model="m", policy_version="v1", telemetry=telemetry, **kwargs
    ), sink


def counter(sink, name, **labels):
    return sum(v for (n, key), v in sink.values.items() if n == name and labels.items() <= dict(key).items())


def test_config_round_trips_through_triton_parameters_and_refuses_what_it_cannot_test():
    config = ShadowConfig(
        rate=0.01, exit_rates="0=0.02", cohort_rates="new=0.5", conservative=False, epsilon=0.03
    )
    assert ShadowConfig.from_parameters(config.to_parameters()) == config
    assert config.exit_rate_map == {0: 0.02} and config.cohort_rate_map == {"new": 0.5}
    with pytest.raises(ValueError, match="name=probability"):
        ShadowConfig(rate=0.01, exit_rates="0=0")  # never checked: the risk estimate would be biased low
    with pytest.raises(ValueError, match="rate > 0"):
        ShadowConfig(exit_rates="0=0.5")
    with pytest.raises(ValueError, match="rate"):
        ShadowConfig(rate=1.5)
    with pytest.raises(ValueError, match="boost_rows"):
        ShadowConfig(rate=0.01, boost_rows=-1)
    assert expected_epsilon({"epsilon": 0.05, "risk": "disagreement"}) == 0.05
    assert expected_epsilon({"epsilon": 0.05, "risk": "error_increase"}) is None  # not what checks measure
    assert expected_epsilon({}) is None


def test_rates_by_exit_cohort_newness_and_boost():
    shadow, _ = checks(
        ShadowConfig(rate=0.01, exit_rates="1=0.03", cohort_rates="vip=0.2", new_cohort_rows=100)
    )
    try:
        assert shadow.rate(0, "") == 0.1  # a cohort's first rows: new_cohort_rate
        shadow.observe(**batch(np.random.default_rng(0), 100), run_full=full_model(0))
        assert shadow.rate(0, "") == 0.01 and shadow.rate(1, "") == 0.03
        assert shadow.rate(0, "vip") == 0.2  # new, but its own rate is higher
        shadow.profile_moved(True)
        assert shadow.rate(0, "") == 1.0 and shadow.alert  # a burst of checks once the exit profile moves
        shadow.profile_moved(False)
        assert shadow.rate(0, "") == 0.01 and not shadow.alert
    finally:
        shadow.close()


def test_the_burst_after_a_move_lasts_boost_rows_while_the_profile_stays_out():
    """A benign shift of the mix can keep the profile out of its band for good: the boosted checks stop
    after boost_rows rows unless the evidence asks for more, and the next move starts a new burst."""
    shadow, _ = checks(ShadowConfig(rate=0.01, new_cohort_rows=0, boost_rows=250))
    try:
        rng = np.random.default_rng(0)
        shadow.profile_moved(True)
        shadow.observe(**batch(rng, 200), run_full=full_model(0))
        assert shadow.rate(0, "") == 1.0  # 50 rows of the burst left
        shadow.observe(**batch(rng, 100), run_full=full_model(0))
        assert shadow.rate(0, "") == 0.01 and not shadow.alert  # still out, burst spent
        shadow.profile_moved(False)
        shadow.profile_moved(True)
        assert shadow.rate(0, "") == 1.0
    finally:
        shadow.close()


def test_a_move_starts_a_fresh_wealth_after_the_rows_held_before_it():
    """Rows observed before the profile moved wait up to a second for the worker; they must go to the
    tests before the fresh wealth starts, or 3,000 healthy rows charge a bet made on what comes after
    them. Two services see the same rows, one settling them before the move, one holding them across it;
    their evidence after two disagreements must be the same."""
    evidence = []
    for settled_first in (True, False):
        shadow, _ = checks(ShadowConfig(rate=0.01, seed=3), clock=lambda: 0.0)  # no hand-over by time
        try:
            rng = np.random.default_rng(0)
            shadow.observe(**batch(rng, 3000, exits=EXITS - 1), run_full=full_model(0))  # held: < 4,096
            if settled_first:
                shadow.drain()
            shadow.profile_moved(True)
            shadow.observe(**batch(rng, 2, exits=0), run_full=full_model(1))  # both checked, both disagree
            shadow.drain()
            evidence.append(shadow.gauges()[""]["evidence"])
        finally:
            shadow.close()
    assert 0 < evidence[0] < 3.0  # the two disagreements' evidence, short of an alarm
    assert evidence[1] == pytest.approx(evidence[0])


def serve(shadow, rng: np.random.Generator, batches: int, rows: int, full) -> np.ndarray:
    """``batches`` batches of ``rows`` served rows observed by ``shadow``, which is then closed; returns
    how many rows the policy sent to each exit (EXITS,)."""
    exits = np.zeros(EXITS, dtype=np.int64)
    for _ in range(batches):
        served = batch(rng, rows)
        exits += np.bincount(served["policy_exit"], minlength=EXITS)
        shadow.observe(**served, run_full=full)
    shadow.close()
    return exits


def test_checked_rows_match_their_probabilities_and_only_early_rows_are_checked():
    """200,000 rows, exits uniform: exit 0 checked at 5%, exit 1 at 20%, the last exit never (its
    answer is the full one). Each count is Binomial(n, q); 4 standard deviations of margin (a correct
    sampler fails this with probability under 1e-4)."""
    # No check may be dropped (the counts under test are the sampler's, and the worker may lag the loop
    # by any amount on a loaded machine): the queue holds every row.
    config = ShadowConfig(rate=0.05, exit_rates="1=0.2", new_cohort_rows=0, max_pending_rows=200_000, seed=1)
    shadow, sink = checks(config)
    exits = serve(shadow, np.random.default_rng(1), batches=400, rows=500, full=full_model(0))
    for exit_index, q in ((0, 0.05), (1, 0.2)):
        n = exits[exit_index]
        checked = counter(sink, "offramp_shadow_checks_total", exit=str(exit_index))
        assert abs(checked - n * q) <= 4 * math.sqrt(n * q * (1 - q)), (exit_index, checked, n)
    assert counter(sink, "offramp_shadow_checks_total", exit="2") == 0
    assert counter(sink, "offramp_shadow_disagreements_total") == 0
    assert shadow.dropped == shadow.failed == shadow.errors == 0


def test_the_check_queue_is_bounded_and_a_full_model_outage_loses_checks_not_requests():
    release = threading.Event()

    def slow_full(inputs):
        release.wait(10)
        return full_model(0)(inputs)

    shadow, sink = checks(ShadowConfig(rate=1.0, max_pending_rows=50, seed=2))
    rng = np.random.default_rng(2)
    for _ in range(10):
        shadow.observe(**batch(rng, 20, exits=0), run_full=slow_full)  # returns at once, every time
    assert shadow.dropped >= 150  # at most 50 wait; of 200 rows, the rest were dropped
    release.set()
    shadow.drain()

    def down(inputs):
        raise RuntimeError("the full model is unavailable")

    shadow.observe(**batch(rng, 20, exits=0), run_full=down)
    shadow.close()
    assert shadow.failed == 20 and shadow.errors == 0
    assert counter(sink, "offramp_shadow_checks_total") == 200 - shadow.dropped


def test_disagreements_raise_the_alarm_conservative_mode_runs_and_agreement_clears_it(tmp_path):
    audit = RecordingAudit()
    shadow, sink = checks(ShadowConfig(rate=1.0, seed=3), audit=audit)
    rng = np.random.default_rng(3)
    for _ in range(20):  # every early answer wrong: the alarm needs a handful of checks
        shadow.observe(**batch(rng, 20, exits=0), run_full=full_model(1))
        # Settled before the next batch, so the alarm rises at the same row whatever the worker's pace
        # (how many foreign rows are checked after it decides what the clearing has to outweigh).
        shadow.drain()
    assert shadow.conservative
    raised = [r for r in audit.rows if r.get("kind") == "risk_alarm"]
    assert [r["event"] for r in raised] == ["raised"] and raised[0]["estimated_risk"] > 0.5
    assert 0 < raised[0]["rows_in_test"] <= 400
    assert counter(sink, "offramp_risk_alarms_total") == 1
    checked = [r for r in audit.rows if r.get("kind") == "shadow"]
    assert (
        checked
        and not any(r["agree"] for r in checked)
        and {"request_id", "row", "exit"} <= checked[0].keys()
    )
    # Conservative mode: every row at full depth, its early answer known (here the same): no check runs,
    # and the evidence that the risk is back below epsilon grows from every row (the foreign rows checked
    # after the alarm count against it first: 800 clean rows clear it).
    for _ in range(40):
        served = batch(rng, 20, exits=0)
        served["conservative"] = True
        shadow.observe(**served, run_full=full_model(1))
        shadow.drain()  # one settlement per batch: the bets, and so the evidence, do not depend on timing
    shadow.close()
    assert not shadow.conservative
    assert [r["event"] for r in audit.rows if r.get("kind") == "risk_alarm"] == ["raised", "cleared"]


def test_instances_add_their_evidence(tmp_path):
    """Two processes' checks (this one and a live child's id), each with 4 checked rows of which 2
    disagree: alone, the best bet's evidence is about 10.5^2 * 0.975^2 / 6 grid points * 1/4 weight =
    4.4, under 1/alpha = 20; together (4 of 8) about 450. Neither raises alone; the one with the lower id
    decides and raises once it has absorbed the other's log-growth through the shared directory, and the
    other takes that state at its next look."""
    child = subprocess.Popen(["sleep", "60"])
    pids = (os.getpid(), child.pid)
    shadows = [
        checks(ShadowConfig(rate=1.0, seed=s), pid=pid)[0] for s, pid in zip((4, 5), pids, strict=True)
    ]
    try:
        directory = shared_directory(tmp_path, "m", "v1", server_pid=child.pid)
        states = [SharedState(directory, pid=pid) for pid in pids]
        rng = np.random.default_rng(4)
        for shadow in shadows:
            shadow.observe(**batch(rng, 4, exits=0), run_full=_half_wrong)
            shadow.drain()
        assert not any(s.conservative for s in shadows)

        def exchange():
            for shadow, state in zip(shadows, states, strict=True):
                state.publish(shadow.snapshot())
            for shadow, state in zip(shadows, states, strict=True):
                shadow.absorb(state.peers())

        exchange()
        decider = int(np.argmin(pids))
        assert [s.conservative for s in shadows] == [i == decider for i in range(2)]
        exchange()  # the same growth again adds nothing; the other instance takes the raised alarm
        assert all(s.conservative for s in shadows)
        assert all(s.leader == (None if i == decider else pids[decider]) for i, s in enumerate(shadows))
    finally:
        for shadow in shadows:
            shadow.close()
        child.kill()
        child.wait()
    # The second process is gone: its file is skipped and removed.
    first, second = states
    assert first.peers() == {} and not second.path.exists()
    first.close()  # the last one out leaves nothing under the root
    assert not any(tmp_path.glob("offramp-shared-*"))


def test_one_instance_decides_so_an_idle_instance_clears_with_the_others():
    """The failure this prevents: each instance deciding alone started its clearing test at its own row
    of the shared stream, so when the traffic that cleared one instance's alarm ended, the other kept
    its alarm, and served every row at full depth, for good. Here the follower (higher id) alone sees
    400 disagreeing rows, enough for an alarm of its own (the alarm test above raises on the same rows),
    but only the leader raises, and the follower takes it; the leader alone then sees the clean rows
    that clear it, and the idle follower clears at its next look."""
    leader, follower = (checks(ShadowConfig(rate=1.0, seed=s), pid=pid)[0] for s, pid in ((6, 1), (7, 2)))

    def exchange():
        snapshots = {1: leader.snapshot(), 2: follower.snapshot()}
        leader.absorb({2: snapshots[2]})
        follower.absorb({1: snapshots[1]})

    try:
        exchange()
        rng = np.random.default_rng(6)
        for _ in range(20):
            follower.observe(**batch(rng, 20, exits=0), run_full=full_model(1))
            follower.drain()
        assert not follower.conservative and follower.leader == 1
        exchange()
        assert leader.conservative and not follower.conservative
        exchange()
        assert follower.conservative
        for _ in range(40):
            served = batch(rng, 20, exits=0)
            served["conservative"] = True
            leader.observe(**served, run_full=full_model(1))
            leader.drain()
        assert not leader.conservative and follower.conservative
        exchange()
        assert not follower.conservative
    finally:
        leader.close()
        follower.close()


def _half_wrong(inputs):
    """Disagrees with the early answer on every other row."""
    label = inputs["X"][:, 0].astype(np.int64)
    label[::2] = (label[::2] + 1) % CLASSES
    return np.eye(CLASSES, dtype=np.float32)[label]


def test_the_drift_window_is_the_newest_rows_of_all_instances():
    """Instance A saw only old in-domain rows; instance B only the new shifted ones. A's score over
    its own window would say nothing moved; over the newest window of both it sees the shift."""
    config = DriftConfig(reference=(0.6, 0.2, 0.2), window=1000, min_rows=100, alarm_level=0.25)
    now = [0.0]
    a, b = (DriftMonitor(config, clock=lambda: now[0]) for _ in range(2))
    rng = np.random.default_rng(5)
    a.update(rng.choice(EXITS, 1000, p=config.reference))
    now[0] = 10.0
    b.update(np.zeros(600, dtype=np.int64))  # the switch: everything leaves at the first exit
    alone = DriftMonitor(config)
    alone.update(rng.choice(EXITS, 1000, p=config.reference))
    a.absorb([b.snapshot()])
    now[0] = 11.0
    a.update(np.zeros(10, dtype=np.int64))
    # Newest 1000: B's 600 and A's 10 at the first exit, then 390 of A's older rows.
    assert a.alarm and a.score > 0.25 and a.moving
    alone.update(rng.choice(EXITS, 10, p=config.reference))
    assert not alone.alarm


def test_the_store_keeps_a_bounded_recent_sample_per_instance(tmp_path):
    now = [1000.0]
    store = ShadowStore(tmp_path, "m-0", max_rows=250, max_age_s=100.0, flush_rows=100, clock=lambda: now[0])
    other = ShadowStore(tmp_path, "m-1", max_rows=10, clock=lambda: now[0])

    def add(target, rows, start):
        target.add(
            inputs={"X": np.arange(start, start + rows, dtype=np.float32)[:, None]},
            exit=np.zeros(rows, np.int64),
            label=np.zeros(rows, np.int64),
            full_label=np.zeros(rows, np.int64),
            cohort=np.full(rows, ""),
            request_id=np.full(rows, "r"),
            row=np.arange(rows),
            time=np.full(rows, now[0]),
        )

    add(other, 5, -5)
    other.flush()
    for start in range(0, 400, 100):  # four chunks of 100 rows: the oldest go past 250
        add(store, 100, start)
        store.flush_if_due()
        now[0] += 1
    inputs, _ = read_store(tmp_path)
    ours = inputs["X"][:, 0] >= 0
    assert sorted(inputs["X"][ours, 0].astype(int).tolist()) == list(range(200, 400))
    assert (~ours).sum() == 5  # the other instance's chunks are its own to retain
    now[0] += 200  # past the age limit: the next write removes every older chunk
    add(store, 100, 1000)
    store.flush()
    inputs, _ = read_store(tmp_path, since=now[0] - 1)
    assert inputs["X"][:, 0].min() == 1000
    assert len(list(tmp_path.glob("m_0-*.npz"))) == 1


def test_checks_keep_a_uniform_sample_with_both_answers(tmp_path):
    store = ShadowStore(tmp_path, "m-0", flush_rows=10_000)
    config = ShadowConfig(rate=0.01, store_rate=0.2, new_cohort_rows=0, max_pending_rows=10_000, seed=6)
    shadow, _ = checks(config, store=store)  # a queue that holds every row: none dropped, whatever the timing
    exits = serve(shadow, np.random.default_rng(6), batches=50, rows=200, full=full_model(1))
    _, meta = read_store(tmp_path)
    kept = np.bincount(meta["exit"], minlength=EXITS)
    # Every exit at the store rate (Binomial, 4 standard deviations), the last exit's rows included.
    for exit_index in range(EXITS):
        n = exits[exit_index]
        assert abs(kept[exit_index] - 0.2 * n) <= 4 * math.sqrt(n * 0.2 * 0.8), (exit_index, kept, exits)
    early = meta["exit"] < EXITS - 1
    assert (meta["label"][early] != meta["full_label"][early]).all()  # checked: the full answer is known
    assert (meta["label"][~early] == meta["full_label"][~early]).all()  # the last exit is the full answer


def test_the_orchestrator_checks_its_early_answers_and_goes_conservative_on_an_alarm(tmp_path):
    """A policy that sends every row out at the first exit (threshold 0) of a network whose first exit
    often disagrees with its full depth: the checks run at full depth through ``run_model`` after the
    answers are returned, the alarm rises, and the next requests run at full depth, flagged, with the
    policy's own choice in the audit line."""
    net = FakeNetwork()
    policy = Policy("bad-1", "fp", (ExitRule("max_prob", 0.0),) * 3, provenance={"epsilon": 0.05})
    options = ServingOptions(
        audit_path=str(tmp_path / "audit.jsonl"),
        shadow=ShadowConfig(rate=0.5, seed=8),
        shared_state_dir=str(tmp_path),
    )
    assert ServingOptions.from_parameters(options.to_parameters()) == options
    hooks = options.hooks(policy, "i0", "fake")
    assert isinstance(hooks.pop("shared"), SharedState)
    sink = RecordingSink()
    orchestrator = Orchestrator(SPEC, policy, telemetry=ServingTelemetry(sink, "fake", "i0", 0.0), **hooks)
    x = net.inputs(64)["X"]
    full = net.run_full({"X": x}).argmax(axis=1)
    first = orchestrator.execute([FakeRequest({"X": x})], net.run_segment, net.run_model)[0]
    disagree = float(np.mean(first["LABEL"] != full))
    assert (first["EXIT"] == 0).all() and disagree > 0.2, disagree  # 0.28 here: over 4x epsilon
    for _ in range(10):
        orchestrator.execute([FakeRequest({"X": x})], net.run_segment, net.run_model)
        orchestrator.shadow.drain()
        if orchestrator.conservative:
            break
    assert orchestrator.conservative
    answer = orchestrator.execute(
        [FakeRequest({"X": x}, {"request_id": "late"})], net.run_segment, net.run_model
    )[0]
    orchestrator.close()
    assert (answer["EXIT"] == 2).all() and (answer["FLAGS"] & FLAG_CONSERVATIVE).all()
    np.testing.assert_array_equal(answer["LABEL"], full)
    assert counter(sink, "offramp_shadow_checks_total", exit="0") > 0
    assert counter(sink, "offramp_risk_alarms_total") == 1
    lines = [json.loads(line) for line in (tmp_path / "audit.i0.jsonl").read_text().splitlines()]
    late = [r for r in lines if r.get("request_id") == "late" and "kind" not in r]
    assert len(late) == 64 and {r["policy_exit"] for r in late} == {0} and {r["exit"] for r in late} == {2}
    assert [r["event"] for r in lines if r.get("kind") == "risk_alarm"] == ["raised"]
    shadowed = [r for r in lines if r.get("kind") == "shadow"]
    assert shadowed and all(r["agree"] == (r["label"] == r["full_label"]) for r in shadowed)


def test_an_idle_instance_shows_the_alarm_it_takes_from_the_decider_at_the_next_publication(tmp_path):
    """The gauges are read from the state when they go out, not pushed by the thread that changed it: an
    instance that takes a raised alarm from the decider between requests shows the alarm and conservative
    mode at its next publication (a gauge pushed from a reading taken a moment before a change could
    overwrite the newer one and stay so while no request came)."""
    leader = checks(ShadowConfig(rate=1.0, seed=9), pid=1)[0]
    rng = np.random.default_rng(9)
    for _ in range(20):  # every early answer wrong: the leader raises on its own checks
        leader.observe(**batch(rng, 20, exits=0), run_full=full_model(1))
        leader.drain()
    assert leader.conservative
    policy = Policy("p-1", "fp", (ExitRule("max_prob", 0.5),) * 3, provenance={"epsilon": 0.05})
    options = ServingOptions(shadow=ShadowConfig(rate=0.5, seed=9), shared_state_dir=str(tmp_path))
    hooks = options.hooks(policy, "i1", "fake")
    hooks.pop("shared").close()
    sink = RecordingSink()
    orchestrator = Orchestrator(SPEC, policy, telemetry=ServingTelemetry(sink, "fake", "i1", 60.0), **hooks)
    try:
        orchestrator.absorb_shared({1: {"shadow": leader.snapshot()}})
        assert orchestrator.conservative
        orchestrator.telemetry.publish(force=True)  # the publishing thread's, once due

        def gauge(name):
            return [v for (n, _), v in sink.values.items() if n == name]

        assert gauge("offramp_risk_alarm") == [1.0] and gauge("offramp_conservative_mode") == [1.0]
    finally:
        orchestrator.close()
        leader.close()
