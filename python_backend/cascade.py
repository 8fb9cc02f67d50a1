"""The early-exit cascade: pure logic over an array module, testable without a server.

For each segment: run it on the rows still active, compute their confidence in one pass, decide
which rows exit, scatter those rows' outputs to their original positions, and compact the survivors
(hidden state, side tensors, original indices) into a dense batch for the next segment.
``xp`` is NumPy on the CPU and CuPy on the GPU; ``run_segment`` is a BLS call under Triton and a
plain function in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from offramp.backend.policy import Policy
from offramp.backend.contract import HIDDEN_IN
from offramp.kernels.confidence import Confidence, compute_confidence, exits_by_threshold

# run_segment(index, tensors, need_hidden) -> (hidden or None, logits (B, C))
RunSegment = Callable[[int, Mapping[str, Any], bool], tuple[Any, Any]]
# run_full(raw inputs) -> logits (B, C) of the network without exits
RunFull = Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class CascadeBatch:
    """Rows of one or more requests, merged; every array has the batch as its first axis."""

    inputs: Mapping[str, Any]  # raw inputs by name, each (B, ...)
    force_full: Any  # (B,) bool: never exit early
    min_exit: Any  # (B,) int: earliest exit a row may take
    max_exit: Any  # (B,) int: the row exits here at the latest, confident or not

    @property
    def rows(self) -> int:
        return len(self.force_full)

    @classmethod
    def plain(cls, inputs: Mapping[str, Any], num_exits: int, xp: Any = np) -> CascadeBatch:
        """A batch with no per-row constraints."""
        rows = len(next(iter(inputs.values())))
        return cls(
            inputs=inputs,
            force_full=xp.zeros(rows, dtype=bool),
            min_exit=xp.zeros(rows, dtype=xp.int64),
            max_exit=xp.full(rows, num_exits - 1, dtype=xp.int64),
        )


@dataclass(frozen=True)
class CascadeResult:
    """One row per input row, in the input order (the tensor contract's outputs)."""

    logits: Any  # (B, C) float32, divided by the exit's temperature
    label: Any  # (B,) int64; -1 where the logits were not finite
    exit: Any  # (B,) int32, 0-based exit index
    confidence: Any  # (B, 3) float32: max-prob, entropy, margin
    cost: Any  # (B,) float32: fraction of the full network's compute the row used
    rows_per_segment: tuple[int, ...]  # how many rows each segment ran (0 after the batch emptied)


def run_cascade(
    batch: CascadeBatch,
    run_segment: RunSegment,
    policy: Policy,
    exit_costs: Sequence[float],
    side_inputs: Sequence[str] = (),
    run_full: RunFull | None = None,
    xp: Any = np,
) -> CascadeResult:
    """Answers every row of ``batch`` at the first exit confident enough for it.

    ``exit_costs[k]`` is the compute fraction of leaving at exit k. Rows forced to full depth go to
    ``run_full`` when the policy routes them to the full model and it is given; otherwise they run
    through every segment and answer at the last exit.
    """
    num_exits = len(exit_costs)
    rules = policy.exits
    rows = batch.rows
    logits_out = None  # (B, C), allocated once the class count is known
    label_out = xp.full(rows, -1, dtype=xp.int64)
    exit_out = xp.full(rows, -1, dtype=xp.int32)
    confidence_out = xp.full((rows, 3), xp.nan, dtype=xp.float32)
    cost_out = xp.zeros(rows, dtype=xp.float32)
    rows_per_segment = [0] * num_exits

    def scatter(positions: Any, logits: Any, confidence: Confidence, exit_index: int, cost: float) -> None:
        nonlocal logits_out
        if logits_out is None:
            logits_out = xp.full((rows, logits.shape[1]), xp.nan, dtype=xp.float32)
        logits_out[positions] = logits.astype(xp.float32) / xp.float32(rules[exit_index].temperature)
        label_out[positions] = confidence.label
        exit_out[positions] = exit_index
        confidence_out[positions] = confidence.stacked(xp)
        cost_out[positions] = cost

    active = xp.arange(rows)  # original positions of the rows still running
    if run_full is not None and policy.full_depth_route == "full_model" and bool(batch.force_full.any()):
        forced = xp.nonzero(batch.force_full)[0]
        logits = run_full({n: t[forced] for n, t in batch.inputs.items()})
        confidence = compute_confidence(logits, rules[-1].temperature, xp)
        scatter(forced, logits, confidence, num_exits - 1, 1.0)
        active = xp.nonzero(~batch.force_full)[0]

    tensors: dict[str, Any] = {n: t[active] for n, t in batch.inputs.items()}
    for index in range(num_exits):
        if len(active) == 0:
            break
        last = index == num_exits - 1
        rows_per_segment[index] = len(active)
        hidden, logits = run_segment(index, tensors, not last)  # hidden (n, ...), logits (n, C)
        rule = rules[index]
        confidence = compute_confidence(logits, rule.temperature, xp)
        if last:
            leaving = xp.ones(len(active), dtype=bool)
        else:
            leaving = exits_by_threshold(confidence, rule.metric, rule.threshold, xp)
            leaving &= ~batch.force_full[active] & (batch.min_exit[active] <= index)
            leaving |= batch.max_exit[active] <= index
        if bool(leaving.any()):
            scatter(active[leaving], logits[leaving], confidence.select(leaving), index, exit_costs[index])
        staying = ~leaving
        active = active[staying]
        tensors = {HIDDEN_IN: hidden[staying] if hidden is not None else None}
        tensors.update({name: batch.inputs[name][active] for name in side_inputs})

    return CascadeResult(
        logits=logits_out if logits_out is not None else xp.zeros((rows, 0), dtype=xp.float32),
        label=label_out,
        exit=exit_out,
        confidence=confidence_out,
        cost=cost_out,
        rows_per_segment=tuple(rows_per_segment),
    )
