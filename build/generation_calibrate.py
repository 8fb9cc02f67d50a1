"""The generation policy of a decoder: the draft exit and length of ``self_speculative``, from measured
acceptance and cost, and the ``confident`` thresholds, certified by Learn-then-Test.

Both are measured on next-line completion tasks from the calibration modules (``code_data``:
functions cut at a random line; complete up to the newline, at most ``max_tokens`` tokens), decoded
by the serving code itself (``offramp.backend.generation``), batched.

Draft exit, length, vocabulary and stop. Drafts need only be good guesses, so they may be chosen among
the most frequent tokens of the train modules alone (512, 1,024, 2,048, or all): a fraction of the
head's cost (FR-Spec, Zhao et al. 2025). For each exit and vocabulary, self-speculation with the
longest draft length considered records, per row and verify pass, how many drafts the full model
accepted (a) and each draft's max-prob; the first d drafts are the same whatever the draft length, so
a pass of d drafts accepts ``min(a, d)`` and commits ``min(a, d) + [a < d]`` tokens (the full
model's own where a draft disagreed). With a draft stop s, a group of b rows drafts until every row
has drafted a token under s (or d are drafted): the recorded passes of one step are cut into groups
of b rows, and each group's own draft count is replayed. The parts of a step are timed (CPU time of
the thread, the least of interleaved rounds) at batch 1 and 8: a draft pass per exit and vocabulary
(layers up to the exit and the head's rows), a verify pass per exit and draft count (the remaining
layers on that many tokens, the whole head) and a ``full`` step. The predicted speed-up of (exit, d,
vocabulary, s) at batch b is the tokens committed per row and pass times ``full(b)``, over the mean
of ``n * draft(b) + verify(n, b)`` over the passes (n each pass's draft count); the one with the best
geometric mean over the batch sizes is chosen. The prediction is recorded beside the choice; the
benchmark measures the real thing.

A served step costs more than its parts: the serving loop, a response per row through Triton, gRPC
and the client (measured on this 2-core machine: a served full step at batch 8 took 18.6-21.3 ms
against 11.4-12.0 ms of parts; the loop in process, responses built but not sent, adds only 0.2-0.5
ms), and its compute runs slower, on cores it shares with them. A pass of self-speculation pays the
per-step part once for all its tokens, so parts alone undervalue long drafts (predicted 1.28x where
1.46x was served); a constant per step alone overvalues them, since a pass has several times a full
step's compute (at batch 8, predicted 1.49-1.58x where 1.16-1.26x was served, while in process the
pass cost what its parts predict). ``draft_for_served_steps`` chooses again with every step's time
``k(b) * parts + o(b)`` (``ServedCost``), ``k`` and ``o`` through two served points at batch b
that the benchmark times on the running server: a ``full`` step and a pass of a long draft from the
deepest early exit (``served_probe``).

Confident thresholds (Learn-then-Test, ``offramp.build.risk_control``). The loss of one completion
is its token disagreement with the full model's greedy completion of the same prompt: the share of
positions, up to the longer of the two, where the tokens differ (a position only one of them has
counts as a disagreement), in [0, 1]. The risk is its expectation over prompts. Candidates are one
max-prob threshold shared by every early exit, along a fixed path from "never" (candidate 0, risk 0)
to lower and lower thresholds; they are tested in that order with Hoeffding-Bentkus p-values (the
loss is not {0, 1}) and testing stops at the first p-value above delta (fixed-sequence testing).
Every candidate before the stop is certified: with probability at least 1 - delta over the
calibration prompts, its risk is at most epsilon. The certified candidate with the least compute is
chosen, compute being the multiply-accumulates the rule spent per token over ``full``'s, counted as it
ran (``ConfidentGroup.spent``): the head's products at exits a token passed without leaving, and the
keys and values of rows that left, cost as much as the layers skipped save, so a low threshold can
cost more than ``full``. Where none costs less, "never" is chosen and ``confident`` answers as
``full`` does. Its exits score the ``confident_vocabulary`` most frequent tokens first (see
``ConfidentGroup``). Prompts are i.i.d. only as far as the functions of calibration modules are; the
test modules' figures are measured alongside to see whether it holds there.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from offramp.backend.exit_decoder import (
    NUMERICS_VERSION,
    TOKENIZER_FILE,
    ExitDecoder,
    KVCache,
    softmax_confidence,
)
from offramp.backend.generation import NEVER, DecodingSettings, GenerationEngine, Row
from offramp.backend.generation_policy import GenerationPolicy
from offramp.build.code_data import (
    CompletionTask,
    completion_tasks,
    split_modules,
    stdlib_modules,
    token_stream,
)
from offramp.build.decoder import DecoderArtifacts
from offramp.build.risk_control import hoeffding_bentkus_p_value

# Shared max-prob thresholds, most conservative first; candidate 0 never leaves early.
THRESHOLD_PATH = (NEVER, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9,
                  0.85, 0.8, 0.7, 0.6, 0.5)  # fmt: skip


@dataclass(frozen=True)
class CalibrationSettings:
    epsilon: float = 0.02  # token disagreement per completion, in expectation
    delta: float = 0.05
    max_tokens: int = 64
    stop: tuple[str, ...] = ("\n",)
    calibration_tasks: int | None = None  # None: one per function of every calibration module
    test_tasks: int = 400
    draft_lengths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10)  # ceilings, with a draft stop
    draft_vocabularies: tuple[int, ...] = (512, 1024, 2048)  # most frequent tokens drafts may choose; and all
    draft_stops: tuple[float, ...] = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # 0: never stop early
    acceptance_tasks: int = 160
    # The most frequent tokens a confident exit scores first (``ConfidentGroup``); vocabulary or more: all.
    confident_vocabulary: int = 1024
    timing_batches: tuple[int, ...] = (1, 8)
    batch: int = 64  # rows decoded together during calibration
    seed: int = 0


def load_tokenizer(directory: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(directory) / TOKENIZER_FILE))


def split_tasks(
    artifacts: DecoderArtifacts, tokenizer, settings: CalibrationSettings
) -> dict[str, list[CompletionTask]]:
    """Next-line tasks of the calibration and test modules (the build's own split, or the standard one)."""
    seed = artifacts.build.get("settings", {}).get("split_seed", 0)
    splits = split_modules(stdlib_modules(), seed)
    prompt_tokens = artifacts.context - settings.max_tokens
    tasks = {}
    for split, limit in (("calibration", settings.calibration_tasks), ("test", settings.test_tasks)):
        found = completion_tasks(splits[split], tokenizer, prompt_tokens, seed=settings.seed)
        if limit is not None and len(found) > limit:
            rng = np.random.default_rng(settings.seed)
            found = [found[i] for i in sorted(rng.choice(len(found), limit, replace=False))]
        tasks[split] = found
    return tasks


def complete(
    decoder: ExitDecoder,
    tokenizer,
    tasks: Sequence[CompletionTask],
    mode: str,
    settings: DecodingSettings,
    calibration: CalibrationSettings,
    end_of_text: int,
    on_step: Callable[[GenerationEngine], None] | None = None,
) -> list[Row]:
    """Every task completed in ``mode``, ``calibration.batch`` rows at a time (rows join as others leave)."""
    engine = GenerationEngine(decoder, settings, lambda ids: tokenizer.decode(ids), end_of_text,
                              capacity=calibration.batch)  # fmt: skip
    rows = [Row(i, tokenizer.encode(t.prompt).ids, calibration.max_tokens, mode, calibration.stop)
            for i, t in enumerate(tasks)]  # fmt: skip
    waiting = list(rows)
    with torch.inference_mode():
        while waiting or engine.running:
            room = calibration.batch - engine.running
            if waiting and room > 0:
                engine.add(waiting[:room])
                waiting = waiting[room:]
            engine.step()
            if on_step is not None:
                on_step(engine)
    return rows


def token_disagreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Share of positions, up to the longer sequence, where the two differ (or only one has a token)."""
    longest = max(len(reference), len(candidate))
    if longest == 0:
        return 0.0
    same = sum(a == b for a, b in zip(reference, candidate, strict=False))  # the longer one's tail differs
    return 1.0 - same / longest


def exact_line_match(rows: Sequence[Row], tasks: Sequence[CompletionTask]) -> float:
    """Share of completions equal to the true next line."""
    return float(np.mean([row.text == task.target for row, task in zip(rows, tasks, strict=True)]))


# --- Draft exit and length ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftPasses:
    """Verify passes of ``longest`` drafts, row by row: drafts accepted (N,) and each draft's max-prob
    (N, longest); ``steps`` (N,) numbers the engine step of each (rows of a step were drafted together)."""

    accepted: np.ndarray
    confidence: np.ndarray
    steps: np.ndarray


def draft_passes(
    decoder: ExitDecoder,
    tokenizer,
    tasks: Sequence[CompletionTask],
    draft_exit: int,
    longest: int,
    vocabulary: tuple[int, ...],
    calibration: CalibrationSettings,
    end_of_text: int,
) -> DraftPasses:
    """Self-speculation with ``longest`` drafts from ``draft_exit`` among ``vocabulary`` (empty: all) and no
    draft stop, recorded per row and pass; only passes that drafted ``longest`` (not cut by a row's
    budget) count."""
    accepted: list[int] = []
    confidence: list[tuple[float, ...]] = []
    steps: list[int] = []

    def record(engine: GenerationEngine) -> None:
        verification = engine.last_verification
        if verification is not None and verification.draft_length == longest:
            accepted.extend(verification.accepted)
            confidence.extend(verification.confidence)
            steps.extend([steps[-1] + 1 if steps else 0] * len(verification.accepted))  # this step's number

    never = (NEVER,) * (len(decoder.spec.exit_layers) - 1)
    settings = DecodingSettings(draft_exit, longest, never, vocabulary)
    complete(decoder, tokenizer, tasks, "self_speculative", settings, calibration, end_of_text, record)
    return DraftPasses(np.asarray(accepted), np.asarray(confidence).reshape(-1, longest), np.asarray(steps))


def frequent_tokens(tokenizer, vocabulary: int, seed: int) -> list[int]:
    """Every token id, the most frequent in the train modules first (ties: the lower id first)."""
    train = split_modules(stdlib_modules(), seed)["train"]
    counts = np.bincount(token_stream(train, tokenizer), minlength=vocabulary)[:vocabulary]
    return sorted(range(vocabulary), key=lambda t: (-counts[t], t))


def least_cpu_seconds(calls: dict, rounds: int = 25) -> dict:
    """Each call's least CPU time (of this thread: other processes' load does not count) over ``rounds``
    rounds that run every call once, interleaved, so that all see the same conditions."""
    best = {key: float("inf") for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            started = time.thread_time()
            call()
            best[key] = min(best[key], time.thread_time() - started)
    return best


def step_costs(
    decoder: ExitDecoder,
    batch: int,
    draft_lengths: Sequence[int],
    draft_heads: dict[int, torch.Tensor | None],
    prompt_tokens: int,
) -> dict:
    """CPU seconds of each part of a step at ``batch`` rows, on one thread, with ``prompt_tokens`` tokens
    in every row's cache (attention runs over the whole context whatever the length, so it hardly
    matters): a full step, a draft pass per exit and draft vocabulary size (``draft_heads``: size ->
    the head's rows, None for all; with the max-prob the draft stop reads), a verify pass per exit
    and draft count."""
    spec = decoder.spec
    cache = KVCache(spec, batch)
    tokens = torch.randint(0, spec.vocab, (batch, 1))
    at = torch.full((batch, 1), prompt_tokens)

    def run(first: int, stop: int, width: int, head: torch.Tensor | None = None) -> Callable[[], None]:
        def call() -> None:
            positions = at + torch.arange(width).view(1, -1)
            hidden = torch.randn(batch, width, spec.hidden) if first else decoder.embed(tokens, positions)
            hidden = decoder.layers(first, stop, hidden, cache, decoder.place(0, positions))
            softmax_confidence(decoder.exit_logits(hidden, head))

        return call

    calls = {("full",): run(0, spec.layers, 1)}
    for exit_index, layer in enumerate(spec.exit_layers[:-1]):
        calls.update(
            {("draft", exit_index, size): run(0, layer, 1, head) for size, head in draft_heads.items()}
        )
        calls.update({("verify", exit_index, d): run(layer, spec.layers, d) for d in draft_lengths})
    # One torch thread and no autograd, as the served generator runs (``triton_generator``): the costs the
    # choice weighs must be the served ones, and parts of one and of several tokens do not scale alike
    # with threads. Autograd's bookkeeping alone makes a full step slower: 4.60 against 4.18 ms at one
    # row, 10.41 against 9.92 ms at eight (the least of 40 interleaved rounds, this 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            seconds = least_cpu_seconds(calls)
    finally:
        torch.set_num_threads(threads)
    costs: dict = {"full": seconds[("full",)], "draft": {}, "verify": {}}
    for key, value in seconds.items():
        if key[0] != "full":
            costs[key[0]].setdefault(key[1], {})[key[2]] = value
    return costs


def draft_counts(passes: DraftPasses, d: int, stop: float, batch: int) -> np.ndarray:
    """(N,) drafts each recorded pass makes with draft length ``d`` and draft stop ``stop`` when the rows of
    a step are drafted ``batch`` at a time: a group drafts until every row has drafted a token under
    ``stop`` (its first such draft included), at most ``d``."""
    under = passes.confidence[:, :d] < stop  # (N, d)
    # Drafts a row alone would make: up to and including its first unsure one.
    alone = np.where(under.any(axis=1), under.argmax(axis=1) + 1, d)  # (N,)
    counts = np.empty_like(alone)
    for step in np.unique(passes.steps):
        rows = np.flatnonzero(passes.steps == step)
        for first in range(0, len(rows), batch):
            group = rows[first : first + batch]
            counts[group] = alone[group].max()
    return counts


def tokens_per_verify(accepted: np.ndarray, counts: np.ndarray | int) -> float:
    """Tokens a pass commits per row, of ``counts`` drafts: the agreeing drafts, and the full model's token
    where one disagreed (``accepted`` counts the agreeing drafts among more than ``counts``)."""
    return float(np.minimum(accepted, counts).mean() + (accepted < counts).mean())


@dataclass(frozen=True)
class ServedCost:
    """A served step's wall time from its parts' CPU time at one batch size: ``compute_factor * parts +
    per_step_s``. ``per_step_s`` is what every step pays whatever its compute (the loop, a response per
    row through Triton, gRPC, the client); ``compute_factor`` the slowing of compute itself, by the
    cores it shares with them. The parts alone: (1, 0)."""

    compute_factor: float = 1.0
    per_step_s: float = 0.0

    def seconds(self, parts_s: float) -> float:
        return self.compute_factor * parts_s + self.per_step_s


@dataclass(frozen=True)
class ServedSteps:
    """Two served steps at one batch size, wall seconds: a ``full`` step, and a pass of
    ``self_speculative`` under a known draft (exit, vocabulary size) that drafted ``drafts`` tokens on
    average."""

    full_s: float
    pass_s: float
    draft_exit: int
    vocabulary: int  # the draft vocabulary's size; 0: all tokens
    drafts: float

    def cost(self, costs: dict) -> ServedCost:
        """The :class:`ServedCost` through both points, from ``costs`` (``step_costs``) at the same batch.
        A factor under 1 (serving does not speed compute up) or a negative per-step cost is the two
        measures' noise: clamped."""
        size = self.vocabulary or max(costs["draft"][self.draft_exit])  # all tokens: the largest head
        parts_pass = pass_parts_s(costs, self.draft_exit, size, self.drafts)
        span = parts_pass - costs["full"]
        factor = (self.pass_s - self.full_s) / span if span > 0 else 1.0
        factor = max(1.0, factor)
        return ServedCost(factor, max(0.0, self.full_s - factor * costs["full"]))


def pass_parts_s(costs: dict, exit_index: int, size: int, drafts: float) -> float:
    """Parts' seconds of a pass of ``drafts`` drafts (a mean: the verify pass interpolated between the
    draft counts either side)."""
    verify = costs["verify"][exit_index]  # draft count -> seconds
    low = min(max(1, int(np.floor(drafts))), max(verify))
    high = min(low + 1, max(verify))
    share = min(max(drafts - low, 0.0), 1.0) if high > low else 0.0
    return drafts * costs["draft"][exit_index][size] + (1 - share) * verify[low] + share * verify[high]


def predicted_speedup(
    counts: np.ndarray,
    accepted: np.ndarray,
    costs: dict,
    exit_index: int,
    size: int,
    served: ServedCost = ServedCost(),
) -> float:
    """Tokens per second of passes of ``counts`` drafts (one per recorded row) over ``full``'s, each step
    of either (a pass, a full step) taking what ``served`` makes of its parts."""
    verify = costs["verify"][exit_index]  # draft count -> seconds
    seconds = counts * costs["draft"][exit_index][size] + np.array([verify[int(n)] for n in counts])
    return (
        tokens_per_verify(accepted, counts)
        * served.seconds(costs["full"])
        / served.seconds(float(seconds.mean()))
    )


@dataclass(frozen=True)
class DraftChoice:
    draft_exit: int
    draft_length: int
    vocabulary: tuple[int, ...]  # empty: all
    draft_stop: float
    record: dict  # what was measured, for the policy's provenance


def choose_draft(
    decoder: ExitDecoder,
    tokenizer,
    tasks: Sequence[CompletionTask],
    calibration: CalibrationSettings,
    end_of_text: int,
    split_seed: int,
    progress: Callable[[str], None] = print,
    served_steps: Mapping[int, ServedSteps] | None = None,
) -> DraftChoice:
    """The draft exit, length, vocabulary and stop with the best predicted speed-up (module docstring).
    ``served_steps``: batch size -> two served steps at that batch, for each of
    ``calibration.timing_batches``; every step's time is what they make of its parts
    (:class:`ServedCost`). None: the parts alone."""
    if served_steps is not None and set(served_steps) != set(calibration.timing_batches):
        raise ValueError(
            f"served steps are needed at each timing batch {list(calibration.timing_batches)}, "
            f"got {sorted(served_steps)}"
        )
    longest = max(calibration.draft_lengths)
    ranked = frequent_tokens(tokenizer, decoder.spec.vocab, split_seed)
    sizes = sorted(
        {min(k, decoder.spec.vocab) for k in calibration.draft_vocabularies} | {decoder.spec.vocab}
    )
    vocabularies = {k: () if k == decoder.spec.vocab else tuple(ranked[:k]) for k in sizes}
    heads = {k: decoder.head_of(list(v)) if v else None for k, v in vocabularies.items()}
    prompt_tokens = max(1, decoder.spec.context - calibration.max_tokens - longest - 1)
    costs = {  # a draft stop may end a pass after any number of drafts up to the longest
        b: step_costs(decoder, b, range(1, longest + 1), heads, prompt_tokens)
        for b in calibration.timing_batches
    }
    served = {b: served_steps[b].cost(costs[b]) if served_steps else ServedCost() for b in costs}
    table = []
    for exit_index in range(len(decoder.spec.exit_layers) - 1):
        for size, vocabulary in vocabularies.items():
            passes = draft_passes(
                decoder, tokenizer, tasks, exit_index, longest, vocabulary, calibration, end_of_text
            )
            accepted = passes.accepted
            progress(
                f"draft exit {exit_index} (layer {decoder.spec.exit_layers[exit_index]}), {size} tokens: "
                f"{len(accepted)} passes, mean accepted of {longest}: {accepted.mean():.2f}"
            )
            for d, stop in itertools.product(calibration.draft_lengths, calibration.draft_stops):
                counts = {b: draft_counts(passes, d, stop, b) for b in calibration.timing_batches}
                speedups = {
                    b: predicted_speedup(counts[b], accepted, costs[b], exit_index, size, served[b])
                    for b in calibration.timing_batches
                }
                alone = counts[min(calibration.timing_batches)]
                table.append(
                    {
                        "draft_exit": exit_index,
                        "draft_layer": decoder.spec.exit_layers[exit_index],
                        "draft_length": d,
                        "draft_vocabulary": size,
                        "draft_stop": stop,
                        "drafts_per_verify": {str(b): float(c.mean()) for b, c in counts.items()},
                        "acceptance_rate": float(np.minimum(accepted, alone).sum() / alone.sum()),
                        "tokens_per_verify": tokens_per_verify(accepted, alone),
                        "predicted_speedup": {str(b): s for b, s in speedups.items()},
                        "score": float(np.exp(np.mean(np.log(list(speedups.values()))))),
                    }
                )
    best = max(table, key=lambda r: r["score"])
    costs_record = {
        str(b): {
            part: {str(e): {str(k): v for k, v in by.items()} for e, by in c[part].items()}
            for part in ("draft", "verify")
        }
        | {"full": c["full"]}
        for b, c in costs.items()
    }
    record = {"table": table, "step_seconds": costs_record}
    if served_steps is not None:
        record["served_steps"] = {str(b): asdict(served_steps[b]) for b in costs}
        record["served_cost"] = {str(b): asdict(served[b]) for b in costs}
    return DraftChoice(best["draft_exit"], best["draft_length"], vocabularies[best["draft_vocabulary"]],
                       best["draft_stop"], record)  # fmt: skip


# --- Confident thresholds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateResult:
    threshold: float
    risk: float  # mean token disagreement on the calibration completions
    p_value: float
    compute: float  # multiply-accumulates spent per decoded token, over full's (module docstring)
    exit_shares: tuple[float, ...]


class ConfidentSpending:
    """``complete``'s ``on_step``: the multiply-accumulates its confident rows spent so far."""

    macs = 0

    def __call__(self, engine: GenerationEngine) -> None:
        self.macs = engine.groups["confident"].spent


def certify_thresholds(
    decoder: ExitDecoder,
    tokenizer,
    tasks: Sequence[CompletionTask],
    references: Sequence[Row],
    calibration: CalibrationSettings,
    end_of_text: int,
    check_vocabulary: tuple[int, ...] = (),
    progress: Callable[[str], None] = print,
) -> tuple[list[CandidateResult], int]:
    """Fixed-sequence Learn-then-Test along ``THRESHOLD_PATH`` (module docstring); returns every tested
    candidate and the index of the chosen one (0, "never": none certified, or none cheaper than full)."""
    exits = len(decoder.spec.exit_layers)
    results = [CandidateResult(NEVER, 0.0, 0.0, 1.0, (0.0,) * (exits - 1) + (1.0,))]
    for threshold in THRESHOLD_PATH[1:]:
        spent = ConfidentSpending()
        rows = complete(
            decoder,
            tokenizer,
            tasks,
            "confident",
            DecodingSettings(0, 1, (threshold,) * (exits - 1), check_vocabulary=check_vocabulary),
            calibration,
            end_of_text,
            on_step=spent,
        )
        losses = np.asarray(
            [token_disagreement(r.generated, c.generated) for r, c in zip(references, rows, strict=True)]
        )
        taken = np.concatenate([np.asarray(c.exits[1:], dtype=int) for c in rows if len(c.exits) > 1])
        p = float(hoeffding_bentkus_p_value(losses.mean(), len(losses), calibration.epsilon))
        shares = np.bincount(taken, minlength=exits) / max(len(taken), 1)
        # Per token of the steps (the first token of each completion is the prefill's, at full depth).
        compute = spent.macs / max(len(taken) * decoder.work.full_token, 1)
        results.append(CandidateResult(threshold, float(losses.mean()), p, float(compute),
                                       tuple(float(s) for s in shares)))  # fmt: skip
        progress(f"threshold {threshold:g}: risk {losses.mean():.4f}, p {p:.3g}, compute {compute:.3f}")
        if p > calibration.delta:
            break
    return results, cheapest_certified(results, calibration.delta)


def cheapest_certified(results: Sequence[CandidateResult], delta: float) -> int:
    """The index of the certified candidate with the least compute (the first of equals): testing stops
    at the first p-value over ``delta``, and every candidate before it is certified. Candidate 0,
    "never", costs what ``full`` does (1), so it is chosen where no certified threshold costs less."""
    certified = next((i for i, r in enumerate(results) if r.p_value > delta), len(results))
    return min(range(certified), key=lambda i: (results[i].compute, i))


def calibrate_generation(
    artifacts_dir: Path,
    calibration: CalibrationSettings = CalibrationSettings(),
    progress: Callable[[str], None] = print,
) -> GenerationPolicy:
    """The generation policy of the decoder in ``artifacts_dir`` (module docstring)."""
    started = time.time()
    artifacts = DecoderArtifacts.load(artifacts_dir)
    decoder = ExitDecoder.load(artifacts_dir)
    tokenizer = load_tokenizer(artifacts_dir)
    tasks = split_tasks(artifacts, tokenizer, calibration)
    progress(f"tasks: {len(tasks['calibration'])} calibration, {len(tasks['test'])} test")
    end = artifacts.end_of_text
    neutral = DecodingSettings(0, 1, (NEVER,) * (len(decoder.spec.exit_layers) - 1))
    full = {
        split: complete(decoder, tokenizer, t, "full", neutral, calibration, end)
        for split, t in tasks.items()
    }
    probe = tasks["calibration"][: calibration.acceptance_tasks]
    split_seed = artifacts.build.get("settings", {}).get("split_seed", 0)
    draft = choose_draft(decoder, tokenizer, probe, calibration, end, split_seed, progress)
    check_vocabulary = (
        tuple(frequent_tokens(tokenizer, decoder.spec.vocab, split_seed)[: calibration.confident_vocabulary])
        if calibration.confident_vocabulary < decoder.spec.vocab
        else ()
    )
    results, chosen = certify_thresholds(
        decoder, tokenizer, tasks["calibration"], full["calibration"], calibration, end, check_vocabulary,
        progress,
    )  # fmt: skip
    thresholds = (results[chosen].threshold,) * (len(decoder.spec.exit_layers) - 1)
    confident = DecodingSettings(0, 1, thresholds, check_vocabulary=check_vocabulary)
    test_rows = complete(decoder, tokenizer, tasks["test"], "confident", confident, calibration, end)
    test_losses = [
        token_disagreement(r.generated, c.generated) for r, c in zip(full["test"], test_rows, strict=True)
    ]
    provenance = {
        "method": "learn_then_test",
        "guarantee": (f"fixed-sequence Learn-then-Test, Hoeffding-Bentkus p-values: with probability >= "
                      f"{1 - calibration.delta:g} over the calibration completions, the expected token "
                      f"disagreement of confident with full per completion is <= {calibration.epsilon:g}"),
        "risk": "token disagreement per completion (positions up to the longer completion)",
        "epsilon": calibration.epsilon,
        "delta": calibration.delta,
        "task": f"next line (stop {list(calibration.stop)}), at most {calibration.max_tokens} tokens",
        "calibration_completions": len(tasks["calibration"]),
        "candidates": [asdict(r) for r in results],
        "chosen": chosen,
        "calibration_risk": results[chosen].risk,
        "test_completions": len(test_losses),
        "test_risk": float(np.mean(test_losses)),
        "full_exact_line_match": {split: exact_line_match(full[split], t) for split, t in tasks.items()},
        "draft": draft.record,
        "settings": asdict(calibration),
        "decoder_numerics": NUMERICS_VERSION,
        "seconds": round(time.time() - started, 1),
    }  # fmt: skip
    policy = GenerationPolicy(
        "",
        artifacts.fingerprint,
        draft.draft_exit,
        draft.draft_length,
        thresholds,
        provenance,
        draft.vocabulary,
        draft.draft_stop,
        check_vocabulary,
    )
    return policy.with_content_version("ltt")


def served_probe(policy: GenerationPolicy, calibration: CalibrationSettings, exits: int) -> GenerationPolicy:
    """The policy whose served pass, beside a served full step, gives :class:`ServedCost`: the deepest
    early exit, the longest draft, no stop. The two points must differ by much compute for the factor to
    be known: with the calibrated draft (layer 2, 1.8 drafts a pass) the pass cost 1.4 times a full step
    in parts, and the fit gave a factor of 1.5 and a per-step cost under zero (measured on the code
    model), against a factor of 1.0 in process."""
    return replace(
        policy, draft_exit=exits - 2, draft_length=max(calibration.draft_lengths), draft_stop=0.0
    ).with_content_version("probe")


def draft_for_served_steps(
    artifacts_dir: Path,
    policy: GenerationPolicy,
    served_steps: Mapping[int, ServedSteps],
    calibration: CalibrationSettings = CalibrationSettings(),
    progress: Callable[[str], None] = print,
) -> GenerationPolicy:
    """``policy`` with its draft chosen again from what serving makes of a step's parts, measured
    (``choose_draft``'s ``served_steps``), a new version; its provenance keeps the
    calibration's choice (``draft``) beside this one (``draft_served``). The thresholds stay: the
    draft settles only speed, never what ``self_speculative`` answers."""
    artifacts = DecoderArtifacts.load(artifacts_dir)
    decoder = ExitDecoder.load(artifacts_dir)
    tokenizer = load_tokenizer(artifacts_dir)
    tasks = split_tasks(artifacts, tokenizer, calibration)["calibration"][: calibration.acceptance_tasks]
    split_seed = artifacts.build.get("settings", {}).get("split_seed", 0)
    draft = choose_draft(
        decoder, tokenizer, tasks, calibration, artifacts.end_of_text, split_seed, progress, served_steps
    )
    return replace(
        policy,
        draft_exit=draft.draft_exit,
        draft_length=draft.draft_length,
        draft_vocabulary=draft.vocabulary,
        draft_stop=draft.draft_stop,
        provenance={**policy.provenance, "draft_served": draft.record},
    ).with_content_version("ltt")
