"""The orchestrator's request handling with fake requests: one answer per request, errors kept apart."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from offramp.backend.contract import (
    FLAG_DEGRADED,
    FLAG_FORCED_FULL,
    FLAG_REROUTED,
    SegmentUnavailable,
    TensorSpec,
    label_names,
)
from offramp.backend.orchestrator import (
    Orchestrator,
    OrchestratorSpec,
    RequestError,
    ServiceDegraded,
    ServingOptions,
)
from offramp.backend.policy import ExitRule, Policy, PolicyError
from tests.fakes import FakeNetwork

SPEC = OrchestratorSpec(
    model_name="fake",
    segment_models=("s0", "s1", "s2"),
    full_model="fake_full",
    inputs=(TensorSpec("X", "float32", (6,)),),
    side_inputs=(),
    exit_costs=(0.3, 0.6, 1.0),
    class_names=("a", "b", "c", "d"),
    fingerprint="fp",
)


class FakeRequest:
    def __init__(self, inputs: dict, parameters: dict | None = None):
        self.inputs = inputs
        self.params = parameters or {}

    def input(self, name):
        return self.inputs.get(name)

    def parameters(self):
        return self.params


@pytest.fixture
def orchestrator():
    return Orchestrator(SPEC, Policy("p1", "fp", (ExitRule("max_prob", 0.6),) * 3))


def good_rows(net, start, rows):
    x = net.inputs(start + rows)["X"]
    return x[start:]


BAD_REQUESTS = [
    ({}, None, "input 'X' is missing"),
    ({"X": np.zeros((2, 6), np.float64)}, None, "must be float32"),
    ({"X": np.zeros((2, 5), np.float32)}, None, r"shape \[-1, 6\]"),
    ({"X": np.zeros((2, 6, 1), np.float32)}, None, r"shape \[-1, 6\]"),
    ({"X": np.zeros((0, 6), np.float32)}, None, "no rows"),
    ({"X": np.full((2, 6), np.inf, np.float32)}, None, "NaN or infinite"),
    ({"X": np.zeros((2, 6), np.float32)}, {"max_exit": 3}, "max_exit"),
    ({"X": np.zeros((2, 6), np.float32)}, {"min_exit": "two"}, "must be an integer"),
    ({"X": np.zeros((2, 6), np.float32)}, {"min_exit": 2, "max_exit": 1}, "above max_exit"),
    ({"X": np.zeros((2, 6), np.float32)}, {"force_full": "maybe"}, "boolean"),
    ({"X": np.zeros((2, 6), np.float32)}, {"request_id": 7}, "string"),
    ({"X": np.zeros((2, 6), np.float32)}, {"priority_boost": 1}, "unknown request parameters"),
]


@pytest.mark.parametrize("inputs,parameters,message", BAD_REQUESTS)
def test_a_bad_request_fails_alone_and_its_neighbours_are_answered_as_if_alone(
    orchestrator, inputs, parameters, message
):
    net = FakeNetwork()
    before, after = good_rows(net, 0, 5), good_rows(net, 5, 3)
    requests = [FakeRequest({"X": before}), FakeRequest(inputs, parameters), FakeRequest({"X": after})]
    answers = orchestrator.execute(requests, net.run_segment, net.run_model)
    assert isinstance(answers[1], RequestError)
    assert re.search(message, str(answers[1])), answers[1]
    for request, answer in [(requests[0], answers[0]), (requests[2], answers[2])]:
        alone = orchestrator.execute([request], FakeNetwork().run_segment, None)[0]
        assert set(answer) == {"LOGITS", "LABEL", "EXIT", "CONFIDENCE", "COST", "FLAGS", "LABEL_NAME"}
        for name in answer:
            np.testing.assert_array_equal(answer[name], alone[name], err_msg=name)


def test_every_answer_and_audit_record_names_its_label(orchestrator, tmp_path):
    """LABEL_NAME is the class name of LABEL, UTF-8 bytes; empty where no label could be given (-1).
    The audit records carry the name too."""
    from offramp.backend.audit import AuditConfig, AuditLog, read_audit

    net = FakeNetwork()
    orchestrator.audit = AuditLog(AuditConfig(tmp_path / "audit.jsonl"))
    try:
        request = FakeRequest({"X": net.inputs(12)["X"]})
        answer = orchestrator.execute([request], net.run_segment, net.run_model)[0]
    finally:
        orchestrator.audit.close()
        orchestrator.audit = None
    assert answer["LABEL_NAME"].dtype == np.object_ and len(set(answer["LABEL"].tolist())) > 1
    assert answer["LABEL_NAME"].tolist() == [SPEC.class_names[label].encode() for label in answer["LABEL"]]
    records = list(read_audit([tmp_path / "audit.jsonl"]))
    assert len(records) == 12 and [r["label_name"] for r in records] == [
        SPEC.class_names[r["label"]] for r in records
    ]
    assert label_names(np.array([2, -1, 0]), ("a", "b", "ç")).tolist() == [b"\xc3\xa7", b"", b"a"]


def test_request_parameters_apply_per_request(orchestrator):
    net = FakeNetwork()
    x = net.inputs(20)["X"]
    answers = orchestrator.execute(
        [
            FakeRequest({"X": x}, {"force_full": True, "request_id": "r1"}),
            FakeRequest({"X": x}, {"max_exit": 0}),
            FakeRequest({"X": x}, {"min_exit": "1", "force_full": "false"}),
        ],
        net.run_segment,
        net.run_model,
    )
    assert (answers[0]["EXIT"] == 2).all() and (answers[0]["COST"] == 1.0).all()
    assert (answers[1]["EXIT"] == 0).all()
    assert (answers[2]["EXIT"] >= 1).all()


def test_a_failing_segment_fails_the_good_requests_and_keeps_the_bad_ones_errors(orchestrator):
    def broken(index, tensors, need_hidden):
        raise RuntimeError("segment s1 is unavailable")

    answers = orchestrator.execute(
        [FakeRequest({"X": np.zeros((2, 6), np.float32)}), FakeRequest({})], broken, None
    )
    assert "unavailable" in str(answers[0]) and "missing" in str(answers[1])


def test_a_request_that_breaks_a_segment_fails_alone_and_the_rest_run_again(orchestrator):
    """A fault parse cannot foresee (here: a row with a poison value) fails only its own request."""
    net = FakeNetwork()
    poison = good_rows(net, 0, 2)
    poison[1, 3] = 1e6

    def fragile(index, tensors, need_hidden):
        if (np.abs(tensors["X" if index == 0 else "hidden_in"][:, 1:]) > 1e5).any():
            raise RuntimeError("segment overflow")
        return net.run_segment(index, tensors, need_hidden)

    requests = [
        FakeRequest({"X": good_rows(net, 2, 3)}),
        FakeRequest({"X": poison}),
        FakeRequest({"X": good_rows(net, 5, 4)}),
    ]
    answers = orchestrator.execute(requests, fragile, None)
    assert str(answers[1]) == "segment overflow"
    for request, answer in [(requests[0], answers[0]), (requests[2], answers[2])]:
        alone = orchestrator.execute([request], FakeNetwork().run_segment, None)[0]
        for name in answer:
            np.testing.assert_array_equal(answer[name], alone[name], err_msg=name)


def test_an_unavailable_segment_fails_the_batch_once_without_rerunning_each_request(orchestrator):
    calls = []

    def missing(index, tensors, need_hidden):
        calls.append(len(tensors["X"]))
        raise SegmentUnavailable("s0 failed: model is not ready")

    requests = [FakeRequest({"X": np.zeros((2, 6), np.float32)}) for _ in range(4)]
    answers = orchestrator.execute(requests, missing, None)
    assert all(isinstance(a, ServiceDegraded) for a in answers) and calls == [8]
    assert "service degraded: s0 failed: model is not ready" in str(answers[0])


class Outage:
    """The fake network with segment ``down`` (and, if ``full_down``, the full model) unavailable."""

    def __init__(self, down: int | None, full_down: bool = False) -> None:
        self.net, self.down, self.full_down = FakeNetwork(), down, full_down
        self.segment_calls = [0, 0, 0]
        self.full_calls = 0

    def run_segment(self, index, tensors, need_hidden):
        self.segment_calls[index] += 1
        if index == self.down:
            raise SegmentUnavailable(f"s{index} failed: Stub process 's{index}_0_0' is not healthy.")
        return self.net.run_segment(index, tensors, need_hidden)

    def run_model(self, name, tensors):
        self.full_calls += 1
        if self.full_down:
            raise SegmentUnavailable(f"{name} failed: Stub process '{name}_0_0' is not healthy.")
        return self.net.run_full(tensors)


def _served(orchestrator, outage, rows=32, parameters=None):
    x = good_rows(outage.net, 0, rows)
    request = FakeRequest({"X": x}, parameters)
    return orchestrator.execute([request], outage.run_segment, outage.run_model)[0], x


def test_rows_a_segment_outage_strands_are_answered_by_the_full_model(orchestrator):
    healthy, x = _served(orchestrator, Outage(None))
    answer, _ = _served(orchestrator, Outage(1))
    stranded = healthy["EXIT"].reshape(-1) >= 1
    assert stranded.any() and (~stranded).any()
    for name in ("LOGITS", "LABEL", "EXIT", "CONFIDENCE"):  # the early leavers keep their answers
        np.testing.assert_array_equal(answer[name][~stranded], healthy[name][~stranded], err_msg=name)
    flags, exits = answer["FLAGS"].reshape(-1), answer["EXIT"].reshape(-1)
    assert (flags[stranded] == FLAG_REROUTED).all() and not flags[~stranded].any()
    assert (exits[stranded] == 2).all()
    full = FakeNetwork().run_full({"X": x[stranded]})  # the last exit's temperature is 1
    np.testing.assert_array_equal(answer["LOGITS"][stranded], full)
    np.testing.assert_allclose(answer["COST"].reshape(-1)[stranded], 0.3 + 1.0)  # exit 0's segment, then full


def test_an_outage_at_the_first_segment_is_answered_by_the_full_model(orchestrator):
    answer, x = _served(orchestrator, Outage(0))
    assert (answer["FLAGS"] == FLAG_REROUTED).all() and (answer["EXIT"] == 2).all()
    np.testing.assert_array_equal(answer["LOGITS"], FakeNetwork().run_full({"X": x}))
    np.testing.assert_allclose(answer["COST"], 1.0)


def test_with_the_full_model_down_too_the_policy_decides_between_degraded_answers_and_errors(orchestrator):
    healthy, _ = _served(orchestrator, Outage(None))
    strict, _ = _served(orchestrator, Outage(1, full_down=True))
    assert isinstance(strict, ServiceDegraded)
    assert "s1 failed" in str(strict) and "fake_full is unavailable too" in str(strict)
    assert "degraded_answers" in str(strict)

    lenient = Orchestrator(SPEC, replace(orchestrator.policy, degraded_answers=True))
    answer, _ = _served(lenient, Outage(1, full_down=True))
    exits, flags = answer["EXIT"].reshape(-1), answer["FLAGS"].reshape(-1)
    stranded = healthy["EXIT"].reshape(-1) >= 1
    assert (exits[stranded] == 0).all() and (flags[stranded] == FLAG_DEGRADED).all()
    assert not flags[~stranded].any()
    # A stranded row answers with its own exit-0 verdict: what it gets when capped there.
    capped, _ = _served(lenient, Outage(None), parameters={"max_exit": 0})
    np.testing.assert_array_equal(answer["LOGITS"], capped["LOGITS"])
    np.testing.assert_array_equal(answer["LABEL"], capped["LABEL"])

    nothing_reached = Outage(0, full_down=True)  # no exit was reached: no answer is possible
    answer, _ = _served(lenient, nothing_reached)
    assert isinstance(answer, ServiceDegraded) and "no exit was reached" in str(answer)


def test_an_outage_fails_only_the_requests_whose_rows_it_strands(orchestrator):
    lenient = Orchestrator(SPEC, replace(orchestrator.policy, degraded_answers=True))
    outage = Outage(0, full_down=True)
    x = good_rows(outage.net, 0, 4)
    requests = [FakeRequest({"X": x}), FakeRequest({"X": x}, {"force_full": True})]
    # The forced request's rows need the full model, which is down: they go through the segments,
    # which are down too; nothing answers either request.
    answers = lenient.execute(requests, outage.run_segment, outage.run_model)
    assert all(isinstance(a, ServiceDegraded) for a in answers)
    only_full_down = Outage(None, full_down=True)
    answers = orchestrator.execute(requests, only_full_down.run_segment, only_full_down.run_model)
    healthy = orchestrator.execute(requests, Outage(None).run_segment, Outage(None).run_model)
    for answer, reference in zip(answers, healthy, strict=True):
        assert not isinstance(answer, Exception)
        np.testing.assert_array_equal(answer["LABEL"], reference["LABEL"])
    forced = answers[1]
    assert (forced["EXIT"] == 2).all() and (forced["FLAGS"] == FLAG_FORCED_FULL).all()


def test_an_unavailable_model_is_not_called_again_until_its_retry_time():
    clock = [0.0]
    orchestrator = Orchestrator(SPEC, Policy("p1", "fp", (ExitRule("max_prob", 0.6),) * 3))
    orchestrator.outages.clock = lambda: clock[0]
    outage = Outage(1)
    for _ in range(3):
        answer, _ = _served(orchestrator, outage)
        assert not isinstance(answer, Exception)
    assert outage.segment_calls[1] == 1, "the dead segment was asked again within its retry time"
    clock[0] += orchestrator.outages.retry_after_s
    outage.down = None  # it came back
    answer, _ = _served(orchestrator, outage)
    assert outage.segment_calls[1] == 2 and not (answer["FLAGS"] & FLAG_REROUTED).any()


def test_a_negative_exit_counts_from_the_last(orchestrator):
    net = FakeNetwork()
    x = good_rows(net, 0, 16)
    deepest = orchestrator.execute([FakeRequest({"X": x}, {"min_exit": -1})], net.run_segment, None)[0]
    assert (deepest["EXIT"] == 2).all()
    capped = orchestrator.execute([FakeRequest({"X": x}, {"max_exit": -3})], net.run_segment, None)[0]
    assert (capped["EXIT"] == 0).all()
    refused = orchestrator.execute([FakeRequest({"X": x}, {"min_exit": -4})], net.run_segment, None)[0]
    assert isinstance(refused, RequestError) and "[-3, 2]" in str(refused)


TEXT_SPEC = OrchestratorSpec(
    model_name="text",
    segment_models=("s0", "s1", "s2"),
    full_model="text_full",
    inputs=(
        TensorSpec("IDS", "int64", (-1,), low=0, high=99, max_length=8),
        TensorSpec("MASK", "int64", (-1,), low=0, high=1, max_length=8),
    ),
    side_inputs=("MASK",),
    exit_costs=(0.3, 0.6, 1.0),
    class_names=("a", "b", "c", "d"),
    fingerprint="fp",
)
IDS = np.array([[5, 17, 99, 0], [3, 4, 0, 0]], np.int64)
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int64)


@pytest.mark.parametrize(
    "inputs,message",
    [
        (
            {"IDS": IDS, "MASK": MASK[:, :3]},
            r"disagree on the sequence length: 'IDS' 4, 'MASK' 3; their lengths must be equal",
        ),
        ({"IDS": IDS + 1, "MASK": MASK}, r"'IDS' holds values in \[1, 100\]; allowed: \[0, 99\]"),
        ({"IDS": IDS - 6, "MASK": MASK}, r"'IDS' holds values in \[-6, 93\]"),
        ({"IDS": IDS, "MASK": MASK * 2}, r"'MASK' holds values in \[0, 2\]; allowed: \[0, 1\]"),
        (
            {"IDS": np.zeros((1, 9), np.int64), "MASK": np.ones((1, 9), np.int64)},
            r"'IDS' is 9 long; the model takes at most 8",
        ),
    ],
)
def test_pre_tokenized_inputs_outside_the_models_limits_are_refused(inputs, message):
    orchestrator = Orchestrator(TEXT_SPEC, Policy("p1", "fp", (ExitRule("max_prob", 0.6),) * 3))
    with pytest.raises(RequestError, match=message):
        orchestrator.parse(FakeRequest(inputs))
    parsed = orchestrator.parse(FakeRequest({"IDS": IDS, "MASK": MASK}))  # the limits themselves are fine
    assert parsed.rows == 2


def test_only_bad_requests_never_reach_a_segment(orchestrator):
    def unreachable(*args):
        raise AssertionError("no segment should run")

    answers = orchestrator.execute([FakeRequest({})], unreachable, unreachable)
    assert isinstance(answers[0], RequestError)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"exits": [{"metric": "max_prob", "threshold": 0.5}] * 2}, "2 rules for a model with 3 exits"),
        ({"exits": [{"metric": "energy", "threshold": 0.5}] * 3}, "metric 'energy'"),
        ({"exits": [{"threshold": [0.5, 0.5]}] * 3}, "2 per-class thresholds for 4 classes"),
        ({"exits": [{"temperature": 0}] * 3}, "temperature"),
        ({"model_fingerprint": "other"}, "not for the served model"),
        ({"full_depth_route": "nowhere"}, "full_depth_route"),
        ({"version": ""}, "version is empty"),
    ],
)
def test_invalid_policies_are_refused_at_load(tmp_path, change, message):
    data = {
        "version": "p1",
        "model_fingerprint": "fp",
        "exits": [{"metric": "max_prob", "threshold": 0.5}] * 3,
    }
    data.update(change)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PolicyError, match=message):
        Orchestrator(SPEC, Policy.load(path))


def test_malformed_policy_files_are_refused(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text("{not json")
    with pytest.raises(PolicyError):
        Policy.load(path)
    path.write_text(json.dumps({"version": "p1"}))
    with pytest.raises(PolicyError, match="malformed"):
        Policy.load(path)


def test_policy_round_trips_through_json(tmp_path):
    policy = Policy("p2", "fp", (ExitRule("entropy", (0.1, 0.2, 0.3, 0.4), 1.5),) * 3, provenance={"n": 5})
    assert Policy.load(policy.save(tmp_path / "policy.json")) == policy


def _ladder_orchestrator(
    rung: int,
    shedding: bool = False,
    shed_max_exit: int | None = None,
    thresholds=(0.45, 0.3),
    **policy_fields,
):
    from offramp.backend.policy import Rung
    from offramp.backend.slo import SloConfig, SloController

    rungs = tuple(
        Rung(0.01 * (i + 2), (ExitRule("max_prob", threshold),) * 3, expected_cost=0.5)
        for i, threshold in enumerate(thresholds)
    )
    policy = Policy("ladder-1", "fp", (ExitRule("max_prob", 0.6),) * 3, rungs=rungs, **policy_fields)
    slo = SloController(SloConfig(100.0, shed_max_exit=shed_max_exit), len(rungs), lambda: None, lambda: 0.0)
    slo.rung, slo.shedding = rung, shedding
    return Orchestrator(SPEC, policy, slo=slo), rungs


def test_rows_are_served_at_the_controllers_rung_except_forced_and_pinned_ones():
    net = FakeNetwork()
    x = good_rows(net, 0, 64)
    orchestrator, rungs = _ladder_orchestrator(2, pinned_cohorts=("vip",))
    requests = [
        FakeRequest({"X": x}),
        FakeRequest({"X": x}, {"cohort": "vip"}),
        FakeRequest({"X": x}, {"force_full": True}),
    ]
    plain, pinned, forced = orchestrator.execute(requests, net.run_segment, net.run_model)
    at_rung = Orchestrator(SPEC, Policy("r2", "fp", rungs[1].exits)).execute(
        [requests[0]], net.run_segment, None
    )[0]
    at_zero = Orchestrator(SPEC, Policy("r0", "fp", (ExitRule("max_prob", 0.6),) * 3)).execute(
        [requests[0]], net.run_segment, None
    )[0]
    np.testing.assert_array_equal(plain["EXIT"], at_rung["EXIT"])
    np.testing.assert_array_equal(pinned["EXIT"], at_zero["EXIT"])
    assert (plain["EXIT"] < at_zero["EXIT"]).any(), "rung 2 should let rows leave earlier"
    assert (forced["EXIT"] == 2).all()


def test_audit_records_and_metrics_say_which_rung_served_each_row(tmp_path):
    from offramp.backend.audit import AuditConfig, AuditLog, read_audit
    from offramp.backend.telemetry import ServingTelemetry
    from tests.test_monitoring import RecordingSink

    net = FakeNetwork()
    orchestrator, _ = _ladder_orchestrator(1)
    sink = RecordingSink()
    orchestrator.telemetry = ServingTelemetry(sink, "fake", publish_interval_s=0.0)
    orchestrator.audit = AuditLog(AuditConfig(tmp_path / "audit.jsonl"))
    requests = [
        FakeRequest({"X": good_rows(net, 0, 4)}),
        FakeRequest({"X": good_rows(net, 4, 3)}, {"force_full": True}),
    ]
    orchestrator.execute(requests, net.run_segment, net.run_model)
    orchestrator.audit.close()
    assert [r["rung"] for r in read_audit([tmp_path / "audit.jsonl"])] == [1] * 4 + [0] * 3
    by_rung = {dict(k)["rung"]: v for (n, k), v in sink.values.items() if n == "offramp_rung_rows_total"}
    assert by_rung == {"1": 4, "0": 3}


def test_load_shedding_caps_depth_and_flags_the_rows_it_capped():
    from offramp.backend.contract import FLAG_SHED

    net = FakeNetwork()
    x = good_rows(net, 0, 64)
    orchestrator, _ = _ladder_orchestrator(1, shedding=True, shed_max_exit=1, thresholds=(0.95,))
    shed, forced = orchestrator.execute([FakeRequest({"X": x}), FakeRequest({"X": x}, {"force_full": True})],
                                        net.run_segment, net.run_model)  # fmt: skip
    exits, flags = shed["EXIT"].reshape(-1), shed["FLAGS"].reshape(-1)
    assert exits.max() == 1 and (exits == 1).any()
    capped = (flags & FLAG_SHED) != 0
    assert capped.any() and (exits[capped] == 1).all()
    assert (forced["EXIT"] == 2).all() and not (forced["FLAGS"] & FLAG_SHED).any()


def test_the_execute_time_is_split_into_parts_that_add_up(orchestrator):
    """Every segment run sleeps 20 ms, so that part's time is known from below: it lands in "segments"
    (at least the sleeps), not in the cascade's own work, and the parts together are the execute's
    wall time (measured around it here, so they can only be less)."""
    import time

    from offramp.backend.telemetry import ServingTelemetry
    from tests.test_monitoring import RecordingSink

    net = FakeNetwork()
    calls = []

    def slow_segment(index, tensors, need_hidden):
        calls.append(index)
        time.sleep(0.02)
        return net.run_segment(index, tensors, need_hidden)

    sink = RecordingSink()
    orchestrator.telemetry = ServingTelemetry(sink, "fake", publish_interval_s=0.0)
    requests = [FakeRequest({"X": good_rows(net, 0, 8)}), FakeRequest({"X": good_rows(net, 8, 8)})]
    started = time.perf_counter()
    orchestrator.execute(requests, slow_segment, net.run_model)
    wall = time.perf_counter() - started
    orchestrator.telemetry.publish(force=True)
    parts = {dict(k)["part"]: v for (n, k), v in sink.values.items() if n == "offramp_execute_seconds_total"}
    assert set(parts) == {"parse", "cascade", "segments", "observe"}
    assert parts["segments"] >= 0.02 * len(calls) and calls
    assert parts["cascade"] < 0.02  # the sleeps are not the cascade's
    assert sum(parts.values()) <= wall
    totals = {
        n: v
        for (n, k), v in sink.values.items()
        if n in ("offramp_executes_total", "offramp_execute_requests_total")
    }
    assert totals == {"offramp_executes_total": 1, "offramp_execute_requests_total": 2}


def test_the_slo_controller_knows_each_rungs_expected_compute_where_the_policy_has_it():
    from offramp.backend.policy import Rung

    rungs = tuple(
        Rung(e, (ExitRule("max_prob", 0.4),) * 3, expected_cost=c) for e, c in ((0.05, 0.5), (0.1, 0.4))
    )
    calibrated = Policy(
        "l", "fp", (ExitRule("max_prob", 0.6),) * 3, rungs=rungs, provenance={"expected_cost": 0.7}
    )
    options = ServingOptions(slo_p99_ms=100.0)
    assert options.hooks(calibrated, "i0", "")["slo"].costs == (0.7, 0.5, 0.4)
    # A hand-written policy without the calibration's figures: the controller learns capacities only.
    assert options.hooks(replace(calibrated, provenance={}), "i0", "")["slo"].costs == ()
    # Shedding at exit 1: a shed row costs what the top rung's calibration exit shares, capped there, do.
    top = replace(rungs[-1], exit_rate_profile=(0.7, 0.2, 0.1))
    with_profile = replace(
        calibrated, rungs=(rungs[0], top), provenance={"expected_cost": 0.7, "exit_costs": (0.2, 0.6, 1.0)}
    )
    shedding = replace(options, slo_shed_max_exit=1)
    assert shedding.hooks(with_profile, "i0", "")["slo"].shed_cost == pytest.approx(0.7 * 0.2 + 0.3 * 0.6)
    assert options.hooks(with_profile, "i0", "")["slo"].shed_cost is None  # shedding not enabled
    assert shedding.hooks(calibrated, "i0", "")["slo"].shed_cost is None  # no exit shares
