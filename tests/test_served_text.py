"""A text model served with raw TEXT in: the server's tokenization and cascade equal the in-process ones,
and unusual text gets an answer or a clear per-request error."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from offramp.backend.text import TextEncoder, TextSpec
from offramp.build.repository import RepositoryOptions, write_repository
from offramp.client.grpc_client import OfframpClient
from tests.served_reference import QUESTIONS, Reference, spread_policy

TEXT_ROWS = list(QUESTIONS) * 4


@pytest.fixture(scope="module")
def served_text(quick_text_model, tmp_path_factory, running_server, execution_env):
    artifacts, directory = quick_text_model
    encoder = TextEncoder(
        directory, TextSpec(artifacts.build["tokenizer_dir"], artifacts.build["max_length"])
    )
    ids, mask = encoder.encode(np.array(TEXT_ROWS, dtype=object))
    policy = spread_policy(artifacts, directory, {"INPUT_IDS": ids, "ATTENTION_MASK": mask}, version="text-1")
    repository = tmp_path_factory.mktemp("text_repo")
    write_repository(artifacts, directory, policy, repository, RepositoryOptions(execution_env=execution_env))
    with running_server(repository) as server:
        yield server, artifacts, directory, policy, encoder


def test_served_text_equals_the_in_process_cascade(served_text):
    server, artifacts, directory, policy, encoder = served_text
    ids, mask = encoder.encode(np.array(TEXT_ROWS, dtype=object))
    expected = Reference(artifacts, directory, policy)({"INPUT_IDS": ids, "ATTENTION_MASK": mask})
    assert len(set(expected.exit.tolist())) > 1, "the policy should use more than one exit"
    with OfframpClient(server.grpc_url) as client:
        whole = client.classify_text(artifacts.name, TEXT_ROWS)
        # One row at a time: other padding lengths, no batch-mates; the answers must not move.
        alone = [client.classify_text(artifacts.name, [q]) for q in TEXT_ROWS[:8]]
        pretokenized = client.classify(artifacts.name, {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
    for served in [whole, pretokenized]:
        np.testing.assert_array_equal(served.exit, expected.exit)
        np.testing.assert_array_equal(served.label, expected.label)
        np.testing.assert_allclose(served.logits, expected.logits, rtol=0, atol=1e-4)
    for row, result in enumerate(alone):
        assert result.exit[0] == expected.exit[row] and result.label[0] == expected.label[row]
        np.testing.assert_allclose(result.logits[0], expected.logits[row], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "😀🚀" * 10,
        "word " * 500,
        "naïve café über straße",
        "\x00\x01 control",
        "<script>alert(1)</script>",
    ],
)
def test_unusual_text_gets_an_answer(served_text, text):
    server, artifacts, *_ = served_text
    with OfframpClient(server.grpc_url) as client:
        result = client.classify_text(artifacts.name, [text, "Who wrote Hamlet?"])
    assert len(result) == 2 and (result.label >= 0).all() and (result.exit >= 0).all()


def test_invalid_utf8_fails_alone(served_text):
    server, artifacts, *_ = served_text
    with OfframpClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="not valid UTF-8"):
            client.classify_text(artifacts.name, [b"ok", b"\xff\xfe broken"])
        with pytest.raises(InferenceServerException, match="either TEXT or"):
            ids = np.ones((1, 4), np.int64)
            client.classify(
                artifacts.name,
                {"TEXT": np.array([[b"x"]], dtype=object), "INPUT_IDS": ids, "ATTENTION_MASK": ids},
            )
        assert len(client.classify_text(artifacts.name, ["still served"])) == 1
