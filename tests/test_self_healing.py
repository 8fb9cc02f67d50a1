"""Self-healing against a real server under load: a stub killed with SIGKILL (what an out-of-memory kill
or a segfault does) costs seconds, not the service.

One server with the supervisor running; in turn the stub of the middle segment, the first, the last,
``_full`` and the orchestrator itself is killed while several client threads send requests. For each:
how many requests failed, how long until the answers were back on the early-exit path, what the health
checks said before, during and after, the restart counters, and that answers after recovery equal the
in-process cascade. A second server sees one segment killed five times in a row: the supervisor gives
up, unloads it, and the service stays up on ``<name>_full``. After each stop no shared-memory region of
the server is left.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from offramp.backend.contract import FLAG_FORCED_FULL, FLAG_REROUTED
from offramp.build.repository import RepositoryOptions, full_model_name, segment_model_name, write_repository
from offramp.client.serving.health import HealthEndpoint, ServiceHealth, check_service
from offramp.client.serving.processes import python_stubs
from offramp.client.serving.server import SHM_DIR, EmbeddedTritonServer, ServerPorts
from offramp.client.serving.supervisor import RestartPolicy, ServerRestarts, Supervisor, supervised
from tests.reliability_support import Traffic, assert_rows_match, wait_for
from tests.served_reference import Reference, spread_policy

pytestmark = pytest.mark.integration
ROWS = 256
TIMEOUT_S = 10.0
# tritonserver 2.51's Python backend can abort the whole server when a stub dies while it holds the lock
# of its shared-memory message queue: the server's side throws this from libtriton_python.so and
# terminates (once in CI, the orchestrator killed under load; upstream triton-inference-server/server#8882
# reports it under plain BLS load too). No supervisor of stubs can repair a server that is gone, so a
# kill that ends that way says nothing of the supervisor: the test is reported as an expected failure
# with the reason, and fails as before for every other way the restart can go wrong.
UPSTREAM_ABORT = "boost::interprocess::lock_exception"
# The goal: answers back on the early-exit path within this long of a kill (the supervisor polls every
# 0.25 s and a reload takes well under a second here; the rest is a margin for a loaded 2-core machine).
RECOVERY_GOAL_S = 10.0


@dataclass
class HealingService:
    server: EmbeddedTritonServer
    supervisor: Supervisor
    artifacts: Any
    images: np.ndarray
    expected: Any  # CascadeResult of the in-process cascade for `images`
    full_labels: np.ndarray  # (ROWS,) what rows forced to full depth answer


def _start(repository: Path, tmp_path: Path, name: str) -> EmbeddedTritonServer:
    server = EmbeddedTritonServer(
        repository,
        ports=ServerPorts.free(),
        log_path=tmp_path / f"{name}.log",
        model_control="explicit",
        load_models=("*",),
        startup_timeout_s=120,
    )
    return server.start()


@pytest.fixture(scope="module")
def repository(quick_cnn, fashion_test, tmp_path_factory, execution_env):
    artifacts, directory = quick_cnn
    images = fashion_test[0]
    policy = spread_policy(artifacts, directory, {"IMAGE": images[5000:6000]})
    root = tmp_path_factory.mktemp("healing")
    write_repository(
        artifacts, directory, policy, root / "repo", RepositoryOptions(execution_env=execution_env)
    )
    reference = Reference(artifacts, directory, policy)
    return root, artifacts, images[:ROWS], reference


@pytest.fixture(scope="module")
def healing(repository):
    root, artifacts, images, reference = repository
    server = _start(root / "repo", root, "healing")
    prefix = server.shm_region_prefix
    try:
        with supervised(server) as supervisor:
            expected = reference({"IMAGE": images})
            full_labels = reference({"IMAGE": images}, np.ones(len(images), dtype=bool)).label
            yield HealingService(server, supervisor, artifacts, images, expected, full_labels)
    finally:
        left = server.stop()
    # Killed stubs leave their regions; the supervisor removed them on recovery, the stop the rest.
    assert not list(SHM_DIR.glob(f"{prefix}*")), f"shared memory left after the stop: {left}"


def _get(endpoint: HealthEndpoint, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}{path}", timeout=30) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read().decode()
    return status, (body if path == "/metrics" else json.loads(body))


def _probe(endpoint: HealthEndpoint, path: str) -> tuple[int, str]:
    status, body = _get(endpoint, path)
    return status, body["status"]


def _stub_of(server: EmbeddedTritonServer, model: str) -> Any:
    stubs = [s for s in python_stubs(server.pid).values() if s.model == model]
    assert stubs, f"no stub serves {model}: {python_stubs(server.pid)}"
    return stubs[0]


def _early_exit_path(sent: Any, expected: Any) -> bool:
    """The request was answered by the segments as the policy would: no reroute, the reference's answer."""
    if not sent.outcome.ok or sent.outcome.outputs["FLAGS"].any():
        return False
    try:
        assert_rows_match(sent.outcome.outputs, expected, sent.rows)
    except AssertionError:
        return False
    return True


