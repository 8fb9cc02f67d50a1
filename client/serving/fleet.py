"""Policy versions across the replicas of one service: rolling deploys with a canary, rollbacks, status.

A service that outgrew one machine runs as several Triton replicas over one shared model repository
(a volume every replica mounts, or object storage each one reads). A routing change must reach all of
them, or none, without failed requests. ``FleetControl`` does it one replica at a time:

1. Before any replica is touched, the version's policy is *simulated*: the canary rows go through the
   orchestrator's own code (``Orchestrator.from_directory`` on the version folder) over the repository's
   ONNX files in this process, as ``segments_in_process`` serves them. A malformed policy fails here.
2. Replica by replica: load the version (explicit model control, as ``offramp policy deploy`` does on
   one server: in-flight requests finish on the old version), then send it the canary rows and compare
   every row's exit and label with the simulation. A replica that does not serve what the policy says
   (it runs other weights than the repository holds, another offramp, another runtime) fails here.
3. On the first failure: stop, and serve each replica already changed its previous version again; the
   replicas not reached were never touched. The fleet ends where it began.
4. Once every replica serves the version, pin it in ``config.pbtxt`` (``PolicyControl.pin``): a
   replica that restarts, or a new one, serves it too. The pin is written last, so a replica restarting
   during a rollout comes back on the version the fleet served before (``status`` then shows it apart).

A rollback is the same roll-out of an earlier version folder. ``status`` reads the versions every
replica reports READY and the pin, and says where they disagree.

Replicas are named by their gRPC address; ``parse_fleet`` reads ``host:port,host:port`` or ``@FILE``
(one replica a line, optionally followed by its metrics URL, for ``offramp stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from offramp.backend.contract import FULL_LOGITS_OUT, HIDDEN_OUT, LOGITS_OUT
from offramp.backend.orchestrator import Orchestrator
from offramp.backend.policy import Policy, PolicyError
from offramp.client.serving.policy_control import PolicyControl, PolicyControlError

DEFAULT_METRICS_PORT = 8002  # Triton's; every replica of a Kubernetes Deployment has the same ports
CANARY_ROWS_PER_REQUEST = 32  # well under any max_batch_size the repository writer sets


class FleetError(RuntimeError):
    pass


# --- Which replicas -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    grpc_url: str  # host:port
    metrics_url: str  # http://host:port/metrics


def replica(
    grpc_url: str, metrics_url: str | None = None, metrics_port: int = DEFAULT_METRICS_PORT
) -> Replica:
    host = grpc_url.rpartition(":")[0] or grpc_url
    return Replica(grpc_url, metrics_url or f"http://{host}:{metrics_port}/metrics")


def parse_fleet(spec: str, metrics_port: int = DEFAULT_METRICS_PORT) -> tuple[Replica, ...]:
    """``host:8001,host2:8001`` (metrics on ``metrics_port`` of each host), or ``@FILE``: one replica a
    line, its gRPC address and optionally its metrics URL, ``#`` starting a comment."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise FleetError(f"cannot read the fleet file {path}: {error}") from None
        entries = [line.split("#", 1)[0].split() for line in lines]
        replicas = [replica(e[0], e[1] if len(e) > 1 else None, metrics_port) for e in entries if e]
    else:
        replicas = [replica(a.strip(), None, metrics_port) for a in spec.split(",") if a.strip()]
    if not replicas:
        raise FleetError(f"no replica in {spec!r}")
    if len({r.grpc_url for r in replicas}) < len(replicas):
        raise FleetError(f"a replica is named twice in {spec!r}")
    return tuple(replicas)


# --- The canary and the policy's simulation ------------------------------------------------------------


@dataclass(frozen=True)
class CanaryRows:
    """Rows the policy is checked on: the orchestrator's inputs by name, each (N, ...)."""

    inputs: Mapping[str, np.ndarray]

    @classmethod
    def load(cls, path: Path) -> CanaryRows:
        """An ``.npz`` with one array per input (text as a fixed-width bytes array, or token ids)."""
        with np.load(path, allow_pickle=False) as data:
            inputs = {name: data[name] for name in data.files}
        if not inputs or len({len(a) for a in inputs.values()}) != 1:
            raise FleetError(
                f"{path}: the canary needs one array per input, all with the same number of rows"
            )
        return cls(inputs)

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    def chunks(self) -> list[dict[str, np.ndarray]]:
        return [
            {name: array[start : start + CANARY_ROWS_PER_REQUEST] for name, array in self.inputs.items()}
            for start in range(0, self.rows, CANARY_ROWS_PER_REQUEST)
        ]


