"""Drift of the live exit profile from the one measured at calibration.

The score is the population stability index (PSI) between the exit-rate distribution of the last
``window`` rows the policy decided freely and the calibration profile stored in the policy:
PSI = sum_k (live_k - ref_k) * ln(live_k / ref_k), over exits, with both distributions floored at
``floor`` so an empty bin does not make it infinite. Common reading: below 0.1 stable, 0.1-0.25 a
moderate shift, above 0.25 a large one. A shift of the input mix towards harder rows moves rows to
later exits, and inputs unlike the training data often leave earlier (the model is most confident
where it knows least); both move the profile.

The window is the last ``window`` rows of every orchestrator instance of the model together: each
instance keeps its own recent exits with their times, ``snapshot`` gives them to the others (through
``offramp.backend.shared_state``) and ``absorb`` takes theirs, and the score is over the latest
``window`` of all of them. A short window reacts to a sudden shift within a few hundred rows; per
instance, a window mixes old and new traffic for as many rows times the number of instances.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    """A ring buffer of recent exits (with their times), the other instances' latest, and the PSI of the
    newest ``window`` of them against the reference profile."""

    def __init__(self, config: DriftConfig, clock: Callable[[], float] = time.time) -> None:
        if not config.clear_level <= config.alarm_level:
            raise ValueError("drift clear_level must not exceed alarm_level")
        self.config = config
        self.clock = clock
        self.reference = np.asarray(config.reference, dtype=np.float64)
        self._exits = np.full(config.window, -1, dtype=np.int64)
        self._times = np.full(config.window, -np.inf)
        self._next = 0
        self._seen = 0
        # The other instances' exits (n,), their times (n,) and how many they have seen, as one tuple: the
        # exchange thread replaces it while requests read it, and two attributes replaced one after the
        # other were once read half old, half new (exits and times of different lengths failed a
        # request with an IndexError).
        self._peers: tuple[np.ndarray, np.ndarray, int] = (np.empty(0, dtype=np.int64), np.empty(0), 0)
        self.score: float | None = None
        self.alarm = False

    @property
    def moving(self) -> bool:
        """Whether the profile has left the stable band (score at or past the clear level)."""
        return self.score is not None and self.score >= self.config.clear_level

    def snapshot(self) -> dict[str, Any]:
        """This instance's recent exits and their times, and how many it has seen, for the others."""
        held = self._exits >= 0
        return {"exits": self._exits[held].tolist(), "times": self._times[held].tolist(), "seen": self._seen}

    def absorb(self, peers: Iterable[Mapping[str, Any]]) -> None:
        """The other instances' latest snapshots (replacing the previous ones)."""
        peers = [p for p in peers if p.get("exits")]
        exits = [np.asarray(p["exits"], dtype=np.int64) for p in peers]
        self._peers = (
            np.concatenate(exits or [[]]).astype(np.int64),
            np.concatenate([np.asarray(p["times"], dtype=np.float64) for p in peers] or [[]]),
            sum(int(p.get("seen", 0)) for p in peers),
        )

    @property
    def conservative(self) -> bool:
        """Whether the service should run every row to full depth now."""
        return self.alarm and self.config.conservative

    def update(self, exits: Sequence[int] | np.ndarray) -> bool:
        """Adds the exits the policy chose freely; returns True when the alarm state changed."""
        exits = np.asarray(exits, dtype=np.int64)
        self._seen += len(exits)
        exits = exits[-self.config.window :]
        positions = (self._next + np.arange(len(exits))) % self.config.window
        self._exits[positions] = exits
        self._times[positions] = self.clock()
        self._next = (self._next + len(exits)) % self.config.window
        peer_exits, peer_times, peers_seen = self._peers
        if self._seen + peers_seen < self.config.min_rows:
            return False
        held = self._exits >= 0
        recent = np.concatenate([self._exits[held], peer_exits])
        times = np.concatenate([self._times[held], peer_times])
        if len(recent) > self.config.window:  # the newest window of all instances together
            recent = recent[np.argpartition(-times, self.config.window - 1)[: self.config.window]]
        live = np.bincount(recent, minlength=len(self.reference))[: len(self.reference)] / len(recent)
        self.score = population_stability_index(live, self.reference)
        before = self.alarm
        if self.score >= self.config.alarm_level:
            self.alarm = True
        elif self.score < self.config.clear_level:
            self.alarm = False
        return self.alarm != before
