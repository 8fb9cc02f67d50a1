"""The multi-exit CNN served by a real tritonserver equals the in-process cascade, request by request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from offramp.backend.contract import FLAG_DEADLINE
from offramp.backend.orchestrator import ServingOptions
from offramp.build.repository import RepositoryOptions, write_repository
from offramp.client.grpc_client import OfframpClient, Predictions
from tests.served_reference import Reference, spread_policy

pytestmark = pytest.mark.integration
ROWS = 256


@pytest.fixture(scope="module")
def served_cnn(quick_cnn, tmp_path_factory, running_server, execution_env, fashion_test):
    artifacts, directory = quick_cnn
    repository = tmp_path_factory.mktemp("repo")
    policy = spread_policy(artifacts, directory, {"IMAGE": fashion_test[0][:ROWS]})
    write_repository(artifacts, directory, policy, repository, RepositoryOptions(execution_env=execution_env))
    with running_server(repository) as server:
        yield server, artifacts, directory, policy


def assert_matches(served: Predictions, expected, rows=slice(None)):
    # Same ONNX files, same ONNX Runtime: labels and exits agree exactly; floats to ORT's batch noise.
    np.testing.assert_array_equal(served.exit, expected.exit[rows])
    np.testing.assert_array_equal(served.label, expected.label[rows])
    np.testing.assert_allclose(served.logits, expected.logits[rows], rtol=0, atol=1e-5)
    np.testing.assert_allclose(served.confidence, expected.confidence[rows], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(served.cost, expected.cost[rows])


def test_served_answers_equal_the_in_process_cascade(served_cnn, fashion_test):
    server, artifacts, directory, policy = served_cnn
    images = fashion_test[0][:ROWS]
    expected = Reference(artifacts, directory, policy)({"IMAGE": images})
    assert len(set(expected.exit.tolist())) == artifacts.num_exits, "the policy should use every exit"
    with OfframpClient(server.grpc_url) as client:
        whole = client.classify(artifacts.name, images)
        assert_matches(whole, expected)

        # Many small concurrent requests: merged by the dynamic batchers, compacted, answered apart.
        def one(start):
            with OfframpClient(server.grpc_url) as own:
                return start, own.classify(artifacts.name, images[start : start + 4])

        with ThreadPoolExecutor(8) as pool:
            for start, part in pool.map(one, range(0, ROWS, 4)):
                assert_matches(part, expected, slice(start, start + 4))


def test_full_model_and_forced_rows(served_cnn, fashion_test):
    server, artifacts, directory, policy = served_cnn
    images = fashion_test[0][:64]
    with OfframpClient(server.grpc_url) as client:
        forced = client.classify(artifacts.name, images, force_full=True)
        full = client.full_logits(f"{artifacts.name}_full", images)
    assert (forced.exit == artifacts.num_exits - 1).all() and (forced.cost == 1.0).all()
    np.testing.assert_allclose(forced.logits, full, rtol=0, atol=1e-5)
    assert_matches(
        forced, Reference(artifacts, directory, policy)({"IMAGE": images}, np.ones(64, dtype=bool))
    )


def _raw_infer(url, model, images, parameters=None, outputs=None):
    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput("IMAGE", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        requested = None if outputs is None else [grpcclient.InferRequestedOutput(n) for n in outputs]
        return client.infer(model, [tensor], parameters=parameters, outputs=requested)


def test_a_request_gets_the_outputs_it_names_and_all_when_it_names_none(served_cnn, fashion_test):
    server, artifacts, directory, policy = served_cnn
    images = fashion_test[0][:8]
    expected = Reference(artifacts, directory, policy)({"IMAGE": images})
    named = _raw_infer(server.grpc_url, artifacts.name, images, outputs=["LABEL", "EXIT"])
    # A response's outputs come in no fixed order (both orders seen): compared as a set.
    assert {o.name for o in named.get_response().outputs} == {"LABEL", "EXIT"}
    np.testing.assert_array_equal(named.as_numpy("LABEL").reshape(-1), expected.label)
    np.testing.assert_array_equal(named.as_numpy("EXIT").reshape(-1), expected.exit)
    every = _raw_infer(server.grpc_url, artifacts.name, images)
    assert {o.name for o in every.get_response().outputs} == {
        "LOGITS", "LABEL", "EXIT", "CONFIDENCE", "COST", "FLAGS", "LABEL_NAME"
    }  # fmt: skip


@pytest.mark.parametrize(
    "images,parameters,message",
    [
        (np.zeros((2, 1, 27, 28), np.float32), None, "unexpected shape"),
        (np.full((2, 1, 28, 28), np.nan, np.float32), None, "NaN or infinite"),
        (np.zeros((2, 1, 28, 28), np.float32), {"max_exit": 9}, "max_exit"),
        (np.zeros((2, 1, 28, 28), np.float32), {"depth": 1}, "unknown request parameters"),
    ],
)
def test_a_bad_request_fails_alone(served_cnn, fashion_test, images, parameters, message):
    server, artifacts, directory, policy = served_cnn
    good = fashion_test[0][:ROWS]
    expected = Reference(artifacts, directory, policy)({"IMAGE": good})

    def good_request(start):
        with OfframpClient(server.grpc_url) as client:
            return start, client.classify(artifacts.name, good[start : start + 16])

    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(good_request, s) for s in range(0, ROWS, 16)]
        bads = [
            pool.submit(_raw_infer, server.grpc_url, artifacts.name, images, parameters) for _ in range(4)
        ]
        for future in bads:
            with pytest.raises(InferenceServerException, match=message):
                future.result()
        for future in goods:
            start, part = future.result()
            assert_matches(part, expected, slice(start, start + 16))


def test_request_policies_through_the_server(served_cnn, fashion_test):
    server, artifacts, _, policy = served_cnn
    images = fashion_test[0][:64]
    with OfframpClient(server.grpc_url) as client:
        late = client.classify(artifacts.name, images, deadline_ms=0, request_id="late")
        capped = client.classify(artifacts.name, images, max_exit=1)
        deep = client.classify(artifacts.name, images, min_exit=2, cohort="no-such-cohort")
    assert (late.exit == 0).all()
    unsure = late.confidence[:, 0] < policy.exits[0].threshold
    assert unsure.any() and (late.flags[unsure] == FLAG_DEADLINE).all() and (late.flags[~unsure] == 0).all()
    assert (capped.exit <= 1).all()
    assert (deep.exit == 2).all()


def test_segments_in_process_serve_the_same_answers(
    quick_cnn, served_cnn, fashion_test, tmp_path, running_server, execution_env
):
    _, artifacts, directory, policy = served_cnn
    options = RepositoryOptions(execution_env=execution_env, serving=ServingOptions(segments_in_process=True))
    write_repository(artifacts, directory, policy, tmp_path / "repo", options)
    images = fashion_test[0][:ROWS]
    expected = Reference(artifacts, directory, policy)({"IMAGE": images})
    with running_server(tmp_path / "repo") as server, OfframpClient(server.grpc_url) as client:
        assert_matches(client.classify(artifacts.name, images), expected)
        forced = client.classify(artifacts.name, images[:16], force_full=True)
    assert (forced.exit == artifacts.num_exits - 1).all()
