"""The orchestrator's logic: requests in, one cascade over all of them, one answer (or error) per request.

``triton_orchestrator.py`` adapts Triton's request objects to ``RequestView`` and BLS calls to
``run_segment``; everything here runs in plain Python, so tests drive it with fakes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from offramp.backend.audit import AuditConfig, AuditLog
from offramp.backend.cascade import Cascade, CascadeBatch, CascadeResult, RunSegment, rule_sets, run_cascade
from offramp.backend.contract import (
    FLAG_ABSTAINED,
    FLAG_CONSERVATIVE,
    FLAG_DEGRADED,
    FLAG_DEPTH_CAP,
    FLAG_FALLBACK,
    FLAG_FALLBACK_FAILED,
    FLAG_FORCED_FULL,
    FLAG_REROUTED,
    FLAG_SHED,
    SegmentUnavailable,
    TensorSpec,
    describe_flags,
    label_names,
)
from offramp.backend.drift import DriftConfig, DriftMonitor
from offramp.backend.image import IMAGE_BYTES_INPUT, ImageDecoder, ImageError, ImageSpec
from offramp.backend.policy import Policy
from offramp.backend.shadow import ShadowChecks, ShadowConfig, expected_epsilon
from offramp.backend.shadow_store import ShadowStore
from offramp.backend.shared_state import SharedState, shared_directory
from offramp.backend.slo import (
    SloConfig,
    SloController,
    is_expected_cost,
    shed_compute,
    triton_queue_counters,
)
from offramp.backend.telemetry import ServingTelemetry
from offramp.backend.text import TEXT_INPUT, TextEncoder, TextError, TextSpec
from offramp.kernels.confidence import Confidence, compute_confidence, exits_by_threshold

# run_model(model name, raw inputs) -> logits (n, C): another model of the repository, over BLS.
RunModel = Callable[[str, Mapping[str, Any]], Any]

SPEC_FILE = "orchestrator.json"
POLICY_FILE = "policy.json"
# Seconds between two exchanges of state with the model's other instances (shared_state_interval_s).
EXCHANGE_S = 0.25
ALERT_EXCHANGE_S = 0.05


class RequestError(ValueError):
    """What is wrong with one request; it is answered with this message and its batch-mates go on."""


class ServiceDegraded(RuntimeError):
    """Models the request needs are unavailable and the policy allows no other answer for its rows: the
    request fails (UNAVAILABLE), saying which; its batch-mates are answered."""


class OutageMemory:
    """Remembers, for ``retry_after_s``, the models that answered SegmentUnavailable, so that the next
    batches do not each wait on them again (a call to a dead stub takes about a second to fail); after
    that the model is tried again. Shared by the orchestrator's calls to segments and other models."""

    def __init__(self, retry_after_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._down: dict[str, tuple[float, str]] = {}  # model -> (since, what it said)

    def call(self, model: str, call: Callable[[], Any]) -> Any:
        down = self._down.get(model)
        if down is not None and self.clock() - down[0] < self.retry_after_s:
            raise SegmentUnavailable(down[1])
        try:
            result = call()
        except SegmentUnavailable as error:
            self._down[model] = (self.clock(), str(error))
            raise
        self._down.pop(model, None)
        return result


class RequestView(Protocol):
    def input(self, name: str) -> np.ndarray | None: ...
    def parameters(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class OrchestratorSpec:
    """What the orchestrator needs of the model; written beside it by the repository writer."""

    model_name: str
    segment_models: tuple[str, ...]
    full_model: str
    inputs: tuple[TensorSpec, ...]
    side_inputs: tuple[str, ...]
    exit_costs: tuple[float, ...]
    class_names: tuple[str, ...]
    fingerprint: str
    # False serves batch-level early exit (no compaction): kept to measure what compaction gains.
    compact: bool = True
    text: TextSpec | None = None  # accept raw TEXT and tokenize it here
    image: ImageSpec | None = None  # accept encoded IMAGE_BYTES and decode and preprocess them here

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> OrchestratorSpec:
        data = json.loads(Path(path).read_text())
        return cls(
            model_name=data["model_name"],
            segment_models=tuple(data["segment_models"]),
            full_model=data["full_model"],
            inputs=tuple(TensorSpec.from_dict(d) for d in data["inputs"]),
            side_inputs=tuple(data["side_inputs"]),
            exit_costs=tuple(data["exit_costs"]),
            class_names=tuple(data["class_names"]),
            fingerprint=data["fingerprint"],
            compact=data.get("compact", True),
            text=TextSpec(**data["text"]) if data.get("text") else None,
            image=ImageSpec.from_dict(data["image"]) if data.get("image") else None,
        )


@dataclass(frozen=True)
class ServingOptions:
    """Operational settings of one orchestrator, carried as parameters of its Triton config."""

    audit_path: str = ""  # JSON-lines audit file; empty: no audit
    audit_sample_rate: float = 1.0
    audit_max_bytes: int = 64 * 1024 * 1024
    # Rows of all instances in the drift window. 500 moves the score past drift_clear_level within a few
    # hundred rows of a sudden shift (2,000 took 600 on the demo CNN), while a stable profile's PSI
    # over 3 exits stays near chi-square(2) / 500: about 0.004, rarely past 0.03.
    drift_window: int = 500
    drift_alarm_level: float = 0.25
    drift_clear_level: float = 0.1
    drift_conservative: bool = False  # force full depth while the drift alarm is raised
    # Run the segments' ONNX files inside the orchestrator's own process instead of calling the
    # segment models over BLS (embedded target, CPU): no IPC hop per segment, at the price of
    # segment batches no longer merged across orchestrator instances.
    segments_in_process: bool = False
    # The SLO controller (offramp.backend.slo): a p99 latency target in ms (0: none); it climbs the
    # policy's ladder under load and, with slo_shed_max_exit >= 0, caps depth past the top rung.
    slo_p99_ms: float = 0.0
    slo_window_s: float = 1.0
    slo_shed_max_exit: int = -1
    # A request's cost whatever its depth, as a fraction of the network's compute per row (SloConfig).
    slo_fixed_cost: float = 0.1
    # Requests/s each rung carries, rung 0 first, comma-separated, as measured on this deployment
    # (SloConfig.rung_capacity; ``offramp bench --spike`` measures them); empty: learnt under load.
    slo_rung_capacity: str = ""
    # The multiple of the steady load a rung must carry to be served (SloConfig.headroom; 2: a doubling
    # within a second finds the rung able to carry it).
    slo_headroom: float = 1.0
    # The share of what a rung carries that the risen load may fill (SloConfig.headroom_load); 0: the
    # descent's margin, as for a load of now.
    slo_headroom_load: float = 0.0
    # The same share for the rungs above rung 0 (SloConfig.headroom_load_above); 0: slo_headroom_load.
    slo_headroom_load_above: float = 0.0
    # Where the controller reads Triton's queue counters for this model (Triton's metrics port).
    metrics_url: str = "http://127.0.0.1:8002/metrics"
    # Shadow checks of early answers at full depth and the live risk alarm (offramp.backend.shadow),
    # carried as their own ``offramp_shadow_*`` parameters.
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    # Where the orchestrator instances of a model share their drift windows and risk evidence (a file
    # per process; /dev/shm is memory); empty: each instance decides on its own rows.
    shared_state_dir: str = "/dev/shm"

    def __post_init__(self) -> None:
        self.slo_config()  # a bad SLO setting is refused where the options are made, not at model load

    def slo_config(self) -> SloConfig | None:
        """The SLO controller's settings these options ask for; None without a latency target."""
        if self.slo_p99_ms <= 0:
            return None
        return SloConfig(
            self.slo_p99_ms,
            self.slo_window_s,
            shed_max_exit=self.slo_shed_max_exit if self.slo_shed_max_exit >= 0 else None,
            fixed_cost=self.slo_fixed_cost,
            rung_capacity=self._rung_capacity(),
            headroom=self.slo_headroom,
            headroom_load=self.slo_headroom_load or None,
            headroom_load_above=self.slo_headroom_load_above or None,
        )

    def check_against(self, policy: Policy) -> None:
        """Refuses options that do not fit ``policy``: measured capacities for another number of rungs."""
        slo = self.slo_config()
        if slo is not None:
            slo.check_ladder(len(policy.rungs) + 1)

    def _rung_capacity(self) -> tuple[float, ...]:
        try:
            return tuple(float(figure) for figure in self.slo_rung_capacity.split(",") if figure.strip())
        except ValueError:
            raise ValueError(
                "slo_rung_capacity must be requests/s per rung, rung 0 first, comma-separated: "
                f"{self.slo_rung_capacity!r}"
            ) from None

    def to_parameters(self) -> dict[str, str]:
        plain = {k: v for k, v in asdict(self).items() if k != "shadow"}
        return {
            **{f"offramp_{k}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in plain.items()},
            **self.shadow.to_parameters(),
        }

    @classmethod
    def describes(cls, parameters: Mapping[str, Any]) -> bool:
        """Whether a model config's ``parameters`` are an orchestrator's (they carry these options)."""
        return any(f"offramp_{name}" in parameters for name in cls.__dataclass_fields__)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> ServingOptions:
        values: dict[str, Any] = {"shadow": ShadowConfig.from_parameters(parameters)}
        for name, field_type in (
            (f, type(getattr(cls(), f))) for f in cls.__dataclass_fields__ if f != "shadow"
        ):
            raw = parameters.get(f"offramp_{name}")
            if raw is None:
                continue
            values[name] = raw.lower() == "true" if field_type is bool else field_type(raw)
        return cls(**values)

    def hooks(
        self, policy: Policy, instance: str = "", model: str = "", instances: int = 1
    ) -> dict[str, Any]:
        """The audit log, drift monitor, SLO controller, shadow checks (with their store) and the state
        shared with the model's other instances these options ask for (drift needs the policy's
        profile; the controller reads ``model``'s queue counters at ``metrics_url``).

        Each instance writes its own audit file (``<stem>.<instance><suffix>``): instances are
        separate processes, and one file rotated by two writers would lose records.
        """
        hooks: dict[str, Any] = {}
        if self.audit_path:
            path = Path(self.audit_path)
            if instance:
                path = path.with_name(f"{path.stem}.{instance}{path.suffix}")
            config = AuditConfig(path, self.audit_max_bytes, sample_rate=self.audit_sample_rate)
            hooks["audit"] = AuditLog(config)
        if policy.exit_rate_profile is not None:
            hooks["drift"] = DriftMonitor(
                DriftConfig(
                    reference=policy.exit_rate_profile,
                    window=self.drift_window,
                    min_rows=min(500, self.drift_window),
                    alarm_level=self.drift_alarm_level,
                    clear_level=self.drift_clear_level,
                    conservative=self.drift_conservative,
                )
            )
        config = self.slo_config()
        if config is not None:
            queue = triton_queue_counters(self.metrics_url, model) if model else lambda: None
            costs = (policy.provenance.get("expected_cost"), *(r.expected_cost for r in policy.rungs))
            known = all(map(is_expected_cost, costs))  # a policy written by hand may lack them
            # What a shed row costs: the top rung's calibration exit shares, capped at the shedding exit.
            top_profile = policy.rungs[-1].exit_rate_profile if policy.rungs else policy.exit_rate_profile
            exit_costs = policy.provenance.get("exit_costs")
            shed_cost = None
            if (
                known
                and config.shed_max_exit is not None
                and exit_costs
                and len(top_profile or ()) == len(exit_costs)
            ):
                shed_cost = shed_compute(top_profile, exit_costs, config.shed_max_exit)
            hooks["slo"] = SloController(
                config,
                len(policy.rungs),
                queue,
                time.monotonic,
                costs=costs if known else (),
                instances=instances,
                shed_cost=shed_cost,
            )
        if self.shadow.rate > 0:
            store = None
            if self.shadow.store_path:
                store = ShadowStore(
                    Path(self.shadow.store_path),
                    f"{model}-{instance}-{os.getpid()}",
                    self.shadow.store_max_rows,
                    self.shadow.store_max_age_h * 3600.0,
                )
            hooks["shadow"] = ShadowChecks(
                self.shadow,
                len(policy.exits),
                expected_epsilon(policy.provenance),
                model=model,
                policy_version=policy.version,
                audit=hooks.get("audit"),
                store=store,
            )
        if self.shared_state_dir and model and ("drift" in hooks or "shadow" in hooks):
            hooks["shared"] = SharedState(
                shared_directory(Path(self.shared_state_dir), model, policy.version)
            )
        return hooks


@dataclass(frozen=True)
class ParsedRequest:
    inputs: dict[str, np.ndarray]  # each (n, ...)
    rows: int
    force_full: bool
    min_exit: int
    max_exit: int
    rule_set: int  # index into cascade.rule_sets: 0 global, then the cohorts, then the ladder's rungs
    deadline: float  # time.monotonic() after which rows take the next exit; inf: none
    request_id: str | None
    cohort: str | None
    rung: int = 0  # the ladder's rung the request is served at
    shed: bool = False  # load shedding capped its depth (max_exit)


@dataclass
class Answered:
    """A batch's answers and what monitoring needs of them, every array (B,) in row order."""

    outputs: dict[str, np.ndarray]  # the output tensors
    policy_exit: np.ndarray  # the exit the policy chose freely; -1: it did not choose
    policy_label: np.ndarray  # its label there
    requested_full: np.ndarray  # the request itself forced full depth
    conservative: bool  # conservative mode ran every row to full depth

    def rows(self, keep: np.ndarray) -> Answered:
        return replace(
            self,
            outputs={name: array[keep] for name, array in self.outputs.items()},
            policy_exit=self.policy_exit[keep],
            policy_label=self.policy_label[keep],
            requested_full=self.requested_full[keep],
        )


def _bool_parameter(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise RequestError(f"parameter {name!r} must be a boolean, not {value!r}")


def _str_parameter(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RequestError(f"parameter {name!r} must be a string, not {value!r}")
    return value


def _int_parameter(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RequestError(f"parameter {name!r} must be an integer, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise RequestError(f"parameter {name!r} must be an integer, not {value!r}") from None
    if not low <= number <= high:
        raise RequestError(f"parameter {name!r} must lie in [{low}, {high}], not {number}")
    return number


class Orchestrator:
    """Serves one multi-exit model under one policy."""

    PARAMETERS = ("force_full", "min_exit", "max_exit", "cohort", "deadline_ms", "request_id")

    def __init__(
        self,
        spec: OrchestratorSpec,
        policy: Policy,
        *,
        telemetry: ServingTelemetry | None = None,
        audit: AuditLog | None = None,
        drift: DriftMonitor | None = None,
        text_encoder: TextEncoder | None = None,
        image_decoder: ImageDecoder | None = None,
        cascade: Cascade = run_cascade,
        slo: SloController | None = None,
        shadow: ShadowChecks | None = None,
    ) -> None:
        self.spec = spec
        # run_cascade on the host; offramp.backend.device.DeviceCascade where it runs on a GPU.
        self.cascade = cascade
        self.text_encoder = text_encoder
        # The raw input turned into the model's tensors here, and how: TEXT is tokenized, IMAGE_BYTES
        # decoded and preprocessed.
        self.raw_input: tuple[str, Callable[[np.ndarray], tuple[np.ndarray, ...]]] | None = None
        if text_encoder is not None:
            self.raw_input = (TEXT_INPUT, text_encoder.encode)
        elif image_decoder is not None:
            self.raw_input = (IMAGE_BYTES_INPUT, lambda rows: (image_decoder.decode(rows),))
        self.policy = policy.validate(len(spec.segment_models), len(spec.class_names), spec.fingerprint)
        # Conservative mode runs rows through every segment, so the drift monitor keeps seeing
        # which exit the policy would have chosen, and can clear.
        self.conservative_policy = replace(self.policy, full_depth_route="segments")
        self.cohort_rule_set = {name: i + 1 for i, name in enumerate(sorted(policy.cohorts))}
        self.rule_sets = rule_sets(self.policy)
        self.first_rung_rule_set = 1 + len(policy.cohorts)  # rung r > 0 is rule set first + r - 1
        self.telemetry = telemetry
        self.audit = audit
        self.drift = drift
        self.slo = slo
        self.shadow = shadow
        if shadow is not None:
            shadow.telemetry = telemetry
        self.outages = OutageMemory()
        self._times: dict[str, float] = {}  # the running execute's seconds by part (execute_times)
        if (
            slo is not None
            and slo.config.shed_max_exit is not None
            and slo.config.shed_max_exit >= self.num_exits
        ):
            raise ValueError(
                f"slo_shed_max_exit {slo.config.shed_max_exit} is past the last exit {self.num_exits - 1}"
            )
        if telemetry is not None:
            telemetry.policy(policy.version, spec.fingerprint)
            if audit is not None:  # the writer's totals move in its own thread, between requests
                telemetry.refresh_with(lambda: telemetry.audit(audit.written, audit.dropped, audit.lost))
            telemetry.refresh_with(self._publish_state)

    @classmethod
    def from_directory(cls, directory: Path, **hooks: Any) -> Orchestrator:
        """The spec, policy and tokenizer files a repository writer put into a model version folder."""
        spec = OrchestratorSpec.load(directory / SPEC_FILE)
        encoder = TextEncoder(directory, spec.text) if spec.text else None
        decoder = ImageDecoder(spec.image) if spec.image else None
        policy = Policy.load(directory / POLICY_FILE)
        return cls(spec, policy, text_encoder=encoder, image_decoder=decoder, **hooks)

    @property
    def num_exits(self) -> int:
        return len(self.spec.segment_models)

    def parse(self, request: RequestView, received: float | None = None) -> ParsedRequest:
        """Checks one request's inputs and parameters; raises RequestError naming the first problem.

        ``received`` (time.monotonic()) starts the request's deadline clock.
        """
        inputs: dict[str, np.ndarray] = {}
        rows = None
        encoded = self._encode_raw_input(request)
        for spec in self.spec.inputs:
            array = encoded[spec.name] if encoded else request.input(spec.name)
            if array is None:
                alternative = f" (or send {self.raw_input[0]})" if self.raw_input is not None else ""
                raise RequestError(f"input {spec.name!r} is missing{alternative}")
            if array.dtype != np.dtype(spec.dtype):
                raise RequestError(f"input {spec.name!r} must be {spec.dtype}, not {array.dtype}")
            if array.ndim != 1 + len(spec.shape) or any(
                e != -1 and a != e for a, e in zip(array.shape[1:], spec.shape, strict=True)
            ):
                shape = ", ".join(str(d) for d in (-1, *spec.shape))
                raise RequestError(f"input {spec.name!r} must have shape [{shape}], not {list(array.shape)}")
            if rows is not None and array.shape[0] != rows:
                raise RequestError(f"input {spec.name!r} has {array.shape[0]} rows, the other inputs {rows}")
            rows = array.shape[0]
            problem = spec.violation(array)
            if problem:
                raise RequestError(f"input {spec.name!r} {problem}")
            inputs[spec.name] = array
        if not rows:
            raise RequestError("the request has no rows")
        # Every variable axis is the one sequence axis the segments were exported with.
        lengths = {
            (spec.name, length)
            for spec in self.spec.inputs
            for length, declared in zip(inputs[spec.name].shape[1:], spec.shape, strict=True)
            if declared == -1
        }
        if len({length for _, length in lengths}) > 1:
            described = ", ".join(f"{name!r} {length}" for name, length in sorted(lengths))
            raise RequestError(
                f"inputs disagree on the sequence length: {described}; their lengths must be equal"
            )

        parameters = dict(request.parameters())
        unknown = sorted(set(parameters) - set(self.PARAMETERS))
        if unknown:
            raise RequestError(f"unknown request parameters {unknown}; known: {list(self.PARAMETERS)}")
        last = self.num_exits - 1
        # A negative exit counts from the last, as Python indexes: min_exit -1 runs every segment
        # whatever the model's depth (the health canary does so).
        min_exit = (
            _int_parameter("min_exit", parameters.get("min_exit", 0), -self.num_exits, last) % self.num_exits
        )
        max_exit = (
            _int_parameter("max_exit", parameters.get("max_exit", last), -self.num_exits, last)
            % self.num_exits
        )
        if min_exit > max_exit:
            raise RequestError(f"min_exit {min_exit} is above max_exit {max_exit}")
        force_full = _bool_parameter("force_full", parameters.get("force_full", False))
        if force_full and max_exit < last:
            raise RequestError(f"force_full contradicts max_exit {max_exit}")
        request_id = _str_parameter("request_id", parameters.get("request_id"))
        # A cohort without calibrated overrides is served by the global rules.
        cohort = _str_parameter("cohort", parameters.get("cohort"))
        deadline = math.inf
        if "deadline_ms" in parameters:
            budget_ms = _int_parameter("deadline_ms", parameters["deadline_ms"], 0, 24 * 3600 * 1000)
            deadline = (time.monotonic() if received is None else received) + budget_ms / 1000.0
        return ParsedRequest(
            inputs=inputs,
            rows=rows,
            force_full=force_full,
            min_exit=min_exit,
            max_exit=max_exit,
            rule_set=self.cohort_rule_set.get(cohort, 0) if cohort else 0,
            deadline=deadline,
            request_id=request_id,
            cohort=cohort,
        )

    def _encode_raw_input(self, request: RequestView) -> dict[str, np.ndarray] | None:
        """The model's inputs from the request's raw TEXT or IMAGE_BYTES, or None where it sent none (it
        sent the model's own tensors)."""
        if self.raw_input is None:
            return None
        name, encode = self.raw_input
        raw = request.input(name)
        if raw is None:
            return None
        if any(request.input(spec.name) is not None for spec in self.spec.inputs):
            raise RequestError(f"send either {name} or {[s.name for s in self.spec.inputs]}, not both")
        if raw.dtype != np.object_ and raw.dtype.kind not in "SU":
            raise RequestError(f"input {name!r} must be BYTES, not {raw.dtype}")
        try:
            tensors = encode(raw)
        except (TextError, ImageError) as error:
            raise RequestError(str(error)) from None
        return dict(zip((s.name for s in self.spec.inputs), tensors, strict=True))

    def merge(self, parsed: Sequence[ParsedRequest]) -> CascadeBatch:
        """One batch of all rows, in request order, with each row's own constraints."""

        rows = [p.rows for p in parsed]

        def repeat(value: str, dtype: Any) -> np.ndarray:  # (B,) each request's value on its rows
            return np.repeat(np.array([getattr(p, value) for p in parsed], dtype=dtype), rows)

        return CascadeBatch(
            inputs={
                s.name: _concatenate_padded([p.inputs[s.name] for p in parsed]) for s in self.spec.inputs
            },
            force_full=repeat("force_full", bool),
            min_exit=repeat("min_exit", np.int64),
            max_exit=repeat("max_exit", np.int64),
            rule_set=repeat("rule_set", np.int64),
            deadline=repeat("deadline", np.float64),
        )

    def execute(
        self, requests: Sequence[RequestView], run_segment: RunSegment, run_model: RunModel | None
    ) -> list[dict[str, np.ndarray] | Exception]:
        """One answer per request, in order: its output tensors, or the error that concerns it alone.

        ``run_model(name, raw_inputs) -> logits`` reaches other models: `<name>_full` for forced rows
        and the policy's fallback model.
        """
        answers: list[dict[str, np.ndarray] | Exception] = []
        parsed: list[ParsedRequest] = []
        received = time.monotonic()
        started = time.perf_counter()
        self._times = dict.fromkeys(("segments", "observe"), 0.0)  # seconds of this execute, by part
        rung, shedding = (self.slo.rung, self.slo.shedding) if self.slo is not None else (0, False)
        for request in requests:
            try:
                parsed.append(self._at_rung(self.parse(request, received), rung, shedding))
                answers.append({})
            except RequestError as error:
                answers.append(error)
        parsed_at = time.perf_counter()
        served = iter(self._serve(parsed, self._timed_segments(run_segment), run_model))
        answers = [answer if isinstance(answer, Exception) else next(served) for answer in answers]
        if self.slo is not None:  # its windows close in the adapter's thread (close_slo_window)
            self.slo.record(time.monotonic() - received, len(requests))
        if self.telemetry is not None:
            times = self._times
            cascade = time.perf_counter() - parsed_at - times["segments"] - times["observe"]
            self.telemetry.execute_times(
                {"parse": parsed_at - started, "cascade": cascade, **times}, len(requests)
            )
        return answers

    def _timed_segments(self, run_segment: RunSegment) -> RunSegment:
        """``run_segment`` adding its time to this execute's "segments" part: the segments' runs (BLS
        round trips, or ONNX Runtime in process) apart from the cascade's own work (a forced row's or a
        fallback's call to another model counts as cascade)."""

        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return run_segment(*args)
            finally:
                self._times["segments"] += time.perf_counter() - started

        return timed

    def _at_rung(self, request: ParsedRequest, rung: int, shedding: bool) -> ParsedRequest:
        """The request as the SLO controller's rung serves it: forced and pinned-cohort requests stay at
        rung 0; under load shedding the others answer at the shedding exit at the latest."""
        if request.force_full or request.cohort in self.policy.pinned_cohorts or (rung == 0 and not shedding):
            return request
        cap = self.slo.config.shed_max_exit if shedding else None
        shed = cap is not None and cap < request.max_exit
        return replace(
            request,
            rung=rung,
            rule_set=self.first_rung_rule_set + rung - 1 if rung else request.rule_set,
            max_exit=cap if shed else request.max_exit,
            min_exit=min(request.min_exit, cap) if shed else request.min_exit,
            shed=shed,
        )

    def close_slo_window(self) -> None:
        """The SLO controller's work between requests, when ``slo.due_in()`` says: close its window,
        or check the backlog; the window's figures go to the metrics."""
        window = self.slo.tick()
        if window is not None and self.telemetry is not None:
            self.telemetry.slo(window)

    def _serve(
        self, parsed: Sequence[ParsedRequest], run_segment: RunSegment, run_model: RunModel | None
    ) -> list[dict[str, np.ndarray] | Exception]:
        """One answer per parsed request. When the merged batch fails, each request runs again on its
        own, so a request that breaks a segment in a way parse could not foresee fails alone."""
        if not parsed:
            return []
        batch = self.merge(parsed)
        try:
            answered, failed = self._answer(batch, run_segment, run_model)
        except Exception as error:  # a failed segment fails the rows that needed it, not the server
            if len(parsed) == 1 or isinstance(error, SegmentUnavailable):
                return [error] * len(parsed)
            return [answer for request in parsed for answer in self._serve([request], run_segment, run_model)]
        outputs = answered.outputs
        bounds = np.cumsum([0, *(p.rows for p in parsed)])
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        if any(p.shed for p in parsed):
            shed = np.repeat([p.shed for p in parsed], [p.rows for p in parsed])  # (B,)
            outputs["FLAGS"][shed & (outputs["FLAGS"] & FLAG_DEPTH_CAP != 0)] |= FLAG_SHED
        if failed is not None:  # a request with a row the outage left unanswerable fails whole
            rows, message = failed
            lost = [bool(rows[a:b].any()) for a, b in spans]
            keep = np.repeat(~np.array(lost), [p.rows for p in parsed])
            kept = [p for p, gone in zip(parsed, lost, strict=True) if not gone]
            if kept:
                kept_batch = replace(
                    batch, inputs={n: t[keep] for n, t in batch.inputs.items()}, rule_set=batch.rule_set[keep]
                )
                self._observe(answered.rows(keep), kept, kept_batch, run_model)
            return [
                ServiceDegraded(message) if gone else {name: array[a:b] for name, array in outputs.items()}
                for (a, b), gone in zip(spans, lost, strict=True)
            ]
        self._observe(answered, parsed, batch, run_model)
        return [{name: array[a:b] for name, array in outputs.items()} for a, b in spans]

    def _answer(
        self, batch: CascadeBatch, run_segment: RunSegment, run_model: RunModel | None
    ) -> tuple[Answered, tuple[np.ndarray, str] | None]:
        """The answers of every row of the batch and, where models were unavailable, the rows left
        without an answer the policy allows (B,) with the reason."""
        requested_full = batch.force_full
        policy = self.policy
        # Drift's alarm, or the live risk test's: full depth through the segments, so the policy's
        # early answer is still known for every row (evidence for the test that clears the alarm).
        conservative = self.conservative
        if conservative:
            batch = replace(batch, force_full=np.ones(batch.rows, dtype=bool))
            policy = self.conservative_policy
        segments = self.spec.segment_models

        def segment(index: int, tensors: Mapping[str, Any], need_hidden: bool) -> tuple[Any, Any]:
            return self.outages.call(segments[index], lambda: run_segment(index, tensors, need_hidden))

        run_full = None
        if run_model is not None:
            full = self.spec.full_model

            def call_full(tensors: Any) -> Any:
                return self.outages.call(full, lambda: run_model(full, tensors))

            run_full = call_full
        result = self.cascade(
            batch,
            segment,
            policy,
            self.spec.exit_costs,
            self.spec.side_inputs,
            run_full,
            compact=self.spec.compact,
        )
        outputs = {
            "LOGITS": result.logits,
            "LABEL": result.label,
            "EXIT": result.exit,
            "CONFIDENCE": result.confidence,
            "COST": result.cost,
            "FLAGS": result.flags,
        }
        if conservative:  # rows the request did not force are flagged as forced by conservative mode
            outputs["FLAGS"] = np.where(
                requested_full, result.flags, (result.flags & ~FLAG_FORCED_FULL) | FLAG_CONSERVATIVE
            ).astype(np.int32)
        failed = None
        if result.unfinished is not None:
            failed = self._reroute(outputs, batch, result, run_full)
        if self.policy.abstention is not None:
            self._abstain(outputs, batch, run_model)
        outputs["LABEL_NAME"] = label_names(outputs["LABEL"], self.spec.class_names)  # of the final labels
        answered = Answered(outputs, result.policy_exit, result.policy_label, requested_full, conservative)
        return answered, failed

    @property
    def conservative(self) -> bool:
        """Whether every row runs to full depth now: the drift alarm or a risk alarm asks for it."""
        return (self.drift is not None and self.drift.conservative) or (
            self.shadow is not None and self.shadow.conservative
        )

    def _reroute(
        self, outputs: dict[str, np.ndarray], batch: CascadeBatch, result: CascadeResult, run_full: Any
    ) -> tuple[np.ndarray, str] | None:
        """Answers the rows a segment outage left unfinished with `<name>_full` (FLAG_REROUTED); where it
        is down too, keeps their answers at the deepest exit reached if the policy allows it. Returns
        the rows still without an allowed answer, and why, or None."""
        rows = result.unfinished  # (B,) bool
        reason = f"service degraded: {result.outage}"
        if run_full is not None:
            try:
                logits = run_full({name: tensor[rows] for name, tensor in batch.inputs.items()})
            except SegmentUnavailable as error:
                reason += f"; {self.spec.full_model} is unavailable too: {error}"
            else:
                last = self.num_exits - 1
                temperature = np.array([self.rule_sets[s][last].temperature for s in batch.rule_set[rows]])
                scaled = np.asarray(logits, dtype=np.float32) / temperature[:, None].astype(np.float32)
                answer = compute_confidence(scaled)
                if outputs["LOGITS"].shape[1] == 0:  # no row of the batch reached an exit: (B, 0) so far
                    outputs["LOGITS"] = np.full((len(rows), scaled.shape[1]), np.nan, dtype=np.float32)
                outputs["LOGITS"][rows] = scaled
                outputs["LABEL"][rows] = answer.label
                outputs["CONFIDENCE"][rows] = answer.stacked()
                outputs["EXIT"][rows] = last
                outputs["COST"][rows] += np.float32(1.0)
                outputs["FLAGS"][rows] = (outputs["FLAGS"][rows] & ~FLAG_DEGRADED) | FLAG_REROUTED
                return None
        if self.policy.degraded_answers:
            unanswerable = rows & (outputs["EXIT"] < 0)  # reached no exit before the outage
            return (unanswerable, reason + "; no exit was reached") if unanswerable.any() else None
        return rows, reason + "; the policy allows no answer at a shallower exit (degraded_answers)"

    def _abstain(
        self, outputs: dict[str, np.ndarray], batch: CascadeBatch, run_model: RunModel | None
    ) -> None:
        """Flags, or sends to the fallback model, the rows still unsure at their last allowed exit."""
        band = self.policy.abstention
        confidence = Confidence(*(outputs["CONFIDENCE"][:, i] for i in range(3)), outputs["LABEL"])
        unsure = ~exits_by_threshold(confidence, band.metric, band.threshold)
        flags = outputs["FLAGS"]
        if band.action == "fallback":
            model = band.fallback_model or self.spec.full_model
            # Rows already answered by the full network gain nothing from running it again.
            ask = unsure & ((outputs["EXIT"] < self.num_exits - 1) | (model != self.spec.full_model))
            if ask.any() and run_model is not None:
                try:
                    logits = run_model(model, {n: t[ask] for n, t in batch.inputs.items()})
                    answer = compute_confidence(logits)
                    outputs["LOGITS"][ask] = logits
                    outputs["LABEL"][ask] = answer.label
                    outputs["CONFIDENCE"][ask] = answer.stacked()
                    outputs["COST"][ask] += np.float32(band.fallback_cost)
                    flags[ask] |= FLAG_FALLBACK
                except Exception:  # the fallback is a second opinion: without it, the row is flagged
                    flags[ask] |= FLAG_FALLBACK_FAILED | FLAG_ABSTAINED
                unsure &= ~ask
        flags[unsure] |= FLAG_ABSTAINED

    def _observe(
        self,
        answered: Answered,
        parsed: Sequence[ParsedRequest],
        batch: CascadeBatch,
        run_model: RunModel | None,
    ) -> None:
        """Metrics, drift, shadow checks and audit for the answered rows; none of it waits on a check.
        Its time is this execute's "observe" part.

        Drift and the shadow checks watch the exits the policy chose freely, conservative mode included
        (its rows run through every segment, so the choice and its answer are still known), not rows the
        request forced, and only at rung 0: a higher rung moves the profile on purpose (its own is in
        the policy's ladder). Rows answered by another model than the cascade (rerouted in an outage,
        sent to a fallback) are left out of the checks: their answer is not the policy's.
        """
        started = time.perf_counter()
        outputs, policy_exit = answered.outputs, answered.policy_exit
        rungs = np.repeat([p.rung for p in parsed], [p.rows for p in parsed])  # (B,)
        free = (policy_exit >= 0) & ~answered.requested_full & (rungs == 0)  # (B,)
        cohorts = np.concatenate([np.full(p.rows, p.cohort or "", dtype=object) for p in parsed])  # (B,)
        if self.drift is not None:
            if free.any():
                self.drift.update(policy_exit[free])
            if self.shadow is not None:
                self.shadow.profile_moved(self.drift.moving)
        if self.shadow is not None:
            own = (outputs["FLAGS"] & (FLAG_REROUTED | FLAG_DEGRADED | FLAG_FALLBACK)) == 0
            full = self.spec.full_model
            self.shadow.observe(
                labels=outputs["LABEL"],
                policy_exit=policy_exit,
                policy_label=answered.policy_label,
                free=free & own,
                conservative=answered.conservative,
                cohorts=cohorts,
                inputs=batch.inputs,
                request_ids=[p.request_id for p in parsed for _ in range(p.rows)],
                rows=np.concatenate([np.arange(p.rows) for p in parsed]),
                run_full=None if run_model is None else lambda tensors: run_model(full, tensors),
            )
        if self.telemetry is not None:
            self.telemetry.answered(
                outputs["EXIT"], outputs["CONFIDENCE"][:, 0], outputs["COST"], outputs["FLAGS"], cohorts
            )
            if self.slo is not None:
                self.telemetry.rows_by_rung(rungs)
            self.telemetry.publish()
        if self.audit is not None:
            self.audit.record(self.audit_records(outputs, parsed, batch, policy_exit))
        self._times["observe"] += time.perf_counter() - started

    def _publish_state(self) -> None:
        """The drift, risk and conservative-mode gauges, read as they go out. Three threads change that
        state (requests, settled shadow checks, and the other instances' evidence): a gauge each of them
        set from what it had read a moment before could be overwritten by an older reading, and on an
        idle service stay wrong (in a served test one instance's alarm gauge still read 0 ten seconds after
        the other instance had taken its raised alarm from it)."""
        if self.drift is not None:
            self.telemetry.drift(self.drift.score, self.drift.alarm, self.conservative)
        elif self.shadow is not None:
            self.telemetry.conservative_mode(self.conservative)
        if self.shadow is not None:
            self.telemetry.risk_tests(self.shadow.gauges())
            self.telemetry.shadow_lost(self.shadow.dropped, self.shadow.failed)

    def shared_state(self) -> dict[str, Any]:
        """What this instance tells the model's other instances: its drift window and risk evidence."""
        state: dict[str, Any] = {}
        if self.drift is not None:
            state["drift"] = self.drift.snapshot()
        if self.shadow is not None:
            state["shadow"] = self.shadow.snapshot()
        return state

    def shared_state_interval_s(self) -> float:
        """Seconds to the next exchange with the other instances. While checks are boosted an alarm may be
        near (and while one is up, its clear), and each exchange is a step on its way to the requests:
        the leader adds the others' evidence, then the others take its decision. At the usual 0.25 s
        those two steps cost a switch to foreign rows up to 0.5 s of traffic, about 600 rows of the
        served test's stream; at 0.05 s, about 125. An exchange writes and reads a few KB of JSON per
        instance (under a millisecond)."""
        return ALERT_EXCHANGE_S if self.shadow is not None and self.shadow.alert else EXCHANGE_S

    def absorb_shared(self, peers: Mapping[int, Mapping[str, Any]]) -> None:
        """The other instances' latest states (pid -> ``shared_state()``)."""
        if self.drift is not None:
            self.drift.absorb([p["drift"] for p in peers.values() if "drift" in p])
        if self.shadow is not None:
            self.shadow.absorb({pid: p["shadow"] for pid, p in peers.items() if "shadow" in p})

    def close(self) -> None:
        """Settles the queued shadow checks, then closes the audit log they write to."""
        if self.shadow is not None:
            self.shadow.close()
        if self.audit is not None:
            self.audit.close()

    def audit_records(
        self,
        outputs: dict[str, np.ndarray],
        parsed: Sequence[ParsedRequest],
        batch: CascadeBatch,
        policy_exit: np.ndarray,
    ) -> list[dict[str, Any]]:
        """One record per answered row: which exit decided it, how sure, under which rule and policy."""
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        records = []
        position = 0
        last = self.num_exits - 1
        for request in parsed:
            for row in range(request.rows):
                exit_index = int(outputs["EXIT"][position])
                label = int(outputs["LABEL"][position])
                rule = self.rule_sets[int(batch.rule_set[position])][exit_index]
                threshold = rule.threshold
                if isinstance(threshold, tuple):
                    threshold = threshold[label] if label >= 0 else None
                confidence = outputs["CONFIDENCE"][position]
                records.append(
                    {
                        "time": stamp,
                        "model": self.spec.model_name,
                        "request_id": request.request_id,
                        "row": row,
                        "exit": exit_index,
                        "label": label,
                        "label_name": self.spec.class_names[label] if label >= 0 else None,
                        "max_prob": _finite_or_none(confidence[0]),
                        "entropy": _finite_or_none(confidence[1]),
                        "margin": _finite_or_none(confidence[2]),
                        "metric": rule.metric,
                        # The last exit answers whatever its confidence: no threshold applied there.
                        "threshold": None if exit_index == last else threshold,
                        "temperature": rule.temperature,
                        "cohort": request.cohort,
                        "flags": describe_flags(int(outputs["FLAGS"][position])),
                        "cost": round(float(outputs["COST"][position]), 6),
                        "policy_version": self.policy.version,
                        "rung": request.rung,
                        # The exit the policy chose (-1: the request's constraints decided): under
                        # conservative mode the row answered at full depth, and left here otherwise.
                        "policy_exit": int(policy_exit[position]),
                        "model_fingerprint": self.spec.fingerprint,
                    }
                )
                position += 1
        return records


def _concatenate_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Rows of several requests in one array; variable axes (a sequence) are right-padded with zeros
    to the longest, which an attention mask of zeros makes inert."""
    if len(arrays) == 1:
        return arrays[0]
    if all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):  # nothing to pad (np.pad costs 0.1 ms)
        return np.concatenate(arrays)
    longest = np.max([a.shape for a in arrays], axis=0)[1:]
    return np.concatenate(
        [
            np.pad(a, [(0, 0), *((0, int(m - d)) for d, m in zip(a.shape[1:], longest, strict=True))])
            for a in arrays
        ]
    )


def _finite_or_none(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(float(value)) else None
