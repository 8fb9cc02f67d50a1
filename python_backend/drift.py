"""Drift of the live exit profile from the one measured at calibration.

The score is the population stability index (PSI) between the exit-rate distribution of the last
``window`` rows the policy decided freely and the calibration profile stored in the policy:
PSI = sum_k (live_k - ref_k) * ln(live_k / ref_k), over exits, with both distributions floored at
``floor`` so an empty bin does not make it infinite. Common reading: below 0.1 stable, 0.1-0.25 a
moderate shift, above 0.25 a large one. A shift of the input mix towards harder rows moves rows to
later exits, which is what this watches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def population_stability_index(live: np.ndarray, reference: np.ndarray, floor: float = 1e-4) -> float:
    """PSI of two distributions over the same bins (each sums to 1 before flooring)."""
    p = np.maximum(np.asarray(live, dtype=np.float64), floor)
    q = np.maximum(np.asarray(reference, dtype=np.float64), floor)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


@dataclass(frozen=True)
class DriftConfig:
    reference: tuple[float, ...]  # exit-rate profile at calibration: fraction of rows per exit
    window: int = 2000  # rows in the sliding window
    min_rows: int = 500  # rows needed before any score is reported
    alarm_level: float = 0.25  # PSI at which the alarm is raised
    clear_level: float = 0.1  # PSI under which a raised alarm clears (hysteresis)
    conservative: bool = False  # force full depth while the alarm is raised


class DriftMonitor:
    """A ring buffer of recent exits and the PSI against the reference profile."""

    def __init__(self, config: DriftConfig) -> None:
        if not config.clear_level <= config.alarm_level:
            raise ValueError("drift clear_level must not exceed alarm_level")
        self.config = config
        self.reference = np.asarray(config.reference, dtype=np.float64)
        self._exits = np.full(config.window, -1, dtype=np.int64)
        self._next = 0
        self._seen = 0
        self.score: float | None = None
        self.alarm = False

    @property
    def conservative(self) -> bool:
        """Whether the service should run every row to full depth now."""
        return self.alarm and self.config.conservative

    def update(self, exits: Sequence[int] | np.ndarray) -> bool:
        """Adds the exits the policy chose freely; returns True when the alarm state changed."""
        exits = np.asarray(exits, dtype=np.int64)[-self.config.window :]
        positions = (self._next + np.arange(len(exits))) % self.config.window
        self._exits[positions] = exits
        self._next = (self._next + len(exits)) % self.config.window
        self._seen += len(exits)
        if self._seen < self.config.min_rows:
            return False
        recent = self._exits[self._exits >= 0]
        live = np.bincount(recent, minlength=len(self.reference))[: len(self.reference)] / len(recent)
        self.score = population_stability_index(live, self.reference)
        before = self.alarm
        if self.score >= self.config.alarm_level:
            self.alarm = True
        elif self.score < self.config.clear_level:
            self.alarm = False
        return self.alarm != before
