"""The arithmetic of ``offramp bench``: medians, paired ratios, goals and the time breakdown.

Pure functions over plain records (dicts, as ``summary.json`` stores them), so the report can be
regenerated from saved results and the arithmetic is tested on fixed inputs. A *run record* is one
perf_analyzer measurement::

    {"arm": "early", "model": "fashion_cnn", "concurrency": 8, "rep": 0,
     "perf": {"rows_per_s": ..., "p50_ms": ..., "p90_ms": ..., "p99_ms": ..., ...},
     "wall_s": ..., "client_cpu_s": ..., "server_cpu_s": {"tritonserver": ..., "<model>": ...},
     "machine": {"busy_cores": ..., "cores": 2},
     "stats": {"<model>": {"inference_count": ..., "execution_count": ..., "success": ..., "fail": ...,
                           "queue_ns": ..., "compute_input_ns": ..., "compute_infer_ns": ...,
                           "compute_output_ns": ..., "batch_exec_count": ..., "batch_exec_ns": ...}}}

Ratios are formed within one repeat (the two runs of a pair were measured minutes apart at most, under
the same load) and then the median over repeats is taken.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from offramp.client.serving.statistics import ORCHESTRATOR_PARTS

EARLY, FULL, NOCOMPACT, SEGMENTS_FULL, FORWARD_FULL, TRUNCATED = (
    "early",
    "full",
    "nocompact",
    "segments_full",
    "forward_full",
    "truncated",
)
LATENCIES = ("p50_ms", "p90_ms", "p99_ms")


def median(values: Iterable[float]) -> float:
    """The median of the finite values; NaN when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _by_key(records: Sequence[Mapping]) -> dict[tuple[str, int, int], Mapping]:
    return {(r["arm"], r["concurrency"], r["rep"]): r for r in records}


def paired_ratios(
    records: Sequence[Mapping], numerator: str, denominator: str, field: str, concurrency: int
) -> list[float]:
    """``numerator / denominator`` of ``perf[field]`` for every repeat at ``concurrency`` where both arms
    ran."""
    index = _by_key(records)
    reps = sorted({r["rep"] for r in records if r["concurrency"] == concurrency})
    ratios = []
    for rep in reps:
        num, den = index.get((numerator, concurrency, rep)), index.get((denominator, concurrency, rep))
        if num is None or den is None:
            continue
        a, b = num["perf"][field], den["perf"][field]
        if a is not None and b:
            ratios.append(a / b)
    return ratios


def paired_ratio(
    records: Sequence[Mapping], numerator: str, denominator: str, field: str, concurrency: int
) -> float:
    """The median over repeats of the per-repeat ratio (NaN if no repeat has both arms)."""
    return median(paired_ratios(records, numerator, denominator, field, concurrency))


@dataclass(frozen=True)
class ArmLevel:
    """One arm at one concurrency: medians over its repeats."""

    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    reps: int
    rows_per_s_min: float
    rows_per_s_max: float


def arm_level(records: Sequence[Mapping], arm: str, concurrency: int) -> ArmLevel | None:
    runs = [r for r in records if r["arm"] == arm and r["concurrency"] == concurrency]
    if not runs:
        return None
    throughput = [r["perf"]["rows_per_s"] for r in runs]
    return ArmLevel(
        rows_per_s=median(throughput),
        p50_ms=median(r["perf"]["p50_ms"] for r in runs),
        p90_ms=median(r["perf"]["p90_ms"] for r in runs),
        p99_ms=median(r["perf"]["p99_ms"] for r in runs),
        reps=len(runs),
        rows_per_s_min=min(throughput),
        rows_per_s_max=max(throughput),
    )


