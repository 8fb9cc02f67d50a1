"""The early-exit cascade: pure logic over an array module, testable without a server.

For each segment: run it on the rows still active, compute their confidence in one pass, decide
which rows exit, scatter those rows' outputs to their original positions, and compact the survivors
(hidden state, side tensors, original indices) into a dense batch for the next segment.
``xp`` is NumPy on the CPU and CuPy on the GPU; ``run_segment`` is a BLS call under Triton and a
plain function in tests. On the GPU the per-exit decision is the fused confidence kernel and the
rows move through the compaction kernels (``offramp.kernels.cuda``); on NumPy, plain indexing does
both. Tests run the kernel path on NumPy too, with the kernels executed by the CPU shim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from offramp.backend.policy import ExitRule, Policy
from offramp.backend.contract import FLAG_DEADLINE, FLAG_DEPTH_CAP, FLAG_FORCED_FULL, HIDDEN_IN
from offramp.kernels.confidence import Confidence, compute_confidence, exits_by_threshold

# run_segment(index, tensors, need_hidden) -> (hidden or None, logits (B, C))
RunSegment = Callable[[int, Mapping[str, Any], bool], tuple[Any, Any]]
# run_full(raw inputs) -> logits (B, C) of the network without exits
RunFull = Callable[[Mapping[str, Any]], Any]
# A callable with run_cascade's signature (run_cascade itself, or offramp.backend.device.DeviceCascade):
# how the orchestrator is told where the cascade runs.
Cascade = Callable[..., "CascadeResult"]


@dataclass(frozen=True)
class CascadeBatch:
    """Rows of one or more requests, merged; every array has the batch as its first axis."""

    inputs: Mapping[str, Any]  # raw inputs by name, each (B, ...)
    force_full: Any  # (B,) bool: never exit early
    min_exit: Any  # (B,) int: earliest exit a row may take
    max_exit: Any  # (B,) int: the row exits here at the latest, confident or not
    rule_set: Any = None  # (B,) int: 0 = the policy's global rules, i > 0 = its i-th cohort (sorted names)
    deadline: Any = None  # (B,) float: time.monotonic() after which a row takes the next exit; inf = none

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
    flags: Any  # (B,) int32: FLAG_* bits saying why a row answered where it did
    # (B,) int: the first exit whose threshold the row passed (the last if none), where request
    # constraints did not hide it; -1 where they did. The drift monitor watches these free choices.
    policy_exit: Any
    rows_per_segment: tuple[int, ...]  # how many rows each segment ran (0 after the batch emptied)


def rule_sets(policy: Policy) -> list[tuple[ExitRule, ...]]:
    """The policy's rule sets as ``CascadeBatch.rule_set`` indexes them: global first, then cohorts by name."""
    return [policy.exits, *(policy.cohorts[name] for name in sorted(policy.cohorts))]


def _decide(
    logits: Any, exit_index: int, groups: Any, sets: list[tuple[ExitRule, ...]], xp: Any, kernels: Any = None
) -> tuple[Any, Confidence, Any]:
    """Temperature-scaled logits (n, C), their confidence, and which rows pass their own threshold (n,).

    Rows are grouped by rule set (global or a cohort's), each group judged by its own rule.
    """
    present = [int(g) for g in xp.unique(groups)] if groups is not None else [0]
    temperature = xp.empty(len(logits), dtype=xp.float32)
    for g in present:
        temperature[groups == g if groups is not None else slice(None)] = sets[g][exit_index].temperature
    scaled = logits.astype(xp.float32) / temperature[:, None]
    if kernels is not None:
        return (scaled, *_decide_by_kernel(scaled, exit_index, groups, present, sets, kernels))
    confidence = compute_confidence(scaled, 1.0, xp)
    passes = xp.zeros(len(logits), dtype=bool)
    for g in present:
        rule = sets[g][exit_index]
        rows = groups == g if groups is not None else xp.ones(len(logits), dtype=bool)
        passes[rows] = exits_by_threshold(confidence.select(rows), rule.metric, rule.threshold, xp)
    return scaled, confidence, passes


