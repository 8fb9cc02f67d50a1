"""``offramp health``: canary requests through a served offramp model; the exit status says how it went."""

from __future__ import annotations

import argparse
import json
import os

from offramp.client.cli.subcommand import DEFAULT_GRPC_URL, Subcommand

READY, LIVE, DOWN = 0, 1, 2  # exit statuses


class HealthCommand(Subcommand):
    name = "health"
    help = "ask a served model through every segment and at full depth: ready, live or down"
    description = (
        "Sends one canary row through every segment (min_exit -1) and one forced to full depth. Exit status: "
        f"{READY} ready (every answer at full quality), {LIVE} live but not ready (some answer below full "
        f"quality), {DOWN} down (no answer). With --live, {READY} whenever the service answers at all."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add(
            "url",
            nargs="?",
            default=DEFAULT_GRPC_URL,
            help="gRPC address of the server (default: %(default)s)",
        )
        add("--model", action="append", dest="models", metavar="NAME",
            help="the orchestrator model, repeatable (default: every offramp model the server has loaded)")  # fmt: skip
        add("--live", action="store_true", help="a liveness probe: succeed whenever the service answers")
        add("--timeout", type=float, default=5.0, help="seconds per canary (default: %(default)s)")
        add("--json", action="store_true", help="the details as JSON")
        add("--admin-key", default=os.environ.get("OFFRAMP_ADMIN_KEY"), help="for servers off loopback")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.client.serving.health import check_service
        from offramp.client.serving.server import ADMIN_KEY_HEADER

        headers = {ADMIN_KEY_HEADER: args.admin_key} if args.admin_key else None
        health = check_service(args.url, args.models, args.timeout, headers)
        print(json.dumps(health.to_dict(), indent=2) if args.json else health.describe())
        if health.ready or (args.live and health.live):
            return READY
        return LIVE if health.live else DOWN