@dataclass(frozen=True)
class Answers:
    """Each canary row's exit and label."""

    exit: np.ndarray
    label: np.ndarray


class _Request:
    """One request, as the orchestrator sees it (``RequestView``)."""

    def __init__(self, inputs: Mapping[str, np.ndarray]) -> None:
        self.inputs = inputs

    def input(self, name: str) -> np.ndarray | None:
        return self.inputs.get(name)

    def parameters(self) -> Mapping[str, Any]:
        return {}


def simulate_version(repository: Path, model: str, version: int, canary: CanaryRows) -> Answers:
    """What version ``version`` of ``model`` must answer for the canary rows: its policy served by the
    orchestrator's own code in this process, over the segments' and the full model's ``model.onnx`` in
    the repository (ONNX Runtime on the CPU).

    Raises FleetError where the version's policy or spec does not load (what would fail the replica's
    load), or where the repository holds no ONNX file to run (TensorRT plans only).
    """
    from offramp.backend.segment_runner import OnnxRunner

    version_dir = Path(repository) / model / str(version)
    try:
        orchestrator = Orchestrator.from_directory(version_dir)
    except (OSError, ValueError, KeyError) as error:  # a PolicyError is a ValueError
        raise FleetError(f"{model} version {version} does not load: {error}") from error
    spec = orchestrator.spec
    runners = {}
    for name in (*spec.segment_models, spec.full_model):
        onnx = Path(repository) / name / "1" / "model.onnx"
        if not onnx.is_file():
            raise FleetError(f"no {onnx} to simulate the policy with (the canary needs the ONNX models)")
        runners[name] = OnnxRunner(onnx)

    def run_segment(index: int, tensors: Mapping[str, np.ndarray], need_hidden: bool) -> tuple:
        outputs = runners[spec.segment_models[index]].run(dict(tensors), [HIDDEN_OUT, LOGITS_OUT])
        return (outputs[HIDDEN_OUT] if need_hidden else None), outputs[LOGITS_OUT]

    def run_model(name: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        if name not in runners:
            raise FleetError(f"the policy asks model {name}, which the simulation does not have")
        return runners[name].run(dict(tensors), [FULL_LOGITS_OUT])[FULL_LOGITS_OUT]

    (answer,) = orchestrator.execute([_Request(canary.inputs)], run_segment, run_model)
    if isinstance(answer, Exception):
        raise FleetError(f"the canary rows fail under {model} version {version}: {answer}")
    return Answers(answer["EXIT"].reshape(-1), answer["LABEL"].reshape(-1))


@dataclass(frozen=True)
class CanaryVerdict:
    replica: str
    rows: int
    mismatched: int = 0  # rows whose exit or label differs from the simulation
    error: str = ""  # a request that failed
    allowed: int = 0  # mismatches tolerated

    @property
    def passed(self) -> bool:
        return not self.error and self.mismatched <= self.allowed

    def describe(self) -> str:
        if self.error:
            return f"canary failed on {self.replica}: {self.error}"
        verdict = "passed" if self.passed else "FAILED"
        differ = f"{self.mismatched} of {self.rows} rows differ from the policy's simulation"
        return f"canary {verdict} on {self.replica}: {differ}"


def compare_answers(
    replica_url: str, served: Answers, expected: Answers, tolerance: float = 0.0
) -> CanaryVerdict:
    """Row by row; ``tolerance`` is the share of rows allowed to differ (0: none; a replica on another
    runtime, a GPU in FP16 say, may move rows that sit on a threshold)."""
    differ = (served.exit != expected.exit) | (served.label != expected.label)
    rows = len(expected.exit)
    return CanaryVerdict(replica_url, rows, int(differ.sum()), allowed=int(tolerance * rows))


def served_answers(replica_url: str, model: str, canary: CanaryRows, timeout_s: float = 30.0) -> Answers:
    """The canary rows as this one replica answers them (no other replica stands in)."""
    from offramp.client.grpc_client import OfframpClient

    with OfframpClient(replica_url, timeout_s=timeout_s) as client:
        parts = [client.classify(model, chunk) for chunk in canary.chunks()]
    return Answers(np.concatenate([p.exit for p in parts]), np.concatenate([p.label for p in parts]))


# --- What the fleet serves ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaState:
    replica: str
    versions: tuple[int, ...] = ()  # the versions it reports READY
    error: str = ""  # it did not answer

    @property
    def version(self) -> int | None:
        """The one version it serves, or None (unreachable, none, or several)."""
        return self.versions[0] if len(self.versions) == 1 else None


@dataclass(frozen=True)
class FleetStatus:
    model: str
    pinned: int | None  # what config.pbtxt pins: what a replica that restarts serves (None: the newest)
    newest: int  # the newest version folder on disk
    replicas: tuple[ReplicaState, ...]
    policy_names: Mapping[int, str] = field(default_factory=dict)  # version -> the policy's own name

    @property
    def on_restart(self) -> int:
        return self.pinned if self.pinned is not None else self.newest

    def problems(self) -> list[str]:
        """Why the fleet does not serve one version everywhere, the one a restart would serve too."""
        problems = []
        for state in self.replicas:
            if state.error:
                problems.append(f"{state.replica} does not answer: {state.error}")
            elif state.version is None:
                problems.append(f"{state.replica} serves versions {list(state.versions)}, not one")
        served = {s.version for s in self.replicas if s.version is not None}
        if len(served) > 1:
            problems.append(f"replicas serve different versions: {sorted(served)}")
        elif served and served != {self.on_restart}:
            problems.append(
                f"replicas serve version {served.pop()}, a restarted replica would serve {self.on_restart}"
            )
        return problems

    @property
    def agreed(self) -> bool:
        return not self.problems()

    def describe(self) -> str:
        pin = (
            f"pinned to {self.pinned}" if self.pinned is not None else f"unpinned (the newest, {self.newest})"
        )
        lines = [f"{self.model}: config.pbtxt {pin}"]
        for state in self.replicas:
            if state.error:
                lines.append(f"  {state.replica:<24} DOWN ({state.error})")
            else:
                names = (
                    ", ".join(f"{v} ({self.policy_names.get(v, '?')})" for v in state.versions) or "nothing"
                )
                lines.append(f"  {state.replica:<24} serves {names}")
        problems = self.problems()
        lines.append("fleet agrees" if not problems else "fleet DISAGREES:")
        lines += [f"  {p}" for p in problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class RolloutStep:
    replica: str
    previous: int | None  # what it served before
    outcome: str  # what happened, one line


@dataclass(frozen=True)
class Rollout:
    version: int
    steps: tuple[RolloutStep, ...]
    completed: bool  # every replica serves the version and it is pinned
    failure: str = ""
    restored: tuple[str, ...] = ()  # replicas set back to their previous version after the failure


class FleetControl:
    """The policy versions of one orchestrator model across replicas that share its repository."""

    def __init__(
        self,
        repository: Path,
        model: str,
        replicas: Sequence[Replica],
        admin_key: str | None = None,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        if not replicas:
            raise FleetError("a fleet needs at least one replica")
        self.repository = Path(repository)
        self.model = model
        self.replicas = tuple(replicas)
        self.admin_key = admin_key
        self.say = say
        self.disk = PolicyControl(self.repository, model)  # the repository alone, no server

    def _control(self, target: Replica) -> PolicyControl:
        return PolicyControl(self.repository, self.model, target.grpc_url, self.admin_key)

    def replica_state(self, target: Replica) -> ReplicaState:
        from tritonclient.utils import InferenceServerException

        try:
            return ReplicaState(target.grpc_url, tuple(sorted(self._control(target).active_versions())))
        except InferenceServerException as error:
            return ReplicaState(target.grpc_url, error=str(error.message() or error).splitlines()[0][:160])

    def status(self) -> FleetStatus:
        numbers = self.disk.version_numbers()
        if not numbers:
            raise FleetError(f"{self.repository / self.model} has no policy version")
        return FleetStatus(
            self.model,
            self.disk.pinned_version(),
            max(numbers),
            tuple(self.replica_state(r) for r in self.replicas),
            {n: self._policy_name(n) for n in numbers},
        )

    def _policy_name(self, number: int) -> str:
        try:
            return self.disk.policy(number).version
        except PolicyError as error:  # a version folder edited by hand: say so, do not fail the status
            return f"malformed: {str(error)[:80]}"

    def deploy(self, policy: Policy, canary: CanaryRows | None, tolerance: float = 0.0) -> Rollout:
        """Writes ``policy`` as the next version (checked against the model; nothing served, nothing pinned
        yet) and rolls it out."""
        number = self.disk.deploy(policy)
        self.say(f"{self.model}: policy {policy.version} written as version {number}")
        return self.roll_out(number, canary, tolerance)

    def rollback(self, to_version: int | None, canary: CanaryRows | None, tolerance: float = 0.0) -> Rollout:
        """Rolls out ``to_version``, by default the version before the one the fleet serves."""
        status = self.status()
        if to_version is None:
            served = {s.version for s in status.replicas}
            if len(served) != 1 or None in served:
                raise FleetError("the replicas do not serve one version; name the version to roll back to")
            current = served.pop()
            to_version = max((n for n in status.policy_names if n < current), default=None)
            if to_version is None:
                raise FleetError(f"no version before {current} to roll back to")
        return self.roll_out(to_version, canary, tolerance)

    def roll_out(self, version: int, canary: CanaryRows | None, tolerance: float = 0.0) -> Rollout:
        """Serves ``version`` on one replica after the other, checking each with the canary; on the first
        failure stops and restores the replicas already changed (module docstring)."""
        if version not in self.disk.version_numbers():
            raise FleetError(f"{self.model} has no policy version {version}")
        expected = simulate_version(self.repository, self.model, version, canary) if canary else None
        states = [self.replica_state(r) for r in self.replicas]
        down = [s for s in states if s.error]
        if down:
            raise FleetError(f"not rolling out: {down[0].replica} does not answer ({down[0].error})")
        steps: list[RolloutStep] = []
        for target, state in zip(self.replicas, states):
            failure = self._serve_and_check(target, version, canary, expected, tolerance)
            steps.append(RolloutStep(target.grpc_url, state.version, failure or f"serves version {version}"))
            self.say(f"  {target.grpc_url}: {steps[-1].outcome}")
            if failure:
                restored = self._restore(steps)
                return Rollout(version, tuple(steps), False, failure, restored)
        self.disk.pin(version)
        self.say(f"{self.model}: every replica serves version {version}; pinned in config.pbtxt")
        return Rollout(version, tuple(steps), True)

    def _serve_and_check(
        self,
        target: Replica,
        version: int,
        canary: CanaryRows | None,
        expected: Answers | None,
        tolerance: float,
    ) -> str:
        """Loads ``version`` on one replica and checks it; returns what went wrong ("" when nothing did)."""
        from tritonclient.utils import InferenceServerException

        try:
            self._control(target).serve_version(version)
        except (PolicyControlError, InferenceServerException) as error:
            return f"load failed: {str(error).splitlines()[0][:300]}"
        if canary is None or expected is None:
            return ""
        try:
            served = served_answers(target.grpc_url, self.model, canary)
        except InferenceServerException as error:
            verdict = CanaryVerdict(target.grpc_url, canary.rows, error=str(error.message() or error)[:300])
        else:
            verdict = compare_answers(target.grpc_url, served, expected, tolerance)
        self.say(f"  {verdict.describe()}")
        return "" if verdict.passed else verdict.describe()

    def _restore(self, steps: Sequence[RolloutStep]) -> tuple[str, ...]:
        """Serves each changed replica's previous version again; returns those restored."""
        from tritonclient.utils import InferenceServerException

        restored = []
        for step in steps:
            if step.previous is None:
                self.say(f"  {step.replica}: served no single version before; left as it is")
                continue
            try:
                self._control(self._replica(step.replica)).serve_version(step.previous)
            except (PolicyControlError, InferenceServerException) as error:
                self.say(f"  {step.replica}: NOT restored to version {step.previous}: {error}")
                continue
            restored.append(step.replica)
            self.say(f"  {step.replica}: restored to version {step.previous}")
        return tuple(restored)

    def _replica(self, grpc_url: str) -> Replica:
        return next(r for r in self.replicas if r.grpc_url == grpc_url)
