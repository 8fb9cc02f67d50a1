"""The early-exit cascade: pure logic over an array module, testable without a server.

For each segment: run it on the rows still active, decide which rows exit, scatter those rows'
outputs to their original positions, and compact the survivors (original positions, hidden state,
side tensors, the row's label history) into a dense batch for the next segment. ``run_cascade`` is
that loop; a row mover does the deciding (``exit_rules.rule_passes``: every rule family) and the
moving. ``IndexingRowMover`` does both with array indexing (NumPy on the
host, or CuPy); ``KernelRowMover`` decides with the fused confidence kernel and moves rows with the
compaction kernels (``offramp.kernels.cuda``), on CuPy or, in tests, on NumPy with the kernels
executed by the CPU shim. ``run_segment`` is a BLS call under Triton and a plain function in tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from offramp.backend.contract import (
    FLAG_DEADLINE,
    FLAG_DEGRADED,
    FLAG_DEPTH_CAP,
    FLAG_FORCED_FULL,
    HIDDEN_IN,
    SegmentUnavailable,
)
from offramp.backend.exit_rules import NEVER, LabelHistory, is_plain, rule_passes
from offramp.backend.policy import ExitRule, Policy
from offramp.kernels.confidence import Confidence, compute_confidence

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
    # (B,) int64: the label at policy_exit (-1 where it is -1). Under conservative mode a row answers at
    # full depth, and this is the early answer the policy would have sent: a shadow check for free.
    policy_label: Any
    rows_per_segment: tuple[int, ...]  # how many rows each segment ran (0 after the batch emptied)
    # A segment was unavailable: what it said, and (B,) bool the rows it left without the answer their
    # policy would give (answered at the deepest exit they reached, FLAG_DEGRADED, or not at all:
    # exit -1 where they reached none). None when every segment answered.
    outage: str = ""
    unfinished: Any = None


def rule_sets(policy: Policy) -> list[tuple[ExitRule, ...]]:
    """The policy's rule sets as ``CascadeBatch.rule_set`` indexes them: global first, then the cohorts
    by name, then the ladder's rungs above rung 0."""
    return [
        policy.exits,
        *(policy.cohorts[name] for name in sorted(policy.cohorts)),
        *(r.exits for r in policy.rungs),
    ]


@dataclass(frozen=True)
class Decision:
    """One exit's verdict on the rows of a segment batch."""

    logits: Any  # (n, C) float32, divided by each row's temperature
    confidence: Confidence  # of those logits, each field (n,)
    passes: Any  # (n,) bool: the row passes its own rule set's rule
    history: LabelHistory  # the rows' label history after this exit, each field (n,)


@dataclass(frozen=True)
class RowSplit:
    """A segment batch split by which rows leave: those that go on and those that answer here."""

    survivors: Any  # (S,) int64: rows of the segment batch that go on, ascending
    exited: Any  # (E,) int64: rows that answer at this exit, ascending
    num_survivors: int  # S, on the host
    num_exited: int  # E, on the host
    # (2,) int32 [S, E] on the device, where the copy kernels read how many rows to move (kernels only)
    device_counts: Any = None


class RowMover(Protocol):
    """The steps of one exit that touch rows: deciding which leave, scattering their answers to their
    original positions, and compacting the rest into the next segment's batch."""

    def decide(self, logits: Any, exit_index: int, groups: Any, history: LabelHistory) -> Decision:
        """Judges logits (n, C) by each row's rule at this exit; ``groups`` (n,) indexes ``rule_sets``
        (None: every row takes the global rules); ``history`` is the rows' before this exit."""

    def split(self, leaving: Any) -> RowSplit:
        """The segment batch split by ``leaving`` (n,) bool, with both counts read to the host."""

    def scatter_exited(self, split: RowSplit, positions: Any, moves: Sequence[tuple[Any, Any]]) -> Any:
        """``target[positions[r]] = source[r]`` for each exited row r and each (source (n, ...),
        target (B, ...)) of ``moves``; ``positions`` (n,) are the rows' original positions.
        Returns the exited rows' original positions (E,)."""

    def gather_survivors(self, split: RowSplit, rows: Any) -> Any:
        """The survivors' rows (S, ...) of ``rows`` (n, ...), dense and in order."""


