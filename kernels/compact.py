"""Row compaction between exits: which rows go on, and moving rows between batches.

Two implementations share one contract:

- the NumPy references below, the ground truth the kernels are checked against (compaction only
  moves bytes, so "exact" is the only tolerance: no float64 needed beyond copying);
- the CUDA kernels in ``compact.cu`` with their CuPy launchers in ``cuda.py``.

Contract:

- ``partition_rows``: a stable partition of the batch by its exit mask (nonzero = the row exits):
  survivors' and exited rows' indices, each ascending, and their counts ``[S, B - S]``.
- ``gather_rows``: ``dst[j] = src[rows[j]]``, a dense buffer of the listed rows.
- ``scatter_rows``: ``dst[dst_rows[j]] = src[src_rows[j]]`` (``src[j]`` without ``src_rows``),
  rows not listed in ``dst_rows`` keep their values.

Rows are whatever follows the batch axis, of any dtype and shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RowPartition:
    """Rows of a batch split by an exit mask.

    The device buffers are B long and only their first ``counts`` entries are meaningful; the
    reference's are exactly as long as their counts.
    """

    survivor_rows: Any  # (B,) int64: rows that go on to the next segment, ascending
    exited_rows: Any  # (B,) int64: rows that exit here, ascending
    counts: Any  # (2,) int32: [survivors, exited]

    @property
    def num_survivors(self) -> Any:
        """(1,) view of the survivor count, where the copy kernels read how many rows to move."""
        return self.counts[0:1]

    @property
    def num_exited(self) -> Any:
        """(1,) view of the exited count."""
        return self.counts[1:2]


def partition_rows_reference(exit_mask: Any) -> RowPartition:
    """Survivors and exited rows of an exit mask of shape (B,)."""
    exits = np.asarray(exit_mask) != 0  # (B,)
    survivor_rows = np.flatnonzero(~exits)
    exited_rows = np.flatnonzero(exits)
    counts = np.array([survivor_rows.size, exited_rows.size], dtype=np.int32)
    return RowPartition(survivor_rows=survivor_rows, exited_rows=exited_rows, counts=counts)


def gather_rows_reference(src: Any, rows: Any) -> np.ndarray:
    """``src[rows]``: shape (len(rows), *src.shape[1:])."""
    return np.asarray(src)[np.asarray(rows)]


def scatter_rows_reference(src: Any, dst: Any, dst_rows: Any, src_rows: Any = None) -> np.ndarray:
    """A copy of ``dst`` with ``dst[dst_rows] = src[src_rows]`` (``src`` itself without ``src_rows``)."""
    out = np.array(dst, copy=True)
    moved = np.asarray(src) if src_rows is None else np.asarray(src)[np.asarray(src_rows)]
    out[np.asarray(dst_rows)] = moved
    return out
