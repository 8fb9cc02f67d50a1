"""What the orchestrator reports on Triton's metrics port, computed from one cascade's results.

The Triton adapter supplies a ``MetricsSink`` over ``pb_utils.MetricFamily``; tests supply a
dictionary. Figures are aggregated per ``execute`` so each metric is touched once per label set,
not once per row, except histogram observations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from offramp.backend.contract import (
    FLAG_ABSTAINED,
    FLAG_CONSERVATIVE,
    FLAG_DEADLINE,
    FLAG_FALLBACK,
    FLAG_FALLBACK_FAILED,
    FLAG_FORCED_FULL,
)

CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
COST_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0)
_FLAG_COUNTERS = {
    FLAG_FORCED_FULL: ("offramp_forced_full_rows_total", "Rows served at full depth because the request asked"),
    FLAG_DEADLINE: ("offramp_deadline_exits_total", "Rows that took an exit because their deadline passed"),
    FLAG_ABSTAINED: ("offramp_abstained_rows_total", "Rows flagged for review: unsure at their last exit"),
    FLAG_FALLBACK: ("offramp_fallback_rows_total", "Rows answered by the policy's fallback model"),
    FLAG_FALLBACK_FAILED: ("offramp_fallback_failures_total", "Rows whose fallback model call failed"),
    FLAG_CONSERVATIVE: ("offramp_conservative_rows_total", "Rows run to full depth by drift conservative mode"),
}


class MetricsSink(Protocol):
    def increment(self, name: str, description: str, labels: Mapping[str, str], value: float) -> None: ...
    def set(self, name: str, description: str, labels: Mapping[str, str], value: float) -> None: ...
    def observe(
        self, name: str, description: str, labels: Mapping[str, str], buckets: Sequence[float], values: np.ndarray
    ) -> None: ...


class ServingTelemetry:
    def __init__(self, sink: MetricsSink, model: str, instance: str = "") -> None:
        self.sink = sink
        self.model = model
        # Every metric carries the instance (and policy version) it comes from. Gauges are per
        # instance state (its drift window, its audit writer), and no two stubs may share a metric:
        # one stub unloading (a policy swap) deletes its metrics, which would pull them from under
        # another still serving (a tritonserver segfault, seen here). Sum over instances to query.
        self.instance = instance
        self.labels = {"model": model, "instance": instance}

    def answered(self, exits: np.ndarray, max_prob: np.ndarray, cost: np.ndarray, flags: np.ndarray, cohorts: np.ndarray) -> None:
        """Per answered row (all (n,)): its exit, confidence, compute fraction, flags and cohort name."""
        for (exit_index, cohort), count in zip(*_count_pairs(exits, cohorts)):
            self.sink.increment(
                "offramp_exits_total",
                "Rows answered, by exit and cohort",
                {**self.labels, "exit": str(exit_index), "cohort": cohort},
                count,
            )
        for exit_index in np.unique(exits):
            values = max_prob[exits == exit_index]
            self.sink.observe(
                "offramp_exit_confidence",
                "Max-prob confidence of the rows answered at each exit",
                {**self.labels, "exit": str(int(exit_index))},
                CONFIDENCE_BUCKETS,
                values[np.isfinite(values)],
            )
        self.sink.observe(
            "offramp_compute_fraction", "Fraction of the full network's compute each row used",
            self.labels, COST_BUCKETS, cost,
        )  # fmt: skip
        for bit, (name, description) in _FLAG_COUNTERS.items():
            count = int(np.count_nonzero(flags & bit))
            if count:
                self.sink.increment(name, description, self.labels, count)

    def policy(self, version: str, fingerprint: str) -> None:
        self.sink.set(
            "offramp_policy_info", "The policy being served (value 1)",
            {**self.labels, "version": version, "model_fingerprint": fingerprint[:16]}, 1.0,
        )  # fmt: skip

    def drift(self, score: float | None, alarm: bool, conservative: bool) -> None:
        labels = self.labels
        if score is not None:
            self.sink.set("offramp_drift_score", "PSI of the live exit profile against calibration", labels, score)
        self.sink.set("offramp_drift_alarm", "1 while the drift score is past its alarm level", labels, float(alarm))
        self.sink.set(
            "offramp_conservative_mode", "1 while drift forces every row to full depth", labels, float(conservative)
        )

    def audit(self, written: int, dropped: int, lost: int) -> None:
        """Totals of the audit log so far (set, as they only grow)."""
        for name, value, description in [
            ("offramp_audit_rows_written", written, "Audit records written"),
            ("offramp_audit_rows_dropped", dropped, "Audit records dropped: the writer fell behind"),
            ("offramp_audit_rows_lost", lost, "Audit records lost: the disk refused them"),
        ]:
            self.sink.set(name, description, self.labels, float(value))


def _count_pairs(exits: np.ndarray, cohorts: np.ndarray) -> tuple[list[tuple[int, str]], list[int]]:
    pairs: dict[tuple[int, str], int] = {}
    for exit_index, cohort in zip(exits.tolist(), cohorts.tolist()):
        key = (exit_index, cohort)
        pairs[key] = pairs.get(key, 0) + 1
    return list(pairs), list(pairs.values())