def sweep_summary(records: Sequence[Mapping], ideal_speedup: float | None = None) -> list[dict]:
    """Per concurrency level: each arm's medians and the paired ratios of the report.

    - ``throughput_ratio``: early / full rows per second; ``realised_share``: that over the ideal
      speed-up (1 / mean compute fraction).
    - ``p50_ratio`` ... ``p99_ratio``: early / full latency (below 1 is better).
    - ``tax``: 1 - segments_full / full throughput: what the orchestrator costs when every row
      runs to full depth through the segments; ``tax_p50``: segments_full / full p50 latency - 1.
    - ``forward_tax``: the same for forced rows routed to the full model through one BLS hop.
    - ``compaction_gain``: early / nocompact throughput - 1.
    - ``truncation_ratio``: early / truncated throughput, the static-truncation baseline (every row
      answered at one exit, ``truncation_exit``) at the same accuracy loss.
    - ``server_cpu_per_row_ms``: each arm's server CPU per served row, all rounds pooled, and
      ``cpu_bound_ratio``: full / early of it, the throughput ratio a CPU-bound server allows. It
      depends little on other load on the machine, unlike throughput, since a busy machine gives
      the arm with more runnable processes a larger share of the CPU.
    """
    levels = []
    for concurrency in sorted({r["concurrency"] for r in records}):
        arms = {arm: arm_level(records, arm, concurrency) for arm in sorted({r["arm"] for r in records})}

        def ratio(a: str, b: str, f: str, concurrency: int = concurrency) -> float:
            return paired_ratio(records, a, b, f, concurrency)

        throughput_ratio = ratio(EARLY, FULL, "rows_per_s")
        level = {
            "concurrency": concurrency,
            "arms": {k: asdict(v) for k, v in arms.items() if v is not None},
            "throughput_ratio": throughput_ratio,
            "realised_share": throughput_ratio / ideal_speedup if ideal_speedup else math.nan,
            **{f"{f[:3]}_ratio": ratio(EARLY, FULL, f) for f in LATENCIES},
            "tax": 1.0 - ratio(SEGMENTS_FULL, FULL, "rows_per_s"),
            "tax_p50": ratio(SEGMENTS_FULL, FULL, "p50_ms") - 1.0,
            "forward_tax": 1.0 - ratio(FORWARD_FULL, FULL, "rows_per_s"),
            "forward_tax_p50": ratio(FORWARD_FULL, FULL, "p50_ms") - 1.0,
            "compaction_gain": ratio(EARLY, NOCOMPACT, "rows_per_s") - 1.0,
            "truncation_ratio": ratio(EARLY, TRUNCATED, "rows_per_s"),
            "throughput_ratios": paired_ratios(records, EARLY, FULL, "rows_per_s", concurrency),
        }
        cpu = {}
        for arm in arms:
            runs = [r for r in records if r["arm"] == arm and r["concurrency"] == concurrency]
            if runs and runs[0].get("model") and all(r.get("stats") and r.get("server_cpu_s") for r in runs):
                cpu[arm] = cpu_per_row(runs, runs[0]["model"])["server total"] or math.nan
        level["server_cpu_per_row_ms"] = cpu
        level["cpu_bound_ratio"] = _per(cpu.get(FULL, math.nan), cpu.get(EARLY, math.nan))
        levels.append(level)
    return levels


def truncation_exit(exit_accuracy: Sequence[float], allowed_loss: float) -> int:
    """The static-truncation baseline's exit: the cheapest whose accuracy is within ``allowed_loss`` of
    the last exit's (the full model's), on the same rows; the last exit when none is."""
    last = len(exit_accuracy) - 1
    return next(
        k for k, accuracy in enumerate(exit_accuracy) if accuracy >= exit_accuracy[last] - allowed_loss
    )


# --- Quality through the server ------------------------------------------------------------------------


def quality_summary(
    labels: np.ndarray,
    full_labels: np.ndarray,
    early_labels: np.ndarray,
    early_exits: np.ndarray,
    early_costs: np.ndarray,
    num_exits: int,
) -> dict:
    """Accuracy of both models, their agreement, the exit distribution and the compute it implies."""
    mean_cost = float(np.mean(early_costs))
    counts = np.bincount(np.asarray(early_exits), minlength=num_exits)
    return {
        "rows": len(labels),
        "accuracy_early": float(np.mean(early_labels == labels)),
        "accuracy_full": float(np.mean(full_labels == labels)),
        "agreement": float(np.mean(early_labels == full_labels)),
        "mean_compute_fraction": mean_cost,
        "ideal_speedup": 1.0 / mean_cost if mean_cost > 0 else math.inf,
        "exit_counts": counts.tolist(),
        "exit_fractions": (counts / max(1, len(labels))).tolist(),
    }


