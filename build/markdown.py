"""Markdown tables for the reports offramp writes (calibration, training, benchmark, soak)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are written with ``str``; no trailing newline."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
