"""Live rows kept for recalibration: a uniform sample of the served rows with their inputs, bounded.

Only where the operator sets ``store_path`` (inputs are the users' data). Each orchestrator process
writes its own ``.npz`` chunks (``<instance>-<time ns>-<rows>.npz``) into the store folder: the model's
inputs as the segments take them (token ids, preprocessed pixels), the exit the policy chose and its
answer there, the full-depth answer, cohort, request id, row and time. Retention is enforced at each
write: chunks older than ``max_age_s`` go, then the oldest until the process's chunks hold at most
``max_rows`` rows. ``read_store`` gathers every chunk of a folder for ``offramp calibrate --shadow``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = re.compile(r"^(?P<instance>.+)-(?P<time>\d+)-(?P<rows>\d+)\.npz$")
META = ("exit", "label", "full_label", "cohort", "request_id", "row", "time")
INPUT_PREFIX = "input:"


class ShadowStore:
    def __init__(
        self,
        directory: Path,
        instance: str,
        max_rows: int = 100_000,
        max_age_s: float = 7 * 24 * 3600.0,
        flush_rows: int = 256,
        flush_interval_s: float = 30.0,
        clock: Any = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.instance = re.sub(r"[^A-Za-z0-9_.]", "_", instance)
        self.max_rows, self.max_age_s = max_rows, max_age_s
        self.flush_rows, self.flush_interval_s = flush_rows, flush_interval_s
        self.clock = clock
        self._parts: list[dict[str, Any]] = []
        self._rows = 0
        self._flushed_at = clock()
        self.written = 0

    def add(self, inputs: Mapping[str, np.ndarray], **meta: Any) -> None:
        """Rows to keep: the model's inputs (n, ...) and each of ``META`` (n,)."""
        missing = set(META) - set(meta)
        if missing:
            raise ValueError(f"shadow store rows lack {sorted(missing)}")
        self._parts.append({**{INPUT_PREFIX + n: np.asarray(a) for n, a in inputs.items()}, **meta})
        self._rows += len(meta["exit"])

    def flush_if_due(self) -> None:
        if self._rows >= self.flush_rows or (
            self._rows and self.clock() - self._flushed_at >= self.flush_interval_s
        ):
            self.flush()

    def flush(self) -> None:
        """Writes what was added as one chunk (appearing whole, by a rename), then enforces retention."""
        self._flushed_at = self.clock()
        if not self._rows:
            return
        parts, self._parts, rows, self._rows = self._parts, [], self._rows, 0
        arrays = {name: _concatenated([p[name] for p in parts]) for name in parts[0]}
        name = f"{self.instance}-{int(self.clock() * 1e9)}-{rows}.npz"  # the clock retention reads
        temporary = self.directory / f".{name}.tmp.npz"
        np.savez(temporary, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(temporary, self.directory / name)
        self.written += rows
        self._retain()

    def _retain(self) -> None:
        chunks = sorted(
            (int(m["time"]), int(m["rows"]), path)
            for path in self.directory.glob(f"{self.instance}-*.npz")
            if (m := _CHUNK.match(path.name)) and m["instance"] == self.instance
        )
        oldest_kept = (self.clock() - self.max_age_s) * 1e9
        total = sum(rows for _, rows, _ in chunks)
        for written, rows, path in chunks:
            if written >= oldest_kept and total <= self.max_rows:
                break
            path.unlink(missing_ok=True)
            total -= rows


def _concatenated(arrays: list[np.ndarray]) -> np.ndarray:
    """Rows of several parts in one array; a variable axis (token ids) right-padded with zeros to the
    longest, which an attention mask of zeros makes inert."""
    arrays = [np.asarray(a) for a in arrays]
    if len(arrays) == 1 or arrays[0].ndim < 2:
        return np.concatenate(arrays)
    longest = np.max([a.shape for a in arrays], axis=0)[1:]
    return np.concatenate(
        [
            np.pad(a, [(0, 0), *((0, int(m - d)) for d, m in zip(a.shape[1:], longest, strict=True))])
            for a in arrays
        ]
    )


def read_store(
    directory: Path, since: float | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every row kept in ``directory`` (its chunks of all processes), oldest first, written at or after
    ``since`` (a Unix time): the inputs by name and the ``META`` columns."""
    chunks = sorted(
        (int(m["time"]), path) for path in Path(directory).glob("*.npz") if (m := _CHUNK.match(path.name))
    )
    parts: list[dict[str, np.ndarray]] = []
    for _, path in chunks:
        with np.load(path, allow_pickle=False) as chunk:
            part = {name: chunk[name] for name in chunk.files}
        if since is not None:
            recent = part["time"] >= since
            part = {name: array[recent] for name, array in part.items()}
        if len(part["exit"]):
            parts.append(part)
    if not parts:
        raise ValueError(f"{directory}: no kept rows{'' if since is None else ' since then'}")
    merged = {name: _concatenated([p[name] for p in parts]) for name in parts[0]}
    inputs = {
        name[len(INPUT_PREFIX) :]: array for name, array in merged.items() if name.startswith(INPUT_PREFIX)
    }
    return inputs, {name: merged[name] for name in META}