def _sent_since(traffic: Traffic, since: float) -> list[Any]:
    """The requests started after ``since`` (each recorded once it ended, failed or not), in send order."""
    return sorted(traffic.between(since, float("inf")), key=lambda s: s.started)


def _back_on_path(traffic: Traffic, since: float, expected: Any, last: int = 8) -> bool:
    """The ``last`` latest requests started after ``since`` all took the early-exit path."""
    after = _sent_since(traffic, since)
    return len(after) >= last and all(_early_exit_path(s, expected) for s in after[-last:])


def _health(service: HealingService) -> ServiceHealth:
    return check_service(service.server.grpc_url, [service.artifacts.name], timeout_s=TIMEOUT_S)


@dataclass
class KillOutcome:
    sent: int
    failed: list
    recovery_s: float  # from the kill to the first request answered on the early-exit path, all after it too
    health_before: ServiceHealth
    health_during: ServiceHealth
    health_after: ServiceHealth
    restarts: int


def _kill_under_load(service: HealingService, model: str, forced_traffic: bool = False) -> KillOutcome:
    server, supervisor = service.server, service.supervisor
    victim = _stub_of(server, model)
    restarts_before = supervisor.record(model).restarts
    health_before = _health(service)
    forced = Traffic(server, service.artifacts.name, service.images, threads=1, timeout_s=TIMEOUT_S,
                     parameters={"force_full": True}) if forced_traffic else None  # fmt: skip
    with Traffic(server, service.artifacts.name, service.images, threads=4, timeout_s=TIMEOUT_S) as traffic:
        if forced is not None:
            forced.__enter__()
        time.sleep(1.0)
        killed = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.3)
        health_during = _health(service)
        restarted = wait_for(
            lambda: supervisor.record(model).restarts > restarts_before, timeout_s=RECOVERY_GOAL_S
        )
        if not restarted and UPSTREAM_ABORT in server.log_path.read_text(errors="replace"):
            pytest.xfail(f"tritonserver aborted when the {model} stub was killed: {UPSTREAM_ABORT}")
        assert restarted, f"{model} was not restarted within {RECOVERY_GOAL_S} s: {supervisor.events[-3:]}"
        # Until the early-exit path is back, not a fixed pause: under CPU contention (a CI run beside other
        # work) the last requests of a two-second pause were still rerouted, and no request run took the
        # path to the end.
        wait_for(lambda: _back_on_path(traffic, killed, service.expected), timeout_s=RECOVERY_GOAL_S)
        if forced is not None:
            forced.stop()
    health_after = _health(service)
    after_kill = _sent_since(traffic, killed)
    on_path = [_early_exit_path(s, service.expected) for s in after_kill]
    # Recovered at the first request from which on every request took the early-exit path.
    first = next((i for i in range(len(on_path)) if all(on_path[i:])), None)
    assert first is not None, (
        f"{model}: the early-exit path was not back {RECOVERY_GOAL_S} s after the restart "
        f"({sum(on_path)} of {len(on_path)} requests after the kill took it)"
    )
    everything = traffic.sent + (forced.sent if forced is not None else [])
    if forced is not None:
        for sent in forced.sent:  # forced rows: the full network's answer, whichever way it came
            assert sent.outcome.ok, sent.outcome.error
            np.testing.assert_array_equal(
                sent.outcome.outputs["LABEL"].reshape(-1), service.full_labels[sent.rows]
            )
            assert (sent.outcome.outputs["FLAGS"] & FLAG_FORCED_FULL).all()
    return KillOutcome(
        sent=len(everything),
        failed=[s for s in everything if not s.outcome.ok],
        recovery_s=after_kill[first].ended - killed,
        health_before=health_before,
        health_during=health_during,
        health_after=health_after,
        restarts=supervisor.record(model).restarts - restarts_before,
    )


