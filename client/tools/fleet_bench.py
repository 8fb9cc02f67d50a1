"""``offramp bench --fleet``: early exit against the full model on replicas that are already running.

The benchmark of one server (``offramp.client.tools.bench``) writes its own repository, starts a server
and drives it with perf_analyzer, which sends to one address. A fleet serves what the operator deployed,
and its clients spread requests over the replicas: here each workload's real test rows go to the early-
exit model (``<name>``) and to the network without exits (``<name>_full``) of every replica, through
``FleetLoad`` (the multi-address client in ``concurrency`` threads), interleaved and repeated in the
benchmark's own order (``sweep_order``). Per run: rows and requests per second, p50 and p99 latency,
failed and retried requests, and how the requests spread over the replicas; per level the median
ratio of early exit's throughput over the full model's.

Written to ``<out>/fleet/``: ``<workload>.json`` (every run) and ``FLEET.md`` (the table). The figures
are what this client machine could send and receive; on a small client they measure the client too.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

from offramp.build.markdown import markdown_table
from offramp.client.serving.fleet import parse_fleet
from offramp.client.tools.bench import (
    BenchConfig,
    WorkloadSettings,
    pick_data_rows,
    resolve_workload,
    sweep_order,
)
from offramp.client.tools.bench_summary import EARLY, FULL
from offramp.client.tools.fleet_load import FleetLoad


def fleet_runs(config: BenchConfig, addresses: list[str], name: str, inputs: dict) -> list[dict[str, Any]]:
    """Every (concurrency, round, arm) run against the fleet."""
    seconds = 3 * config.measurement_interval_ms / 1000  # as long as one of perf_analyzer's runs
    runs = []
    for level_index, concurrency in enumerate(config.concurrency):
        for rep in range(config.repeats):
            for arm in sweep_order([EARLY, FULL], level_index, rep):
                model = name if arm == EARLY else f"{name}_full"
                load = FleetLoad(
                    addresses, model, inputs, config.rows_per_request, concurrency, full_logits=arm == FULL
                )
                summary = load.run_for(seconds).summary()
                runs.append({"arm": arm, "concurrency": concurrency, "rep": rep, **summary})
                if config.progress:
                    print(
                        f"bench --fleet {name} c={concurrency} round {rep + 1} {arm}: "
                        f"{summary['rows_per_s']:,.0f} rows/s, p99 {summary['p99_ms']} ms, "
                        f"failed {summary['failed']}",
                        flush=True,
                    )
    return runs


def level_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per concurrency: medians over the rounds, the speed-up as the median of each
    round's ratio."""
    rows = []
    for concurrency in sorted({r["concurrency"] for r in runs}):
        at = [r for r in runs if r["concurrency"] == concurrency]
        arm = {a: [r for r in at if r["arm"] == a] for a in (EARLY, FULL)}

        def median(a, key, arm=arm):
            return statistics.median(r[key] for r in arm[a])

        ratios = [
            e["rows_per_s"] / f["rows_per_s"]
            for e, f in zip(arm[EARLY], arm[FULL], strict=True)
            if f["rows_per_s"]
        ]
        spread: dict[str, int] = {}
        for run in at:
            for replica, count in run["by_replica"].items():
                spread[replica] = spread.get(replica, 0) + count
        rows.append(
            [
                concurrency,
                f"{median(EARLY, 'rows_per_s'):,.0f}",
                f"{median(FULL, 'rows_per_s'):,.0f}",
                f"{statistics.median(ratios):.2f}x" if ratios else "",
                f"{median(EARLY, 'p99_ms'):.1f}",
                f"{median(FULL, 'p99_ms'):.1f}",
                sum(r["failed"] for r in at),
                sum(r["retried"] for r in at),
                ", ".join(f"{replica} {count}" for replica, count in sorted(spread.items())),
            ]
        )
    return rows


def run_fleet_bench(config: BenchConfig) -> list[dict[str, Any]]:
    """Measures every workload of ``config`` on the replicas of ``config.fleet``; returns the summaries."""
    addresses = [r.grpc_url for r in parse_fleet(config.fleet)]
    out = Path(config.out) / "fleet"
    out.mkdir(parents=True, exist_ok=True)
    summaries, sections = [], []
    for spec in config.workloads:
        workload = resolve_workload(spec)(
            WorkloadSettings(workdir=config.workdir, quick=config.quick, epochs=config.epochs)
        )
        rows = pick_data_rows(workload.test_rows, config.data_rows, config.seed)
        inputs = {n: a[rows] for n, a in workload.test_inputs.items()}
        runs = fleet_runs(config, addresses, workload.name, inputs)
        summary = {
            "workload": workload.name,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "replicas": addresses,
            "rows_per_request": config.rows_per_request,
            "runs": runs,
        }
        (out / f"{workload.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
        summaries.append(summary)
        sections += [
            f"## {workload.name}",
            "",
            markdown_table(
                [
                    "concurrency",
                    "early rows/s",
                    "full rows/s",
                    "early/full",
                    "p99 early ms",
                    "p99 full ms",
                    "failed",
                    "retried",
                    "requests by replica",
                ],
                level_rows(runs),
            ),
            "",
        ]
    head = [
        f"# Early exit on a fleet of {len(addresses)} replicas",
        "",
        f"OfframpClient over every replica, {config.rows_per_request} real test rows per request, "
        f"{config.repeats} interleaved rounds per level; medians.",
        "",
    ]
    (out / "FLEET.md").write_text("\n".join(head + sections))
    print(f"report: {out / 'FLEET.md'}")
    return summaries
