"""The fleet's pure parts, without a server: the client's rotation over replicas, fleet addresses, the
version pin in config.pbtxt, the fleet's status verdict, the canary comparison, the metrics summed over
replicas, and the shared-memory regions a killed server leaves."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from offramp.backend.contract import TensorSpec
from offramp.backend.orchestrator import POLICY_FILE, SPEC_FILE, OrchestratorSpec
from offramp.backend.policy import Policy
from offramp.client.grpc_client import ReplicaRotation, replica_addresses
from offramp.client.serving.fleet import (
    Answers,
    FleetError,
    FleetStatus,
    ReplicaState,
    compare_answers,
    parse_fleet,
)
from offramp.client.serving.fleet_stats import (
    FLEET,
    ReplicaFigures,
    figures_from_text,
    fleet_total,
    stats_table,
)
from offramp.client.serving.policy_control import PolicyControl
from offramp.client.serving.server import SHM_REGION_PREFIX, orphaned_shm_regions

FINGERPRINT = "f" * 64


def test_the_rotation_spreads_requests_and_puts_a_failed_replica_last_for_a_while():
    now = [0.0]
    rotation = ReplicaRotation(3, cooldown_s=1.0, clock=lambda: now[0], start=0)
    assert [rotation.order()[0] for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    rotation.failed(1)
    assert rotation.order() == [0, 2, 1]  # 1's turn would be next; it goes last
    assert rotation.order() == [2, 0, 1]
    now[0] = 1.5  # cooled down: back in its turn
    assert rotation.order() == [2, 0, 1]
    rotation.failed(0)
    rotation.failed(2)
    assert rotation.order() == [1, 0, 2]  # still every replica, the failed ones last
    rotation.answered(2)
    assert rotation.order() == [1, 2, 0]


def test_replica_addresses():
    assert replica_addresses("a:1, b:2,,") == ("a:1", "b:2")
    assert replica_addresses(["a:1"]) == ("a:1",)
    with pytest.raises(ValueError):
        replica_addresses(" , ")


def test_fleets_are_named_inline_or_in_a_file(tmp_path):
    inline = parse_fleet("10.0.0.1:8001,10.0.0.2:8001", metrics_port=9002)
    assert [(r.grpc_url, r.metrics_url) for r in inline] == [
        ("10.0.0.1:8001", "http://10.0.0.1:9002/metrics"),
        ("10.0.0.2:8001", "http://10.0.0.2:9002/metrics"),
    ]
    listing = tmp_path / "replicas.txt"
    listing.write_text(
        "# the fleet\n127.0.0.1:5001 http://127.0.0.1:5002/metrics\n\n127.0.0.1:6001  # default metrics\n"
    )
    from_file = parse_fleet(f"@{listing}")
    assert [(r.grpc_url, r.metrics_url) for r in from_file] == [
        ("127.0.0.1:5001", "http://127.0.0.1:5002/metrics"),
        ("127.0.0.1:6001", "http://127.0.0.1:8002/metrics"),
    ]
    for bad in ("", "a:1,a:1", f"@{tmp_path / 'missing'}"):
        with pytest.raises(FleetError):
            parse_fleet(bad)


def orchestrator_model(repository: Path, versions: int) -> Path:
    """A model folder as the repository writer leaves it, with ``versions`` policy versions."""
    model = repository / "m"
    spec = OrchestratorSpec(
        "m",
        ("m_segment_0", "m_segment_1"),
        "m_full",
        (TensorSpec("X", "float32", (4,)),),
        (),
        (0.5, 1.0),
        ("a", "b"),
        FINGERPRINT,
    )
    for number in range(1, versions + 1):
        (model / str(number)).mkdir(parents=True)
        spec.save(model / str(number) / SPEC_FILE)
        Policy.fixed(FINGERPRINT, 2, threshold=0.5 + number / 10).save(model / str(number) / POLICY_FILE)
    config = pb.ModelConfig(name="m", backend="python", max_batch_size=8)
    config.parameters["offramp_drift_window"].string_value = "100"
    (model / "config.pbtxt").write_text(text_format.MessageToString(config))
    return model


def test_the_version_served_is_pinned_in_config_pbtxt(tmp_path):
    """A pin keeps the rest of the config; writing a new version into an unpinned repository first pins
    the version a fresh server served until then (the newest), so the new folder changes nothing."""
    model = orchestrator_model(tmp_path, 2)
    control = PolicyControl(tmp_path, "m")
    assert control.pinned_version() is None
    number = control.deploy(Policy.fixed(FINGERPRINT, 2, threshold=0.99))
    assert number == 3 and control.pinned_version() == 2
    control.pin(3)
    config = text_format.Parse((model / "config.pbtxt").read_text(), pb.ModelConfig())
    assert list(config.version_policy.specific.versions) == [3]
    assert config.parameters["offramp_drift_window"].string_value == "100" and config.max_batch_size == 8
    with pytest.raises(Exception, match="no policy version 9"):
        control.pin(9)
    assert not list(model.glob(".config.pbtxt.*"))


def test_the_fleet_status_says_where_replicas_disagree():
    def status(pinned, *states):
        return FleetStatus("m", pinned, 3, tuple(states), {1: "a", 2: "b", 3: "c"})

    assert status(2, ReplicaState("r1", (2,)), ReplicaState("r2", (2,))).agreed
    assert status(None, ReplicaState("r1", (3,))).agreed  # unpinned: a restart serves the newest
    split = status(2, ReplicaState("r1", (2,)), ReplicaState("r2", (1,)))
    assert split.problems() == ["replicas serve different versions: [1, 2]"]
    assert "DISAGREES" in split.describe()
    drifted = status(1, ReplicaState("r1", (2,)))
    assert drifted.problems() == ["replicas serve version 2, a restarted replica would serve 1"]
    down = status(2, ReplicaState("r1", (2,)), ReplicaState("r2", error="connection refused"))
    assert down.problems() == ["r2 does not answer: connection refused"]
    two = status(2, ReplicaState("r1", (1, 2)))
    assert two.problems() == ["r1 serves versions [1, 2], not one"]


def test_the_canary_compares_exit_and_label_row_by_row():
    expected = Answers(np.array([0, 1, 2, 2]), np.array([3, 3, 4, 5]))
    assert compare_answers("r", Answers(expected.exit.copy(), expected.label.copy()), expected).passed
    moved = compare_answers("r", Answers(np.array([0, 2, 2, 2]), expected.label), expected)
    assert (moved.mismatched, moved.passed) == (1, False)
    assert compare_answers(
        "r", Answers(np.array([0, 2, 2, 2]), expected.label), expected, tolerance=0.25
    ).passed
    relabelled = compare_answers("r", Answers(expected.exit, np.array([3, 3, 4, 6])), expected)
    assert not relabelled.passed and "1 of 4 rows differ" in relabelled.describe()


METRICS = textwrap.dedent("""\
    # HELP nv_inference_request_success Number of successful inference requests, all batch sizes
    # TYPE nv_inference_request_success counter
    nv_inference_request_success{model="m",version="2"} 10
    nv_inference_request_success{model="m_segment_0",version="1"} 30
    nv_inference_request_failure{model="m",version="2",reason="OTHER"} 1
    # TYPE offramp_exits_total counter
    offramp_exits_total{cohort="",exit="0",instance="m_0_0-v2",model="m"} 60
    offramp_exits_total{cohort="",exit="1",instance="m_0_1-v2",model="m"} 20
    offramp_exits_total{cohort="vip",exit="1",instance="m_0_0-v2",model="m"} 20
    offramp_compute_fraction_sum{instance="m_0_0-v2",model="m"} 40
    offramp_compute_fraction_count{instance="m_0_0-v2",model="m"} 100
    offramp_rerouted_rows_total{instance="m_0_0-v2",model="m"} 5
    offramp_drift_score{instance="m_0_0-v2",model="m"} 0.3
    offramp_drift_score{instance="m_0_1-v2",model="m"} 0.1
    offramp_drift_alarm{instance="m_0_0-v2",model="m"} 1
    offramp_drift_alarm{instance="m_0_1-v2",model="m"} 0
    offramp_policy_info{instance="m_0_0-v2",model="m",model_fingerprint="ff",version="ltt-2"} 1
    offramp_exits_total{cohort="",exit="0",instance="o_0_0-v1",model="other"} 99