# --- Goals -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goals:
    """What a workload should reach (the goals of "early exit that pays"); None leaves a goal out.

    The served throughput target depends on how the orchestrator reaches its segments: a BLS hop per
    segment costs what a small model's exits save, so the goal over BLS is lower than in process.
    """

    concurrency: int = 8  # where the throughput and truncation goals are judged
    throughput_ratio: float | None = None  # early / full rows per second, segments over BLS, at least
    throughput_ratio_in_process: float | None = None  # the same, segments in the orchestrator's process
    ideal_speedup: float | None = None  # 1 / mean compute of the served policy on the test rows, at least
    max_accuracy_loss: float | None = None  # full - early accuracy on the test rows, at most (a fraction)
    beat_truncation: bool = True  # early over static truncation's rows per second at ``concurrency``
    max_p99_ratio: float | None = 1.0  # early / full p99 latency, at most, at every level from...
    p99_from_concurrency: int = 4  # ...this one (at concurrency 1 a hop's latency cannot be hidden)

    @classmethod
    def from_settings(cls, settings: Mapping | None) -> Goals:
        """The goals a summary.json recorded; the keys of older goals than these are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (settings or {}).items() if k in known})


def evaluate_goals(
    levels: Sequence[Mapping], goals: Goals, quality: Mapping | None = None, in_process: bool = False
) -> list[dict]:
    """One line per goal: what was asked, what was measured, and whether it was met. ``quality``: the
    accuracy pass's figures (ideal speed-up, accuracies); ``in_process``: the segment mode measured."""
    at = next((level for level in levels if level["concurrency"] == goals.concurrency), None)
    lines = []

    def add(goal: str, target: str, measured: float, met: bool, shown: str) -> None:
        lines.append({"goal": goal, "target": target, "measured": measured, "shown": shown,
                      "met": bool(met) if math.isfinite(measured) else None})  # fmt: skip

    missing = f"not measured: concurrency {goals.concurrency} was not in the sweep"
    quality = quality or {}
    if goals.ideal_speedup is not None and "ideal_speedup" in quality:
        value = quality["ideal_speedup"]
        add("ideal speed-up (1 / mean compute on the test rows)", f">= {goals.ideal_speedup:g}x",
            value, value >= goals.ideal_speedup, f"{value:.2f}x")  # fmt: skip
    if goals.max_accuracy_loss is not None and "accuracy_full" in quality:
        value = quality["accuracy_full"] - quality["accuracy_early"]
        add("accuracy lost against the full model (test rows, through the server)",
            f"<= {goals.max_accuracy_loss * 100:g} points", value, value <= goals.max_accuracy_loss,
            f"{value * 100:.2f} points")  # fmt: skip
    target = goals.throughput_ratio_in_process if in_process else goals.throughput_ratio
    if target is not None:
        value = at["throughput_ratio"] if at else math.nan
        mode = "segments in process" if in_process else "segments over BLS"
        add(f"throughput early/full at concurrency {goals.concurrency}, {mode}", f">= {target:g}x",
            value, value >= target, f"{value:.2f}x" if at else missing)  # fmt: skip
    if goals.beat_truncation and at is not None and math.isfinite(at.get("truncation_ratio", math.nan)):
        value = at["truncation_ratio"]
        add(f"throughput early/static truncation at concurrency {goals.concurrency}", "> 1x",
            value, value > 1.0, f"{value:.2f}x")  # fmt: skip
    judged = [level for level in levels if level["concurrency"] >= goals.p99_from_concurrency]
    if goals.max_p99_ratio is not None and judged:
        worst = max(
            (level["p99_ratio"] for level in judged if math.isfinite(level["p99_ratio"])), default=math.nan
        )
        where = next((level["concurrency"] for level in judged if level["p99_ratio"] == worst), None)
        add(f"p99 latency early/full, worst level from concurrency {goals.p99_from_concurrency}",
            f"<= {goals.max_p99_ratio:g}", worst, worst <= goals.max_p99_ratio,
            f"{worst:.2f} (concurrency {where})")  # fmt: skip
    return lines


# --- Where the time goes ----------------------------------------------------------------------------------


