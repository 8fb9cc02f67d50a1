"""offramp's figures summed over the replicas of a service (``offramp stats --fleet``).

Each replica's metrics page (Triton's metrics port) is read, its offramp series are summed over their
``instance`` label (an orchestrator instance and policy version each) into one row per replica, and the
rows into one for the fleet: requests, rows by exit, compute saved, the flagged rows (forced to full
depth, rerouted, degraded, ...), drift alarms, and which policy versions serve. Counters are totals since
each replica started; ``difference`` of two readings is what happened between them (gauges as of the
later reading). A replica that does not answer gets a row saying so and adds nothing.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Rows counted by why they answered where they did (offramp.backend.telemetry's counters).
FLAGGED_ROWS = {
    "forced full": "offramp_forced_full_rows_total",
    "deadline": "offramp_deadline_exits_total",
    "abstained": "offramp_abstained_rows_total",
    "fallback": "offramp_fallback_rows_total",
    "conservative": "offramp_conservative_rows_total",
    "rerouted": "offramp_rerouted_rows_total",
    "degraded": "offramp_degraded_rows_total",
}
FLEET = "fleet"


@dataclass(frozen=True)
class ReplicaFigures:
    replica: str
    # Triton's successful and failed requests of the model: of the versions loaded now (Triton drops a
    # version's series when it unloads; offramp's own counters keep them, so rows count since start).
    requests: float = 0.0
    failed_requests: float = 0.0
    rows_by_exit: Mapping[int, float] = field(default_factory=dict)
    compute_sum: float = 0.0  # the compute fractions of the rows answered, summed
    compute_count: float = 0.0
    flagged: Mapping[str, float] = field(default_factory=dict)  # FLAGGED_ROWS' names
    drift_score: float | None = None  # the highest of its instances
    drift_alarms: int = 0  # replicas (instances, within one replica) whose drift alarm is raised
    conservative: int = 0  # ... in drift's conservative mode
    policies: tuple[str, ...] = ()  # the policy versions serving
    error: str = ""

    @property
    def rows(self) -> float:
        return sum(self.rows_by_exit.values())

    @property
    def compute_saved(self) -> float | None:
        """1 - the mean compute fraction of the rows answered (None before any row)."""
        return 1.0 - self.compute_sum / self.compute_count if self.compute_count else None

    def difference(self, earlier: ReplicaFigures) -> ReplicaFigures:
        """The counters' growth since ``earlier``; gauges and policies as of this reading."""
        if self.error or earlier.error:
            return self if self.error else replace(self, error=earlier.error)

        def minus(now: Mapping[Any, float], then: Mapping[Any, float]) -> dict[Any, float]:
            return {key: value - then.get(key, 0.0) for key, value in now.items()}

        return replace(
            self,
            requests=self.requests - earlier.requests,
            failed_requests=self.failed_requests - earlier.failed_requests,
            rows_by_exit=minus(self.rows_by_exit, earlier.rows_by_exit),
            compute_sum=self.compute_sum - earlier.compute_sum,
            compute_count=self.compute_count - earlier.compute_count,
            flagged=minus(self.flagged, earlier.flagged),
        )


