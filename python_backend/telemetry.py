"""What the orchestrator reports on Triton's metrics port, computed from one cascade's results.

The Triton adapter supplies a ``MetricsSink`` over ``pb_utils.MetricFamily``; tests supply a
dictionary. Every metric call from a Python stub is a round trip to the server process, so
counters, histograms and gauges are all gathered here and published at most once per
``publish_interval_s``: a per-row histogram observation cost the CNN's orchestrator more CPU than
the compute its exits saved (benchmarks/BENCHMARKS.md), and a few counters per ``execute`` still
cost each request several round trips.
Histograms are published in Prometheus' histogram form (``<name>_bucket{le}`` cumulative,
``<name>_sum``, ``<name>_count``), as counters, since Triton's histogram takes one value per call.
A request publishes what is due; ``publishing_thread`` publishes what the last requests before an
idle spell left, so a scrape never waits for the next request.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from offramp.backend.contract import (
    FLAG_ABSTAINED,
    FLAG_CONSERVATIVE,
    FLAG_DEADLINE,
    FLAG_DEGRADED,
    FLAG_FALLBACK,
    FLAG_FALLBACK_FAILED,
    FLAG_FORCED_FULL,
    FLAG_REROUTED,
)
from offramp.backend.recurring import Recurring
from offramp.backend.slo import SloWindow

CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
COST_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0)
_FLAG_COUNTERS = {
    FLAG_FORCED_FULL: (
        "offramp_forced_full_rows_total",
        "Rows served at full depth because the request asked",
    ),
    FLAG_DEADLINE: ("offramp_deadline_exits_total", "Rows that took an exit because their deadline passed"),
    FLAG_ABSTAINED: ("offramp_abstained_rows_total", "Rows flagged for review: unsure at their last exit"),
    FLAG_FALLBACK: ("offramp_fallback_rows_total", "Rows answered by the policy's fallback model"),
    FLAG_FALLBACK_FAILED: ("offramp_fallback_failures_total", "Rows whose fallback model call failed"),
    FLAG_CONSERVATIVE: (
        "offramp_conservative_rows_total",
        "Rows run to full depth by conservative mode (drift or risk alarm)",
    ),
    FLAG_REROUTED: (
        "offramp_rerouted_rows_total",
        "Rows answered by the full model because a segment was unavailable",
    ),
    FLAG_DEGRADED: (
        "offramp_degraded_rows_total",
        "Rows answered at a shallower exit because models were unavailable",
    ),
}


class MetricsSink(Protocol):
    def increment(self, name: str, description: str, labels: Mapping[str, str], value: float) -> None: ...
    def set(self, name: str, description: str, labels: Mapping[str, str], value: float) -> None: ...


Labels = tuple[tuple[str, str], ...]


@dataclass
class _Histogram:
    """Observations not yet published: counts per bucket (the last: above every bound) and their sum."""

    description: str
    bounds: tuple[float, ...]
    counts: np.ndarray = field(init=False)  # (len(bounds) + 1,) int64
    total: float = 0.0
    published: bool = False  # every bucket series exists once published, zeros included

    def __post_init__(self) -> None:
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        # A value v counts in every bucket whose bound is >= v (Prometheus' le).
        self.counts += np.bincount(
            np.searchsorted(self.bounds, values, side="left"), minlength=len(self.counts)
        )
        self.total += float(np.sum(values))


class ServingTelemetry:
    def __init__(
        self,
        sink: MetricsSink,
        model: str,
        instance: str = "",
        publish_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.model = model
        # Every metric carries the instance (and policy version) it comes from. Gauges are per
        # instance state (its drift window, its audit writer), and no two stubs may share a metric:
        # one stub unloading (a policy swap) deletes its metrics, which would pull them from under
        # another still serving (a tritonserver segfault, seen here). Sum over instances to query.
        self.instance = instance
        self.labels = {"model": model, "instance": instance}
        self.publish_interval_s = publish_interval_s
        self.clock = clock
        self._published_at = -math.inf
        # execute() gathers while the publishing thread may publish; a refresher sets gauges
        # from inside publish().
        self._lock = threading.RLock()
        self._refreshers: list[Callable[[], None]] = []
        self._histograms: dict[tuple[str, Labels], _Histogram] = {}
        self._counters: dict[tuple[str, Labels], tuple[str, float]] = {}  # increments not yet published
        self._gauges: dict[tuple[str, Labels], tuple[str, float]] = {}  # the latest value of each
        self._published_gauges: dict[tuple[str, Labels], float] = {}  # what the sink holds
        self._answered: list[tuple[np.ndarray, ...]] = []  # rows kept by answered(), not yet counted

    def answered(
        self,
        exits: np.ndarray,
        max_prob: np.ndarray,
        cost: np.ndarray,
        flags: np.ndarray,
        cohorts: np.ndarray,
    ) -> None:
        """Per answered row (all (n,)): its exit, confidence, compute fraction, flags and cohort name.

        Only kept here: they are counted at publication, over every row since the last one, so a
        request pays for one append rather than a dozen small array passes (0.14 ms of a CNN's
        execute of 24 rows).
        """
        with self._lock:
            self._answered.append((exits, max_prob, cost, flags, cohorts))

    def _count_answered(self) -> None:
        """Folds the rows kept by ``answered`` into the counters and histograms."""
        if not self._answered:
            return
        kept, self._answered = self._answered, []
        exits, max_prob, cost, flags, cohorts = (np.concatenate(column) for column in zip(*kept, strict=True))
        for (exit_index, cohort), count in zip(*_count_pairs(exits, cohorts), strict=True):
            self._count(
                "offramp_exits_total",
                "Rows answered, by exit and cohort",
                {**self.labels, "exit": str(exit_index), "cohort": cohort},
                count,
            )
        for exit_index in np.unique(exits):
            values = max_prob[exits == exit_index]
            self._observe(
                "offramp_exit_confidence",
                "Max-prob confidence of the rows answered at each exit",
                {**self.labels, "exit": str(int(exit_index))},
                CONFIDENCE_BUCKETS,
                values[np.isfinite(values)],
            )
        self._observe(
            "offramp_compute_fraction",
            "Fraction of the full network's compute each row used",
            self.labels,
            COST_BUCKETS,
            cost,
        )
        for bit, (name, description) in _FLAG_COUNTERS.items():
            count = int(np.count_nonzero(flags & bit))
            if count:
                self._count(name, description, self.labels, count)

    def _observe(
        self,
        name: str,
        description: str,
        labels: Mapping[str, str],
        bounds: Sequence[float],
        values: np.ndarray,
    ) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            if key not in self._histograms:
                self._histograms[key] = _Histogram(description, tuple(bounds))
            self._histograms[key].add(np.asarray(values, dtype=np.float64))

    def _count(self, name: str, description: str, labels: Mapping[str, str], value: float) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = (description, self._counters.get(key, ("", 0.0))[1] + float(value))

    def _set(self, name: str, description: str, labels: Mapping[str, str], value: float) -> None:
        with self._lock:
            self._gauges[(name, tuple(sorted(labels.items())))] = (description, float(value))

    def refresh_with(self, refresher: Callable[[], None]) -> None:
        """Run ``refresher`` at each publication, before the gauges go out: for gauges of state that
        moves between requests (the audit writer's totals), so they are current when published."""
        self._refreshers.append(refresher)

    def due_in(self) -> float:
        """Seconds until the next publication is due (0 or less: due now)."""
        return self._published_at + self.publish_interval_s - self.clock()

    def publishing_thread(self, on_error: Callable[[Exception], None]) -> Recurring:
        """A thread that publishes whenever due, for what the last requests before an idle spell left;
        close it before the sink's metrics go (a stub's unload)."""
        return Recurring("offramp-metrics", self.due_in, self.publish, on_error)

    def publish(self, force: bool = False) -> None:
        """Hands the gathered histograms and gauges to the sink, if ``publish_interval_s`` has passed."""
        with self._lock:
            now = self.clock()
            if not force and now - self._published_at < self.publish_interval_s:
                return
            self._published_at = now
            for refresh in self._refreshers:
                refresh()
            self._count_answered()
            self._publish_gathered()

    def _publish_gathered(self) -> None:
        # What is handed over is taken first: a sink failing half-way loses the rest of this
        # publication (the error is the caller's to report) rather than counting its first half twice.
        counters, self._counters = self._counters, {}
        for (name, labels), (description, value) in counters.items():
            self.sink.increment(name, description, dict(labels), value)
        for (name, labels), histogram in self._histograms.items():
            observed = int(histogram.counts.sum())
            if not observed and histogram.published:
                continue
            cumulative, total, first = np.cumsum(histogram.counts), histogram.total, not histogram.published
            histogram.counts[:] = 0
            histogram.total = 0.0
            histogram.published = True
            for bound, count in zip([*histogram.bounds, math.inf], cumulative.tolist(), strict=True):
                if count or first:
                    le = "+Inf" if bound == math.inf else f"{bound:g}"
                    self.sink.increment(
                        f"{name}_bucket", histogram.description, {**dict(labels), "le": le}, count
                    )
            self.sink.increment(f"{name}_sum", histogram.description, dict(labels), total)
            self.sink.increment(f"{name}_count", histogram.description, dict(labels), observed)
        gauges, self._gauges = self._gauges, {}
        for key, (description, value) in gauges.items():
            if self._published_gauges.get(key) != value:  # an idle stub's refreshed gauges stay put
                self._published_gauges[key] = value
                self.sink.set(key[0], description, dict(key[1]), value)

    def policy(self, version: str, fingerprint: str) -> None:
        self.sink.set(
            "offramp_policy_info",
            "The policy being served (value 1)",
            {**self.labels, "version": version, "model_fingerprint": fingerprint[:16]},
            1.0,
        )

    def drift(self, score: float | None, alarm: bool, conservative: bool) -> None:
        labels = self.labels
        if score is not None:
            self._set(
                "offramp_drift_score", "PSI of the live exit profile against calibration", labels, score
            )
        self._set(
            "offramp_drift_alarm", "1 while the drift score is past its alarm level", labels, float(alarm)
        )
        self._set(
            "offramp_conservative_mode",
            "1 while drift or a risk alarm forces every row to full depth",
            labels,
            float(conservative),
        )

    def conservative_mode(self, conservative: bool) -> None:
        """Conservative mode without a drift monitor (a risk alarm's)."""
        self._set(
            "offramp_conservative_mode",
            "1 while drift or a risk alarm forces every row to full depth",
            self.labels,
            float(conservative),
        )

    def shadow(self, counts: Mapping[tuple[int, str], Sequence[int]], raised: Sequence[str]) -> None:
        """Shadow checks settled: (exit, cohort) -> (checked, disagreed); the cohorts whose alarm was just
        raised."""
        for (exit_index, cohort), (checked, disagreed) in counts.items():
            labels = {**self.labels, "exit": str(exit_index), "cohort": cohort}
            self._count("offramp_shadow_checks_total", "Early answers checked at full depth", labels, checked)
            if disagreed:
                self._count(
                    "offramp_shadow_disagreements_total",
                    "Checked early answers the full model disagreed with",
                    labels,
                    disagreed,
                )
        for cohort in raised:
            self._count(
                "offramp_risk_alarms_total", "Risk alarms raised", {**self.labels, "cohort": cohort}, 1
            )

    def risk_tests(self, gauges: Mapping[str, Mapping[str, float]]) -> None:
        """cohort -> its risk test's figures now (``offramp.backend.shadow.ShadowChecks.gauges``)."""
        for cohort, figures in gauges.items():
            labels = {**self.labels, "cohort": cohort}
            self._set(
                "offramp_shadow_rate",
                "Check probability of a row leaving at the first exit",
                labels,
                figures["rate"],
            )
            self._set(
                "offramp_risk_estimate",
                "Live risk estimate (mean of D/q) since the last alarm change",
                labels,
                figures["estimate"],
            )
            if "alarm" in figures:
                self._set(
                    "offramp_risk_alarm",
                    "1 while the live risk test says the risk is above epsilon",
                    labels,
                    figures["alarm"],
                )
                self._set(
                    "offramp_risk_evidence",
                    "log e-value of the active risk test (alarm/clear at level)",
                    labels,
                    figures["evidence"],
                )
                self._set(
                    "offramp_risk_evidence_level",
                    "log(1/alpha) the active risk test must reach",
                    labels,
                    figures["level"],
                )

    def shadow_lost(self, dropped: int, failed: int) -> None:
        """Checks not run so far: the queue was full, or the full model's call failed (set: only grow)."""
        self._set(
            "offramp_shadow_dropped_rows",
            "Shadow checks dropped: the check queue was full",
            self.labels,
            dropped,
        )
        self._set(
            "offramp_shadow_failed_rows", "Shadow checks whose full-model call failed", self.labels, failed
        )

    def slo(self, window: SloWindow) -> None:
        """What the SLO controller decided at the end of a window."""
        labels = self.labels
        self._set(
            "offramp_slo_rung",
            "The ladder's rung being served (0: the policy's own rules)",
            labels,
            window.rung,
        )
        self._set(
            "offramp_slo_shedding",
            "1 while load shedding caps every row's depth",
            labels,
            float(window.shedding),
        )
        self._set(
            "offramp_slo_missed",
            "1 while at the top rung and over the latency target",
            labels,
            float(window.missed),
        )
        self._set(
            "offramp_slo_quiet_windows",
            "Quiet windows in a row (a descent needs slo descend_windows of them)",
            labels,
            window.quiet,
        )
        for name, description, value in [
            ("offramp_slo_load_rps", "Requests/s that came to the model, last window", window.load_rps),
            (
                "offramp_slo_below_p99_ms",
                "p99 predicted for the rung below at the last window's load and times",
                window.below_p99_ms,
            ),
        ]:
            # Left as it was where NaN (unknown, or rung 0) or inf (the rung below cannot keep up at all):
            # a gauge of Triton's custom metrics takes finite numbers.
            if math.isfinite(value):
                self._set(name, description, labels, value)
        if window.requests:
            self._set(
                "offramp_slo_latency_estimate_ms",
                "Queue wait plus own p99 per request, last window",
                labels,
                window.estimate_ms,
            )
            self._set(
                "offramp_slo_own_p99_ms",
                "p99 of this instance's own time per request (its execute's), last window",
                labels,
                window.own_p99_ms,
            )

    def rows_by_rung(self, rungs: np.ndarray) -> None:
        """Rows answered at each rung of the ladder, (n,) the rung of each."""
        values, counts = np.unique(rungs, return_counts=True)
        for rung, count in zip(values.tolist(), counts.tolist(), strict=True):
            self._count(
                "offramp_rung_rows_total",
                "Rows answered, by the ladder's rung",
                {**self.labels, "rung": str(rung)},
                count,
            )

    def execute_times(self, seconds: Mapping[str, float], requests: int) -> None:
        """Where one ``execute`` of ``requests`` requests spent its time (part -> seconds): the per-part
        totals divided by the requests' total are the orchestrator's cost per request, part by part."""
        for part, value in seconds.items():
            self._count(
                "offramp_execute_seconds_total",
                "Wall time of the orchestrator's executes, by part",
                {**self.labels, "part": part},
                value,
            )
        if requests:  # 0: a part measured after the execute returned (the adapter's responses)
            self._count("offramp_executes_total", "Executes run (each a batch of requests)", self.labels, 1)
            self._count(
                "offramp_execute_requests_total", "Requests the executes served", self.labels, requests
            )

    def audit(self, written: int, dropped: int, lost: int) -> None:
        """Totals of the audit log so far (set, as they only grow)."""
        for name, value, description in [
            ("offramp_audit_rows_written", written, "Audit records written"),
            ("offramp_audit_rows_dropped", dropped, "Audit records dropped: the writer fell behind"),
            ("offramp_audit_rows_lost", lost, "Audit records lost: the disk refused them"),
        ]:
            self._set(name, description, self.labels, float(value))


def _count_pairs(exits: np.ndarray, cohorts: np.ndarray) -> tuple[list[tuple[int, str]], list[int]]:
    pairs: dict[tuple[int, str], int] = {}
    for exit_index, cohort in zip(exits.tolist(), cohorts.tolist(), strict=True):
        key = (exit_index, cohort)
        pairs[key] = pairs.get(key, 0) + 1
    return list(pairs), list(pairs.values())