def _record(record_property: Any, outcome: KillOutcome) -> None:
    record_property("requests", outcome.sent)
    record_property("failed", len(outcome.failed))
    record_property("recovery_s", round(outcome.recovery_s, 2))
    for when in ("before", "during", "after"):
        record_property(f"health_{when}", getattr(outcome, f"health_{when}").status)


@pytest.mark.parametrize("segment", [1, 0, 2], ids=["middle", "first", "last"])
def test_a_killed_segment_costs_no_request_and_heals(healing, segment, record_property):
    """Rows that need the dead segment are answered by `_full` (flagged rerouted) until the supervisor
    has reloaded it; then the answers are the early-exit path's again."""
    model = segment_model_name(healing.artifacts.name, segment)
    outcome = _kill_under_load(healing, model)
    _record(record_property, outcome)
    assert outcome.failed == [], [s.outcome.error for s in outcome.failed[:3]]
    assert outcome.restarts == 1
    assert outcome.recovery_s < RECOVERY_GOAL_S
    assert outcome.health_before.ready and outcome.health_after.ready
    assert outcome.health_after.status == "ready", outcome.health_after.describe()
    assert outcome.health_during.live and outcome.health_during.ready, outcome.health_during.describe()


def test_a_killed_full_model_costs_no_request_and_forced_rows_go_through_the_segments(
    healing, record_property
):
    outcome = _kill_under_load(healing, full_model_name(healing.artifacts.name), forced_traffic=True)
    _record(record_property, outcome)
    assert outcome.failed == [], [s.outcome.error for s in outcome.failed[:3]]
    assert outcome.restarts == 1 and outcome.recovery_s < RECOVERY_GOAL_S
    assert outcome.health_after.status == "ready"


def test_a_killed_orchestrator_fails_requests_only_while_it_restarts(healing, record_property):
    name = healing.artifacts.name
    outcome = _kill_under_load(healing, name)
    _record(record_property, outcome)
    restarted = next(
        e for e in reversed(healing.supervisor.events) if e.model == name and e.kind == "restarted"
    )
    assert outcome.restarts == 1 and outcome.recovery_s < RECOVERY_GOAL_S
    late = [s for s in outcome.failed if s.started > restarted.time + 1.0]
    assert not late, f"requests failed after the orchestrator was back: {[s.outcome.error for s in late[:3]]}"
    for sent in outcome.failed:
        assert "not healthy" in sent.outcome.error or "unavailable" in sent.outcome.error.lower(), (
            sent.outcome.error
        )
    assert outcome.health_after.status == "ready"