def _temperature_scaled(
    logits: Any, exit_index: int, groups: Any, sets: list[tuple[ExitRule, ...]], xp: Any
) -> tuple[Any, list[tuple[int, Any]]]:
    """Logits (n, C) divided by each row's temperature in float32, and each rule set present with its
    rows (a mask (n,), or every row where only one set is present)."""
    if groups is None or len(sets) == 1:  # one set: no search for the sets present (a sort)
        present = [0]
    else:
        present = [int(g) for g in xp.unique(groups)]
    if len(present) == 1:
        temperature = sets[present[0]][exit_index].temperature
        return logits.astype(xp.float32) / xp.float32(temperature), [(present[0], slice(None))]
    members = [(g, groups == g) for g in present]
    temperatures = xp.empty(len(logits), dtype=xp.float32)  # (n,)
    for g, rows in members:
        temperatures[rows] = sets[g][exit_index].temperature
    return logits.astype(xp.float32) / temperatures[:, None], members


@dataclass(frozen=True)
class IndexingRowMover:
    """Decides with ``compute_confidence`` and moves rows by array indexing, on NumPy or CuPy."""

    xp: Any
    sets: list[tuple[ExitRule, ...]]

    def decide(self, logits: Any, exit_index: int, groups: Any, history: LabelHistory) -> Decision:
        """Each rule set's rule judges every row (it is row-wise); each row keeps its own set's verdict."""
        xp = self.xp
        scaled, members = _temperature_scaled(logits, exit_index, groups, self.sets, xp)
        confidence = compute_confidence(scaled, 1.0, xp)
        history = history.after(confidence.label, xp)
        passes = None
        for g, rows in members:
            verdict = rule_passes(self.sets[g][exit_index], scaled, confidence, history, xp)  # (n,)
            passes = verdict if passes is None else xp.where(rows, verdict, passes)
        return Decision(scaled, confidence, passes, history)

    def split(self, leaving: Any) -> RowSplit:
        survivors, exited = self.xp.flatnonzero(~leaving), self.xp.flatnonzero(leaving)
        return RowSplit(survivors, exited, len(survivors), len(exited))

    def scatter_exited(self, split: RowSplit, positions: Any, moves: Sequence[tuple[Any, Any]]) -> Any:
        exited_positions = positions[split.exited]  # (E,)
        for source, target in moves:
            target[exited_positions] = source[split.exited]
        return exited_positions

    def gather_survivors(self, split: RowSplit, rows: Any) -> Any:
        return rows[split.survivors]


@dataclass(frozen=True)
class KernelRowMover:
    """Decides with the fused confidence kernel and moves rows with the compaction kernels.

    Between segments only the two counts of each split reach the host; everything else stays on the
    device of ``xp`` (the launchers' arrays are ``xp``'s).
    """

    xp: Any
    kernels: Any  # offramp.kernels.cuda.Launchers over xp
    sets: list[tuple[ExitRule, ...]]

    def decide(self, logits: Any, exit_index: int, groups: Any, history: LabelHistory) -> Decision:
        """One kernel launch per rule set present whose rule the kernel decides alone (``is_plain``).

        The logits arrive already divided by each row's temperature, so the kernel runs at temperature 1
        (z / 1 is z exactly, as the indexing mover computes it); the rows of other rule sets are held
        back with the kernel's never-exit flags, so each launch decides its own rows only. A rule with
        patience, a novelty gate or a learned score is decided from the kernel's figures and the rows'
        label history by array operations on the device (``exit_rules``), launching the kernel only
        where no figures exist yet.
        """
        xp = self.xp
        scaled, members = _temperature_scaled(logits, exit_index, groups, self.sets, xp)
        confidence, passes, after = None, None, None
        for g, rows in members:
            rule = self.sets[g][exit_index]
            alone = len(members) == 1
            plain = is_plain(rule)
            if plain or confidence is None:
                # Where the kernel cannot decide the rule, its figures alone: no row passes NEVER.
                metric = rule.metric if plain else "max_prob"
                threshold = rule.threshold if plain else NEVER[metric]
                held = None if alone else ~rows
                figures, exit_mask = self.kernels.confidence(scaled, 1.0, metric, threshold, held)
                if confidence is None:
                    confidence, after = figures, history.after(figures.label, xp)
            if plain:
                verdict = exit_mask.view(bool)  # (n,) uint8 of 0 and 1, viewed as bool
            else:
                verdict = rule_passes(rule, scaled, confidence, after, xp)
                verdict = verdict if alone else verdict & rows
            passes = verdict if passes is None else passes | verdict
        return Decision(scaled, confidence, passes, after)

    def split(self, leaving: Any) -> RowSplit:
        partition = self.kernels.partition_rows(leaving)
        num_survivors, num_exited = (int(c) for c in partition.counts.tolist())  # the segment's host read
        return RowSplit(
            partition.survivor_rows[:num_survivors],
            partition.exited_rows[:num_exited],
            num_survivors,
            num_exited,
            partition.counts,
        )

    def scatter_exited(self, split: RowSplit, positions: Any, moves: Sequence[tuple[Any, Any]]) -> Any:
        count = split.device_counts[1:2]
        exited_positions = self.kernels.gather_rows(positions, split.exited, count)  # (E,)
        for source, target in moves:
            self.kernels.scatter_rows(source, target, exited_positions, count, src_rows=split.exited)
        return exited_positions

    def gather_survivors(self, split: RowSplit, rows: Any) -> Any:
        return self.kernels.gather_rows(rows, split.survivors, split.device_counts[0:1])


