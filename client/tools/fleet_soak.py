"""``offramp soak --fleet``: the soak against replicas that are already running, through the multi-address
client.

The soak of one server (``offramp.client.tools.soak``) starts its own server and drives it with
perf_analyzer, which sends to one address and retries nothing. Against a fleet, the load is what its
clients send: ``FleetLoad`` (threads of ``OfframpClient`` over every replica), window after window, with
Fashion-MNIST test rows to the model ``--model`` (the soak's CNN). Each window is counted against the
replicas' own statistics. Checks:

- no failed request reached a client (a request one replica refused with UNAVAILABLE and another
  answered is not a failure: the client's job);
- every request answered once: the model's successful requests, summed over the replicas' Triton
  statistics, grew by exactly the number of answers the clients received;
- every replica answered a share of the requests;
- latency stable: the last window's p50 and p99 within the soak's bounds of the first's;
- answers unchanged: the check rows get the same exits and labels before and after.

Not checked, unlike the soak of one server: memory, /dev/shm and processes, which live on the replicas'
machines (their dashboards and alerts watch those).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offramp.build.markdown import markdown_table
from offramp.client.serving.fleet import Replica, parse_fleet
from offramp.client.serving.statistics import model_statistics, statistics_delta
from offramp.client.tools.fleet_load import FleetLoad, LoadResult
from offramp.client.tools.soak import CHECK_ROWS, SoakConfig


@dataclass(frozen=True)
class FleetWindow:
    index: int
    started_s: float
    sent: int  # requests the clients finished: answered or failed
    answered: int  # answers the clients received
    failed: int  # failures that reached a client
    retried: int
    triton_answered: int  # the model's successful requests, summed over the replicas' statistics
    triton_failed: int  # failed requests of every model on every replica (retried ones included)
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    by_replica: dict[str, int]


def _statistics(replicas: tuple[Replica, ...]) -> dict[str, dict]:
    return {r.grpc_url: model_statistics(r.grpc_url) for r in replicas}


def _counted(before: dict[str, dict], after: dict[str, dict], model: str) -> tuple[int, int]:
    answered = failed = 0
    for replica, stats in after.items():
        delta = statistics_delta(before[replica], stats)
        answered += int(delta.get(model, {}).get("success", 0))
        failed += int(sum(d.get("fail", 0) for d in delta.values()))
    return answered, failed


def fleet_window(index: int, started_s: float, result: LoadResult, counted: tuple[int, int]) -> FleetWindow:
    summary = result.summary()
    return FleetWindow(
        index,
        round(started_s, 2),
        len(result.answers) + len(result.failures),
        len(result.answers),
        len(result.failures),
        result.retried,
        counted[0],
        counted[1],
        summary["requests_per_s"],
        summary["p50_ms"],
        summary["p99_ms"],
        result.by_replica(),
    )


def evaluate_fleet(
    config: SoakConfig, windows: list[FleetWindow], replicas: tuple[Replica, ...], answers_equal: bool
) -> dict[str, Any]:
    """The checks of the module docstring; ``passed`` when all hold."""
    answered = sum(w.answered for w in windows)
    served = {r for w in windows for r, n in w.by_replica.items() if n}
    first, last = windows[0], windows[-1]
    p50 = last.p50_ms / first.p50_ms if first.p50_ms else float("nan")
    p99 = last.p99_ms / first.p99_ms if first.p99_ms else float("nan")
    checks = {
        "no_failed_requests": {
            "passed": not any(w.failed for w in windows),
            "failed": sum(w.failed for w in windows),
            "retried": sum(w.retried for w in windows),
        },
        "answered_once": {
            "passed": answered == sum(w.triton_answered for w in windows),
            "answered": answered,
            "triton_answered": sum(w.triton_answered for w in windows),
        },
        "every_replica_served": {
            "passed": served == {r.grpc_url for r in replicas},
            "silent": sorted({r.grpc_url for r in replicas} - served),
        },
        "latency_stable": {
            "passed": bool(len(windows) > 1 and p50 <= config.p50_ratio and p99 <= config.p99_ratio),
            "p50_ratio": round(p50, 3),
            "p99_ratio": round(p99, 3),
            "bounds": {"p50_ratio": config.p50_ratio, "p99_ratio": config.p99_ratio},
        },
        "answers_unchanged": {"passed": answers_equal, "rows": CHECK_ROWS},
    }
    return {"passed": all(c["passed"] for c in checks.values()), "checks": checks}


def _check_answers(addresses: list[str], model: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from offramp.client.grpc_client import OfframpClient

    with OfframpClient(addresses) as client:
        parts = [client.classify(model, images[s : s + 32]) for s in range(0, len(images), 32)]
    return np.concatenate([p.exit for p in parts]), np.concatenate([p.label for p in parts])


def run_fleet_soak(config: SoakConfig, progress: bool = True) -> dict[str, Any]:
    """Soaks the replicas of ``config.fleet``; returns the summary, also written to ``config.out``."""
    from offramp.build.fashion_mnist import load_fashion_mnist

    replicas = parse_fleet(config.fleet)
    addresses = [r.grpc_url for r in replicas]
    images, _ = load_fashion_mnist("test")
    rows = np.random.default_rng(config.seed).choice(
        len(images), size=min(config.data_rows, len(images)), replace=False
    )
    check_images = images[:CHECK_ROWS]
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    exits_before, labels_before = _check_answers(addresses, config.model, check_images)
    count = max(1, round(config.duration_s / config.window_s))
    origin = time.monotonic()
    windows = []
    for index in range(count):
        before = _statistics(replicas)
        began = time.monotonic() - origin
        load = FleetLoad(
            addresses, config.model, {"IMAGE": images[rows]}, config.rows_per_request, config.concurrency
        )
        result = load.run_for(config.window_s)
        windows.append(
            fleet_window(index, began, result, _counted(before, _statistics(replicas), config.model))
        )
        if progress:
            w = windows[-1]
            print(
                f"soak --fleet: window {index + 1}/{count}: {w.requests_per_s:.0f} req/s, "
                f"p50 {w.p50_ms:.1f} ms, p99 {w.p99_ms:.1f} ms, answered {w.answered} "
                f"(Triton {w.triton_answered}), failed {w.failed}, "
                f"retried {w.retried}, by replica {w.by_replica}",
                flush=True,
            )
    exits_after, labels_after = _check_answers(addresses, config.model, check_images)
    answers_equal = bool(
        np.array_equal(exits_before, exits_after) and np.array_equal(labels_before, labels_after)
    )
    summary = {
        "date": started_at,
        "model": config.model,
        "replicas": addresses,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "not_checked": "memory, /dev/shm and processes: they are on the replicas' machines",
        "windows": [asdict(w) for w in windows],
        **evaluate_fleet(config, windows, replicas, answers_equal),
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(fleet_summary_markdown(summary))
    return summary


def fleet_summary_markdown(summary: dict[str, Any]) -> str:
    config = summary["config"]
    checks = [
        [name, "pass" if c["passed"] else "FAIL", json.dumps({k: v for k, v in c.items() if k != "passed"})]
        for name, c in summary["checks"].items()
    ]
    windows = [
        [
            w["index"],
            f"{w['started_s']:.0f}",
            f"{w['requests_per_s']:.0f}",
            f"{w['p50_ms']:.1f}",
            f"{w['p99_ms']:.1f}",
            w["answered"],
            w["triton_answered"],
            w["failed"],
            w["retried"],
            ", ".join(f"{r} {n}" for r, n in w["by_replica"].items()),
        ]
        for w in summary["windows"]
    ]
    return (
        "\n".join(
            [
                f"# Soak of a fleet: {summary['model']} on {len(summary['replicas'])} replicas, "
                f"{summary['date']}",
                "",
                f"OfframpClient over every replica, {config['concurrency']} threads, "
                f"{config['rows_per_request']} rows per request, {len(summary['windows'])} windows of "
                f"~{config['window_s']:.0f} s. Not checked: {summary['not_checked']}.",
                "",
                f"**{'PASSED' if summary['passed'] else 'FAILED'}**",
                "",
                markdown_table(["check", "result", "figures"], checks),
                "",
                markdown_table(
                    [
                        "window",
                        "start (s)",
                        "req/s",
                        "p50 ms",
                        "p99 ms",
                        "answered",
                        "Triton answered",
                        "failed",
                        "retried",
                        "by replica",
                    ],
                    windows,
                ),
            ]
        )
        + "\n"
    )