def test_a_segment_that_keeps_dying_is_given_up_on_and_the_full_model_serves(
    repository, tmp_path, record_property
):
    root, artifacts, images, reference = repository
    expected = reference({"IMAGE": images})
    server = _start(root / "repo", tmp_path, "give-up")
    prefix = server.shm_region_prefix
    segment = segment_model_name(artifacts.name, 1)
    policy = RestartPolicy(max_restarts=4, window_s=600, backoff_s=(0.0, 0.5, 0.5, 0.5))
    try:
        with (
            supervised(server, policy) as supervisor,
            HealthEndpoint("127.0.0.1", 0, server.grpc_url, supervisor) as endpoint,
            Traffic(server, artifacts.name, images, threads=4, timeout_s=TIMEOUT_S) as traffic,
        ):
            assert _probe(endpoint, "/health/ready") == (200, "ready")
            for kill in range(5):
                victim = _stub_of(server, segment)
                os.kill(victim.pid, signal.SIGKILL)
                record = supervisor.record(segment)
                settled = wait_for(
                    lambda record=record, kill=kill: record.restarts == kill + 1 or record.gave_up,
                    timeout_s=RECOVERY_GOAL_S,
                )
                assert settled, f"kill {kill + 1}: {supervisor.events[-2:]}"
            assert record.gave_up and record.restarts == 4 and record.crashes == 5
            gave_up = time.monotonic()
            time.sleep(2.0)
            health = check_service(server.grpc_url, [artifacts.name])
            ready, live = _probe(endpoint, "/health/ready"), _probe(endpoint, "/health/live")
            details, metrics = _get(endpoint, "/health")[1], _get(endpoint, "/metrics")[1]
        after = traffic.between(gave_up, float("inf"))
        failed = [s for s in traffic.sent if not s.outcome.ok]
        record_property("requests", len(traffic.sent))
        record_property("failed", len(failed))
        assert not failed, [s.outcome.error for s in failed[:3]]
        assert after and all(
            s.outcome.ok and (s.outcome.outputs["FLAGS"] & ~FLAG_REROUTED == 0).all() for s in after
        )
        rerouted = [s for s in after if (s.outcome.outputs["FLAGS"] & FLAG_REROUTED).any()]
        assert rerouted, "no row needed the given-up segment after the give-up"
        for sent in after:  # the full model's answer where rerouted, the policy's elsewhere
            labels = sent.outcome.outputs["LABEL"].reshape(-1)
            early = (sent.outcome.outputs["FLAGS"].reshape(-1) & FLAG_REROUTED) == 0
            np.testing.assert_array_equal(labels[early], expected.label[sent.rows][early])
        assert health.ready and "degraded" in health.status, health.describe()
        # Answers are right (the full model's), so the replica stays ready; the endpoint says why it is
        # degraded.
        assert ready[0] == 200 and live[0] == 200 and ready[1].startswith("ready, degraded")
        assert f"{segment}: given up" in json.dumps(details)
        assert f'offramp_supervisor_gave_up{{model="{segment}"}} 1' in metrics
        assert f'offramp_supervisor_restarts_total{{model="{segment}"}} 4' in metrics
    finally:
        server.stop()
    assert not list(SHM_DIR.glob(f"{prefix}*"))


def test_the_health_endpoint_says_down_when_the_server_is_gone(repository, tmp_path):
    root, *_ = repository
    server = _start(root / "repo", tmp_path, "gone")
    url = server.grpc_url
    with HealthEndpoint("127.0.0.1", 0, url) as endpoint:
        assert _probe(endpoint, "/health/live") == (200, "ready")
        server.stop()
        status, body = _get(endpoint, "/health/live")
        assert status == 503 and body["status"] == "down" and "does not answer" in body["notes"][0]
        assert _get(endpoint, "/nowhere")[0] == 404
        # Gone while `offramp serve` restarts it: recovering, so live (a probe must not kill the replica
        # mid-restart) and not ready, with a note and the gauge saying so.
        endpoint.server_restarts = ServerRestarts()
        endpoint.server_restarts.exited(-9)
        status, body = _get(endpoint, "/health/live")
        assert status == 200 and "tritonserver exited with code -9; being restarted" in body["notes"]
        assert _get(endpoint, "/health/ready")[0] == 503
        assert "offramp_server_restarting 1" in endpoint.respond("/metrics")[1]
