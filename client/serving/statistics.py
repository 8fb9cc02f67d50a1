"""Triton's cumulative per-model statistics as flat counters, read with tritonclient.

The counters only grow while the server runs, so the difference of two readings is what the server did
between them: requests answered and failed, rows inferred, executions, and the time spent on each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

# The parts of the orchestrator's execute it times itself (offramp_execute_seconds_total{part}).
ORCHESTRATOR_PARTS = ("parse", "cascade", "segments", "observe", "respond")
# The parts of one execution whose times add up to its time in the backend.
EXECUTION_PARTS = ("compute_input", "compute_infer", "compute_output")


def model_statistics(grpc_url: str) -> dict[str, dict[str, float]]:
    """Triton's cumulative statistics of every model, flattened (see :func:`flatten_model_stats`), by name."""
    with grpcclient.InferenceServerClient(grpc_url) as client:
        response = client.get_inference_statistics()
    return {entry.name: flatten_model_stats(entry) for entry in response.model_stats}


def flatten_model_stats(entry: service_pb2.ModelStatistics) -> dict[str, float]:
    """One model's statistics as counters: requests, failures, rows, executions, times in ns."""
    stats = entry.inference_stats
    batches = entry.batch_stats
    return {
        "inference_count": float(entry.inference_count),
        "execution_count": float(entry.execution_count),
        "success": float(stats.success.count),
        "fail": float(stats.fail.count),
        "queue_ns": float(stats.queue.ns),
        "compute_input_ns": float(stats.compute_input.ns),
        "compute_infer_ns": float(stats.compute_infer.ns),
        "compute_output_ns": float(stats.compute_output.ns),
        "batch_exec_count": sum(float(b.compute_infer.count) for b in batches),
        "batch_exec_ns": sum(float(getattr(b, part).ns) for b in batches for part in EXECUTION_PARTS),
    }


def statistics_delta(
    before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """``after - before`` per model and counter; models with no new request are left out."""
    delta = {}
    for model, counters in after.items():
        old = before.get(model, {})
        diff = {key: value - old.get(key, 0.0) for key, value in counters.items()}
        if diff.get("success", 0.0) or diff.get("fail", 0.0):
            delta[model] = diff
    return delta


def orchestrator_parts(metrics_url: str, model: str) -> dict[str, float]:
    """The orchestrator's cumulative time by part (seconds: parse, cascade, segments, observe, respond),
    and its executes and requests, summed over the instances of ``model``, from the metrics page
    (published by each stub at most once a second: a reading lags by that much at most)."""
    from offramp.client.serving.fleet_stats import read_metrics

    text = read_metrics(metrics_url, timeout_s=10.0)
    totals: dict[str, float] = {}
    pattern = r"^offramp_execute(?:s|_seconds|_requests)_total\{(.*)\} (\S+)$"
    for line in re.finditer(pattern, text, re.MULTILINE):
        labels, value = line.group(1), float(line.group(2))
        if f'model="{model}"' not in labels:
            continue
        part = re.search(r'part="(\w+)"', labels)
        key = part.group(1) if part else ("requests" if "_requests_" in line.group(0) else "executes")
        totals[key] = totals.get(key, 0.0) + value
    return totals
