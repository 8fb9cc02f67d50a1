"""The generator's request handling, checks, escalation, metrics and audit, without a server.

The model is a tiny random Llama imported as a user's checkpoint would be; requests go through
``GenerationService.submit`` with a recording stream, and rounds are run by hand.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch

from offramp.backend.audit import AuditConfig, AuditLog, read_audit
from offramp.backend.exit_decoder import ExitDecoder, reproducible_gemm
from offramp.backend.generation import ALWAYS, NEVER
from offramp.backend.generation_checks import python_prefix_error
from offramp.backend.generation_contract import FLAG_CHECK_FAILED, FLAG_ESCALATED
from offramp.backend.generation_policy import GenerationPolicy
from offramp.backend.generation_service import (
    BackgroundSender,
    GenerationService,
    GenerationTelemetry,
    ServiceOptions,
)
from offramp.build.decoder import import_checkpoint, tiny_random_checkpoint
from tests.generation_support import tiny_tokenizer

reproducible_gemm()  # before this process' first matrix product: MKL fixes its rounding mode there

PROMPTS = ["def add(a, b):\n", "import json\n\n\nclass Encoder:\n    def encode(self, o):\n", "x = [1, 2,"]


class RecordingStream:
    def __init__(self) -> None:
        self.responses: list[dict] = []
        self.error: tuple[str, bool] | None = None

    def send(self, outputs, final):
        assert not self.done, "a response after the final one"
        self.responses.append({**{k: np.asarray(v).copy() for k, v in outputs.items()}, "final": final})

    def fail(self, message, request_error):
        assert not self.done
        self.error = (message, request_error)

    @property
    def done(self) -> bool:
        return self.error is not None or any(r["final"] for r in self.responses)

    def text(self, attempt: int | None = None) -> str:
        last = max(int(r["ATTEMPT"][0]) for r in self.responses) if attempt is None else attempt
        return "".join(r["TEXT"][0].decode() for r in self.responses if int(r["ATTEMPT"][0]) == last)

    @property
    def final(self) -> dict:
        return self.responses[-1]


class DictSink:
    def __init__(self) -> None:
        self.counters: dict[tuple, float] = {}

    def increment(self, name, description, labels, value):
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, name, description, labels, value):
        self.counters[(name, tuple(sorted(labels.items())))] = value

    def total(self, name: str, **labels: str) -> float:
        return sum(
            v for (n, ls), v in self.counters.items() if n == name and labels.items() <= dict(ls).items()
        )


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_generator")
    checkpoint = tiny_random_checkpoint(directory / "checkpoint", "llama", tiny_tokenizer())
    manifest, out = import_checkpoint(checkpoint, directory / "artifacts", exit_layers=(1, 2, 4))
    return manifest, out


def make_service(artifacts, thresholds=(NEVER, NEVER), audit=None, **options):
    from tokenizers import Tokenizer

    manifest, directory = artifacts
    decoder = ExitDecoder.load(directory)
    policy = GenerationPolicy("test", manifest.fingerprint, 1, 3, thresholds)
    sink = DictSink()
    service = GenerationService(
        decoder, Tokenizer.from_file(str(directory / "tokenizer.json")), policy, manifest.end_of_text,
        ServiceOptions(**options), GenerationTelemetry(sink, "tiny"), audit, manifest.fingerprint,
    )  # fmt: skip
    return service, sink


def submit(service, prompt: str, **parameters) -> RecordingStream:
    stream = RecordingStream()
    service.submit(np.array([prompt.encode()], dtype=object), parameters, stream)
    return stream


def run(service, streams) -> None:
    with torch.inference_mode():
        for _ in range(500):
            if all(s.done for s in streams):
                return
            service.run_round()
    raise AssertionError("requests did not finish")


def test_bad_requests_fail_alone_and_at_once(artifacts):
    service, sink = make_service(artifacts)
    good = [
        submit(service, p, max_tokens=12, mode=m)
        for p, m in zip(PROMPTS, ["full", "self_speculative", "confident"], strict=True)
    ]
    bad = {
        "empty": submit(service, "", max_tokens=5),
        "unknown parameter": submit(service, PROMPTS[0], temperature=0.7),
        "too long": submit(service, "x = 1\n" * 200),
        "mode": submit(service, PROMPTS[0], mode="fast"),
        "max_tokens": submit(service, PROMPTS[0], max_tokens=0),
        "stop": submit(service, PROMPTS[0], stop="\n"),
        "check": submit(service, PROMPTS[0], check="spelling"),
        "schema": submit(service, PROMPTS[0], check="json_schema", check_schema='{"type": "strin"}'),
        "pattern": submit(service, PROMPTS[0], check="regex", check_pattern="(unclosed"),
        "python prompt": submit(service, "    return x\n", check="python_syntax"),
        "deadline": submit(service, PROMPTS[0], deadline_ms=-1),
    }
    for name, stream in bad.items():
        assert stream.error is not None and stream.error[1], name  # answered at submit, as the client's fault
        assert not stream.responses, name
    assert "unknown parameter(s) ['temperature']" in bad["unknown parameter"].error[0]
    assert "the prompt is empty" in bad["empty"].error[0]
    assert "context holds" in bad["too long"].error[0]
    run(service, good)
    assert all(s.error is None and s.final["final"] for s in good)
    assert sink.total("offramp_generation_requests_total", outcome="invalid") == len(bad)


def test_responses_stream_the_completion_and_modes_agree(artifacts):
    service, sink = make_service(artifacts)
    streams = {
        m: [submit(service, p, max_tokens=20, mode=m) for p in PROMPTS] for m in ("full", "self_speculative")
    }
    run(service, [s for group in streams.values() for s in group])
    full_tokens = 0
    for full, speculative in zip(streams["full"], streams["self_speculative"], strict=True):
        ids = [int(t) for r in full.responses for t in r["TOKEN_IDS"]]
        reason = full.final["FINISH_REASON"][0]
        assert (len(ids), reason) == (20, b"length") or (len(ids) < 20 and reason == b"end_of_text")
        full_tokens += len(ids)
        assert [int(t) for r in speculative.responses for t in r["TOKEN_IDS"]] == ids
        assert speculative.text() == full.text()
        assert sum(r["final"] for r in full.responses) == 1
    # Self-speculation commits several tokens per response; full one.
    assert max(len(r["TOKEN_IDS"]) for s in streams["self_speculative"] for r in s.responses) > 1
    assert all(len(r["TOKEN_IDS"]) <= 1 for s in streams["full"] for r in s.responses)  # 0: end of text
    assert sink.total("offramp_generation_tokens_total", mode="full") == full_tokens
    drafted = sink.total("offramp_generation_draft_tokens_total")
    assert 0 < sink.total("offramp_generation_accepted_tokens_total") < drafted


def test_a_stop_string_ends_the_completion_before_it(artifacts):
    service, _ = make_service(artifacts)
    probe = submit(service, PROMPTS[1], max_tokens=30)
    run(service, [probe])
    text = probe.text()
    stop = text[3:5]
    stopped = submit(service, PROMPTS[1], max_tokens=30, stop=json.dumps([stop]), mode="self_speculative")
    run(service, [stopped])
    assert stopped.text() == text[: text.index(stop)]
    assert stopped.final["FINISH_REASON"][0] == b"stop"


def test_a_failed_check_in_confident_mode_regenerates_that_request_at_full_depth(artifacts, tmp_path):
    audit = AuditLog(AuditConfig(tmp_path / "audit.jsonl"))
    reference, _ = make_service(artifacts)
    full = [submit(reference, p, max_tokens=10) for p in PROMPTS]
    run(reference, full)
    # Confident at the first exit for every token: its completions differ from full depth's.
    service, sink = make_service(artifacts, thresholds=(ALWAYS, NEVER), audit=audit)
    pattern = re.escape(full[0].text())
    checked = submit(
        service,
        PROMPTS[0],
        max_tokens=10,
        mode="confident",
        check="regex",
        check_pattern=pattern,
        request_id="checked",
    )
    others = [
        submit(service, p, max_tokens=10, mode="confident", request_id=f"other{i}")
        for i, p in enumerate(PROMPTS)
    ]
    impossible = submit(
        service,
        PROMPTS[2],
        max_tokens=10,
        mode="confident",
        check="json_schema",
        check_schema="false",
        request_id="impossible",
    )
    run(service, [checked, impossible, *others])
    audit.close()
    # The failing request started over at full depth (attempt 1) and now passes its check.
    assert checked.text(0) != full[0].text()
    assert checked.text() == full[0].text()
    assert checked.final["FLAGS"][0] == FLAG_ESCALATED
    # An impossible schema: regenerated once, then answered with the flag (no loop).
    assert {int(r["ATTEMPT"][0]) for r in impossible.responses} == {0, 1}
    assert impossible.final["FLAGS"][0] == FLAG_ESCALATED | FLAG_CHECK_FAILED
    assert impossible.text() == full[2].text()
    # Their batch-mates were not regenerated.
    assert all(
        {int(r["ATTEMPT"][0]) for r in s.responses} == {0} and s.final["FLAGS"][0] == 0 for s in others
    )
    assert sink.total("offramp_generation_escalations_total") == 2
    assert sink.total("offramp_generation_check_failures_total", check="json_schema") == 1
    records = {r["request_id"]: r for r in read_audit([tmp_path / "audit.jsonl"])}
    assert records["impossible"]["escalations"] == 1 and records["impossible"]["check_passed"] is False
    assert records["checked"]["attempts"] == 2 and records["checked"]["check_passed"] is True
    assert records["other0"]["tokens_by_exit"]["0"] == 9 and records["other0"]["policy_version"] == "test"


def test_a_confident_completion_that_ran_at_full_depth_is_not_regenerated(artifacts):
    # A policy that never leaves early: every token of the confident attempt comes from the last exit,
    # so its failed check is a failure at full depth, flagged without a second attempt.
    service, sink = make_service(artifacts, thresholds=(NEVER, NEVER))
    impossible = submit(service, PROMPTS[2], max_tokens=10, mode="confident", check="json_schema",
                        check_schema="false")  # fmt: skip
    run(service, [impossible])
    assert {int(r["ATTEMPT"][0]) for r in impossible.responses} == {0}
    assert impossible.final["FLAGS"][0] == FLAG_CHECK_FAILED
    assert sink.total("offramp_generation_escalations_total") == 0
    assert sink.total("offramp_generation_check_failures_total", check="json_schema") == 1


def test_checks(artifacts):
    assert python_prefix_error("def f(x):\n    return x +") is None  # the line goes on
    assert python_prefix_error("x = 'abc") is None  # a string not closed yet
    assert python_prefix_error("x = 1 +* 2") is not None
    assert python_prefix_error("if x:\n    y = 1\n  z = 2\n") is not None  # a dedent to nowhere
    service, sink = make_service(artifacts)
    valid = submit(service, "def add(a, b):\n", max_tokens=6, check="python_syntax", stop=json.dumps(["\n"]))
    run(service, [valid])
    completion = valid.text()
    expected = python_prefix_error(
        "def add(a, b):\n" + completion + ("\n" if valid.final["FINISH_REASON"][0] == b"stop" else "")
    )
    assert bool(valid.final["FLAGS"][0] & FLAG_CHECK_FAILED) == (expected is not None)
    schema = json.dumps({"type": "object"})
    json_check = submit(service, "{", max_tokens=4, check="json_schema", check_schema=schema)
    run(service, [json_check])
    assert json_check.final["FLAGS"][0] == FLAG_CHECK_FAILED  # a random model writes no JSON object


class GoneAfter(RecordingStream):
    """A client that goes away after ``responses`` responses: sending raises from then on."""

    def __init__(self, responses: int) -> None:
        super().__init__()
        self.left = responses

    def send(self, outputs, final):
        if self.left == 0:
            raise RuntimeError("the client cancelled")
        self.left -= 1
        super().send(outputs, final)


def test_a_client_that_goes_away_loses_its_row_alone(artifacts):
    service, _ = make_service(artifacts)
    gone = GoneAfter(2)
    service.submit(
        np.array([PROMPTS[0].encode()], dtype=object), {"max_tokens": 30, "mode": "self_speculative"}, gone
    )
    others = [submit(service, p, max_tokens=30, mode="self_speculative") for p in PROMPTS]
    run(service, others)
    assert len(gone.responses) == 2 and not gone.done
    assert service.engine.running == 0  # its row left at once
    alone, _ = make_service(artifacts)
    references = [submit(alone, p, max_tokens=30) for p in PROMPTS]
    run(alone, references)
    assert [s.text() for s in others] == [r.text() for r in references]


class ThreadRecordingStream(RecordingStream):
    """Records which thread each response came from."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def send(self, outputs, final):
        self.threads.add(threading.get_ident())
        super().send(outputs, final)


