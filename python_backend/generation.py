"""Decoding with exits at batch > 1: rows that join and leave a running batch between steps.

Three modes, all greedy, all over a KV cache (``offramp.backend.exit_decoder``, whose docstring has the
cache layout and why rows are batch-invariant):

- ``full``: one token per row per step through every layer: the baseline.
- ``self_speculative`` (LayerSkip's self-speculation, at batch > 1): each row drafts ``d`` tokens
  with the first ``E`` layers and the shared head (the keys and values those passes store in layers
  ``< E`` are the ones the full model would store), then one verify pass runs layers ``E..L-1`` on the
  ``d`` layer-``E`` states the draft passes saved (the pending token and the first ``d - 1`` drafts)
  and reads the full model's next token after each, which checks all ``d`` drafts. ``d`` is at most the
  draft length, and less where the drafts stop being confident: once every row of the group has
  drafted a token whose max-prob (over the draft vocabulary) is under the draft stop, drafting ends
  (a draft the exit is unsure of is seldom accepted, and the ones after it even less). A row accepts its
  longest prefix of drafts that agree and, where one disagrees, the full model's token instead, so a
  verify pass commits 1 to ``d`` tokens per row, each row its own count. The committed tokens are the
  full model's greedy tokens, bitwise: every number the verify pass reads is the number a ``full``
  step would have computed. Keys and values stored for rejected drafts lie past the row's new
  length, masked until overwritten.
- ``confident`` (CALM, Schuster et al. 2022): each token leaves at the first exit whose max-prob
  passes that exit's threshold (thresholds certified by Learn-then-Test, see
  ``offramp.build.generation_calibrate``); the last exit always answers. A row that left stops moving
  through the layers, but the layers it skipped still need its keys and values for later tokens:
  they are computed from its exit state (CALM's state propagation). Faster than ``full`` and not
  identical to it, by as much as the certified risk allows.

A running batch is a :class:`RowGroup` per mode (a cache and its rows in slots ``[0, B)``). A step of
:class:`GenerationEngine` steps every group that has rows. New rows are prefilled (their prompts
through every layer, batched per group) and join between steps; finished rows leave at once.
A row whose deadline passed finishes at the cheapest exit: every further token is taken at the
first exit, whatever its confidence (such a row moves to the confident group with that rule).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from offramp.backend.exit_decoder import ExitDecoder, KVCache, softmax_confidence

MODES = ("full", "self_speculative", "confident")
FINISH_STOP = "stop"  # a stop string appeared (it is not part of the text)
FINISH_MAX_TOKENS = "length"  # max_tokens generated
FINISH_END_OF_TEXT = "end_of_text"  # the model produced its end-of-text token
FINISH_CONTEXT = "context"  # prompt and completion filled the context
NEVER = 2.0  # a max-prob threshold no token passes
ALWAYS = -1.0  # one every token passes


@dataclass
class Row:
    """One sequence being generated: what was asked, and where it stands."""

    key: Any  # the caller's handle
    prompt: list[int]
    max_tokens: int
    mode: str
    stop: tuple[str, ...] = ()
    deadline: float | None = None  # on the engine's clock
    generated: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)  # per generated token: the exit that chose it
    text: str = ""  # the completion's text so far (a stop string cut off)
    emitted: int = 0  # characters of ``text`` handed out
    length: int = 0  # tokens of this row in its group's cache
    finish_reason: str | None = None
    past_deadline: bool = False
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0

    @property
    def pending(self) -> int:
        """The last committed token: its keys and values are not in the cache yet."""
        return self.generated[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Emitted:
    """What one row produced in one engine call: tokens, their exits, new text, and whether it finished."""

    row: Row
    tokens: list[int]
    exits: list[int]
    text: str
    finished: bool


class RowGroup:
    """Rows of one mode decoded together: a KV cache and its rows, ``rows[i]`` in slot ``i``."""

    def __init__(self, decoder: ExitDecoder, capacity: int = 8) -> None:
        self.decoder = decoder
        self.cache = KVCache(decoder.spec, capacity)
        self.rows: list[Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, row: Row) -> int:
        """Give ``row`` the next slot; returns it."""
        slot = len(self.rows)
        self.cache.ensure(slot + 1)
        self.rows.append(row)
        return slot

    def remove(self, row: Row) -> None:
        """Free ``row``'s slot: the last row moves into it, so the rows stay in slots ``[0, B)``."""
        slot = self.rows.index(row)
        last = len(self.rows) - 1
        if slot != last:
            self.cache.move(last, slot)
            self.rows[slot] = self.rows[last]
        self.rows.pop()

    def adopt(self, row: Row, source: RowGroup) -> None:
        """Take ``row`` over from another group of the same decoder, with its cache."""
        slot = self.admit(row)
        old = source.rows.index(row)
        self.cache.keys[:, slot] = source.cache.keys[:, old]
        self.cache.values[:, slot] = source.cache.values[:, old]
        source.remove(row)

    def prefill(self, rows: Sequence[Row]) -> list[int]:
        """Run the (just admitted, last) ``rows``' prompts through every layer, batched with right padding
        (padding's keys and values lie past each row's length); returns each row's first token, the
        full model's."""
        decoder = self.decoder
        first = len(self.rows) - len(rows)
        longest = max(len(r.prompt) for r in rows)
        tokens = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row.prompt)] = torch.tensor(row.prompt)
        positions = torch.arange(longest).expand(len(rows), longest)
        placement = decoder.place(first, positions)
        hidden = decoder.layers(
            0, decoder.spec.layers, decoder.embed(tokens, positions), self.cache, placement
        )
        last = torch.tensor([len(r.prompt) - 1 for r in rows])
        logits = decoder.exit_logits(hidden[torch.arange(len(rows)), last])  # (n, V)
        for row in rows:
            row.length = len(row.prompt)
        return logits.argmax(dim=-1).tolist()

    def _positions(self) -> torch.Tensor:
        return torch.tensor([[r.length] for r in self.rows])  # (B, 1)

    def _pending(self) -> torch.Tensor:
        return torch.tensor([[r.pending] for r in self.rows])  # (B, 1)

    def step(self) -> list[tuple[Row, list[int], list[int]]]:
        """One step of every row: (row, committed tokens, their exits) each; advances ``row.length``."""
        raise NotImplementedError

    def full_depth_step(self) -> list[tuple[Row, list[int], list[int]]]:
        """``full``'s step: the pending token of every row through every layer; the last exit picks the
        next."""
        decoder = self.decoder
        positions = self._positions()
        embedded = decoder.embed(self._pending(), positions)
        hidden = decoder.layers(0, decoder.spec.layers, embedded, self.cache, decoder.place(0, positions))
        tokens = decoder.exit_logits(hidden[:, 0]).argmax(dim=-1).tolist()
        last_exit = decoder.spec.last_exit
        for row in self.rows:
            row.length += 1
        return [(row, [token], [last_exit]) for row, token in zip(self.rows, tokens, strict=True)]


