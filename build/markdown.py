"""Markdown tables for the reports offramp writes (calibration, training, benchmark, soak)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are written with ``str``; no trailing newline."""
    lines = [_table_row(head), "|" + "|".join("---" for _ in head) + "|"]
    lines += [_table_row(row) for row in rows]
    return "\n".join(lines)


def _table_row(cells: Sequence[Any]) -> str:
    # An empty cell is one space between its bars, as the reports have always written it ("| |").
    texts = [str(cell) for cell in cells]
    return "|" + "|".join(f" {text} " if text else " " for text in texts) + "|"