def _samples(text: str, model: str | None) -> Iterable[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of ``model``. The parser names a counter's samples
    ``<family>_total`` whether the page did or not, so names are compared without that suffix."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if model is None or sample.labels.get("model") == model:
                yield sample.name.removesuffix("_total"), sample.labels, sample.value


def figures_from_text(replica: str, text: str, model: str | None = None) -> ReplicaFigures:
    """One replica's figures from its metrics page; ``model`` the orchestrator (None: every offramp model)."""
    rows_by_exit: dict[int, float] = {}
    flagged = dict.fromkeys(FLAGGED_ROWS, 0.0)
    by_metric = {metric.removesuffix("_total"): name for name, metric in FLAGGED_ROWS.items()}
    totals = {"requests": 0.0, "failed_requests": 0.0, "compute_sum": 0.0, "compute_count": 0.0}
    drift_scores, alarms, conservative, policies = [], 0, 0, set()
    offramp_models = {
        labels["model"] for name, labels, _ in _samples(text, model) if name.startswith("offramp_")
    }
    for name, labels, value in _samples(text, model):
        if name == "offramp_exits":
            rows_by_exit[int(labels["exit"])] = rows_by_exit.get(int(labels["exit"]), 0.0) + value
        elif name in by_metric:
            flagged[by_metric[name]] += value
        elif name == "offramp_compute_fraction_sum":
            totals["compute_sum"] += value
        elif name == "offramp_compute_fraction_count":
            totals["compute_count"] += value
        elif name == "offramp_drift_score":
            drift_scores.append(value)
        elif name == "offramp_drift_alarm":
            alarms += value > 0
        elif name == "offramp_conservative_mode":
            conservative += value > 0
        elif name == "offramp_policy_info" and value > 0:
            policies.add(labels["version"])
        elif name == "nv_inference_request_success" and labels.get("model") in offramp_models:
            totals["requests"] += value
        elif name == "nv_inference_request_failure" and labels.get("model") in offramp_models:
            totals["failed_requests"] += value
    return ReplicaFigures(
        replica,
        rows_by_exit=dict(sorted(rows_by_exit.items())),
        flagged=flagged,
        drift_score=max(drift_scores) if drift_scores else None,
        drift_alarms=min(alarms, 1),
        conservative=min(conservative, 1),
        policies=tuple(sorted(policies)),
        **totals,
    )


def fleet_total(replicas: Sequence[ReplicaFigures]) -> ReplicaFigures:
    """The fleet's row: counters summed over the replicas that answered, the highest drift score, the
    number of replicas in drift alarm and in conservative mode, every policy version serving."""
    answered = [r for r in replicas if not r.error]
    exits = sorted({e for r in answered for e in r.rows_by_exit})
    scores = [r.drift_score for r in answered if r.drift_score is not None]
    return ReplicaFigures(
        FLEET,
        requests=sum(r.requests for r in answered),
        failed_requests=sum(r.failed_requests for r in answered),
        rows_by_exit={e: sum(r.rows_by_exit.get(e, 0.0) for r in answered) for e in exits},
        compute_sum=sum(r.compute_sum for r in answered),
        compute_count=sum(r.compute_count for r in answered),
        flagged={name: sum(r.flagged.get(name, 0.0) for r in answered) for name in FLAGGED_ROWS},
        drift_score=max(scores) if scores else None,
        drift_alarms=sum(r.drift_alarms for r in answered),
        conservative=sum(r.conservative for r in answered),
        policies=tuple(sorted({p for r in answered for p in r.policies})),
        error="" if answered else "no replica answered",
    )


def read_metrics(url: str, timeout_s: float = 5.0) -> str:
    # No proxy: a replica's metrics port is reached directly, as Prometheus does.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout_s) as response:
        return response.read().decode()


def read_replica(replica: str, metrics_url: str, model: str | None, timeout_s: float = 5.0) -> ReplicaFigures:
    try:
        return figures_from_text(replica, read_metrics(metrics_url, timeout_s), model)
    except OSError as error:
        return ReplicaFigures(replica, error=f"{metrics_url}: {error}")


def _count(value: float) -> str:
    return f"{value:,.0f}"


def stats_table(replicas: Sequence[ReplicaFigures]) -> str:
    """One line per replica and one for the fleet (Markdown)."""
    from offramp.build.markdown import markdown_table

    flagged = [name for name in FLAGGED_ROWS if any(r.flagged.get(name) for r in replicas)]
    rows = []
    for figures in [*replicas, fleet_total(replicas)]:
        if figures.error:
            rows.append([figures.replica, f"DOWN: {figures.error}"] + [""] * (7 + len(flagged)))
            continue
        rows_total = figures.rows
        shares = (
            " ".join(f"{e}:{n / rows_total:.0%}" for e, n in figures.rows_by_exit.items())
            if rows_total
            else ""
        )
        saved = figures.compute_saved
        drift = "" if figures.drift_score is None else f"{figures.drift_score:.3f}"
        if figures.drift_alarms:
            drift += f" ALARM ({figures.drift_alarms})" if figures.replica == FLEET else " ALARM"
        rows.append(
            [
                figures.replica,
                ", ".join(figures.policies),
                _count(figures.requests),
                _count(figures.failed_requests),
                _count(rows_total),
                shares,
                "" if saved is None else f"{saved:.1%}",
                *(_count(figures.flagged[name]) for name in flagged),
                drift,
                figures.conservative or "",
            ]
        )
    head = [
        "replica",
        "policy",
        "requests",
        "failed",
        "rows",
        "exit share",
        "compute saved",
        *flagged,
        "drift",
        "conservative",
    ]
    return markdown_table(head, rows)
