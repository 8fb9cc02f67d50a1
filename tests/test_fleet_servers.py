"""Replicas of one service on this machine, sharing one repository: rolling policy deploys, rollbacks that
survive a restart, a canary that stops a bad roll-out, and the multi-address client through a replica
stopped and another killed, on real tritonservers.

The default run starts two in-process servers (about a minute here). The tests marked slow start three
replicas as `offramp serve` processes, each its own launcher, as on three machines: one is stopped with
SIGTERM and one killed with SIGKILL (server, stubs and launcher) under load.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
import tritonclient.grpc as grpcclient

from offramp.backend.policy import ExitRule
from offramp.build.repository import RepositoryOptions, full_model_name, segment_model_name, write_repository
from offramp.client.grpc_client import OfframpClient
from offramp.client.serving import http_probe
from offramp.client.serving.fleet import CanaryRows, FleetControl, FleetError, replica
from offramp.client.serving.fleet_stats import fleet_total, read_replica
from offramp.client.serving.health import check_service
from offramp.client.serving.policy_control import PolicyControl
from offramp.client.serving.server import SHM_DIR, SHM_REGION_PREFIX, ServerPorts
from offramp.client.tools.fleet_load import FleetLoad, LoadResult
from tests.reliability_support import wait_for
from tests.served_reference import Reference, spread_policy

pytestmark = pytest.mark.integration
POOL = 256  # test rows the load cycles through
CANARY = 64


@dataclass
class Service:
    root: Path
    repository: Path
    artifacts: object
    images: np.ndarray  # the load's rows
    canary: CanaryRows
    references: dict  # policy version name -> (exits, labels) of the in-process cascade on `images`
    first: object  # the policy of version 1
    stricter: object  # a policy every row answers at the last exit under


@pytest.fixture(scope="module")
def service(quick_cnn, fashion_test, tmp_path_factory, execution_env):
    artifacts, directory = quick_cnn
    root = tmp_path_factory.mktemp("fleet")
    images = fashion_test[0]
    first = spread_policy(artifacts, directory, {"IMAGE": images[5000:6000]}, "fleet-1")
    stricter = replace(
        first,
        version="fleet-strict",
        exits=(ExitRule("max_prob", 1.01),) * (artifacts.num_exits - 1) + (first.exits[-1],),
    )
    options = RepositoryOptions(execution_env=execution_env, orchestrator_instances=1)
    write_repository(artifacts, directory, first, root / "repo", options)
    canary_file = root / "canary.npz"
    np.savez(canary_file, IMAGE=images[6000 : 6000 + CANARY])
    references = {}
    for policy in (first, stricter):
        result = Reference(artifacts, directory, policy)({"IMAGE": images[:POOL]})
        references[policy.version] = (result.exit, result.label)
    assert not np.array_equal(*(r[0] for r in references.values())), "the two policies must differ"
    return Service(
        root,
        root / "repo",
        artifacts,
        images[:POOL],
        CanaryRows.load(canary_file),
        references,
        first,
        stricter,
    )


def check_answers(result: LoadResult, service: Service) -> dict[str, int]:
    """Every request answered once, each by one of the policies, on its own rows; answers by version."""
    requests = [a.request for a in result.answers]
    assert len(requests) == len(set(requests)), "a request was answered twice"
    by_version = dict.fromkeys(service.references, 0)
    for answer in result.answers:
        matching = [
            v
            for v, (exits, labels) in service.references.items()
            if np.array_equal(answer.exit, exits[answer.rows])
            and np.array_equal(answer.label, labels[answer.rows])
        ]
        assert matching, f"request {answer.request} answered differently from every policy"
        by_version[matching[0]] += 1
    return by_version


def test_two_replicas_roll_a_policy_out_and_a_rollback_survives_a_restart(service, running_server, tmp_path):
    """The short version (default run): a roll-out with the canary, the pin, a rollback, and a replica
    restarted after it, which answers with the rolled-back version."""

    def start():
        return running_server(service.repository, model_control="explicit", load_models=("*",))

    with start() as one, start() as two:
        replicas = [replica(one.grpc_url, one.metrics_url), replica(two.grpc_url, two.metrics_url)]
        fleet = FleetControl(service.repository, service.artifacts.name, replicas)
        first = fleet.status().replicas[0].version
        rollout = fleet.deploy(service.stricter, service.canary)
        assert rollout.completed, rollout.failure
        new = rollout.version
        status = fleet.status()
        assert status.agreed and status.pinned == new and {s.version for s in status.replicas} == {new}
        back = fleet.rollback(None, service.canary)
        assert back.completed and back.version == first and fleet.status().pinned == first
        # A restart loads what config.pbtxt pins: the rolled-back version, not the newest folder.
        with start() as restarted:
            assert PolicyControl(
                service.repository, service.artifacts.name, restarted.grpc_url
            ).active_versions() == {first}
            with OfframpClient(restarted.grpc_url) as client:
                answer = client.classify(service.artifacts.name, service.images[:64])
            exits, labels = service.references[service.first.version]
            np.testing.assert_array_equal(answer.exit, exits[:64])
            np.testing.assert_array_equal(answer.label, labels[:64])
            # The manifests' exec probe (HTTP, standard library) and `offramp health` (gRPC) agree: healthy,
            # a segment gone (`_full` answers its rows: still ready), and `_full` gone too (down).
            name = service.artifacts.name
            verdicts = []
            for unload in (None, segment_model_name(name, 1), full_model_name(name)):
                if unload:
                    with grpcclient.InferenceServerClient(restarted.grpc_url) as triton:
                        triton.unload_model(unload)
                live, ready, _ = http_probe.check(restarted.http_url, [name], 5.0)
                health = check_service(restarted.grpc_url, [name])
                assert (live, ready) == (health.live, health.ready), (unload, health.describe())
                verdicts.append((live, ready))
            assert verdicts == [(True, True), (True, True), (False, False)]


# --- Three replicas as separate launchers (slow) ---------------------------------------------------------


class ServedReplica:
    """`offramp serve` in its own process: a replica with its own launcher, on fixed ports."""

    def __init__(self, repository: Path, logs: Path, name: str) -> None:
        self.repository, self.logs, self.name = repository, logs, name
        self.ports = ServerPorts.free()
        self.health_port = ServerPorts.free().http
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def replica(self):
        return replica(self.grpc_url, f"http://127.0.0.1:{self.ports.metrics}/metrics")

    @property
    def output(self) -> Path:
        return self.logs / f"{self.name}-{self.starts}.out"

    def launch(self) -> None:
        self.starts += 1
        command = [
            sys.executable,
            "-m",
            "offramp.client.cli.main",
            "serve",
            "--repository",
            str(self.repository),
            "--http-port",
            str(self.ports.http),
            "--grpc-port",
            str(self.ports.grpc),
            "--metrics-port",
            str(self.ports.metrics),
            "--health-port",
            str(self.health_port),
            "--log",
            str(self.logs / f"{self.name}-{self.starts}.log"),
        ]
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "Ctrl-C to stop" not in self.output.read_text():
            assert self.process.poll() is None, f"{self.name} exited: {self.output.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{self.name} not ready: {self.output.read_text()[-2000:]}"
            time.sleep(0.5)

    def server_pid(self) -> int:
        (server,) = [c for c in psutil.Process(self.process.pid).children() if c.name() == "tritonserver"]
        return server.pid

    def regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{SHM_REGION_PREFIX}offramp{self.process.pid}-*"))

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(60) == 0

    def kill(self) -> list[Path]:
        """SIGKILL of the server, its stubs and the launcher at once (a crashed machine or container).
        The launcher is stopped first so that it cannot clean up after its server; returns the regions
        left behind."""
        os.kill(self.process.pid, signal.SIGSTOP)
        os.killpg(self.server_pid(), signal.SIGKILL)
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        time.sleep(1.0)  # the stubs see their server gone and exit
        return self.regions()


@pytest.fixture(scope="module")
def three_replicas(service, tmp_path_factory):
    logs = tmp_path_factory.mktemp("replicas")
    replicas = [ServedReplica(service.repository, logs, f"replica-{i}") for i in range(3)]
    for served in replicas:
        served.launch()
    try:
        for served in replicas:
            served.wait_ready()
        yield replicas
    finally:
        for served in replicas:
            if served.process is not None and served.process.poll() is None:
                served.terminate()
                assert not served.regions(), f"{served.name} left shared memory behind"


def fleet_of(service: Service, replicas) -> FleetControl:
    return FleetControl(service.repository, service.artifacts.name, [r.replica for r in replicas], say=print)


def addresses(replicas) -> list[str]:
    return [r.grpc_url for r in replicas]


@pytest.mark.slow
def test_a_rolling_deploy_under_load_fails_nothing_and_reaches_every_replica(service, three_replicas):
    fleet = fleet_of(service, three_replicas)
    load = FleetLoad(addresses(three_replicas), service.artifacts.name, {"IMAGE": service.images}, threads=3)
    with load:
        time.sleep(2.0)
        rollout = fleet.deploy(service.stricter, service.canary)
        time.sleep(2.0)
    result = load.stop()
    print(f"rolling deploy under load: {result.summary()}")
    assert rollout.completed, rollout.failure
    assert not result.failures, result.failures[:3]
    by_version = check_answers(result, service)
    assert by_version[service.first.version] > 0 and by_version[service.stricter.version] > 0
    assert set(result.by_replica()) == set(addresses(three_replicas))
    status = fleet.status()
    assert status.agreed and {s.version for s in status.replicas} == {rollout.version} == {status.pinned}

    def stats():
        return fleet_total(
            [read_replica(r.grpc_url, r.replica.metrics_url, service.artifacts.name) for r in three_replicas]
        )

    # Every replica's exits, summed (its counters are published at most once a second).
    answered = sum(len(a.rows) for a in result.answers)
    assert wait_for(lambda: stats().rows >= answered, timeout_s=5.0, interval_s=0.2), (stats().rows, answered)
    assert stats().policies == (service.stricter.version,)


@pytest.mark.slow
def test_a_failing_canary_stops_at_the_first_replica_and_restores_it(service, three_replicas):
    """A malformed policy is refused before any replica is touched; a policy the first replica does not
    serve as simulated (here: the repository's segment weights changed on disk after the replicas loaded
    them) stops the roll-out there, and that replica is restored."""
    fleet = fleet_of(service, three_replicas)
    before = fleet.status()
    assert before.agreed
    current = before.replicas[0].version

    malformed = service.repository / service.artifacts.name / "99"
    shutil.copytree(service.repository / service.artifacts.name / str(current), malformed)
    (malformed / "policy.json").write_text('{"version": "broken"')
    try:
        with pytest.raises(FleetError, match="does not load"):
            fleet.roll_out(99, service.canary)
    finally:
        shutil.rmtree(malformed)
    assert fleet.status().replicas == before.replicas

    weights = service.repository / segment_model_name(service.artifacts.name, 0) / "1" / "model.onnx"
    original = weights.read_bytes()
    model = onnx.load(weights)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            values = onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(-values, tensor.name))
    onnx.save(model, weights)
    try:
        rollout = fleet.deploy(replace(service.first, version="fleet-again"), service.canary)
    finally:
        weights.write_bytes(original)
    assert not rollout.completed and len(rollout.steps) == 1 and "canary FAILED" in rollout.failure
    assert rollout.restored == (three_replicas[0].grpc_url,)
    after = fleet.status()
    assert after.replicas == before.replicas and after.pinned == before.pinned and after.agreed


@pytest.mark.slow
def test_replicas_stopped_and_killed_under_load(service, three_replicas):
    """SIGTERM to one replica's launcher, then SIGKILL of another's server, stubs and launcher, while
    three clients send requests over all three: every request is answered once, with its own rows, by
    the replicas still up. The killed replica's /dev/shm regions stay behind until a new server starts on
    this machine, which removes them (their launcher is gone)."""
    fleet = fleet_of(service, three_replicas)
    stopped, killed, survivor = three_replicas
    load = FleetLoad(addresses(three_replicas), service.artifacts.name, {"IMAGE": service.images}, threads=3)
    with load:
        time.sleep(2.0)
        stopped.terminate()
        stopped_at = time.monotonic() - load._began
        time.sleep(2.0)
        left = killed.kill()
        killed_at = time.monotonic() - load._began
        time.sleep(3.0)
    result = load.stop()
    print(f"stopped at {stopped_at:.1f} s, killed at {killed_at:.1f} s: {result.summary()}")
    assert not result.failures, result.failures[:3]
    check_answers(result, service)
    late = [a for a in result.answers if a.ended_s > killed_at + 0.5]
    assert late and {a.replica for a in late} == {survivor.grpc_url}
    assert left, "a server killed with its stubs leaves their regions (the premise of the clean-up)"

    for served in (stopped, killed):
        served.launch()
    for served in (stopped, killed):
        served.wait_ready()
    # Removed by the first server that started after the kill: one of these two, here (any server on
    # the machine started by offramp would have done it).
    assert not [p for p in left if p.exists()], "the killed replica's regions outlived the restart"
    assert fleet.status().agreed


@pytest.mark.slow
def test_soak_and_bench_drive_the_fleet(service, three_replicas, tmp_path):
    """`offramp soak --fleet` and `offramp bench --fleet` on the three replicas: short runs, their checks
    and figures (the latency bounds are loose: windows of seconds on a shared 2-core machine)."""
    from offramp.client.tools.bench import BenchConfig
    from offramp.client.tools.fleet_bench import fleet_runs, level_rows
    from offramp.client.tools.fleet_soak import run_fleet_soak
    from offramp.client.tools.soak import SoakConfig

    fleet = ",".join(addresses(three_replicas))
    soak = SoakConfig(
        duration_s=6.0,
        window_s=3.0,
        concurrency=3,
        rows_per_request=8,
        data_rows=256,
        p50_ratio=5.0,
        p99_ratio=10.0,
        out=tmp_path / "soak",
        fleet=fleet,
        model=service.artifacts.name,
    )
    summary = run_fleet_soak(soak, progress=False)
    assert summary["passed"], summary["checks"]
    assert (tmp_path / "soak" / "summary.md").read_text().startswith("# Soak of a fleet")

    bench = BenchConfig(concurrency=(2,), repeats=1, measurement_interval_ms=500, progress=False, fleet=fleet)
    runs = fleet_runs(bench, addresses(three_replicas), service.artifacts.name, {"IMAGE": service.images})
    assert {r["arm"] for r in runs} == {"early", "full"}
    assert all(r["failed"] == 0 and r["rows_per_s"] > 0 and len(r["by_replica"]) == 3 for r in runs)
    (row,) = level_rows(runs)
    assert row[0] == 2 and row[3].endswith("x")