def row_mover(xp: Any, sets: list[tuple[ExitRule, ...]], kernels: Any = None) -> RowMover:
    """The kernels' mover where launchers are given or ``xp`` is CuPy (its CUDA launchers), else indexing."""
    if kernels is None and getattr(xp, "__name__", "") == "cupy":
        from offramp.kernels.cuda import cupy_launchers

        kernels = cupy_launchers()
    return IndexingRowMover(xp, sets) if kernels is None else KernelRowMover(xp, kernels, sets)


@dataclass
class _Answers:
    """The cascade's outputs, filled in as rows answer; every array in the input order."""

    xp: Any
    label: Any  # (B,) int64
    exit: Any  # (B,) int32
    confidence: Any  # (B, 3) float32
    cost: Any  # (B,) float32
    flags: Any  # (B,) int32
    policy_exit: Any  # (B,) int64
    policy_label: Any  # (B,) int64
    logits: Any = None  # (B, C) float32, allocated at the first answer, once C is known

    @classmethod
    def unanswered(cls, batch: CascadeBatch, xp: Any) -> _Answers:
        rows = batch.rows
        return cls(
            xp=xp,
            label=xp.full(rows, -1, dtype=xp.int64),
            exit=xp.full(rows, -1, dtype=xp.int32),
            confidence=xp.full((rows, 3), xp.nan, dtype=xp.float32),
            cost=xp.zeros(rows, dtype=xp.float32),
            flags=xp.where(batch.force_full, FLAG_FORCED_FULL, 0).astype(xp.int32),
            policy_exit=xp.full(rows, -1, dtype=xp.int64),
            policy_label=xp.full(rows, -1, dtype=xp.int64),
        )

    def record(
        self,
        mover: RowMover,
        split: RowSplit,
        decision: Decision,
        positions: Any,
        exit_index: int,
        cost: float,
    ) -> None:
        """The exited rows of ``split`` answer at ``exit_index``; ``positions`` (n,) are the segment
        batch's original positions."""
        xp = self.xp
        if self.logits is None:
            self.logits = xp.full((len(self.label), decision.logits.shape[1]), xp.nan, dtype=xp.float32)
        moves = (
            (decision.logits, self.logits),
            (decision.confidence.label, self.label),
            (decision.confidence.stacked(xp), self.confidence),
        )
        exited_positions = mover.scatter_exited(split, positions, moves)  # (E,)
        self.exit[exited_positions] = exit_index
        self.cost[exited_positions] = cost

    def result(
        self, rows_per_segment: Sequence[int], outage: str = "", unfinished: Any = None
    ) -> CascadeResult:
        no_answer = self.xp.zeros((len(self.label), 0), dtype=self.xp.float32)  # an empty batch
        return CascadeResult(
            logits=self.logits if self.logits is not None else no_answer,
            label=self.label,
            exit=self.exit,
            confidence=self.confidence,
            cost=self.cost,
            flags=self.flags,
            policy_exit=self.policy_exit,
            policy_label=self.policy_label,
            rows_per_segment=tuple(rows_per_segment),
            outage=outage,
            unfinished=unfinished,
        )


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
    fused confidence kernel and moves rows with the compaction kernels; with CuPy as ``xp`` they
    default to the CUDA launchers. Without them, array indexing does the same work (``row_mover``).
    """
    num_exits = len(exit_costs)
    last_exit = num_exits - 1
    sets = rule_sets(policy)
    mover = row_mover(xp, sets, kernels)
    answers = _Answers.unanswered(batch, xp)
    rows_per_segment = [0] * num_exits

    def groups_of(positions: Any) -> Any:
        return None if batch.rule_set is None else batch.rule_set[positions]

    running = xp.arange(batch.rows)  # original positions of the rows in the current segment batch
    if run_full is not None and policy.full_depth_route == "full_model" and bool(batch.force_full.any()):
        forced = xp.nonzero(batch.force_full)[0]
        try:
            logits = run_full({n: t[forced] for n, t in batch.inputs.items()})
        except SegmentUnavailable:
            pass  # the full model is down: the forced rows go through every segment instead
        else:
            decision = mover.decide(logits, last_exit, groups_of(forced), LabelHistory.fresh(len(forced), xp))
            everyone = mover.split(xp.ones(len(forced), dtype=bool))
            answers.record(mover, everyone, decision, forced, last_exit, 1.0)
            running = xp.nonzero(~batch.force_full)[0]
    # Whether any row bounds its own depth (forced, min or max exit, a deadline): where none does, a row
    # leaves when its rule passes, and no row is flagged capped or late. Read once (on a GPU, one wait).
    bounded = batch.force_full | (batch.min_exit > 0) | (batch.max_exit < last_exit)
    if batch.deadline is not None:
        bounded = bounded | (batch.deadline < xp.inf)
    any_bounded = bool(bounded.any())
    pending = xp.ones(len(running), dtype=bool)  # rows of the segment batch not yet answered
    num_pending = len(running)
    history = LabelHistory.fresh(len(running), xp)  # aligned with `running`, compacted with the rows
    # The previous exit's verdict, its segment batch's positions and which of its rows went on: where
    # the next segment is unavailable, those rows answer there instead (the deepest exit they reached).
    previous: tuple[Decision, Any, Any] | None = None

    tensors: dict[str, Any] = {n: t[running] for n, t in batch.inputs.items()}
    for index in range(num_exits):
        if num_pending == 0:
            break
        last = index == last_exit
        rows_per_segment[index] = len(running)
        try:
            hidden, logits = run_segment(index, tensors, not last)  # hidden (n, ...), logits (n, C)
        except SegmentUnavailable as outage:
            unfinished = xp.zeros(batch.rows, dtype=bool)
            unfinished[running[pending]] = True
            if previous is not None:
                decision, positions, went_on = previous
                answers.record(
                    mover, mover.split(went_on), decision, positions, index - 1, exit_costs[index - 1]
                )
                answers.flags[positions[went_on]] |= FLAG_DEGRADED
            return answers.result(rows_per_segment, str(outage), unfinished)
        decision = mover.decide(logits, index, groups_of(running), history)
        passes = decision.passes
        history = decision.history
        chosen = (answers.policy_exit[running] < 0) & (passes | last)  # (n,) the policy decides here
        answers.policy_exit[running[chosen]] = index
        answers.policy_label[running[chosen]] = decision.confidence.label[chosen]
        if last:
            leaving = pending
        elif not any_bounded:
            leaving = pending & passes
        else:
            full_depth = batch.force_full[running]
            capped = batch.max_exit[running] <= index
            late = (
                xp.zeros(len(running), dtype=bool)
                if batch.deadline is None
                else batch.deadline[running] <= clock()
            )
            leaving = passes & ~full_depth & (batch.min_exit[running] <= index)
            leaving = pending & (leaving | capped | (late & ~full_depth))
            answers.flags[running[leaving & capped & ~passes]] |= FLAG_DEPTH_CAP
            answers.flags[running[leaving & late & ~passes & ~capped]] |= FLAG_DEADLINE

        split = mover.split(leaving)
        if split.num_exited:
            answers.record(mover, split, decision, running, index, exit_costs[index])
        num_pending -= split.num_exited
        if num_pending == 0:  # the last segment always gets here: it answers every pending row
            break
        side = {name: tensors[name] for name in side_inputs}  # (n, ...) each, aligned with `running`
        previous = (decision, running, pending & ~leaving)
        if compact:
            running = mover.gather_survivors(split, running)
            hidden = mover.gather_survivors(split, hidden)
            side = {name: mover.gather_survivors(split, tensor) for name, tensor in side.items()}
            history = LabelHistory(
                mover.gather_survivors(split, history.previous), mover.gather_survivors(split, history.streak)
            )
            pending = xp.ones(split.num_survivors, dtype=bool)
        else:
            pending = pending & ~leaving
        tensors = {HIDDEN_IN: hidden, **side}

    return answers.result(rows_per_segment)
