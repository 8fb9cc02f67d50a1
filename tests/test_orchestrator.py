"""The orchestrator's request handling with fake requests: one answer per request, errors kept apart."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from offramp.backend.contract import TensorSpec
from offramp.backend.orchestrator import Orchestrator, OrchestratorSpec, RequestError, SegmentUnavailable
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
def test_a_bad_request_fails_alone_and_its_neighbours_are_answered_as_if_alone(orchestrator, inputs, parameters, message):
    net = FakeNetwork()
    before, after = good_rows(net, 0, 5), good_rows(net, 5, 3)
    requests = [FakeRequest({"X": before}), FakeRequest(inputs, parameters), FakeRequest({"X": after})]
    answers = orchestrator.execute(requests, net.run_segment, net.run_model)
    assert isinstance(answers[1], RequestError)
    assert re.search(message, str(answers[1])), answers[1]
    for request, answer in [(requests[0], answers[0]), (requests[2], answers[2])]:
        alone = orchestrator.execute([request], FakeNetwork().run_segment, None)[0]
        assert set(answer) == {"LOGITS", "LABEL", "EXIT", "CONFIDENCE", "COST", "FLAGS"}
        for name in answer:
            np.testing.assert_array_equal(answer[name], alone[name], err_msg=name)


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

    requests = [FakeRequest({"X": good_rows(net, 2, 3)}), FakeRequest({"X": poison}), FakeRequest({"X": good_rows(net, 5, 4)})]
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
    assert all(isinstance(a, SegmentUnavailable) for a in answers) and calls == [8]


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
        ({"IDS": IDS, "MASK": MASK[:, :3]}, r"disagree on the sequence length: 'IDS' 4, 'MASK' 3; their lengths must be equal"),
        ({"IDS": IDS + 1, "MASK": MASK}, r"'IDS' holds values in \[1, 100\]; allowed: \[0, 99\]"),
        ({"IDS": IDS - 6, "MASK": MASK}, r"'IDS' holds values in \[-6, 93\]"),
        ({"IDS": IDS, "MASK": MASK * 2}, r"'MASK' holds values in \[0, 2\]; allowed: \[0, 1\]"),
        ({"IDS": np.zeros((1, 9), np.int64), "MASK": np.ones((1, 9), np.int64)}, r"'IDS' is 9 long; the model takes at most 8"),
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
    data = {"version": "p1", "model_fingerprint": "fp", "exits": [{"metric": "max_prob", "threshold": 0.5}] * 3}
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
