"""``offramp audit``: audit records summarised by exit, cohort and policy version."""

from __future__ import annotations

import argparse
from pathlib import Path

from offramp.client.cli.subcommand import Subcommand


class AuditCommand(Subcommand):
    name = "audit"
    help = "summarise audit records by exit, cohort and policy version"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("files", nargs="+", help="audit JSON-lines files (rotated siblings are read too)")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.backend.audit import read_audit, summarize_audit

        summary = summarize_audit(read_audit([Path(p) for p in args.files]))
        total = sum(summary["exit"].values())
        print(f"{total} records")
        for field in ("policy_version", "cohort", "exit"):
            print(f"by {field}:")
            for key, count in sorted(summary[field].items(), key=lambda kv: str(kv[0])):
                print(f"  {str(key):<24} {count:>8} {count / max(total, 1):>7.1%}")
        print("by policy_version and exit:")
        for (version, exit_index), count in sorted(
            summary["version_exit"].items(), key=lambda kv: str(kv[0])
        ):
            print(f"  {str(version):<24} exit {exit_index}: {count}")
        return 0
