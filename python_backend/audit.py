"""Audit records: one JSON line per answered row, written off the serving path.

``AuditLog.record`` only enqueues; a background thread writes, rotates by size and survives a
full disk (records it cannot write are counted as lost, and serving goes on).
"""

from __future__ import annotations

import json
import os
import queue
import random
import threading
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AuditConfig:
    path: Path
    max_bytes: int = 64 * 1024 * 1024  # rotate the file past this size
    backups: int = 5  # rotated files kept: path.1 (newest) .. path.N
    sample_rate: float = 1.0  # fraction of rows recorded
    queue_rows: int = 100_000  # rows waiting for the writer; beyond, rows are dropped and counted
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"audit sample_rate must lie in [0, 1], not {self.sample_rate}")


class AuditLog:
    """Asynchronous, size-rotated JSON-lines writer with counters for what it lost."""

    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self._queue: queue.Queue[list[Mapping[str, Any]] | None] = queue.Queue()
        self._pending_rows = 0
        self._lock = threading.Lock()
        self._sampler = random.Random(config.seed)
        self.written = 0
        self.dropped = 0  # rows not queued: the writer fell behind
        self.lost = 0  # rows queued but not written: the disk refused them
        self.last_error: str | None = None
        config.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._write_loop, name="offramp-audit", daemon=True)
        self._thread.start()

    def record(self, rows: list[Mapping[str, Any]], sampled: bool = True) -> None:
        """Queues rows for writing, after sampling (unless ``sampled`` is False: events, which must all
        show); never blocks on the disk."""
        if sampled and self.config.sample_rate < 1.0:
            rows = [r for r in rows if self._sampler.random() < self.config.sample_rate]
        if not rows:
            return
        with self._lock:
            if self._pending_rows + len(rows) > self.config.queue_rows:
                self.dropped += len(rows)
                return
            self._pending_rows += len(rows)
        self._queue.put(rows)

    def close(self, timeout_s: float = 10.0) -> None:
        """Writes what is queued, then stops the writer."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _write_loop(self) -> None:
        log = _AppendOnlyFile(self.config.path)
        while True:
            rows = self._queue.get()
            if rows is None:
                break
            with self._lock:
                self._pending_rows -= len(rows)
            lines = [(json.dumps(r, separators=(",", ":")) + "\n").encode() for r in rows]
            try:
                if log.size + sum(map(len, lines)) > self.config.max_bytes and log.size > 0:
                    log.close()
                    self._rotate()
                landed = log.append(lines)
            except OSError as error:  # a full or failing disk: count the loss, keep serving
                landed = getattr(error, "lines_landed", 0)
                self.last_error = str(error)
                log.close()
            self.written += landed
            self.lost += len(rows) - landed
        log.close()

    def _rotate(self) -> None:
        path = self.config.path
        for index in range(self.config.backups, 0, -1):
            older = path.with_name(f"{path.name}.{index}")
            newer = path if index == 1 else path.with_name(f"{path.name}.{index - 1}")
            if newer.exists():
                if index == self.config.backups and older.exists():
                    older.unlink()
                os.replace(newer, older)


class _AppendOnlyFile:
    """A JSON-lines file written with plain ``os.write``, so a short write on a full disk is seen:
    the file is cut back to its last complete line, and the error says how many lines landed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes in the file (opening it, if closed)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._size = os.fstat(self._fd).st_size
        return self._size

    def append(self, lines: list[bytes]) -> int:
        """Writes the lines; returns how many, or raises OSError with ``lines_landed`` set."""
        start = self.size
        data = memoryview(b"".join(lines))
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError as error:
            ends = list(accumulate(len(line) for line in lines))
            error.lines_landed = bisect_right(ends, done)
            self._size = start + (ends[error.lines_landed - 1] if error.lines_landed else 0)
            try:  # a torn last line would read as a broken record: cut it off
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size = start + done
        return len(lines)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def read_audit(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Records from audit files and their rotated siblings (oldest first); broken lines are skipped."""
    for path in paths:
        siblings = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
        for file in [*siblings, path]:
            if not file.exists():
                continue
            with open(file, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue


def summarize_audit(records: Iterable[Mapping[str, Any]]) -> dict[str, Counter]:
    """Row counts by exit, by cohort, by policy version and by (version, exit)."""
    summary = {"exit": Counter(), "cohort": Counter(), "policy_version": Counter(), "version_exit": Counter()}
    for record in records:
        summary["exit"][record.get("exit")] += 1
        summary["cohort"][record.get("cohort") or "-"] += 1
        summary["policy_version"][record.get("policy_version")] += 1
        summary["version_exit"][(record.get("policy_version"), record.get("exit"))] += 1
    return summary


def late_label_accuracy(
    records: Iterable[Mapping[str, Any]], late_labels: Mapping[tuple[str, int], int | str]
) -> dict[tuple[Any, Any], dict[str, int]]:
    """Correctness where the true label arrived after the answer: ``late_labels`` maps (request id, row)
    to the true class, its index or its name (names are read from the records' ``label_name``).

    Per (policy version, exit): ``rows`` answered with a late label, how many answers were ``correct``,
    and of them the rows a shadow check also ran at full depth (``shadowed``) and how often the full
    depth was right (``full_correct``). Rows without a request id cannot be joined.
    """
    answers: dict[tuple[str, int], Mapping[str, Any]] = {}
    full_labels: dict[tuple[str, int], int] = {}
    index_of: dict[str, int] = {}
    for record in records:
        key = (record.get("request_id"), record.get("row"))
        if key not in late_labels:
            continue
        if record.get("kind") is None:
            answers[key] = record
            if record.get("label_name") is not None:
                index_of[record["label_name"]] = int(record["label"])
        elif record.get("kind") == "shadow":
            full_labels[key] = int(record["full_label"])
    table: dict[tuple[Any, Any], dict[str, int]] = {}
    for key, answer in answers.items():
        truth = late_labels[key]
        truth = index_of.get(truth, -1) if isinstance(truth, str) else int(truth)  # an unseen name: wrong
        tally = table.setdefault(
            (answer.get("policy_version"), answer.get("exit")),
            {"rows": 0, "correct": 0, "shadowed": 0, "full_correct": 0},
        )
        tally["rows"] += 1
        tally["correct"] += int(answer["label"]) == truth
        if key in full_labels:
            tally["shadowed"] += 1
            tally["full_correct"] += full_labels[key] == truth
    return table