class FullGroup(RowGroup):
    """``full``: ordinary greedy decoding, every token at full depth."""

    def step(self) -> list[tuple[Row, list[int], list[int]]]:
        return self.full_depth_step()


@dataclass(frozen=True)
class Verification:
    """One step of the self-speculative group: drafts per row, and each row's accepted drafts."""

    draft_length: int
    accepted: tuple[int, ...]  # per row verified
    confidence: tuple[tuple[float, ...], ...]  # per row, each draft's max-prob over the draft vocabulary


class SpeculativeGroup(RowGroup):
    """``self_speculative``: drafts from exit ``draft_exit``, verified by the rest of the model."""

    def __init__(
        self,
        decoder: ExitDecoder,
        draft_exit: int,
        draft_length: int,
        capacity: int = 8,
        draft_vocabulary: Sequence[int] = (),
        draft_stop: float = 0.0,
    ) -> None:
        super().__init__(decoder, capacity)
        if not 0 <= draft_exit < len(decoder.spec.exit_layers) - 1:
            raise ValueError(
                f"draft exit {draft_exit} must be an early exit (0..{len(decoder.spec.exit_layers) - 2})"
            )
        if draft_length < 1:
            raise ValueError("draft length must be at least 1")
        if not 0.0 <= draft_stop <= 1.0:
            raise ValueError(f"draft stop {draft_stop} is not a max-prob in [0, 1]")
        self.draft_stop = draft_stop
        self.draft_layer = decoder.spec.exit_layers[draft_exit]
        self.draft_length = draft_length
        # Drafts only need to be good guesses (the verify pass decides), so they may come from the head's
        # rows of the most frequent tokens alone: a fraction of the head's cost, a few rare tokens
        # never drafted (FR-Spec's frequency-ranked drafting). Empty: the whole vocabulary.
        self.draft_tokens = (
            torch.tensor(list(draft_vocabulary), dtype=torch.long) if draft_vocabulary else None
        )
        self.draft_head = None if self.draft_tokens is None else decoder.head_of(self.draft_tokens)
        self.last_pass: Verification | None = None

    def _draft(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H) states at the draft exit -> (B, 1) the next token of each row, (B,) its max-prob."""
        confidence, best = softmax_confidence(self.decoder.exit_logits(hidden, self.draft_head))
        best = best.unsqueeze(-1)
        return (best if self.draft_tokens is None else self.draft_tokens[best]), confidence

    def step(self) -> list[tuple[Row, list[int], list[int]]]:
        decoder = self.decoder
        spec = decoder.spec
        # d draft passes run the pending token and the first d - 1 drafts through the first E layers,
        # each proposing the next token; the verify pass runs the other layers on those d saved states
        # and reads the full model's token after each, which checks the d drafts. A row commits its
        # agreeing drafts and, at its first disagreement, the full model's own token instead. (The
        # last draft is checked without being run: when every draft agrees it becomes the pending
        # token, so no pass is spent storing its keys.) Drafts never pass a row's room in the context,
        # where its keys and values are stored. A row's token budget does not cut the pass: the row
        # commits no further than it (``GenerationEngine._commit``), and in a running batch some row
        # is nearly always near its end, which cut every row's pass to 4.4 of 6 drafts on 64-token
        # completions at concurrency 8 (measured on the code model).
        room = min(_context_room(row, spec.context) for row in self.rows)
        drafts_allowed = max(1, min(self.draft_length, room))
        start = self._positions()  # (B, 1)
        fed = self._pending()  # (B, 1)
        states, drafts, confidences = [], [], []
        unsure = torch.zeros(len(self.rows), dtype=torch.bool)  # (B,): drafted under the draft stop
        for i in range(drafts_allowed):
            positions = start + i
            hidden = decoder.layers(0, self.draft_layer, decoder.embed(fed, positions), self.cache,
                                    decoder.place(0, positions))  # fmt: skip
            states.append(hidden)  # (B, 1, H): the verify pass starts here
            fed, confidence = self._draft(hidden[:, 0])  # (B, 1), (B,)
            drafts.append(fed)
            confidences.append(confidence)
            unsure |= confidence < self.draft_stop
            if bool(unsure.all()):
                break
        drafts_wanted = len(drafts)
        positions = start + torch.arange(drafts_wanted).view(1, -1)  # (B, d)
        hidden = decoder.layers(self.draft_layer, spec.layers, torch.cat(states, dim=1), self.cache,
                                decoder.place(0, positions))  # fmt: skip
        verified = decoder.exit_logits(hidden).argmax(dim=-1)  # (B, d): the full model's next tokens
        drafted = torch.cat(drafts, dim=1)  # (B, d)
        accepted = torch.cumprod((drafted == verified).int(), dim=1).sum(dim=1).tolist()
        drafted_confidence = torch.stack(confidences, dim=1).tolist()  # (B, d)
        self.last_pass = Verification(drafts_wanted, tuple(accepted), tuple(map(tuple, drafted_confidence)))
        last_exit = spec.last_exit
        committed = []
        for row, count, proposed, checked in zip(
            self.rows, accepted, drafted.tolist(), verified.tolist(), strict=True
        ):
            tokens = proposed[:count] + ([checked[count]] if count < drafts_wanted else [])
            row.length += 1 + min(count, drafts_wanted - 1)  # the pending token and the agreeing drafts run
            row.drafted += drafts_wanted
            row.accepted += count
            row.verify_passes += 1
            committed.append((row, tokens, [last_exit] * len(tokens)))
        return committed


class ConfidentGroup(RowGroup):
    """``confident``: a token leaves at the first exit whose threshold its max-prob passes.

    Scoring the whole vocabulary at every exit a token passes costs the head's product each time (on
    the code model a step's head is most of a layer), and most tokens go on. With ``check_vocabulary``
    (the most frequent tokens) an exit first scores those alone: where the exit's argmax is among them,
    their softmax puts at least as much mass on it as the whole vocabulary's does, so a token under its
    threshold there is under it over the whole vocabulary too and goes on without the full product. A
    token over it is scored over the whole vocabulary, which decides, as without the check. So a token
    leaves only where the one-stage rule would let it, with the same token; it may go on where the
    one-stage rule would let it leave if the exit's argmax is a rarer token (the calibration certifies
    the rule as it runs, this included).

    ``spent`` counts the multiply-accumulates of every step (:class:`TokenWork`), to set a threshold's
    cost against ``full``'s from what the rule really did: checks that did not let a token leave, and
    keys and values of rows that left, included.
    """

    def __init__(
        self,
        decoder: ExitDecoder,
        thresholds: Sequence[float],
        capacity: int = 8,
        check_vocabulary: Sequence[int] = (),
    ) -> None:
        super().__init__(decoder, capacity)
        early = len(decoder.spec.exit_layers) - 1
        if len(thresholds) != early:
            raise ValueError(f"{len(thresholds)} thresholds for {early} early exits")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.cheapest = (ALWAYS,) + (NEVER,) * (early - 1)  # past a deadline: every token at the first exit
        self.check_head = decoder.head_of(list(check_vocabulary)) if check_vocabulary else None
        # A policy whose calibration found no threshold cheaper than full sets every one to NEVER.
        self.never_leaves = all(t > 1.0 for t in self.thresholds)
        self.work = decoder.work
        self.spent = 0  # multiply-accumulates of every step so far

    def _leaving(self, hidden: torch.Tensor, asked: torch.Tensor, thresholds: torch.Tensor):
        """Of the ``asked`` rows of (n, 1, H) ``hidden`` at an exit with their (len(asked),) thresholds:
        the ones that leave (indices into ``asked``) and their tokens."""
        decoder, work = self.decoder, self.work
        if self.check_head is not None:
            self.spent += len(asked) * work.head_per_entry * self.check_head.shape[1]
            bound, _ = softmax_confidence(decoder.exit_logits(hidden[asked, 0], self.check_head))
            kept = torch.nonzero(bound >= thresholds).flatten()
        else:
            kept = torch.arange(len(asked))
        if len(kept) == 0:
            return kept, kept
        self.spent += len(kept) * work.head_per_entry * work.vocabulary
        confidence, chosen = softmax_confidence(decoder.exit_logits(hidden[asked[kept], 0]))
        passed = confidence >= thresholds[kept]
        return kept[passed], chosen[passed]

    def step(self) -> list[tuple[Row, list[int], list[int]]]:
        decoder, work = self.decoder, self.work
        spec = decoder.spec
        n = len(self.rows)
        if self.never_leaves and not any(r.past_deadline for r in self.rows):
            # No exit can let a token leave: full's step without the exits' bookkeeping, which cost
            # 7% of full's step at batch 1 and 2.5% at batch 8 on the code model (in process, medians
            # of 9 shuffled rounds; 0.99 and 1.01 of full's with this path).
            self.spent += n * work.full_token
            return self.full_depth_step()
        positions = self._positions()
        rules = torch.tensor(
            [self.cheapest if r.past_deadline else self.thresholds for r in self.rows]
        )  # (B, E-1)
        tokens = torch.zeros(n, dtype=torch.long)
        exits = torch.full((n,), spec.last_exit, dtype=torch.long)
        moving = torch.arange(n)
        placement = decoder.place(0, positions)
        hidden = decoder.embed(self._pending(), positions)
        exit_at = {layer: index for index, layer in enumerate(spec.exit_layers[:-1])}
        # Rows past their deadline never go deeper again: once only they are left, the layers they
        # skip need no keys and values for them.
        all_past_deadline = all(r.past_deadline for r in self.rows)
        for index in range(spec.layers):
            if len(moving) == 0:  # every row left: the layers left only store keys and values, in one product
                if not all_past_deadline:
                    decoder.fill_keys_values(index, hidden, self.cache, placement)
                    self.spent += n * (spec.layers - index) * work.keys_values
                break
            hidden = decoder.layer(index, hidden, self.cache, placement, None if len(moving) == n else moving)
            self.spent += n * work.projections + len(moving) * work.rest_of_layer
            exit_index = exit_at.get(index + 1)
            if exit_index is None:
                continue
            threshold = rules[moving, exit_index]
            asked = moving[threshold <= 1.0]  # rows whose rule can pass here; the others skip the head
            if len(asked) == 0:
                continue
            leaving, chosen = self._leaving(hidden, asked, rules[asked, exit_index])
            tokens[asked[leaving]] = chosen
            exits[asked[leaving]] = exit_index
            moving = moving[~torch.isin(moving, asked[leaving])]
        if len(moving):
            tokens[moving] = decoder.exit_logits(hidden[moving, 0]).argmax(dim=-1)
            self.spent += len(moving) * work.head_per_entry * work.vocabulary
        for row in self.rows:
            row.length += 1
        return [(row, [t], [e]) for row, t, e in zip(self.rows, tokens.tolist(), exits.tolist(), strict=True)]


def _context_room(row: Row, context: int) -> int:
    """How many more tokens the context holds for ``row``."""
    return context - len(row.prompt) - len(row.generated)


@dataclass(frozen=True)
class DecodingSettings:
    """What the modes need beyond the model: the draft exit and length, the confident thresholds."""

    draft_exit: int
    draft_length: int
    thresholds: tuple[float, ...]  # max-prob threshold per early exit (NEVER: no exit there)
    draft_vocabulary: tuple[int, ...] = ()  # the tokens drafts are chosen among; empty: all
    draft_stop: float = 0.0  # drafting ends once every row drafted a token under this max-prob; 0: never
    check_vocabulary: tuple[int, ...] = ()  # confident: the tokens an exit scores first; empty: all


class GenerationEngine:
    """The running batch of every mode, stepped together; pure logic over an :class:`ExitDecoder`.

    ``detokenize`` turns token ids into text (for stop strings); ``clock`` gives the time deadlines
    are expressed in.
    """

    def __init__(
        self,
        decoder: ExitDecoder,
        settings: DecodingSettings,
        detokenize: Callable[[list[int]], str],
        end_of_text: int,
        clock: Callable[[], float] = time.monotonic,
        capacity: int = 8,
    ) -> None:
        self.decoder = decoder
        self.detokenize = detokenize
        self.end_of_text = end_of_text
        self.clock = clock
        self.groups: dict[str, RowGroup] = {
            "full": FullGroup(decoder, capacity),
            "self_speculative": SpeculativeGroup(
                decoder,
                settings.draft_exit,
                settings.draft_length,
                capacity,
                settings.draft_vocabulary,
                settings.draft_stop,
            ),
            "confident": ConfidentGroup(decoder, settings.thresholds, capacity, settings.check_vocabulary),
        }
        self.last_verification: Verification | None = None

    @property
    def running(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def rows(self) -> list[Row]:
        return [row for group in self.groups.values() for row in group.rows]

    def add(self, rows: Sequence[Row]) -> list[Emitted]:
        """Prefill ``rows`` (batched per mode) and let them join; returns their first tokens."""
        context = self.decoder.spec.context
        for row in rows:
            if row.mode not in MODES:
                raise ValueError(f"unknown mode {row.mode!r}; expected one of {MODES}")
            if not 0 < len(row.prompt) < context:
                raise ValueError(f"a prompt of {len(row.prompt)} tokens does not fit a context of {context}")
            if row.max_tokens < 1:
                raise ValueError("max_tokens must be at least 1")
        emitted = []
        last_exit = self.decoder.spec.last_exit
        for mode, group in self.groups.items():
            joining = [r for r in rows if r.mode == mode]
            if not joining:
                continue
            for row in joining:
                group.admit(row)
            for row, token in zip(joining, group.prefill(joining), strict=True):
                emitted.append(self._commit(group, row, [token], [last_exit]))
        return emitted

    def step(self) -> list[Emitted]:
        """One step of every group with rows; rows past their deadline move to the cheapest exit first.
        ``last_verification`` then says what the self-speculative group did (None: it did not step)."""
        self._apply_deadlines()
        emitted = []
        self.last_verification = None
        for group in self.groups.values():
            if not group.rows:
                continue
            for row, tokens, exits in group.step():
                emitted.append(self._commit(group, row, tokens, exits))
            if isinstance(group, SpeculativeGroup):
                self.last_verification = group.last_pass
        return emitted

    def cancel(self, row: Row) -> None:
        """Drop a row that has not finished (its client went away)."""
        for group in self.groups.values():
            if row in group.rows:
                group.remove(row)

    def _apply_deadlines(self) -> None:
        now = self.clock()
        confident = self.groups["confident"]
        for group in self.groups.values():
            for row in list(group.rows):
                if row.deadline is None or row.past_deadline or now < row.deadline:
                    continue
                row.past_deadline = True
                if group is not confident:
                    confident.adopt(row, group)

    def _commit(self, group: RowGroup, row: Row, tokens: list[int], exits: list[int]) -> Emitted:
        """Append tokens one by one until the row finishes; text and stop strings; leave when done."""
        taken_tokens, taken_exits = [], []
        context = self.decoder.spec.context
        for token, exit_index in zip(tokens, exits, strict=True):
            if token == self.end_of_text:
                row.finish_reason = FINISH_END_OF_TEXT
                break
            row.generated.append(token)
            row.exits.append(exit_index)
            taken_tokens.append(token)
            taken_exits.append(exit_index)
            row.text = self.detokenize(row.generated)
            cut = _first_stop(row.text, row.stop, row.emitted)
            if cut is not None:
                row.text = row.text[:cut]
                row.finish_reason = FINISH_STOP
                break
            if len(row.generated) >= row.max_tokens:
                row.finish_reason = FINISH_MAX_TOKENS
                break
            if len(row.prompt) + len(row.generated) >= context:
                row.finish_reason = FINISH_CONTEXT
                break
        if row.finished:
            group.remove(row)
        text = row.text[row.emitted : len(row.text) if row.finished else _stable_end(row.text, row.stop)]
        row.emitted += len(text)
        return Emitted(row, taken_tokens, taken_exits, text, row.finished)


def _first_stop(text: str, stops: Sequence[str], searched_from: int) -> int | None:
    """Where the earliest stop string starts in ``text`` (None: none does). Text already handed out
    held none, so the search starts where a stop could still begin."""
    found = None
    for stop in stops:
        index = text.find(stop, max(0, searched_from - len(stop) + 1))
        if index >= 0 and (found is None or index < found):
            found = index
    return found


def _stable_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be handed out: not a trailing partial UTF-8 character (decoded as
    U+FFFD), nor a tail that could be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[end - size : end] == stop[:size]:
                held = max(held, size)
                break
    return end - held
