"""``offramp audit``: audit records summarised by exit, cohort and policy version; with ``--labels``, the
correctness of the answers whose true label arrived later."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from offramp.client.cli.subcommand import Subcommand


class AuditCommand(Subcommand):
    name = "audit"
    help = "summarise audit records by exit, cohort and policy version"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("files", nargs="+", help="audit JSON-lines files (rotated siblings are read too)")
        parser.add_argument(
            "--labels",
            type=Path,
            help="CSV of true labels that arrived later (header request_id,row,label; label an index or a "
            "class name): prints each exit's accuracy on them, and full depth's on the shadow-checked rows",
        )

    def run(self, args: argparse.Namespace) -> int:
        from offramp.backend.audit import read_audit, summarize_audit

        if args.labels is not None:
            return self._late_labels(args)
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

    def _late_labels(self, args: argparse.Namespace) -> int:
        import csv

        from offramp.backend.audit import late_label_accuracy, read_audit

        with open(args.labels, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"request_id", "row", "label"} <= set(reader.fieldnames or ()):
                print(f"offramp audit: error: {args.labels} needs the header request_id,row,label "
                      f"(it has {reader.fieldnames})", file=sys.stderr)  # fmt: skip
                return 2
            try:
                labels = {
                    (row["request_id"], int(row["row"])): int(row["label"])
                    if row["label"].isdigit()
                    else row["label"]
                    for row in reader
                }
            except ValueError as error:
                print(f"offramp audit: error: {args.labels} line {reader.line_num}: the row must be a "
                      f"whole number ({error})", file=sys.stderr)  # fmt: skip
                return 2
        table = late_label_accuracy(read_audit([Path(p) for p in args.files]), labels)
        joined = sum(t["rows"] for t in table.values())
        print(f"{len(labels)} late labels, {joined} joined to answered rows (by request id and row)")
        print(
            f"  {'policy_version':<24} {'exit':>4} {'rows':>8} {'accuracy':>9} {'shadowed':>9} "
            f"{'full acc.':>9}"
        )
        for (version, exit_index), t in sorted(table.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            full = f"{t['full_correct'] / t['shadowed']:.1%}" if t["shadowed"] else "-"
            print(f"  {str(version):<24} {exit_index:>4} {t['rows']:>8} {t['correct'] / t['rows']:>9.1%} "
                  f"{t['shadowed']:>9} {full:>9}")  # fmt: skip
        return 0
