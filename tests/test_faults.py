"""Faults against a real server: a segment unloaded or its stub killed under traffic, the fallback
model missing, the audit disk full, the server stopped with requests in flight.

Requests may fail while a part is missing, but each with a clear error and none past its timeout;
the service recovers when the part is back; nothing is left behind (shared memory, processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from offramp.backend.audit import read_audit
from offramp.backend.cascade import CascadeResult
from offramp.backend.contract import FLAG_ABSTAINED, FLAG_FALLBACK, FLAG_FALLBACK_FAILED, FLAG_REROUTED
from offramp.backend.orchestrator import ServingOptions
from offramp.backend.policy import Abstention
from offramp.build.repository import (
    RepositoryOptions,
    segment_model_name,
    write_orchestrator,
    write_repository,
)
from offramp.client.serving.processes import server_processes, stub_shm_region
from offramp.client.serving.server import SHM_DIR, EmbeddedTritonServer, ServerPorts
from tests.reliability_support import (
    Traffic,
    assert_rows_match,
    infer,
    metric_values,
    wait_for,
)
from tests.served_reference import Reference, spread_policy

pytestmark = pytest.mark.integration
ROWS = 256
TIMEOUT_S = 10.0  # every client request's own timeout
SLACK_S = 2.0  # what a request may take beyond it before it counts as hung
AUDIT_DISK_BYTES = 64 * 1024


@dataclass
class FaultService:
    server: EmbeddedTritonServer
    artifacts: Any
    images: np.ndarray  # the rows the traffic sends
    expected: CascadeResult
    disk: str  # how the audit disk was made full: "tmpfs" or "/dev/full"
    audit_dir: Path

    @property
    def name(self) -> str:
        return self.artifacts.name

    @property
    def fallback_model(self) -> str:
        return f"{self.artifacts.name}_fallback"

    @property
    def audit_model(self) -> str:
        return f"{self.artifacts.name}_audit"


@contextlib.contextmanager
def full_disk(directory: Path, audit_files: list[str]) -> Iterator[str]:
    """A folder whose disk fills up: a 64 KiB tmpfs mounted there (needs root), or, where mounting is not
    allowed, the audit files made symlinks to /dev/full (every write fails with ENOSPC)."""
    directory.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={AUDIT_DISK_BYTES}", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if mount.returncode == 0:
        try:
            yield "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)
        return
    for name in audit_files:
        (directory / name).symlink_to("/dev/full")
    yield "/dev/full"


@pytest.fixture(scope="module")
def fault_service(quick_cnn, fashion_test, tmp_path_factory, running_server, execution_env):
    """The CNN in explicit model control, with two more orchestrators over the same segments: one whose
    policy falls back to a model that does not exist, one auditing to a disk that fills up."""
    artifacts, directory = quick_cnn
    images = fashion_test[0]
    root = tmp_path_factory.mktemp("faults")
    policy = spread_policy(artifacts, directory, {"IMAGE": images[5000:6000]})
    options = RepositoryOptions(execution_env=execution_env)
    repository = root / "repo"
    write_repository(artifacts, directory, policy, repository, options)
    single = replace(options, orchestrator_instances=1)
    unsure = Abstention("max_prob", threshold=0.9, action="fallback", fallback_model="no_such_model")
    write_orchestrator(
        artifacts,
        replace(policy, version="fallback-1", abstention=unsure),
        repository,
        single,
        name=f"{artifacts.name}_fallback",
    )
    audit_dir = root / "audit_disk"
    audit_model = f"{artifacts.name}_audit"
    write_orchestrator(
        artifacts,
        policy,
        repository,
        replace(single, serving=ServingOptions(audit_path=str(audit_dir / "audit.jsonl"))),
        name=audit_model,
    )
    reference = Reference(artifacts, directory, policy)
    with (
        full_disk(audit_dir, [f"audit.{audit_model}_0_0-v1.jsonl"]) as disk,
        running_server(repository, model_control="explicit", load_models=("*",)) as server,
    ):
        yield FaultService(
            server, artifacts, images[:ROWS], reference({"IMAGE": images[:ROWS]}), disk, audit_dir
        )


def assert_answered_or_refused(traffic: Traffic, expected: CascadeResult, error: str | None = None) -> None:
    """Every request ended within its timeout; the answered ones are correct (rows rerouted to the full
    model answer at its exit), the others carry ``error``."""
    hung = [s for s in traffic.sent if s.seconds > TIMEOUT_S + SLACK_S]
    assert not hung, (
        f"{len(hung)} requests took longer than their {TIMEOUT_S:.0f} s timeout, e.g. {hung[0].seconds:.1f} s"
    )
    last_exit = len(expected.logits) and int(expected.exit.max())
    for sent in traffic.sent:
        if sent.outcome.ok:
            flags = sent.outcome.outputs["FLAGS"].reshape(-1)
            if not flags.any():
                assert_rows_match(sent.outcome.outputs, expected, sent.rows)
                continue
            # Rows `_full` answered for a missing segment: the full network's exit; the others as expected.
            assert set(np.unique(flags)) <= {0, FLAG_REROUTED}
            exits, labels = (
                sent.outcome.outputs["EXIT"].reshape(-1),
                sent.outcome.outputs["LABEL"].reshape(-1),
            )
            plain = flags == 0
            np.testing.assert_array_equal(exits[plain], expected.exit[sent.rows][plain])
            np.testing.assert_array_equal(labels[plain], expected.label[sent.rows][plain])
            assert (exits[~plain] == last_exit).all()
        elif error is not None:
            assert re.search(error, sent.outcome.error), sent.outcome.error


def test_an_unloaded_segment_is_stood_in_for_by_the_full_model_and_service_recovers(fault_service):
    """While segment 1 is unloaded, the rows that need it are answered by `<name>_full` (flagged
    rerouted); no request fails; once it is loaded again, the early-exit path answers again."""
    service = fault_service
    segment = segment_model_name(service.name, 1)
    with (
        grpcclient.InferenceServerClient(service.server.grpc_url) as client,
        Traffic(
            service.server,
            service.name,
            service.images,
            threads=4,
            timeout_s=TIMEOUT_S,
            protocols=("grpc", "http"),
        ) as traffic,
    ):
        time.sleep(1.0)
        unloading = time.monotonic()
        client.unload_model(segment)
        unloaded = time.monotonic()
        time.sleep(1.5)
        loading = time.monotonic()
        client.load_model(segment)
        loaded = time.monotonic()
        time.sleep(2.5)
    before = traffic.between(0, unloading)
    gone = traffic.between(unloaded, loading)
    # Each orchestrator instance tries a segment it found unavailable again a second later.
    back = traffic.between(loaded + 1.5, float("inf"))
    assert all(s.outcome.ok for s in traffic.sent), [
        s.outcome.error for s in traffic.sent if not s.outcome.ok
    ][:2]
    assert before and all(not s.outcome.outputs["FLAGS"].any() for s in before)
    rerouted = [s for s in gone if (s.outcome.outputs["FLAGS"] & FLAG_REROUTED).any()]
    assert gone and rerouted, "no row needed the unloaded segment"
    for sent in gone:  # rows that left at exit 0 keep their answer; the others are the full model's
        flags = sent.outcome.outputs["FLAGS"].reshape(-1)
        exits = sent.outcome.outputs["EXIT"].reshape(-1)
        assert set(np.unique(flags)) <= {0, FLAG_REROUTED}
        assert ((flags == FLAG_REROUTED) == (service.expected.exit[sent.rows] >= 1)).all()
        assert (exits[flags == FLAG_REROUTED] == service.artifacts.num_exits - 1).all()
    assert back and all(not s.outcome.outputs["FLAGS"].any() for s in back)
    assert_answered_or_refused(traffic, service.expected)


def test_a_missing_fallback_model_flags_rows_instead_of_failing_them(fault_service):
    service = fault_service
    outcome = infer("grpc", service.server, service.fallback_model, {"IMAGE": service.images})
    assert outcome.ok, outcome.error
    flags = outcome.outputs["FLAGS"].reshape(-1)
    unsure = outcome.outputs["CONFIDENCE"][:, 0] < 0.9
    assert unsure.any() and (~unsure).any()
    assert (
        (flags[unsure] & (FLAG_FALLBACK_FAILED | FLAG_ABSTAINED)) == (FLAG_FALLBACK_FAILED | FLAG_ABSTAINED)
    ).all()
    assert not (flags & FLAG_FALLBACK).any()
    assert not (flags[~unsure] & (FLAG_FALLBACK_FAILED | FLAG_ABSTAINED)).any()
    # The rows keep their own answers: those of the policy without abstention.
    np.testing.assert_array_equal(outcome.outputs["EXIT"].reshape(-1), service.expected.exit)
    np.testing.assert_array_equal(outcome.outputs["LABEL"].reshape(-1), service.expected.label)

    def failures() -> float:  # counters are published at most once a second
        counted = metric_values(service.server, "offramp_fallback_failures_total")
        return sum(v for k, v in counted.items() if f'model="{service.fallback_model}"' in k)

    assert wait_for(lambda: failures() == int(unsure.sum()), timeout_s=5.0, interval_s=0.2), failures()


def _audit_totals(service: FaultService) -> dict[str, float]:
    totals = {}
    for kind in ("written", "dropped", "lost"):
        values = metric_values(service.server, f"offramp_audit_rows_{kind}")
        totals[kind] = sum(v for k, v in values.items() if f'model="{service.audit_model}"' in k)
    return totals


def test_a_full_audit_disk_keeps_serving_and_counts_the_loss(fault_service):
    """Serving goes on while the audit disk refuses records; every row is counted as written or lost."""
    service = fault_service
    sent = 0
    for start in range(0, ROWS, 16):
        outcome = infer(
            "grpc", service.server, service.audit_model, {"IMAGE": service.images[start : start + 16]}
        )
        assert outcome.ok, outcome.error
        assert_rows_match(outcome.outputs, service.expected, slice(start, start + 16))
        sent += 16
    # The gauges follow the writer's totals (published within a second, requests or not) until it
    # has settled every row sent.
    totals: dict[str, float] = {}

    def settled() -> bool:
        nonlocal totals
        totals = _audit_totals(service)
        return totals["written"] + totals["dropped"] + totals["lost"] == sent

    assert wait_for(settled, timeout_s=30, interval_s=0.2), f"{totals} after {sent} rows"
    assert totals["lost"] > 0, f"the {service.disk} audit disk should have refused records: {totals}"
    assert totals["dropped"] == 0
    if service.disk == "tmpfs":  # the first records fitted
        assert totals["written"] > 0
        # Each row is on the disk or counted lost, not both: a record is "lost" only if it is missing.
        on_disk = sum(1 for _ in read_audit(sorted(service.audit_dir.glob("audit*.jsonl"))))
        assert on_disk == totals["written"], (
            f"{on_disk} records on the disk, {totals['written']:.0f} counted written, {totals['lost']:.0f} "
            "counted lost "
            f"(of {on_disk + totals['lost']:.0f} counted in all, {sent} rows sent)"
        )
    with grpcclient.InferenceServerClient(service.server.grpc_url) as client:
        assert client.is_model_ready(service.audit_model)


# --- Faults that take the server down: each has a server of its own -------------------------------


def _stub_of(pgid: int, model: str) -> int:
    stubs = [pid for pid, role in server_processes(pgid).items() if role == model]
    assert len(stubs) == 1, f"expected one stub serving {model}: {server_processes(pgid)}"
    return stubs[0]


@pytest.fixture
def own_repository(quick_cnn, fashion_test, tmp_path, execution_env):
    artifacts, directory = quick_cnn
    images = fashion_test[0]
    policy = spread_policy(artifacts, directory, {"IMAGE": images[5000:6000]})
    write_repository(
        artifacts, directory, policy, tmp_path / "repo", RepositoryOptions(execution_env=execution_env)
    )
    expected = Reference(artifacts, directory, policy)({"IMAGE": images[:ROWS]})
    return tmp_path / "repo", artifacts, images[:ROWS], expected


def test_a_killed_segment_stub_without_a_supervisor(own_repository, tmp_path, record_property):
    """SIGKILL the stub of segment 0 under traffic with no supervisor, and record what Triton does.

    Measured with tritonserver 2.51 (pytriton 0.7.0): the stub is not restarted and the model stays
    READY; a BLS call to it fails after ~1 s with "Stub process '<instance>' is not healthy.", which
    the orchestrator answers with `<name>_full` (each orchestrator instance tries the segment again a
    second later). A plain explicit load of the segment brought a new stub in this test's runs, but not
    when the segment alone was called (nor did a load sending the unchanged config): the test accepts
    either and records which it saw. The dead instance never finishes unloading, so stopping the
    server waits out --exit-timeout-secs, and the killed stub's /dev/shm region is left for the stop
    to remove. `offramp serve`'s supervisor repairs all this (tests/test_self_healing.py).
    """
    repository, artifacts, images, expected = own_repository
    segment = segment_model_name(artifacts.name, 0)
    server = EmbeddedTritonServer(
        repository,
        ports=ServerPorts.free(),
        log_path=tmp_path / "server.log",
        model_control="explicit",
        load_models=("*",),
        startup_timeout_s=120,
    )
    server.start()
    left: list[Path] = []
    try:
        pgid = server.pid
        victim = _stub_of(pgid, segment)
        region = stub_shm_region(victim)
        with (
            grpcclient.InferenceServerClient(server.grpc_url) as client,
            Traffic(server, artifacts.name, images, threads=4, timeout_s=TIMEOUT_S) as traffic,
        ):
            time.sleep(1.0)
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            time.sleep(4.0)
            if (code := server.poll()) is not None:
                # Seen once, in a CI run on a loaded machine, never in a dozen runs here (loaded or not):
                # gRPC refused 4 s after the kill, tritonserver itself gone, nothing left to observe.
                # That run kept no log; python-backend aborts under concurrent BLS calls are reported
                # upstream (triton-inference-server/server#8882). `offramp serve` exits non-zero when
                # tritonserver does, for a process manager to restart it.
                record_property("server_exit_code_after_kill", code)
                pytest.skip(f"tritonserver exited (code {code}) after the kill; log: {server.log_tail(20)}")
            ready_after_kill = client.is_model_ready(segment)
            loading = time.monotonic()
            client.load_model(segment)
            time.sleep(1.5)
            restarted = any(role == segment and pid != victim for pid, role in server_processes(pgid).items())
        after_kill = traffic.between(killed + 0.5, float("inf"))
        rerouted = [
            s for s in after_kill if s.outcome.ok and (s.outcome.outputs["FLAGS"] == FLAG_REROUTED).all()
        ]
        record_property("stub_restarted_by_triton", restarted)
        record_property("model_ready_with_dead_stub", ready_after_kill)
        record_property("requests_after_kill", len(after_kill))
        record_property("rerouted_after_kill", len(rerouted))
        assert_answered_or_refused(traffic, expected)
        assert all(s.outcome.ok for s in traffic.sent), [
            s.outcome.error for s in traffic.sent if not s.outcome.ok
        ][:2]
        if not restarted:  # every row needs segment 0: `_full` answered all of them
            assert after_kill and len(rerouted) == len(after_kill)
        else:  # rerouted until Triton's own restart (seen on some runs here), the segments' answers after
            assert rerouted and rerouted[0].started < loading
    finally:
        left = server.stop()
    record_property("shm_regions_left", [p.name for p in left])
    assert {p.name for p in left} <= {region}, f"regions other than the killed stub's were left: {left}"
    assert not list(SHM_DIR.glob(f"{server.shm_region_prefix}*")), "the stop did not remove what was left"
    assert not server_processes(pgid), "processes outlived the server"


def test_stopping_the_server_under_load_leaves_nothing_behind(own_repository, running_server, caplog):
    """SIGTERM (EmbeddedTritonServer.stop) while requests are in flight: every request ends (answered,
    or refused because the server went away), the stubs exit by themselves, and no /dev/shm region is
    left."""
    repository, artifacts, images, expected = own_repository
    with running_server(repository) as server:
        pgid, prefix = server.pid, server.shm_region_prefix
        assert server.shm_regions()
        with Traffic(
            server,
            artifacts.name,
            images,
            threads=8,
            rows=16,
            timeout_s=TIMEOUT_S,
            protocols=("grpc", "http"),
        ) as traffic:
            time.sleep(1.5)
            with caplog.at_level(logging.WARNING, logger="offramp.client.serving.server"):
                stopping = time.monotonic()
                left = server.stop()
                stopped = time.monotonic()
            time.sleep(0.5)
        log = server.log_text()
    assert left == [] and not list(SHM_DIR.glob(f"{prefix}*")), f"shared memory left behind: {left}"
    assert not server_processes(pgid), f"processes outlived the server: {server_processes(pgid)}"
    assert "outlived" not in caplog.text, "stub processes had to be killed"
    assert "Exit timeout expired" not in log, "Triton did not finish its shutdown in time"
    in_flight = [s for s in traffic.sent if s.started < stopping < s.ended]
    assert traffic.between(0, stopping) and all(s.outcome.ok for s in traffic.between(0, stopping))
    assert in_flight, "no request was in flight at the stop"
    assert_answered_or_refused(traffic, expected)
    after = traffic.between(stopped, float("inf"))
    assert after and not any(s.outcome.ok for s in after)
    assert stopped - stopping < 15, f"the stop took {stopped - stopping:.1f} s"
