"""Telemetry, audit and drift without a server; the shipped dashboard and alert rules name real metrics."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import offramp.backend
from offramp.backend.audit import AuditConfig, AuditLog, read_audit, summarize_audit
from offramp.backend.contract import FLAG_ABSTAINED, FLAG_DEADLINE, FLAG_FORCED_FULL
from offramp.backend.drift import DriftConfig, DriftMonitor, population_stability_index
from offramp.backend.slo import SloWindow
from offramp.backend.telemetry import ServingTelemetry
from offramp.client.serving.supervisor import Supervisor
from tests.reliability_support import wait_for
from tests.test_supervisor import ScriptedServer

MONITORING = Path(offramp.backend.__file__).parent / "monitoring"


class RecordingSink:
    def __init__(self):
        self.values = {}

    def increment(self, name, description, labels, value):
        key = (name, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0) + value

    def set(self, name, description, labels, value):
        self.values[(name, tuple(sorted(labels.items())))] = value


def emitted_names() -> set[str]:
    sink = RecordingSink()
    telemetry = ServingTelemetry(sink, "m", "m_0", publish_interval_s=0.0)
    flags = np.array([FLAG_FORCED_FULL, FLAG_DEADLINE, FLAG_ABSTAINED, 8 | 16, 32, 64, 128, 256], np.int32)
    telemetry.answered(
        np.arange(8) % 3, np.full(8, 0.9), np.full(8, 0.5), flags, np.array(["a"] * 8, dtype=object)
    )
    telemetry.policy("v1", "f" * 64)
    telemetry.drift(0.3, True, True)
    telemetry.audit(1, 2, 3)
    telemetry.slo(
        SloWindow(
            120.0,
            100.0,
            20.0,
            8,
            rung=2,
            shedding=True,
            missed=True,
            load_rps=30.0,
            quiet=1,
            below_p99_ms=90.0,
        )
    )
    telemetry.rows_by_rung(np.array([0, 2]))
    figures = {"rate": 0.01, "estimate": 0.1, "evidence": 1.0, "level": 3.0, "alarm": 1.0}
    telemetry.shadow({(0, "a"): (3, 1)}, ["a"])
    telemetry.risk_tests({"a": figures})
    telemetry.shadow_lost(1, 2)
    telemetry.publish()
    # `offramp serve`'s supervisor publishes its own on the health port.
    supervisor = Supervisor(ScriptedServer())
    supervisor.record("m_segment_0")
    supervised = set(re.findall(r"^(offramp_\w+)\{", supervisor.metrics_text(), re.MULTILINE))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name, _ in sink.values} | supervised


def test_telemetry_counts_rows_by_exit_and_cohort():
    sink = RecordingSink()
    telemetry = ServingTelemetry(sink, "m")
    for _ in range(2):  # counted here, handed to the sink as one increment per label set
        telemetry.answered(
            np.array([0, 0, 1, 2]), np.array([0.9, 0.8, np.nan, 0.5]), np.ones(4), np.zeros(4, np.int32),
            np.array(["", "", "vip", ""], dtype=object),
        )  # fmt: skip
    assert not sink.values
    telemetry.publish()
    exits = {
        dict(k)["exit"] + "/" + dict(k)["cohort"]: v
        for (n, k), v in sink.values.items()
        if n == "offramp_exits_total"
    }
    assert exits == {"0/": 4, "1/vip": 2, "2/": 2}


def test_counters_histograms_and_gauges_are_gathered_and_published_at_most_once_per_interval():
    """Published in Prometheus' histogram form: cumulative buckets (all of them from the first
    publication on), sum and count; nothing reaches the sink between publications."""
    sink, now = RecordingSink(), [0.0]
    telemetry = ServingTelemetry(sink, "m", "i", publish_interval_s=1.0, clock=lambda: now[0])

    def rows(exits: list[int], confidence: list[float]) -> None:
        telemetry.answered(
            np.array(exits), np.array(confidence), np.full(len(exits), 0.5), np.zeros(len(exits), np.int32),
            np.array([""] * len(exits), dtype=object),
        )  # fmt: skip

    def series(name: str) -> dict[str, float]:
        found = {}
        for (metric, labels), value in sink.values.items():
            labels = dict(labels)
            if metric == name and labels.get("exit") == "0":
                found[labels.get("le", "")] = value
        return found

    rows([0, 0, 0], [0.55, 0.9, 1.0])
    telemetry.drift(0.3, True, False)
    telemetry.publish()  # the first publication is due at once
    buckets = series("offramp_exit_confidence_bucket")
    assert buckets["0.5"] == 0 and buckets["0.6"] == 1 and buckets["0.9"] == 2 and buckets["0.999"] == 2
    assert buckets["+Inf"] == 3 and len(buckets) == 10
    assert series("offramp_exit_confidence_count") == {"": 3}
    assert series("offramp_exit_confidence_sum") == {"": pytest.approx(2.45)}
    assert sink.values[("offramp_drift_score", (("instance", "i"), ("model", "m")))] == 0.3
    before = dict(sink.values)
    now[0] = 0.5
    rows([0], [0.95])
    telemetry.drift(0.1, False, False)
    telemetry.publish()
    assert sink.values == before  # not yet due: counters wait too (each call is a round trip)
    now[0] = 1.5
    telemetry.publish()
    assert (
        sink.values[
            ("offramp_exits_total", (("cohort", ""), ("exit", "0"), ("instance", "i"), ("model", "m")))
        ]
        == 4
    )
    assert series("offramp_exit_confidence_bucket")["0.95"] == 3 and series(
        "offramp_exit_confidence_count"
    ) == {"": 4}
    assert sink.values[("offramp_drift_score", (("instance", "i"), ("model", "m")))] == 0.1


def test_what_the_last_requests_gathered_is_published_without_another_request():
    """A request publishes only when due; after the last one, the publisher's thread publishes the rest
    within an interval, and gauges of state that moves between requests (an audit writer's totals)
    as they are then. A failing sink is reported and the thread goes on; close() stops it."""
    sink = RecordingSink()
    telemetry = ServingTelemetry(sink, "m", "i", publish_interval_s=0.05)
    count_key = ("offramp_compute_fraction_count", (("instance", "i"), ("model", "m")))
    written_key = ("offramp_audit_rows_written", (("instance", "i"), ("model", "m")))
    writer = {"written": 0}
    telemetry.refresh_with(lambda: telemetry.audit(writer["written"], 0, 0))
    errors = []
    publisher = telemetry.publishing_thread(errors.append)
    try:
        writer["written"] = 5  # the writer thread moves on with no request in sight
        assert wait_for(lambda: sink.values.get(written_key) == 5, timeout_s=5.0, interval_s=0.01)
        for rows in (3, 4):  # two answers inside one interval: the second is not due at its request
            telemetry.answered(np.zeros(rows, np.int64), np.full(rows, 0.9), np.full(rows, 0.5),
                               np.zeros(rows, np.int32), np.array([""] * rows, dtype=object))  # fmt: skip
            telemetry.publish()
        assert wait_for(lambda: sink.values.get(count_key) == 7, timeout_s=5.0, interval_s=0.01)

        def refuse(*args):
            raise RuntimeError("metrics server away")

        sink.set = refuse
        for score, failures in ((0.1, 1), (0.2, 2)):  # the thread goes on after a failed publication
            telemetry.drift(score, False, False)
            wait_for(lambda failures=failures: len(errors) >= failures, timeout_s=5.0, interval_s=0.01)
        assert len(errors) >= 2 and {str(e) for e in errors} == {"metrics server away"}
    finally:
        publisher.close()
    assert not publisher.alive


@pytest.mark.parametrize("name", ["grafana_dashboard.json", "prometheus_alerts.yml"])
def test_shipped_monitoring_names_only_metrics_that_exist(name):
    text = (MONITORING / name).read_text()
    if name.endswith(".json"):
        json.loads(text)
    referenced = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"offramp_[a-z_]+", text)}
    assert referenced and referenced <= emitted_names(), referenced - emitted_names()


def test_psi_is_zero_for_equal_profiles_and_grows_with_the_shift():
    reference = np.array([0.6, 0.2, 0.2])
    assert population_stability_index(reference, reference) == pytest.approx(0.0)
    small = population_stability_index(np.array([0.55, 0.22, 0.23]), reference)
    large = population_stability_index(np.array([0.2, 0.2, 0.6]), reference)
    assert 0 < small < 0.1 < 0.25 < large


def test_drift_alarm_raises_and_clears_with_hysteresis():
    monitor = DriftMonitor(
        DriftConfig(reference=(0.6, 0.2, 0.2), window=200, min_rows=200, conservative=True)
    )
    rng = np.random.default_rng(0)
    monitor.update(rng.choice(3, 200, p=[0.6, 0.2, 0.2]))
    assert monitor.score < 0.1 and not monitor.alarm
    assert monitor.update(rng.choice(3, 200, p=[0.2, 0.2, 0.6])) and monitor.conservative
    monitor.update(rng.choice(3, 100, p=[0.6, 0.2, 0.2]))  # half the window back to normal: still shifted
    assert monitor.alarm
    monitor.update(rng.choice(3, 200, p=[0.6, 0.2, 0.2]))
    assert not monitor.alarm


def test_audit_log_writes_every_row_once_rotates_and_summarizes(tmp_path):
    log = AuditLog(AuditConfig(tmp_path / "audit.jsonl", max_bytes=2000, backups=50))
    for batch in range(20):
        log.record(
            [{"request_id": f"r{batch}", "row": i, "exit": i % 3, "policy_version": "v1"} for i in range(5)]
        )
    log.close()
    records = list(read_audit([tmp_path / "audit.jsonl"]))
    assert len(records) == 100 and log.written == 100 and log.dropped == log.lost == 0
    assert len(list(tmp_path.glob("audit.jsonl.*"))) > 1  # rotated by size
    assert [r["request_id"] for r in records[:5]] == ["r0"] * 5  # oldest first across rotations
    summary = summarize_audit(records)
    assert summary["exit"] == {0: 40, 1: 40, 2: 20} and summary["policy_version"] == {"v1": 100}


def test_audit_log_counts_what_a_failing_disk_refuses(tmp_path):
    (tmp_path / "audit.jsonl").mkdir()  # opening a directory for append fails as a broken disk does
    log = AuditLog(AuditConfig(tmp_path / "audit.jsonl"))
    log.record([{"row": 0}, {"row": 1}])
    log.close()
    assert log.lost == 2 and log.written == 0 and log.last_error


def test_audit_log_counts_a_batch_cut_short_by_a_full_disk_line_by_line(tmp_path, monkeypatch):
    """The disk takes 150 bytes: the lines that fit are kept and counted written, a torn line is cut
    off, everything else is counted lost, and the file holds exactly what was counted written."""
    path = tmp_path / "audit.jsonl"
    capacity = {"left": 150}
    real_write = os.write

    def small_disk(fd: int, data) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") != str(path):
            return real_write(fd, data)
        if not capacity["left"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = real_write(fd, bytes(data[: capacity["left"]]))
        capacity["left"] -= taken
        return taken

    monkeypatch.setattr(os, "write", small_disk)
    log = AuditLog(AuditConfig(path))
    rows = [{"request_id": "r", "row": i, "exit": 0} for i in range(8)]  # 36-byte lines: 4 fit in 150
    log.record(rows)
    log.record(rows[:2])
    log.close()
    monkeypatch.undo()
    assert (log.written, log.lost) == (4, 6) and "No space" in log.last_error
    text = path.read_text()
    assert text.endswith("\n") and [json.loads(line)["row"] for line in text.splitlines()] == [0, 1, 2, 3]


def test_audit_sampling_and_backpressure(tmp_path):
    sampled = AuditLog(AuditConfig(tmp_path / "a.jsonl", sample_rate=0.25, seed=1))
    sampled.record([{"row": i} for i in range(4000)])
    sampled.close()
    assert 800 < sampled.written < 1200
    small = AuditLog(AuditConfig(tmp_path / "b.jsonl", queue_rows=10))
    small.record([{"row": i} for i in range(11)])  # more than the queue takes: dropped, counted
    small.close()
    assert small.dropped == 11


def test_late_labels_join_the_audit_by_request_and_row(tmp_path, capsys):
    """Answers at exits 0 and 2 under one version, a shadow check of one early row, and true labels that
    came later (one by index, one by class name, one for a row never answered): accuracy per exit, and
    full depth's on the shadowed row; the command prints the same."""
    from offramp.backend.audit import late_label_accuracy
    from offramp.client.cli.main import main

    def answer(request_id, row, exit_index, label, name):
        return {"request_id": request_id, "row": row, "exit": exit_index, "label": label, "label_name": name,
                "policy_version": "v1"}  # fmt: skip

    records = [
        answer("a", 0, 0, 3, "dress"),
        answer("a", 1, 0, 1, "trouser"),
        answer("b", 0, 2, 3, "dress"),
        answer(None, 0, 0, 3, "dress"),  # no request id: never joined
        {"kind": "shadow", "request_id": "a", "row": 1, "exit": 0, "label": 1, "full_label": 3},
        {"kind": "risk_alarm", "event": "raised"},
    ]
    late = {("a", 0): 3, ("a", 1): "dress", ("b", 0): 7, ("c", 0): 1}
    table = late_label_accuracy(records, late)
    assert table == {
        ("v1", 0): {"rows": 2, "correct": 1, "shadowed": 1, "full_correct": 1},
        ("v1", 2): {"rows": 1, "correct": 0, "shadowed": 0, "full_correct": 0},
    }
    audit = tmp_path / "rows.jsonl"
    audit.write_text("".join(json.dumps(r) + "\n" for r in records))
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,row,label\na,0,3\na,1,dress\nb,0,7\nc,0,1\n")
    assert main(["audit", str(audit), "--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert "4 late labels, 3 joined" in out
    assert "v1" in out and "50.0%" in out and "100.0%" in out
    labels.write_text("id,row,label\na,0,3\n")
    assert main(["audit", str(audit), "--labels", str(labels)]) == 2
    assert "needs the header request_id,row,label" in capsys.readouterr().err
    labels.write_text("request_id,row,label\na,first,3\n")
    assert main(["audit", str(audit), "--labels", str(labels)]) == 2
    assert "line 2: the row must be a whole number" in capsys.readouterr().err
