"""The streaming generator's logic: requests in, tokens streamed out, one running batch for all.

``triton_generator.py`` adapts Triton's decoupled requests to :meth:`GenerationService.submit` (the
prompt's bytes, the request parameters and a :class:`ResponseStream`) and runs
:meth:`GenerationService.serve` on a thread of its own; everything here runs in plain Python.

A request is parsed and checked where it arrives (:func:`parse_request`); a bad one is answered with
its error at once and never reaches the batch. The serving loop admits waiting requests between
steps (a prefill per mode, at most ``max_prefill_tokens`` prompt tokens per round so running rows
keep their pace), steps the engine, and streams what each row produced. A finished row's
completion goes through its check: a failure in ``confident`` mode (before its deadline, with a token
taken at an early exit) starts the request again at full depth (``ATTEMPT`` 1, ``FLAG_ESCALATED``); a
failure at full depth, in any mode, is answered with ``FLAG_CHECK_FAILED``. Only the request that failed
is regenerated.

What each response carries is ``offramp.backend.generation_contract``'s. A stream whose client went
away (its ``send`` raises) loses its row at once; the others go on. The Triton adapter sends through
a :class:`BackgroundSender`, whose streams raise at the response after the one that failed.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from offramp.backend.audit import AuditLog
from offramp.backend.contract import FLAG_DEADLINE
from offramp.backend.exit_decoder import ExitDecoder
from offramp.backend.generation import FINISH_STOP, MODES, Emitted, GenerationEngine, Row
from offramp.backend.generation_checks import Check, parse_check
from offramp.backend.generation_contract import (
    FLAG_CHECK_FAILED,
    FLAG_ESCALATED,
    GENERATION_FLAG_NAMES,
    PARAMETERS,
    PROMPT_INPUT,
)
from offramp.backend.generation_policy import GenerationPolicy
from offramp.backend.telemetry import ServingTelemetry

MAX_DEADLINE_MS = 86_400_000
FLAG_CANCELLED = 1 << 30  # internal: the client went away; never sent


class RequestError(ValueError):
    """What is wrong with one request; it is answered with this and its batch-mates go on."""


class ResponseStream(Protocol):
    def send(self, outputs: Mapping[str, np.ndarray], final: bool) -> None: ...
    def fail(self, message: str, request_error: bool) -> None: ...  # the final, error response


class BackgroundSender:
    """Hands responses to their streams from a thread of its own, in the order they were given, so
    that the serving loop's next step does not wait on them.

    Why: the Python backend's ``send`` is a round trip to the server (the stub waits, with the GIL
    released, until the server has taken the response). Timed in the generator's stub on a 2-core
    machine, the responses of a step of 8 rows took 5.1 ms of wall time, 2.9 of them waiting, beside
    12.5 ms of the step itself; from this thread the waiting overlaps the next step's compute.

    At most ``capacity`` responses wait (a full running batch's step, as the adapter sets it): past
    that, handing one over waits for the thread, as every send waited before, so a server slower than
    the loop slows the loop instead of letting the queue grow.

    A stream whose ``send`` raised (its client went away) is marked; the next response given to it
    raises that error to the serving loop, which then drops its row (one step later than a direct
    send would: the responses in between are not sent).
    """

    def __init__(self, capacity: int = 64) -> None:
        self._queue: queue.Queue[tuple[_QueuedStream, Callable[[], None]] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="offramp-responses", daemon=True)
        self._thread.start()

    def stream(self, target: ResponseStream) -> ResponseStream:
        """``target`` with its responses sent from this sender's thread."""
        return _QueuedStream(target, self._queue)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            stream, call = item
            if stream.error is not None:
                continue  # its client is gone: nothing more reaches it
            try:
                call()
            except Exception as error:  # one stream's failure is that stream's alone
                stream.error = error


class _QueuedStream:
    def __init__(self, target: ResponseStream, queued: queue.Queue) -> None:
        self.target = target
        self.queued = queued
        self.error: Exception | None = None  # set by the sender's thread

    def send(self, outputs: Mapping[str, np.ndarray], final: bool) -> None:
        if self.error is not None:
            raise self.error
        self.queued.put((self, functools.partial(self.target.send, outputs, final)))

    def fail(self, message: str, request_error: bool) -> None:
        self.queued.put((self, functools.partial(self.target.fail, message, request_error)))


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    prompt_ids: list[int]
    max_tokens: int
    mode: str
    stop: tuple[str, ...] = ()
    deadline_ms: int | None = None
    check: Check | None = None
    request_id: str = ""


def _int_parameter(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(f"parameter {name} must be an integer, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise RequestError(f"parameter {name} must be an integer, not {value!r}") from None
    if not low <= number <= high:
        raise RequestError(f"parameter {name} must lie in [{low}, {high}], not {number}")
    return number


def _string_parameter(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RequestError(f"parameter {name} must be a string, not {value!r}")
    return value


def _stop_strings(value: Any) -> tuple[str, ...]:
    text = _string_parameter("stop", value)
    try:
        stops = json.loads(text)
    except json.JSONDecodeError:
        raise RequestError(
            f'parameter stop must be a JSON array of strings, e.g. ["\\n"], not {text!r}'
        ) from None
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"parameter stop must be a JSON array of non-empty strings, not {text!r}")
    return tuple(stops)


def parse_request(
    prompt: np.ndarray | None,
    parameters: Mapping[str, Any],
    encode: Callable[[str], list[int]],
    context: int,
    default_max_tokens: int,
) -> GenerationRequest:
    """A request's prompt (``PROMPT``, BYTES ``[1]``) and parameters, checked; ``RequestError`` otherwise."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise RequestError(f"unknown parameter(s) {unknown}; expected some of {list(PARAMETERS)}")
    if prompt is None:
        raise RequestError(f"input {PROMPT_INPUT} is missing")
    if prompt.size != 1:
        raise RequestError(f"input {PROMPT_INPUT} must hold one prompt, not {prompt.size}")
    raw = prompt.reshape(-1)[0]
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as error:
        raise RequestError(f"the prompt is not valid UTF-8: {error}") from None
    if not text:
        raise RequestError("the prompt is empty")
    ids = encode(text)
    if len(ids) >= context:
        raise RequestError(
            f"the prompt is {len(ids)} tokens; the context holds {context}, and one must be left to generate"
        )
    mode = _string_parameter("mode", parameters.get("mode", "full"))
    if mode not in MODES:
        raise RequestError(f"unknown mode {mode!r}; expected one of {MODES}")
    max_tokens = _int_parameter("max_tokens", parameters.get("max_tokens", default_max_tokens), 1, context)
    deadline = parameters.get("deadline_ms")
    check_name = parameters.get("check")
    schema, pattern = parameters.get("check_schema"), parameters.get("check_pattern")
    check = None
    if check_name is not None or schema is not None or pattern is not None:
        if check_name is None:
            raise RequestError("check_schema and check_pattern need a check")
        try:
            check = parse_check(
                _string_parameter("check", check_name),
                None if schema is None else _string_parameter("check_schema", schema),
                None if pattern is None else _string_parameter("check_pattern", pattern),
                text,
            )
        except ValueError as error:
            raise RequestError(str(error)) from None
    return GenerationRequest(
        prompt=text,
        prompt_ids=ids,
        max_tokens=max_tokens,
        mode=mode,
        stop=_stop_strings(parameters["stop"]) if "stop" in parameters else (),
        deadline_ms=None if deadline is None else _int_parameter("deadline_ms", deadline, 0, MAX_DEADLINE_MS),
        check=check,
        request_id=_string_parameter("request_id", parameters.get("request_id", "")),
    )


@dataclass
class Job:
    """One request through its attempts, with what is measured of it."""

    request: GenerationRequest
    stream: ResponseStream
    received: float
    attempt: int = 0
    flags: int = 0
    row: Row | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0  # streamed, over all attempts
    tokens_by_exit: dict[int, int] = field(default_factory=dict)
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    check_reason: str = ""


class GenerationTelemetry(ServingTelemetry):
    """The generator's metrics, on the same sink and publication rhythm as the classifiers'."""

    TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5)
    DRAFT_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16)

    def streamed(self, mode: str, exits: list[int]) -> None:
        for exit_index in sorted(set(exits)):
            self.sink.increment(
                "offramp_generation_tokens_total",
                "Tokens generated, by mode and by the exit that chose them",
                {**self.labels, "mode": mode, "exit": str(exit_index)},
                exits.count(exit_index),
            )

    def verified(self, drafted: int, accepted: int, passes: int, draft_lengths: list[int]) -> None:
        """Self-speculation of one step: drafts made and accepted, verify passes, each pass's draft length."""
        labels = self.labels
        self.sink.increment(
            "offramp_generation_draft_tokens_total",
            "Draft tokens proposed by the early exit",
            labels,
            drafted,
        )
        self.sink.increment(
            "offramp_generation_accepted_tokens_total",
            "Draft tokens the full model accepted",
            labels,
            accepted,
        )
        self.sink.increment(
            "offramp_generation_verify_passes_total", "Verify passes (one per row per step)", labels, passes
        )
        self._observe("offramp_generation_draft_length", "Draft length of each verify pass", labels,
                      self.DRAFT_BUCKETS, np.asarray(draft_lengths, dtype=np.float64))  # fmt: skip

    def finished(self, job: Job, outcome: str, check: str) -> None:
        mode = job.request.mode
        self.sink.increment("offramp_generation_requests_total", "Requests answered, by mode and outcome",
                            {**self.labels, "mode": mode, "outcome": outcome}, 1)  # fmt: skip
        if job.flags & FLAG_ESCALATED:
            self.sink.increment("offramp_generation_escalations_total",
                                "Requests generated again at full depth after a failed check",
                                {**self.labels, "check": check}, 1)  # fmt: skip
        if job.flags & FLAG_CHECK_FAILED:
            self.sink.increment(
                "offramp_generation_check_failures_total",
                "Requests answered with a failed check",
                {**self.labels, "check": check},
                1,
            )
        if job.flags & FLAG_DEADLINE:
            self.sink.increment("offramp_generation_deadline_requests_total",
                                "Requests that finished at the cheapest exit because their deadline passed",
                                self.labels, 1)  # fmt: skip
        labels = {**self.labels, "mode": mode}
        if job.first_token_at is not None:
            self._observe(
                "offramp_generation_time_to_first_token_seconds",
                "Time from arrival to the first token",
                labels,
                self.TTFT_BUCKETS,
                np.asarray([job.first_token_at - job.received]),
            )
        if job.tokens > 1 and job.last_token_at is not None:
            per_token = (job.last_token_at - job.first_token_at) / (job.tokens - 1)
            self._observe("offramp_generation_time_per_output_token_seconds",
                          "Time per token after the first, per request", labels, self.TPOT_BUCKETS,
                          np.asarray([per_token]))  # fmt: skip

    def failed(self, mode: str, request_error: bool) -> None:
        outcome = "invalid" if request_error else "error"
        self.sink.increment("offramp_generation_requests_total", "Requests answered, by mode and outcome",
                            {**self.labels, "mode": mode, "outcome": outcome}, 1)  # fmt: skip


@dataclass(frozen=True)
class ServiceOptions:
    """Operational settings of one generator, carried as parameters of its Triton config."""

    default_max_tokens: int = 64
    max_running: int = 64  # rows decoded together; more requests wait
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per round between steps
    audit_path: str = ""
    audit_sample_rate: float = 1.0

    def to_parameters(self) -> dict[str, str]:
        return {f"offramp_{name}": str(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> ServiceOptions:
        values = {}
        for name in cls.__dataclass_fields__:
            key = f"offramp_{name}"
            if key in parameters:
                values[name] = type(getattr(cls, name))(parameters[key])
        return cls(**values)


class GenerationService:
    """Requests to the running batch and tokens back (module docstring).

    ``submit`` may be called from any thread; ``serve`` (or ``run_round`` in tests) runs the batch.
    """

    def __init__(
        self,
        decoder: ExitDecoder,
        tokenizer: Any,  # tokenizers.Tokenizer
        policy: GenerationPolicy,
        end_of_text: int,
        options: ServiceOptions = ServiceOptions(),
        telemetry: GenerationTelemetry | None = None,
        audit: AuditLog | None = None,
        fingerprint: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.policy = policy
        self.options = options
        self.telemetry = telemetry
        self.audit = audit
        self.fingerprint = fingerprint
        self.clock = clock
        self.engine = GenerationEngine(
            decoder,
            policy.settings,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
            end_of_text,
            clock,
        )
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.held: list[Job] = []  # taken off the queue, not admitted yet (no room this round)
        self._stopping = threading.Event()
        if telemetry is not None:
            telemetry.policy(policy.version, fingerprint)

    # --- arrival (any thread) ---

    def submit(
        self, prompt: np.ndarray | None, parameters: Mapping[str, Any], stream: ResponseStream
    ) -> None:
        received = self.clock()
        try:
            request = parse_request(
                prompt, parameters, lambda text: self.tokenizer.encode(text).ids, self.decoder.spec.context,
                self.options.default_max_tokens,
            )  # fmt: skip
        except RequestError as error:
            stream.fail(str(error), request_error=True)
            if self.telemetry is not None:
                mode = parameters.get("mode", "full")
                self.telemetry.failed(mode if mode in MODES else "unknown", request_error=True)
            return
        self.waiting.put(Job(request, stream, received))

    # --- the serving loop ---

    def serve(self, on_error: Callable[[Exception], None], idle_wait_s: float = 0.05) -> None:
        """Run rounds until :meth:`close`; waits for requests while nothing runs. A round that fails
        outside the batch's step (which answers its own failures) is reported to ``on_error``, its
        running requests fail, and serving goes on."""
        while not self._stopping.is_set():
            try:
                self.run_round(idle_wait_s)
            except Exception as error:  # the loop must outlive any one round: it is every request's
                on_error(error)
                self._fail_running(f"generation failed: {error!r}")

    def close(self) -> None:
        """Stop :meth:`serve` after its round."""
        self._stopping.set()

    def fail_all(self, message: str) -> None:
        """Answer every request still running or waiting with ``message`` (once the loop stopped)."""
        self._fail_running(message)
        while self.held:
            self._fail(self.held.pop(), message, request_error=False)
        while not self.waiting.empty():
            self._fail(self.waiting.get_nowait(), message, request_error=False)

    def run_round(self, idle_wait_s: float = 0.0) -> None:
        """Admit what waits (as room allows), then one step of the running batch; stream the results."""
        self._admit(idle_wait_s if not self.engine.running and not self.held else 0.0)
        if not self.engine.running:
            return
        try:
            emitted = self.engine.step()
        except Exception as error:  # a failure inside the batch: its requests fail, the service goes on
            self._fail_running(f"generation failed: {error!r}")
            return
        self._record_verification()
        self._handle(emitted)

    def _admit(self, wait_s: float) -> None:
        jobs, tokens = [], 0
        room = self.options.max_running - self.engine.running
        while len(jobs) < room:
            if self.held:
                job = self.held.pop(0)
            else:
                try:
                    job = (
                        self.waiting.get(timeout=wait_s) if wait_s and not jobs else self.waiting.get_nowait()
                    )
                except queue.Empty:
                    break
            if jobs and tokens + len(job.request.prompt_ids) > self.options.max_prefill_tokens:
                self.held.insert(0, job)
                break
            jobs.append(job)
            tokens += len(job.request.prompt_ids)
        if not jobs:
            return
        rows = [self._row(job) for job in jobs]
        try:
            emitted = self.engine.add(rows)
        except Exception as error:
            for job in jobs:
                self.engine.cancel(job.row)
                self._fail(job, f"prefill failed: {error!r}", request_error=False)
            return
        self._handle(emitted)

    def _row(self, job: Job) -> Row:
        request = job.request
        full_depth = job.attempt > 0
        deadline = None if request.deadline_ms is None else job.received + request.deadline_ms / 1000.0
        job.row = Row(
            job,
            list(request.prompt_ids),
            request.max_tokens,
            "full" if full_depth else request.mode,
            request.stop,
            deadline,
        )
        return job.row

    def _record_verification(self) -> None:
        verification = self.engine.last_verification
        if self.telemetry is None or verification is None:
            return
        rows = len(verification.accepted)
        self.telemetry.verified(rows * verification.draft_length, sum(verification.accepted), rows,
                                [verification.draft_length] * rows)  # fmt: skip

    def _handle(self, emitted: list[Emitted]) -> None:
        now = self.clock()
        for event in emitted:
            job: Job = event.row.key
            if job.flags & FLAG_CANCELLED:
                continue
            if event.tokens:
                job.first_token_at = job.first_token_at or now
                job.last_token_at = now
                job.tokens += len(event.tokens)
                for exit_index in event.exits:
                    job.tokens_by_exit[exit_index] = job.tokens_by_exit.get(exit_index, 0) + 1
                if self.telemetry is not None:
                    self.telemetry.streamed(event.row.mode, event.exits)
            if event.finished:
                self._finish(job, event)
            elif event.tokens or event.text:
                self._send(job, event, final=False)

    def _finish(self, job: Job, event: Emitted) -> None:
        row = event.row
        job.drafted += row.drafted
        job.accepted += row.accepted
        job.verify_passes += row.verify_passes
        if row.past_deadline:
            job.flags |= FLAG_DEADLINE
        check = job.request.check
        if check is not None:
            ended_line = row.finish_reason == FINISH_STOP and any(s.startswith("\n") for s in row.stop)
            result = check(job.request.prompt, row.text, ended_line)
            if not result.passed:
                job.check_reason = result.reason
                # A confident attempt whose every token came from the last exit already ran at full
                # depth (a policy that never leaves early): running it again would answer the same.
                shallow = any(e != self.engine.decoder.spec.last_exit for e in row.exits)
                if row.mode == "confident" and shallow and not row.past_deadline and job.attempt == 0:
                    job.flags |= FLAG_ESCALATED
                    self._send(job, event, final=False)
                    job.attempt += 1
                    self.held.insert(0, job)  # generated again at full depth, first in the next round
                    return
                job.flags |= FLAG_CHECK_FAILED
        self._send(job, event, final=True)
        outcome = "check_failed" if job.flags & FLAG_CHECK_FAILED else "ok"
        if self.telemetry is not None:
            self.telemetry.finished(job, outcome, check.name if check is not None else "")
        self._audit(job, row)

    def _send(self, job: Job, event: Emitted, final: bool) -> None:
        outputs = {
            "TEXT": np.array([event.text.encode("utf-8")], dtype=object),
            "TOKEN_IDS": np.asarray(event.tokens, dtype=np.int32),
            "TOKEN_EXITS": np.asarray(event.exits, dtype=np.int32),
            "ATTEMPT": np.array([job.attempt], dtype=np.int32),
            "FLAGS": np.array([job.flags if final else 0], dtype=np.int32),
            "FINISH_REASON": np.array(
                [(event.row.finish_reason or "").encode() if final else b""], dtype=object
            ),
        }
        try:
            job.stream.send(outputs, final)
        except Exception:  # the client is gone (a cancelled request): its row leaves, nobody else's
            if not final:
                self.engine.cancel(event.row)
                job.flags |= FLAG_CANCELLED

    def _fail(self, job: Job, message: str, request_error: bool) -> None:
        job.stream.fail(message, request_error)
        if self.telemetry is not None:
            self.telemetry.failed(job.request.mode, request_error)

    def _fail_running(self, message: str) -> None:
        for row in self.engine.rows():
            self.engine.cancel(row)
            self._fail(row.key, message, request_error=False)

    def _audit(self, job: Job, row: Row) -> None:
        if self.audit is None:
            return
        request = job.request
        self.audit.record(
            [
                {
                    "request_id": request.request_id,
                    "mode": request.mode,
                    "attempts": job.attempt + 1,
                    "prompt_tokens": len(request.prompt_ids),
                    "tokens": len(row.generated),
                    "tokens_by_exit": {str(k): v for k, v in sorted(job.tokens_by_exit.items())},
                    "drafted": job.drafted,
                    "accepted": job.accepted,
                    "acceptance_rate": job.accepted / job.drafted if job.drafted else None,
                    "verify_passes": job.verify_passes,
                    "draft_length": self.policy.draft_length if request.mode == "self_speculative" else None,
                    "draft_stop": self.policy.draft_stop if request.mode == "self_speculative" else None,
                    "escalations": int(bool(job.flags & FLAG_ESCALATED)),
                    "check": request.check.name if request.check is not None else None,
                    "check_passed": None if request.check is None else not job.flags & FLAG_CHECK_FAILED,
                    "check_reason": job.check_reason or None,
                    "flags": [name for bit, name in GENERATION_FLAG_NAMES.items() if job.flags & bit],
                    "finish_reason": row.finish_reason,
                    "deadline_ms": request.deadline_ms,
                    "time_to_first_token_s": None
                    if job.first_token_at is None
                    else round(job.first_token_at - job.received, 6),
                    "duration_s": round(self.clock() - job.received, 6),
                    "policy_version": self.policy.version,
                    "model_fingerprint": self.fingerprint,
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                }
            ]
        )