""")


def test_metrics_are_summed_over_instances_then_over_replicas():
    one = figures_from_text("r1", METRICS, model="m")
    assert one.requests == 10 and one.failed_requests == 1  # the orchestrator's requests, not its segments'
    assert one.rows_by_exit == {0: 60, 1: 40} and one.rows == 100
    assert one.compute_saved == pytest.approx(0.6) and one.flagged["rerouted"] == 5
    assert (one.drift_score, one.drift_alarms, one.policies) == (0.3, 1, ("ltt-2",))
    quiet = figures_from_text(
        "r2",
        METRICS.replace(
            'offramp_drift_alarm{instance="m_0_0-v2",model="m"} 1',
            'offramp_drift_alarm{instance="m_0_0-v2",model="m"} 0',
        ),
        "m",
    )
    down = ReplicaFigures("r3", error="connection refused")
    total = fleet_total([one, quiet, down])
    assert total.replica == FLEET and total.requests == 20 and total.rows_by_exit == {0: 120, 1: 80}
    assert (
        total.compute_saved == pytest.approx(0.6)
        and total.drift_alarms == 1
        and total.flagged["rerouted"] == 10
    )
    table = stats_table([one, quiet, down])
    assert (
        "| r3 | DOWN: connection refused |" in table
        and "| fleet | ltt-2 | 20 | 2 | 200 | 0:60% 1:40% | 60.0% |" in table
    )
    assert "rerouted" in table.splitlines()[0] and "ALARM (1)" in table
    later = figures_from_text("r1", METRICS.replace("} 60\n", "} 70\n"), "m")
    assert later.difference(one).rows_by_exit == {0: 10, 1: 0} and later.difference(one).requests == 0
    assert figures_from_text("r1", METRICS).rows == 199  # every offramp model without --model


def test_regions_of_killed_servers_are_found_and_live_ones_kept(tmp_path):
    """A region whose launcher's pid is gone is an orphan; one whose launcher runs is not, nor one a live
    stub (here a stand-in process with a stub's command line) still works in."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    orphan = tmp_path / f"{SHM_REGION_PREFIX}offramp{dead_pid}-0a1b2c3d_1111"
    own = tmp_path / f"{SHM_REGION_PREFIX}offramp{os.getpid()}-0a1b2c3d_2222"
    in_use = tmp_path / f"{SHM_REGION_PREFIX}offramp{dead_pid}-0a1b2c3d_3333"
    foreign = tmp_path / f"{SHM_REGION_PREFIX}5e2f-uuid"  # another launcher's naming: never ours to remove
    for path in (orphan, own, in_use, foreign):
        path.write_bytes(b"")
    stub = tmp_path / "m" / "1" / "model.py"
    stub.parent.mkdir(parents=True)
    stub.write_text("import time\ntime.sleep(60)\n")
    stand_in = subprocess.Popen([sys.executable, str(stub), in_use.name])
    try:
        assert orphaned_shm_regions(tmp_path) == [orphan]
    finally:
        stand_in.kill()
        stand_in.wait()
    assert orphaned_shm_regions(tmp_path) == sorted([orphan, in_use])
