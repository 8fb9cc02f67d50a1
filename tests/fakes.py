"""Fakes for tests without a model: a multi-exit network for cascade tests (row-wise by construction, so
a row's outputs cannot depend on its batch-mates, and it records which rows each segment saw), and
exit logits for calibration tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from offramp.backend.contract import HIDDEN_IN


@dataclass
class FakeNetwork:
    """K segments over inputs X (n, F) with a side input S (n,): column 0 of the hidden state carries
    each row's id through every segment, so tests can see compaction at work."""

    num_exits: int = 3
    num_classes: int = 4
    features: int = 6
    seed: int = 0
    side_input: str | None = None
    calls: list[np.ndarray] = field(default_factory=list)  # row ids each segment call saw

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.scale = rng.uniform(0.5, 2.0, (self.num_exits, self.features)).astype(np.float32)
        self.shift = rng.normal(0, 0.5, (self.num_exits, self.features)).astype(np.float32)
        # Later exits are sharper: logits grow with depth, as a trained network's confidence does.
        self.sharpness = np.linspace(1.0, 4.0, self.num_exits).astype(np.float32)

    def inputs(self, rows: int, seed: int = 1) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        x = rng.normal(0, 1, (rows, self.features)).astype(np.float32)
        x[:, 0] = np.arange(rows)  # the row id
        tensors = {"X": x}
        if self.side_input:
            tensors[self.side_input] = np.arange(rows, dtype=np.int64)  # equals the id, checked per segment
        return tensors

    def run_segment(self, index: int, tensors: Mapping[str, np.ndarray], need_hidden: bool):
        previous = tensors["X"] if index == 0 else tensors[HIDDEN_IN]
        ids = previous[:, 0].copy()
        self.calls.append(ids)
        if self.side_input:
            assert np.array_equal(tensors[self.side_input], ids.astype(np.int64)), "side input not compacted"
        body = np.tanh(previous * self.scale[index] + self.shift[index])  # element-wise: row-wise exact
        body[:, 0] = ids
        logits = body[:, 1 : 1 + self.num_classes] * self.sharpness[index] * 3
        return (body if need_hidden else None), logits.astype(np.float32)

    def run_model(self, name: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The orchestrator's way to reach other models: any name is this network's full depth."""
        return self.run_full(tensors)

    def run_full(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        side = {name: tensor for name, tensor in tensors.items() if name != "X"}
        current = dict(tensors)
        for index in range(self.num_exits):
            body, logits = self.run_segment(index, current, True)
            current = {HIDDEN_IN: body, **side}
        return logits


def synthetic_exits(
    rows: int = 3000, classes: int = 5, exits: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (exits, rows, classes) that grow more accurate exit by exit, and labels (rows,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    ease = rng.uniform(0.2, 1.6, rows)  # (rows,) per-row difficulty shared by every exit
    logits = np.empty((exits, rows, classes), dtype=np.float32)
    for k in range(exits):
        z = rng.normal(0.0, 1.0, (rows, classes))
        z[np.arange(rows), labels] += 1.5 * (k + 1) * ease
        logits[k] = z
    return logits, labels