def _decide_by_kernel(
    scaled: Any,
    exit_index: int,
    groups: Any,
    present: list[int],
    sets: list[tuple[ExitRule, ...]],
    kernels: Any,
) -> tuple[Confidence, Any]:
    """Confidence and threshold passes from the fused confidence kernel: one launch per rule set present.

    The logits arrive already divided by each row's temperature, so the kernel runs at temperature 1
    (z / 1 is z exactly, as the NumPy path computes it); the rows of other rule sets are held back
    with the kernel's never-exit flags, so each launch decides its own rows only.
    """
    confidence, passes = None, None
    for g in present:
        rule = sets[g][exit_index]
        held = None if len(present) == 1 else groups != g
        figures, exit_mask = kernels.confidence(scaled, 1.0, rule.metric, rule.threshold, held)
        confidence = figures if confidence is None else confidence
        passes = exit_mask if passes is None else passes | exit_mask
    return confidence, passes.view(bool)  # (n,) uint8 of 0 and 1, viewed as bool


def _is_cupy(xp: Any) -> bool:
    return getattr(xp, "__name__", "") == "cupy"


def run_cascade(
    batch: CascadeBatch,
    run_segment: RunSegment,
    policy: Policy,
    exit_costs: Sequence[float],
    side_inputs: Sequence[str] = (),
    run_full: RunFull | None = None,
    xp: Any = np,
    compact: bool = True,
    clock: Callable[[], float] = time.monotonic,
    kernels: Any = None,
) -> CascadeResult:
    """Answers every row of ``batch`` at the first exit confident enough for it.

    ``exit_costs[k]`` is the compute fraction of leaving at exit k. Rows forced to full depth go to
    ``run_full`` when the policy routes them to the full model and it is given; otherwise they run
    through every segment and answer at the last exit. With ``compact=False`` the batch is not
    shrunk: it runs on whole until its last row has answered (batch-level early exit, kept to
    measure what compaction gains).

    ``kernels`` (``offramp.kernels.cuda.Launchers`` over ``xp``) makes each exit's decision with the
    fused confidence kernel and moves rows with the compaction kernels (partition, gather of the
    survivors, scatter of the exited rows' outputs); with CuPy as ``xp`` they default to the CUDA
    launchers. Without them, NumPy indexing does the same work.
    """
    if kernels is None and _is_cupy(xp):
        from offramp.kernels.cuda import cupy_launchers

        kernels = cupy_launchers()
    num_exits = len(exit_costs)
    sets = rule_sets(policy)
    rows = batch.rows
    logits_out = None  # (B, C), allocated once the class count is known
    label_out = xp.full(rows, -1, dtype=xp.int64)
    exit_out = xp.full(rows, -1, dtype=xp.int32)
    confidence_out = xp.full((rows, 3), xp.nan, dtype=xp.float32)
    cost_out = xp.zeros(rows, dtype=xp.float32)
    flags_out = xp.where(batch.force_full, FLAG_FORCED_FULL, 0).astype(xp.int32)
    policy_exit_out = xp.full(rows, -1, dtype=xp.int64)
    rows_per_segment = [0] * num_exits

    def scatter(positions: Any, scaled: Any, confidence: Confidence, exit_index: int, cost: float) -> None:
        nonlocal logits_out
        if logits_out is None:
            logits_out = xp.full((rows, scaled.shape[1]), xp.nan, dtype=xp.float32)
        logits_out[positions] = scaled
        label_out[positions] = confidence.label
        exit_out[positions] = exit_index
        confidence_out[positions] = confidence.stacked(xp)
        cost_out[positions] = cost

    def scatter_exited(
        partition: Any, num_exited: int, scaled: Any, confidence: Confidence, exit_index: int, cost: float
    ) -> None:
        """``scatter`` by the kernels: the exited rows of the segment batch, as ``partition`` lists them."""
        nonlocal logits_out
        if logits_out is None:
            logits_out = xp.full((rows, scaled.shape[1]), xp.nan, dtype=xp.float32)
        exited, count = partition.exited_rows, partition.num_exited  # exited (n,): the first count[0] hold
        positions = kernels.gather_rows(running, exited, count)  # (n,) their original positions, likewise
        outputs = (
            (scaled, logits_out),
            (confidence.label, label_out),
            (confidence.stacked(xp), confidence_out),
        )
        for source, target in outputs:
            kernels.scatter_rows(source, target, positions, count, src_rows=exited)
        exit_out[positions[:num_exited]] = exit_index
        cost_out[positions[:num_exited]] = cost

    def groups_of(positions: Any) -> Any:
        return None if batch.rule_set is None else batch.rule_set[positions]

    running = xp.arange(rows)  # original positions of the rows in the current segment batch
    if run_full is not None and policy.full_depth_route == "full_model" and bool(batch.force_full.any()):
        forced = xp.nonzero(batch.force_full)[0]
        logits = run_full({n: t[forced] for n, t in batch.inputs.items()})
        scaled, confidence, _ = _decide(logits, num_exits - 1, groups_of(forced), sets, xp, kernels)
        scatter(forced, scaled, confidence, num_exits - 1, 1.0)
        running = xp.nonzero(~batch.force_full)[0]
    pending = xp.ones(len(running), dtype=bool)  # rows of the segment batch not yet answered

    tensors: dict[str, Any] = {n: t[running] for n, t in batch.inputs.items()}
    for index in range(num_exits):
        if not bool(pending.any()):
            break
        last = index == num_exits - 1
        rows_per_segment[index] = len(running)
        hidden, logits = run_segment(index, tensors, not last)  # hidden (n, ...), logits (n, C)
        scaled, confidence, passes = _decide(logits, index, groups_of(running), sets, xp, kernels)
        undecided = policy_exit_out[running] < 0
        policy_exit_out[running[undecided & (passes | last)]] = index
        if last:
            leaving = pending.copy()
        else:
            capped = batch.max_exit[running] <= index
            late = (
                xp.zeros(len(running), dtype=bool)
                if batch.deadline is None
                else batch.deadline[running] <= clock()
            )
            leaving = passes & ~batch.force_full[running] & (batch.min_exit[running] <= index)
            leaving = pending & (leaving | capped | (late & ~batch.force_full[running]))
            flags_out[running[leaving & capped & ~passes]] |= FLAG_DEPTH_CAP
            flags_out[running[leaving & late & ~passes & ~capped]] |= FLAG_DEADLINE
        if kernels is None:
            if bool(leaving.any()):
                scatter(
                    running[leaving], scaled[leaving], confidence.select(leaving), index, exit_costs[index]
                )
            pending &= ~leaving
            if compact:
                running, pending = running[pending], pending[pending]
                hidden = hidden[~leaving] if hidden is not None else None
            tensors = {HIDDEN_IN: hidden, **{name: batch.inputs[name][running] for name in side_inputs}}
        else:
            partition = kernels.partition_rows(leaving)
            num_survivors, num_exited = (int(c) for c in partition.counts.tolist())  # the segment's host read
            if num_exited:
                scatter_exited(partition, num_exited, scaled, confidence, index, exit_costs[index])
            pending &= ~leaving
            side = {name: tensors[name] for name in side_inputs}  # rows aligned with `running`
            if compact:
                survivors, count = partition.survivor_rows[:num_survivors], partition.num_survivors
                running = kernels.gather_rows(running, survivors, count)
                pending = xp.ones(num_survivors, dtype=bool)
                hidden = kernels.gather_rows(hidden, survivors, count) if hidden is not None else None
                side = {name: kernels.gather_rows(tensor, survivors, count) for name, tensor in side.items()}
            tensors = {HIDDEN_IN: hidden, **side}

    return CascadeResult(
        logits=logits_out if logits_out is not None else xp.zeros((rows, 0), dtype=xp.float32),
        label=label_out,
        exit=exit_out,
        confidence=confidence_out,
        cost=cost_out,
        flags=flags_out,
        policy_exit=policy_exit_out,
        rows_per_segment=tuple(rows_per_segment),
    )
