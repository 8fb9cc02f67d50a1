"""The orchestrator's logic: requests in, one cascade over all of them, one answer (or error) per request.

``triton_orchestrator.py`` adapts Triton's request objects to ``RequestView`` and BLS calls to
``run_segment``; everything here runs in plain Python, so tests drive it with fakes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from offramp.backend.cascade import CascadeBatch, RunFull, RunSegment, run_cascade
from offramp.backend.contract import TensorSpec
from offramp.backend.policy import Policy

SPEC_FILE = "orchestrator.json"
POLICY_FILE = "policy.json"


class RequestError(ValueError):
    """What is wrong with one request; it is answered with this message and its batch-mates go on."""


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
        )


@dataclass(frozen=True)
class ParsedRequest:
    inputs: dict[str, np.ndarray]  # each (n, ...)
    rows: int
    force_full: bool
    min_exit: int
    max_exit: int
    rule_set: int  # 0: global rules; i > 0: the policy's i-th cohort
    deadline: float  # time.monotonic() after which rows take the next exit; inf: none
    request_id: str | None


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

    def __init__(self, spec: OrchestratorSpec, policy: Policy) -> None:
        self.spec = spec
        self.policy = policy.validate(len(spec.segment_models), len(spec.class_names), spec.fingerprint)
        self.cohort_rule_set = {name: i + 1 for i, name in enumerate(sorted(policy.cohorts))}

    @classmethod
    def from_directory(cls, directory: Path) -> Orchestrator:
        """The spec and policy files a repository writer put into a model version folder."""
        return cls(OrchestratorSpec.load(directory / SPEC_FILE), Policy.load(directory / POLICY_FILE))

    @property
    def num_exits(self) -> int:
        return len(self.spec.segment_models)

    def parse(self, request: RequestView, received: float | None = None) -> ParsedRequest:
        """Checks one request's inputs and parameters; raises RequestError naming the first problem.

        ``received`` (time.monotonic()) starts the request's deadline clock.
        """
        inputs: dict[str, np.ndarray] = {}
        rows = None
        for spec in self.spec.inputs:
            array = request.input(spec.name)
            if array is None:
                raise RequestError(f"input {spec.name!r} is missing")
            if array.dtype != np.dtype(spec.dtype):
                raise RequestError(f"input {spec.name!r} must be {spec.dtype}, not {array.dtype}")
            if array.ndim != 1 + len(spec.shape) or any(
                e != -1 and a != e for a, e in zip(array.shape[1:], spec.shape)
            ):
                shape = ", ".join(str(d) for d in (-1, *spec.shape))
                raise RequestError(f"input {spec.name!r} must have shape [{shape}], not {list(array.shape)}")
            if rows is not None and array.shape[0] != rows:
                raise RequestError(f"input {spec.name!r} has {array.shape[0]} rows, the other inputs {rows}")
            rows = array.shape[0]
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise RequestError(f"input {spec.name!r} holds NaN or infinite values")
            inputs[spec.name] = array
        if not rows:
            raise RequestError("the request has no rows")

        parameters = dict(request.parameters())
        unknown = sorted(set(parameters) - set(self.PARAMETERS))
        if unknown:
            raise RequestError(f"unknown request parameters {unknown}; known: {list(self.PARAMETERS)}")
        last = self.num_exits - 1
        min_exit = _int_parameter("min_exit", parameters.get("min_exit", 0), 0, last)
        max_exit = _int_parameter("max_exit", parameters.get("max_exit", last), 0, last)
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
        )

    def merge(self, parsed: Sequence[ParsedRequest]) -> CascadeBatch:
        """One batch of all rows, in request order, with each row's own constraints."""
        repeat = lambda value, dtype: np.concatenate(  # noqa: E731
            [np.full(p.rows, getattr(p, value), dtype=dtype) for p in parsed]
        )
        return CascadeBatch(
            inputs={s.name: np.concatenate([p.inputs[s.name] for p in parsed]) for s in self.spec.inputs},
            force_full=repeat("force_full", bool),
            min_exit=repeat("min_exit", np.int64),
            max_exit=repeat("max_exit", np.int64),
            rule_set=repeat("rule_set", np.int64),
            deadline=repeat("deadline", np.float64),
        )

    def execute(
        self, requests: Sequence[RequestView], run_segment: RunSegment, run_full: RunFull | None
    ) -> list[dict[str, np.ndarray] | Exception]:
        """One answer per request, in order: its output tensors, or the error that concerns it alone."""
        answers: list[dict[str, np.ndarray] | Exception] = []
        parsed: list[ParsedRequest] = []
        received = time.monotonic()
        for request in requests:
            try:
                parsed.append(self.parse(request, received))
                answers.append({})
            except RequestError as error:
                answers.append(error)
        if not parsed:
            return answers
        try:
            result = run_cascade(
                self.merge(parsed),
                run_segment,
                self.policy,
                self.spec.exit_costs,
                self.spec.side_inputs,
                run_full,
                compact=self.spec.compact,
            )
        except Exception as error:  # a failed segment fails the rows that needed it, not the server
            return [a if isinstance(a, Exception) else error for a in answers]
        outputs = {
            "LOGITS": result.logits,
            "LABEL": result.label,
            "EXIT": result.exit,
            "CONFIDENCE": result.confidence,
            "COST": result.cost,
            "FLAGS": result.flags,
        }
        start = 0
        good = iter(parsed)
        for position, answer in enumerate(answers):
            if isinstance(answer, Exception):
                continue
            rows = next(good).rows
            answers[position] = {name: array[start : start + rows] for name, array in outputs.items()}
            start += rows
        return answers