def test_a_background_sender_keeps_each_streams_order_off_the_serving_thread():
    sender = BackgroundSender()
    targets = [ThreadRecordingStream() for _ in range(3)]
    streams = [sender.stream(t) for t in targets]
    for i in range(50):
        for stream in streams:
            stream.send({"I": np.array([i])}, final=i == 49)
    rejected = RecordingStream()
    sender.stream(rejected).fail("bad request", True)
    sender.close()
    for target in targets:
        assert [int(r["I"][0]) for r in target.responses] == list(range(50)) and target.final["final"]
        assert target.threads and threading.get_ident() not in target.threads
    assert rejected.error == ("bad request", True)


def test_a_stream_whose_send_failed_gets_nothing_more_and_raises_at_its_next_response():
    sender = BackgroundSender()
    gone, other = GoneAfter(2), RecordingStream()
    gone_stream, other_stream = sender.stream(gone), sender.stream(other)
    for i in range(4):  # the third raises in the sender's thread; the fourth is not attempted
        gone_stream.send({"I": np.array([i])}, final=False)
        other_stream.send({"I": np.array([i])}, final=i == 3)
    gone_stream.fail("unloading", False)
    sender.close()
    assert len(gone.responses) == 2 and gone.error is None
    assert [int(r["I"][0]) for r in other.responses] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="the client cancelled"):
        gone_stream.send({"I": np.array([4])}, final=False)