def _sum_stats(records: Sequence[Mapping], model: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for record in records:
        for key, value in record["stats"].get(model, {}).items():
            total[key] = total.get(key, 0.0) + value
    return total


def _per(numerator: float, denominator: float, scale: float = 1.0) -> float:
    return numerator / denominator * scale if denominator else math.nan


def model_timing(records: Sequence[Mapping], model: str) -> dict[str, float]:
    """Triton's statistics for ``model`` summed over ``records``: per request (ms) and per execution."""
    s = _sum_stats(records, model)
    requests = s.get("success", 0.0)
    executions = s.get("batch_exec_count", 0.0) or s.get("execution_count", 0.0)
    exec_ns = s.get("batch_exec_ns", 0.0)
    return {
        "requests": requests,
        "failed": s.get("fail", 0.0),
        "rows": s.get("inference_count", 0.0),
        "executions": s.get("execution_count", 0.0),
        "rows_per_execution": _per(s.get("inference_count", 0.0), s.get("execution_count", 0.0)),
        "requests_per_execution": _per(requests, s.get("execution_count", 0.0)),
        "queue_ms": _per(s.get("queue_ns", 0.0), requests, 1e-6),
        "compute_input_ms": _per(s.get("compute_input_ns", 0.0), requests, 1e-6),
        "compute_infer_ms": _per(s.get("compute_infer_ns", 0.0), requests, 1e-6),
        "compute_output_ms": _per(s.get("compute_output_ns", 0.0), requests, 1e-6),
        # One execution's duration (input + infer + output), from the per-batch-size statistics.
        "execution_ms": _per(exec_ns, executions, 1e-6),
        "execution_total_ms": exec_ns * 1e-6,
        # Request latency inside the server: queue and compute, per request.
        "request_ms": _per(
            sum(
                s.get(k, 0.0)
                for k in ("queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns")
            ),
            requests,
            1e-6,
        ),
    }


def cpu_per_row(records: Sequence[Mapping], rows_model: str) -> dict[str, float]:
    """CPU milliseconds per served row, by process (tritonserver, each model's stubs, the client)."""
    rows = _sum_stats(records, rows_model).get("inference_count", 0.0)
    totals: dict[str, float] = {}
    for record in records:
        for label, seconds in record.get("server_cpu_s", {}).items():
            totals[label] = totals.get(label, 0.0) + seconds
        totals["client (perf_analyzer)"] = totals.get("client (perf_analyzer)", 0.0) + record.get(
            "client_cpu_s", 0.0
        )
    per_row = {label: _per(seconds, rows, 1e3) for label, seconds in totals.items() if seconds > 0}
    server_total = sum(v for k, v in per_row.items() if not k.startswith("client"))
    # Stubs of models the arm does not use still wake up now and then: below 1% they are one line.
    idle = [
        k
        for k, v in per_row.items()
        if k not in ("tritonserver", "client (perf_analyzer)") and v < 0.01 * server_total
    ]
    if idle:
        per_row[IDLE_PROCESSES] = sum(per_row.pop(k) for k in idle)
    per_row["server total"] = server_total
    return per_row


IDLE_PROCESSES = "other stubs (idle)"


def time_breakdown(
    records: Sequence[Mapping],
    concurrency: int,
    early_model: str,
    full_model: str,
    segment_models: Sequence[str],
    mac_mean_compute_fraction: float | None = None,
) -> dict:
    """Where an early-exit request's time and CPU go, next to the full model's, at ``concurrency``.

    All repeats at that level are pooled (statistics and CPU times summed). Per orchestrator
    execution: its duration, the part spent inside segment calls (their queue and compute, as the
    segments' own statistics report them), and the rest: the orchestrator's Python and the BLS hops.
    """
    early_runs = [r for r in records if r["arm"] == EARLY and r["concurrency"] == concurrency]
    full_runs = [r for r in records if r["arm"] == FULL and r["concurrency"] == concurrency]
    if not early_runs or not full_runs:
        return {}
    orchestrator = model_timing(early_runs, early_model)
    segments = {m: model_timing(early_runs, m) for m in segment_models}
    full = model_timing(full_runs, full_model)
    executions = orchestrator["executions"]
    calls = sum(s["requests"] for s in segments.values())
    inside_segments_ms = _per(sum(s["request_ms"] * s["requests"] for s in segments.values()), executions)
    segment_compute_ms = sum(s["execution_total_ms"] for s in segments.values())
    rows_early, rows_full = orchestrator["rows"], full["rows"]
    measured_fraction = _per(
        _per(segment_compute_ms, rows_early), _per(full["execution_total_ms"], rows_full)
    )
    overhead_ms = orchestrator["execution_ms"] - inside_segments_ms
    return {
        "orchestrator_parts_ms": orchestrator_parts_per_execution(early_runs),
        "concurrency": concurrency,
        "orchestrator": orchestrator,
        "segments": segments,
        "full": full,
        "bls_calls_per_execution": _per(calls, executions),
        "segment_time_per_execution_ms": inside_segments_ms,
        "orchestrator_overhead_per_execution_ms": overhead_ms,
        "overhead_share": _per(overhead_ms, orchestrator["execution_ms"]),
        "overhead_per_bls_call_ms": _per(overhead_ms * executions, calls),
        # Segment compute per served row over the full model's: the compute fraction in time.
        "segment_compute_per_row_ms": _per(segment_compute_ms, rows_early),
        "full_compute_per_row_ms": _per(full["execution_total_ms"], rows_full),
        "measured_compute_fraction": measured_fraction,
        "mac_compute_fraction": mac_mean_compute_fraction,
        "cpu_per_row_ms": {
            EARLY: cpu_per_row(early_runs, early_model),
            FULL: cpu_per_row(full_runs, full_model),
        },
        "perf_split_ms": {
            arm: {k: median(r["perf"].get(k) for r in runs) for k in _PERF_SPLIT}
            for arm, runs in ((EARLY, early_runs), (FULL, full_runs))
        },
    }


def orchestrator_parts_per_execution(runs: Sequence[Mapping]) -> dict[str, float]:
    """The orchestrator's own timing of its executes, pooled over ``runs``: ms per execution by part,
    their sum, and requests per execution (empty where the runs predate the metric)."""
    pooled: dict[str, float] = {}
    for run in runs:
        for key, value in run.get("orchestrator_parts", {}).items():
            pooled[key] = pooled.get(key, 0.0) + value
    executes = pooled.get("executes", 0.0)
    if not executes:
        return {}
    parts = {part: pooled.get(part, 0.0) / executes * 1e3 for part in ORCHESTRATOR_PARTS}
    return {
        **parts,
        "sum": sum(parts.values()),
        "requests_per_execution": pooled.get("requests", 0.0) / executes,
    }


_PERF_SPLIT = (
    "client_send_ms", "network_ms", "server_queue_ms", "server_compute_input_ms",
    "server_compute_infer_ms", "server_compute_output_ms", "client_recv_ms", "avg_ms",
)  # fmt: skip


def machine_load(records: Sequence[Mapping]) -> dict[str, float]:
    """How busy the machine was during the runs, and how much of it was other people's work (cores)."""
    others, busy = [], []
    for record in records:
        machine = record.get("machine") or {}
        wall = record.get("wall_s") or 0.0
        if not wall or "busy_cores" not in machine:
            continue
        ours = (sum(record.get("server_cpu_s", {}).values()) + record.get("client_cpu_s", 0.0)) / wall
        busy.append(machine["busy_cores"])
        others.append(max(0.0, machine["busy_cores"] - ours))
    return {
        "runs": len(busy),
        "busy_cores_median": median(busy),
        "other_cores_median": median(others),
        "other_cores_min": min(others) if others else math.nan,
        "other_cores_max": max(others) if others else math.nan,
    }


def accuracy_compute_curve(
    exit_logits: np.ndarray, labels: np.ndarray, exit_costs: Sequence[float], thresholds: Sequence[float]
) -> list[dict]:
    """Accuracy, agreement with the last exit and mean compute fraction for one shared max-prob threshold
    each.

    ``exit_logits`` (exits, N, C); a row leaves at the first exit whose max-prob reaches the threshold.
    """
    rows = exit_logits.shape[1]
    shifted = exit_logits - exit_logits.max(axis=2, keepdims=True)
    probs = np.exp(shifted)
    max_prob = probs.max(axis=2) / probs.sum(axis=2)  # (exits, N)
    answers = exit_logits.argmax(axis=2)  # (exits, N)
    costs = np.asarray(exit_costs)
    curve = []
    for threshold in thresholds:
        confident = max_prob >= threshold
        confident[-1] = True
        taken = confident.argmax(axis=0)
        chosen = answers[taken, np.arange(rows)]
        curve.append({
            "threshold": float(threshold),
            "accuracy": float(np.mean(chosen == labels)),
            "agreement": float(np.mean(chosen == answers[-1])),
            "mean_compute_fraction": float(costs[taken].mean()),
        })  # fmt: skip
    return curve


def with_derived_figures(summary: Mapping) -> dict:
    """``summary`` with every figure that is computed from its runs (re)computed: the levels, the goals,
    the time breakdown and the machine load. The report calls it, so rewriting the report from saved
    results applies the current arithmetic."""
    records, quality = summary["records"], summary["quality"]
    levels = sweep_summary(records, quality["ideal_speedup"])
    goals = Goals.from_settings(summary.get("goal_settings"))
    measured = [level["concurrency"] for level in levels]
    concurrency = (
        goals.concurrency
        if goals.concurrency in measured
        else (measured[-1] if measured else goals.concurrency)
    )
    name = summary["workload"]
    segments = [f"{name}_segment_{k}" for k in range(summary["model"]["exits"])]
    return {
        **summary,
        "levels": levels,
        "goals": evaluate_goals(
            levels, goals, quality, bool(summary.get("config", {}).get("segments_in_process"))
        ),
        "breakdown": time_breakdown(
            records, concurrency, name, f"{name}_full", segments, quality["mean_compute_fraction"]
        ),
        "load": machine_load(records),
    }
