"""``offramp policy``: live policy versions of a served model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from offramp.client.cli.subcommand import DEFAULT_REPOSITORY, Subcommand

ACTIONS = ("list", "show", "diff", "deploy", "rollback")


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
        add("--version", type=int, help="show/diff: the version; rollback: the target")
        add("--other", type=int, help="diff: the version to compare with")
        add("--policy", help="deploy: the policy.json to serve")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.backend.policy import Policy
        from offramp.client.serving.policy_control import PolicyControl, PolicyControlError, policy_diff

        control = PolicyControl(Path(args.repository), args.model, args.url, args.admin_key)
        try:
            if args.action == "list":
                for version in control.versions():
                    provenance = version.policy.provenance
                    cost = provenance.get("expected_cost", float("nan"))
                    print(f"{version.number:>4} {'*' if version.active else ' '} {version.policy.version:<24} "
                          f"{provenance.get('method', '?')}, expected compute {cost:.3f}")  # fmt: skip
            elif args.action == "show":
                print(control.policy(args.version).to_json())
            elif args.action == "diff":
                for line in policy_diff(control.policy(args.version), control.policy(args.other)) or ["no differences"]:
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
