"""Operating the service on a real server: request policies under load, metrics, audit records,
drift with conservative mode, and live policy swaps with rollback."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from offramp.backend.audit import read_audit
from offramp.backend.contract import FLAG_CONSERVATIVE
from offramp.backend.orchestrator import ServingOptions
from offramp.backend.policy import ExitRule
from offramp.build.repository import RepositoryOptions, write_repository
from offramp.client.grpc_client import OfframpClient
from offramp.client.serving.policy_control import PolicyControl, policy_diff
from tests.reliability_support import metric_values, wait_for
from tests.served_reference import spread_policy

pytestmark = pytest.mark.integration
DRIFT_WINDOW = 400
HARD_CLASSES = (2, 4, 6)  # pullover, coat, shirt: the classes a Fashion-MNIST model confuses


@pytest.fixture(scope="module")
def ops_server(quick_cnn, fashion_test, tmp_path_factory, running_server, execution_env):
    artifacts, directory = quick_cnn
    root = tmp_path_factory.mktemp("ops")
    reference = {"IMAGE": fashion_test[0][5000:8000]}
    policy = spread_policy(artifacts, directory, reference, "ops-1", drift_reference=True)
    serving = ServingOptions(
        audit_path=str(root / "audit" / "audit.jsonl"), drift_window=DRIFT_WINDOW, drift_conservative=True
    )
    # One orchestrator instance: the drift window and the audit file are per instance.
    options = RepositoryOptions(execution_env=execution_env, orchestrator_instances=1, serving=serving)
    write_repository(artifacts, directory, policy, root / "repo", options)
    with running_server(root / "repo", model_control="explicit", load_models=("*",)) as server:
        yield server, artifacts, root, policy


def audit_records(root, expected: int, timeout_s: float = 30.0) -> list[dict]:
    """The audit records once the writer has caught up with ``expected`` rows."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [r for path in sorted((root / "audit").glob("*.jsonl")) for r in read_audit([path])]
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_request_policies_metrics_and_audit(ops_server, fashion_test):
    server, artifacts, root, policy = ops_server
    images = fashion_test[0][:256]

    def send(index):
        with OfframpClient(server.grpc_url) as client:
            start = (index * 8) % 256
            forced = index % 2 == 0
            result = client.classify(
                artifacts.name, images[start : start + 8], force_full=forced, request_id=f"r{index}"
            )
            return forced, result

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(64)))
    for forced, result in answers:
        if forced:
            assert (result.exit == artifacts.num_exits - 1).all() and (result.cost == 1.0).all()

    assert any(f'version="{policy.version}"' in k for k in metric_values(server, "offramp_policy_info"))

    # Counters and histograms are published at most once a second on a request; the rest of the last
    # second by the orchestrator's publisher thread, with no request after it.
    def counts() -> list[float]:
        return [
            sum(metric_values(server, name).values())
            for name in (
                "offramp_exits_total",
                "offramp_forced_full_rows_total",
                "offramp_compute_fraction_count",
                "offramp_exit_confidence_count",
            )
        ]

    assert wait_for(lambda: counts() == [64 * 8, 32 * 8, 64 * 8, 64 * 8], timeout_s=5.0, interval_s=0.2), (
        counts()
    )

    records = audit_records(root, 64 * 8)
    assert len(records) == 64 * 8  # exactly one record per answered row
    by_request = {}
    for record in records:
        by_request.setdefault(record["request_id"], []).append(record["row"])
        assert (
            record["policy_version"] == policy.version
            and record["model_fingerprint"] == artifacts.fingerprint
        )
    assert sorted(by_request) == sorted(f"r{i}" for i in range(64))
    assert all(sorted(rows) == list(range(8)) for rows in by_request.values())


def test_drift_raises_the_alarm_on_a_harder_mix_and_conservative_mode_clears(ops_server, fashion_test):
    server, artifacts, _, _ = ops_server
    images, labels = fashion_test
    hard = images[np.isin(labels, HARD_CLASSES)][: 2 * DRIFT_WINDOW]
    usual = images[: 3 * DRIFT_WINDOW]

    def drift_score():
        values = metric_values(server, "offramp_drift_score")
        return max(values.values()) if values else 0.0

    with OfframpClient(server.grpc_url) as client:
        for start in range(0, DRIFT_WINDOW, 50):
            client.classify(artifacts.name, usual[start : start + 50])
        assert drift_score() < 0.25, "an unshifted stream must not raise the alarm"
        alarm_at = None
        for start in range(0, len(hard), 50):
            result = client.classify(artifacts.name, hard[start : start + 50])
            if (result.flags & FLAG_CONSERVATIVE).any():
                alarm_at = start + 50
                break
        # Stated bound: the alarm is up within two windows of the shifted mix.
        assert alarm_at is not None and alarm_at <= 2 * DRIFT_WINDOW, drift_score()
        assert (result.exit == artifacts.num_exits - 1).all()  # conservative: full depth for everyone
        for start in range(0, len(usual), 50):
            result = client.classify(artifacts.name, usual[start : start + 50])
        assert not (result.flags & FLAG_CONSERVATIVE).any(), "the usual mix must clear the alarm"


def test_policy_swap_under_load_loses_nothing_and_rolls_back(ops_server, fashion_test):
    server, artifacts, root, policy = ops_server
    control = PolicyControl(root / "repo", artifacts.name, server.grpc_url)
    images = fashion_test[0][:64]
    with OfframpClient(server.grpc_url) as client:
        before = client.classify(artifacts.name, images)
    stricter = replace(policy, version="ops-2", exits=(ExitRule("max_prob", 1.01),) * artifacts.num_exits)
    failures, sent, versions = [], [0], set()
    stop = threading.Event()

    def load():
        with OfframpClient(server.grpc_url) as client:
            while not stop.is_set():
                try:
                    client.classify(artifacts.name, images[:8], request_id="load")
                    sent[0] += 1
                except Exception as error:  # noqa: BLE001 - every failure is the finding
                    failures.append(repr(error))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        number = control.deploy(stricter)
        assert control.active_versions() == {number}
        with OfframpClient(server.grpc_url) as client:
            assert (client.classify(artifacts.name, images).exit == artifacts.num_exits - 1).all()
        time.sleep(1.0)
        assert control.rollback() == number - 1
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:3]
    assert sent[0] > 0
    with OfframpClient(server.grpc_url) as client:
        after = client.classify(artifacts.name, images)
    np.testing.assert_array_equal(after.exit, before.exit)  # rollback restores v1's behaviour
    versions = {r["policy_version"] for r in audit_records(root, 0) if r["request_id"] == "load"}
    assert {"ops-1", "ops-2"} <= versions
    assert any("exits[0].threshold" in line for line in policy_diff(policy, stricter))
