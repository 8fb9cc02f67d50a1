"""``offramp stats``: offramp's metrics summed over the replicas of a service, in one table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from offramp.client.cli.subcommand import Subcommand


class StatsCommand(Subcommand):
    name = "stats"
    help = "exits, compute saved, flagged rows and drift alarms of each replica and of the fleet"
    description = (
        "Reads every replica's metrics page (Triton's metrics port) and prints one line per replica and one "
        "for the fleet: requests, rows by exit, compute saved, rows forced to full depth, rerouted or "
        "degraded, drift alarms and the policy versions serving. Totals since each replica started, or with "
        "--over S what happened during S seconds. Exit status 1 when a replica does not answer."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.client.serving.fleet import DEFAULT_METRICS_PORT

        add = parser.add_argument
        add(
            "--fleet",
            required=True,
            help="HOST:PORT,... (the replicas' gRPC addresses; metrics on --metrics-port of each host) or "
            "@FILE: one replica a line, its gRPC address and optionally its metrics URL",
        )
        add("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="default: %(default)s")
        add("--model", help="the orchestrator model (default: every offramp model)")
        add("--over", type=float, metavar="S", help="read twice, S seconds apart, and show the difference")
        add("--json", action="store_true", help="the figures as JSON")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.client.serving.fleet import FleetError, parse_fleet
        from offramp.client.serving.fleet_stats import fleet_total, read_replica, stats_table

        try:
            replicas = parse_fleet(args.fleet, args.metrics_port)
        except FleetError as error:
            print(f"offramp stats: error: {error}", file=sys.stderr)
            return 2

        def read() -> list:
            return [read_replica(r.grpc_url, r.metrics_url, args.model) for r in replicas]

        figures = read()
        if args.over:
            time.sleep(args.over)
            figures = [later.difference(earlier) for later, earlier in zip(read(), figures, strict=True)]
        if args.json:
            print(json.dumps([asdict(f) for f in [*figures, fleet_total(figures)]], indent=2))
        else:
            print(stats_table(figures))
        return 1 if any(f.error for f in figures) else 0
