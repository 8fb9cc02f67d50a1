"""``offramp policy``: live policy versions of a served model, on one server or across a fleet of replicas.

With ``--fleet`` (or ``status``), deploy and rollback roll the version out one replica at a time with a
canary check, restoring the replicas already changed on the first failure, and pin it in the repository
once every replica serves it (``offramp.client.serving.fleet``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from offramp.client.cli.subcommand import DEFAULT_REPOSITORY, Subcommand

ACTIONS = ("list", "show", "diff", "deploy", "rollback", "status")
FLEET_ACTIONS = ("deploy", "rollback", "status")


class PolicyCommand(Subcommand):
    name = "policy"
    help = "list, show, diff, deploy or roll back live policy versions"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("action", choices=ACTIONS)
        add("--repository", default=str(DEFAULT_REPOSITORY))
        add("--model", default="fashion_cnn", help="the orchestrator model")
        add("--url", help="gRPC address of the running server (host:port)")
        add("--admin-key", default=os.environ.get("OFFRAMP_ADMIN_KEY"), help="for servers off loopback")
        add("--version", type=int,
            help="show/diff: the version; rollback: the target; deploy --fleet: a version on disk to roll "
            "out")  # fmt: skip
        add("--other", type=int, help="diff: the version to compare with")
        add("--policy", help="deploy: the policy.json to serve")
        add("--fleet", help="deploy, rollback, status across replicas: HOST:PORT,HOST:PORT,... (gRPC) or "
            "@FILE, one replica a line")  # fmt: skip
        add("--canary", help="--fleet: an .npz of rows (one array per input) each replica must answer as the "
            "policy's simulation does before the next replica is changed")  # fmt: skip
        add("--canary-tolerance", type=float, default=0.0,
            help="--fleet: share of canary rows allowed to differ from the simulation "
            "(default: %(default)s)")  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        if args.fleet or args.action == "status":
            return run_fleet(args)
        from offramp.backend.policy import Policy
        from offramp.client.serving.policy_control import PolicyControl, PolicyControlError, policy_diff

        control = PolicyControl(Path(args.repository), args.model, args.url, args.admin_key)
        try:
            if args.action == "list":
                for version in control.versions():
                    provenance = version.policy.provenance
                    cost = provenance.get("expected_cost", float("nan"))
                    print(
                        f"{version.number:>4} {'*' if version.active else ' '} {version.policy.version:<24} "
                        f"{provenance.get('method', '?')} ({version.policy.certified_bounds}), "
                        f"expected compute {cost:.3f}"
                    )
            elif args.action == "show":
                print(control.policy(args.version).to_json())
            elif args.action == "diff":
                for line in policy_diff(control.policy(args.version), control.policy(args.other)) or [
                    "no differences"
                ]:
                    print(line)
            elif args.action == "deploy":
                number = control.deploy(Policy.load(Path(args.policy)))
                print(f"{args.model}: policy version {number} written" + (" and serving" if args.url else ""))
            elif args.action == "rollback":
                print(f"{args.model}: serving policy version {control.rollback(args.version)}")
        except PolicyControlError as error:
            print(f"offramp policy: error: {error}", file=sys.stderr)
            return 1
        return 0


def run_fleet(args: argparse.Namespace) -> int:
    """deploy, rollback or status across the replicas of ``--fleet`` (or the one server of ``--url``)."""
    from offramp.backend.policy import Policy, PolicyError
    from offramp.client.serving.fleet import CanaryRows, FleetControl, FleetError, parse_fleet, replica
    from offramp.client.serving.policy_control import PolicyControlError

    def fail(message: str) -> int:
        print(f"offramp policy: error: {message}", file=sys.stderr)
        return 1

    if args.action not in FLEET_ACTIONS:
        return fail(f"--fleet applies to {', '.join(FLEET_ACTIONS)}, not {args.action}")
    try:
        if args.fleet:
            replicas = parse_fleet(args.fleet)
        elif args.url:
            replicas = (replica(args.url),)
        else:
            return fail("status needs --fleet or --url")
        fleet = FleetControl(Path(args.repository), args.model, replicas, args.admin_key, say=print)
        if args.action == "status":
            status = fleet.status()
            print(status.describe())
            return 0 if status.agreed else 1
        canary = CanaryRows.load(Path(args.canary)) if args.canary else None
        if canary is None:
            print(
                "offramp policy: no --canary: a replica is only checked to load the version", file=sys.stderr
            )
        if args.action == "rollback":
            rollout = fleet.rollback(args.version, canary, args.canary_tolerance)
        elif args.policy:
            rollout = fleet.deploy(Policy.load(Path(args.policy)), canary, args.canary_tolerance)
        elif args.version is not None:
            rollout = fleet.roll_out(args.version, canary, args.canary_tolerance)
        else:
            return fail("deploy needs --policy (a new version) or --version (one on disk)")
    except (FleetError, PolicyControlError, PolicyError) as error:
        return fail(str(error))
    if rollout.completed:
        print(f"{args.model}: version {rollout.version} serves on all {len(replicas)} replicas")
        return 0
    kept = ", ".join(rollout.restored) or "none"
    return fail(f"roll-out of version {rollout.version} stopped: {rollout.failure}; restored: {kept}")