class HeldStream(RecordingStream):
    """A server that has not taken a response yet: ``send`` waits until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def send(self, outputs, final):
        self.entered.set()
        assert self.release.wait(10)
        super().send(outputs, final)


def test_a_background_sender_holds_the_serving_loop_once_its_queue_is_full():
    sender = BackgroundSender(capacity=2)
    held = HeldStream()
    stream = sender.stream(held)
    handed = []

    def loop():
        for i in range(6):
            stream.send({"I": np.array([i])}, final=i == 5)
            handed.append(i)

    looping = threading.Thread(target=loop)
    looping.start()
    assert held.entered.wait(10)
    # The sender's thread holds response 0, the queue 1 and 2; handing over 3 must wait. Half a second
    # is ample for the loop to hand over all six where nothing holds it (microseconds each).
    looping.join(0.5)
    assert looping.is_alive() and handed == [0, 1, 2]
    held.release.set()
    looping.join(10)
    sender.close()
    assert handed == list(range(6)) and [int(r["I"][0]) for r in held.responses] == list(range(6))


def test_the_service_answers_through_a_background_sender_as_it_does_directly(artifacts):
    service, _ = make_service(artifacts)
    sender = BackgroundSender()
    queued = [RecordingStream() for _ in PROMPTS]
    for prompt, stream in zip(PROMPTS, queued, strict=True):
        parameters = {"max_tokens": 20, "mode": "self_speculative"}
        service.submit(np.array([prompt.encode()], dtype=object), parameters, sender.stream(stream))
    with torch.inference_mode():
        for _ in range(500):
            if not (service.engine.running or service.held or not service.waiting.empty()):
                break
            service.run_round()
    sender.close()
    direct, _ = make_service(artifacts)
    references = [submit(direct, p, max_tokens=20, mode="self_speculative") for p in PROMPTS]
    run(direct, references)
    for stream, reference in zip(queued, references, strict=True):
        assert stream.done and stream.text() == reference.text()
        assert len(stream.responses) == len(reference.responses)
