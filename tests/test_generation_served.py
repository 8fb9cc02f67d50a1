"""The streaming generator inside a real tritonserver: tritonclient's gRPC stream and perf_analyzer.

One server for the module, serving a tiny random Llama imported as a user's checkpoint, with a
policy whose ``confident`` mode takes every token at the first exit (so that it differs from full
depth and a check can fail there).
"""

from __future__ import annotations

import time
import urllib.request

import pytest

from offramp.backend.generation import ALWAYS, NEVER
from offramp.backend.generation_contract import FLAG_CHECK_FAILED, FLAG_ESCALATED
from offramp.backend.generation_policy import GenerationPolicy
from offramp.build.decoder import import_checkpoint, tiny_random_checkpoint
from offramp.build.generation_repository import write_generator
from offramp.client.generation_client import GenerationClient
from tests.generation_support import tiny_tokenizer

pytestmark = pytest.mark.integration

MODEL = "tiny_coder"
PROMPTS = [
    "def add(a, b):\n",
    "import json\n\n\nclass Encoder:\n    def encode(self, o):\n",
    "x = [1, 2,",
    "for i in range(10):\n    if i % 2:\n",
    "    return self._name\n\n    @property\n",
    "from collections import OrderedDict\n",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, running_server, execution_env):
    directory = tmp_path_factory.mktemp("generator")
    checkpoint = tiny_random_checkpoint(directory / "checkpoint", "llama", tiny_tokenizer())
    artifacts, artifacts_dir = import_checkpoint(checkpoint, directory / "artifacts", exit_layers=(1, 2, 4))
    policy = GenerationPolicy("served-test", artifacts.fingerprint, 1, 3, (ALWAYS, NEVER))
    write_generator(artifacts_dir, policy, directory / "repository", execution_env=execution_env, name=MODEL)
    with running_server(directory / "repository") as server:
        yield server


def test_streams_concurrent_requests_and_self_speculative_is_full(server):
    client = GenerationClient(server.grpc_url, MODEL)
    requests = [
        (p, {"max_tokens": 24, "mode": mode}) for mode in ("full", "self_speculative") for p in PROMPTS
    ]
    completions = client.stream(requests, concurrency=8)
    full, speculative = completions[: len(PROMPTS)], completions[len(PROMPTS) :]
    for a, b in zip(full, speculative, strict=True):
        assert a.error is None and b.error is None
        assert b.tokens == a.tokens and b.text == a.text and a.tokens
        assert a.finish_reason in ("length", "end_of_text")
        assert len(a.arrivals) >= len(a.tokens)  # token by token (the last response may bring none)
    assert sum(len(c.arrivals) for c in speculative) < sum(
        len(c.arrivals) for c in full
    )  # several per verify pass
    # Requests were in flight together: some started before others finished.
    starts = sorted(c.sent_at for c in completions)
    assert starts[7] < min(c.done_at for c in completions)


def test_a_malformed_request_among_many_streams_fails_alone(server):
    client = GenerationClient(server.grpc_url, MODEL)
    alone = client.stream(
        [(p, {"max_tokens": 16, "mode": "self_speculative"}) for p in PROMPTS], concurrency=1
    )
    bad = {
        2: ("", {}),
        5: (PROMPTS[0], {"temperature": 1}),
        9: ("x = 1\n" * 100, {}),
        11: (PROMPTS[1], {"mode": "turbo"}),
    }
    requests = []
    for index in range(16):
        if index in bad:
            prompt, parameters = bad[index]
            requests.append((prompt, {"max_tokens": 16, **parameters}))
        else:
            requests.append((PROMPTS[index % len(PROMPTS)], {"max_tokens": 16, "mode": "self_speculative"}))
    completions = client.stream(requests, concurrency=16)
    for index, completion in enumerate(completions):
        if index in bad:
            assert completion.error is not None and not completion.tokens, index
        else:
            assert completion.error is None
            assert completion.tokens == alone[index % len(PROMPTS)].tokens
    assert "unknown parameter(s) ['temperature']" in completions[5].error
    assert "the context holds" in completions[9].error


def test_a_deadline_finishes_a_long_completion_at_the_cheapest_exit(server):
    client = GenerationClient(server.grpc_url, MODEL)
    free, hurried = client.stream(
        [
            (PROMPTS[1], {"max_tokens": 60, "mode": "full"}),
            (PROMPTS[1], {"max_tokens": 60, "mode": "full", "deadline_ms": 0}),
        ],
        concurrency=1,
    )
    assert set(free.exits) == {2} and free.flags == 0
    assert hurried.flags & 4  # FLAG_DEADLINE
    assert hurried.exits[0] == 2 and set(hurried.exits[1:]) == {0}  # the first token is the prefill's


def test_an_impossible_schema_is_flagged_not_retried_forever(server):
    client = GenerationClient(server.grpc_url, MODEL)
    completion = client.complete(
        PROMPTS[2], max_tokens=12, mode="confident", check="json_schema", check_schema="false"
    )
    assert completion.error is None
    assert completion.attempts == 2
    assert completion.flags == FLAG_ESCALATED | FLAG_CHECK_FAILED
    assert set(completion.exits[1:]) == {2}  # the second attempt ran at full depth


def test_perf_analyzer_drives_the_stream(server, tmp_path):
    from offramp.client.tools.generation_bench import prompt_input_data
    from offramp.client.tools.perf_analyzer import PerfAnalyzerOptions, check_perf_analyzer, run_perf_analyzer

    check_perf_analyzer()
    data = prompt_input_data(tmp_path / "prompts.json", PROMPTS)
    options = PerfAnalyzerOptions(
        url=server.grpc_url, model=MODEL, input_data=data, concurrency=2, shapes={"PROMPT": [1]},
        measurement_interval_ms=800, max_trials=3,
        request_parameters={"max_tokens": 8, "mode": "self_speculative"}, extra_args=("--streaming",),
    )  # fmt: skip
    run = run_perf_analyzer(options, tmp_path / "perf.csv", timeout_s=240)
    assert run.result.rows_per_s > 0
    time.sleep(1.5)  # histograms are published once a second
    metrics = urllib.request.urlopen(server.metrics_url).read().decode()
    for name in (
        "offramp_generation_tokens_total",
        "offramp_generation_draft_tokens_total",
        "offramp_generation_accepted_tokens_total",
        "offramp_generation_time_to_first_token_seconds_count",
        "offramp_generation_time_per_output_token_seconds_count",
        "offramp_generation_escalations_total",
    ):
        assert name in metrics, name
