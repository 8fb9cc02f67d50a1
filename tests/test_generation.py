"""Decoding with exits on tiny random decoders (Llama- and GPT-2-shaped), no server.

The central property: ``self_speculative`` commits exactly the tokens ``full`` does, for every row,
whatever the batch it runs in, when rows join and leave, and whatever the draft exit and length.
The tiny models' late layers are scaled (damped in the Llama, amplified in the GPT-2, whose random
blocks barely move its embeddings), so that early exits agree with the last one often but not
always: drafts are accepted and rejected, in runs of every length.
"""

from __future__ import annotations

import pytest
import torch

from offramp.backend.exit_decoder import (
    DecoderSpec,
    ExitDecoder,
    KVCache,
    project,
    reproducible_gemm,
    softmax_confidence,
)
from offramp.backend.generation import (
    ALWAYS,
    FINISH_CONTEXT,
    FINISH_END_OF_TEXT,
    FINISH_MAX_TOKENS,
    FINISH_STOP,
    NEVER,
    ConfidentGroup,
    DecodingSettings,
    GenerationEngine,
    Row,
)

reproducible_gemm()  # before this process' first matrix product: MKL fixes its rounding mode there

VOCAB = 96
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789 ()=:.,+-*"
NEVER_EXIT = DecodingSettings(1, 3, (NEVER, NEVER))


def detokenize(ids: list[int]) -> str:
    """Token i is one character; 7 is a newline (a stop string in some tests)."""
    return "".join("\n" if i == 7 else LETTERS[i % len(LETTERS)] for i in ids)


def scaled(tensors: dict[str, torch.Tensor], names: list[str], factor: float) -> dict[str, torch.Tensor]:
    return {k: v * factor if any(k.endswith(n) for n in names) else v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def llama_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return config, LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return config, GPT2LMHeadModel(config).eval()


def _decoder(model, late: list[str], factor: float, exit_layers=(1, 2, 4)) -> ExitDecoder:
    config, module = model
    tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return ExitDecoder(DecoderSpec.from_config(config.to_dict(), exit_layers), scaled(tensors, late, factor))


@pytest.fixture(scope="module")
def decoders(llama_model, gpt2_model) -> dict[str, ExitDecoder]:
    llama_late = [f"layers.{i}.self_attn.o_proj.weight" for i in (2, 3)] + [
        f"layers.{i}.mlp.down_proj.weight" for i in (2, 3)
    ]
    gpt2_late = [f"h.{i}.attn.c_proj.weight" for i in (2, 3)] + [f"h.{i}.mlp.c_proj.weight" for i in (2, 3)]
    return {"llama": _decoder(llama_model, llama_late, 0.3), "gpt2": _decoder(gpt2_model, gpt2_late, 10.0)}


def prompts(count: int, seed: int, longest: int = 30) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (count,), generator=g)
    return [torch.randint(8, VOCAB, (int(n),), generator=g).tolist() for n in lengths]


def decode(
    decoder: ExitDecoder,
    rows: list[Row],
    settings: DecodingSettings = NEVER_EXIT,
    joining_per_step: int | None = None,
    clock=None,
) -> GenerationEngine:
    """Run rows to the end, ``joining_per_step`` of them joining before each step (None: all at once)."""
    kwargs = {"clock": clock} if clock else {}
    engine = GenerationEngine(decoder, settings, detokenize, end_of_text=0, capacity=2, **kwargs)
    waiting = list(rows)
    with torch.inference_mode():
        while waiting or engine.running:
            if waiting:
                count = joining_per_step or len(waiting)
                engine.add(waiting[:count])
                waiting = waiting[count:]
            engine.step()
    return engine


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_decoder_computes_what_transformers_does(family, llama_model, gpt2_model):
    config, module = llama_model if family == "llama" else gpt2_model
    decoder = ExitDecoder(DecoderSpec.from_config(config.to_dict(), (2, 4)), dict(module.state_dict()))
    ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = module(ids).logits
        positions = torch.arange(20).expand(3, 20)
        cache = KVCache(decoder.spec, 3)
        hidden = decoder.layers(0, 4, decoder.embed(ids, positions), cache, decoder.place(0, positions))
        torch.testing.assert_close(decoder.exit_logits(hidden), expected, atol=1e-5, rtol=1e-5)
        # The early exit reads the shared head after the final norm (as assistant_early_exit does).
        after_two = module(ids, output_hidden_states=True).hidden_states[2]
        final_norm = module.model.norm if family == "llama" else module.transformer.ln_f
        hidden = decoder.layers(0, 2, decoder.embed(ids, positions), cache, decoder.place(0, positions))
        torch.testing.assert_close(
            decoder.exit_logits(hidden), module.lm_head(final_norm(after_two)), atol=1e-5, rtol=1e-5
        )


def single_row_product_difference() -> float:
    """How far a one-row matrix product lands from the same row in a 24-row product (0: bitwise equal).

    Batch invariance rests on MKL's STRICT mode covering every row count; on some CPUs it does not
    cover a single row (measured 2026-12-02 on a 2-core AVX2 machine: 5.7e-6 on a 64x128 product),
    and then no decoding of one token at a time can be bitwise equal to a chunked one.
    """
    generator = torch.Generator().manual_seed(0)
    weight, rows = torch.randn(64, 128, generator=generator), torch.randn(24, 64, generator=generator)
    whole = project(rows, weight)  # the decoder's own product
    return float((project(rows[5:6], weight) - whole[5:6]).abs().max())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_row_is_bitwise_the_same_alone_batched_in_any_slot_or_chunked(family, decoders):
    difference = single_row_product_difference()
    if difference:
        pytest.skip(f"this CPU's MKL rounds a one-row product unlike a 24-row one ({difference:.1e})")
    decoder = decoders[family]
    ids = torch.randint(1, VOCAB, (5, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = KVCache(decoder.spec, 5)
        positions = torch.arange(24).expand(5, 24)
        reference = decoder.exit_logits(
            decoder.layers(0, 4, decoder.embed(ids, positions), whole, decoder.place(0, positions))
        )
        # Row 2 alone, in slot 3 of another cache, prefilled with 9 tokens and then one token at a time.
        cache = KVCache(decoder.spec, 4)
        parts = [(0, 9)] + [(t, t + 1) for t in range(9, 24)]
        logits = []
        for start, stop in parts:
            p = torch.arange(start, stop).unsqueeze(0)
            hidden = decoder.layers(0, 4, decoder.embed(ids[2:3, start:stop], p), cache, decoder.place(3, p))
            logits.append(decoder.exit_logits(hidden))
    assert torch.equal(torch.cat(logits, dim=1)[0], reference[2])


IDENTITY_PROMPTS = prompts(12, seed=4)
IDENTITY_BUDGETS = [3 + (7 * i) % 19 for i in range(len(IDENTITY_PROMPTS))]


@pytest.fixture(scope="module")
def full_alone(decoders) -> dict[str, list[list[int]]]:
    """Each identity prompt decoded alone in ``full`` mode, per family: the reference."""
    references = {}
    for family, decoder in decoders.items():
        rows = [Row(i, list(p), IDENTITY_BUDGETS[i], "full") for i, p in enumerate(IDENTITY_PROMPTS)]
        references[family] = [decode(decoder, [row]) and row.generated for row in rows]
    return references


@pytest.mark.parametrize(
    "family,draft_exit,draft_length,vocabulary,draft_stop",
    [
        ("llama", 0, 2, (), 0.0),
        ("llama", 1, 5, (), 0.0),
        ("gpt2", 1, 3, (), 0.0),
        ("llama", 1, 3, tuple(range(0, VOCAB, 2)), 0.0),  # drafts among some tokens
        ("llama", 1, 6, (), 0.5),  # drafting ends early where the drafts are unsure
    ],
)
def test_self_speculative_commits_exactly_the_tokens_of_full(
    family, draft_exit, draft_length, vocabulary, draft_stop, decoders, full_alone
):
    decoder = decoders[family]
    settings = DecodingSettings(draft_exit, draft_length, (NEVER, NEVER), vocabulary, draft_stop)
    texts, budgets = IDENTITY_PROMPTS, IDENTITY_BUDGETS

    def rows(mode: str) -> list[Row]:
        return [Row(i, list(p), budgets[i], mode) for i, p in enumerate(texts)]

    alone = full_alone[family]
    for joining in (None, 3):  # all at once; three rows joining per step while others run and leave
        speculative = rows("self_speculative")
        engine = decode(decoder, speculative, settings, joining)
        assert [r.generated for r in speculative] == alone, f"joining {joining}"
        drafted = sum(r.drafted for r in speculative)
        accepted = sum(r.accepted for r in speculative)
        assert 0 < accepted < drafted  # drafts were both kept and thrown away
        assert all(len(r.generated) == budgets[i] for i, r in enumerate(speculative))
        assert engine.running == 0
    # Mixed with rows of the other modes in the same engine: separate groups, same answers.
    mixed = [
        Row(i, list(p), budgets[i], ("self_speculative", "full", "confident")[i % 3])
        for i, p in enumerate(texts)
    ]
    decode(decoder, mixed, settings, 4)
    assert [r.generated for r in mixed] == alone


def test_drafting_ends_once_every_row_drafted_a_token_under_the_draft_stop(decoders):
    decoder = decoders["llama"]
    texts = prompts(6, seed=11)

    def passes(stop: float, rows_at_once: int) -> list:
        """Every verify pass of the self-speculative group, its rows joining ``rows_at_once`` at a time."""
        engine = GenerationEngine(
            decoder, DecodingSettings(1, 6, (NEVER, NEVER), (), stop), detokenize, end_of_text=0, capacity=2
        )
        seen = []
        waiting = [Row(i, list(p), 40, "self_speculative") for i, p in enumerate(texts)]
        with torch.inference_mode():
            while waiting or engine.running:
                if waiting and engine.running == 0:
                    engine.add(waiting[:rows_at_once])
                    waiting = waiting[rows_at_once:]
                engine.step()
                if engine.last_verification is not None:
                    seen.append(engine.last_verification)
        return seen

    free = passes(0.0, 1)
    assert {v.draft_length for v in free if len(v.confidence[0]) == 6} == {6}
    assert {v.draft_length for v in passes(1.0, 1)} == {1}  # every draft is under a max-prob of 1
    # Alone, a row drafts up to and including its first draft under the stop: the same drafts as
    # without a stop (they do not depend on how many follow), cut there.
    stop = float(torch.tensor([c for v in free for c in v.confidence[0]]).median())
    cut = passes(stop, 1)
    assert any(v.draft_length < 6 for v in cut) and any(v.draft_length > 1 for v in cut)
    for v in cut:
        unsure = [i for i, c in enumerate(v.confidence[0]) if c < stop]
        assert not unsure or v.draft_length == unsure[0] + 1
    assert any(v.draft_length == 6 for v in cut)  # sure all along
    # Batched, the group drafts on while any of its rows is still sure of its drafts.
    batched = [v for v in passes(stop, 3) if len(v.confidence) > 1]

    def first_unsure(row: tuple[float, ...]) -> int:
        return next((i + 1 for i, c in enumerate(row) if c < stop), len(row) + 1)

    assert all(max(first_unsure(row) for row in v.confidence) >= v.draft_length for v in batched)
    assert any(min(first_unsure(row) for row in v.confidence) < v.draft_length for v in batched)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_keys_values_of_skipped_layers_come_from_the_exit_state_in_one_product(family, decoders):
    decoder = decoders[family]
    hidden = torch.randn(3, 1, decoder.spec.hidden, generator=torch.Generator().manual_seed(8))
    positions = torch.tensor([[5], [17], [40]])
    placement = decoder.place(0, positions)
    layer_by_layer, at_once = KVCache(decoder.spec, 3), KVCache(decoder.spec, 3)
    with torch.inference_mode():
        for index in range(1, 4):  # each skipped layer on its own, its input the exit state
            decoder.layer(index, hidden, layer_by_layer, placement, moving=torch.zeros(0, dtype=torch.long))
        decoder.fill_keys_values(1, hidden, at_once, placement)
    torch.testing.assert_close(at_once.keys, layer_by_layer.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(at_once.values, layer_by_layer.values, atol=1e-5, rtol=1e-5)
    assert at_once.keys[1:, 1, :, 17].abs().sum() > 0 and at_once.keys[0].abs().sum() == 0


def test_confident_thresholds_decide_the_exit(decoders):
    decoder = decoders["llama"]
    texts = prompts(6, seed=5)
    reference = [Row(i, list(p), 12, "full") for i, p in enumerate(texts)]
    decode(decoder, reference)
    never = [Row(i, list(p), 12, "confident") for i, p in enumerate(texts)]
    decode(decoder, never, DecodingSettings(1, 3, (NEVER, NEVER)))
    assert [r.generated for r in never] == [r.generated for r in reference]
    assert all(set(r.exits) == {2} for r in never)
    first = [Row(i, list(p), 12, "confident") for i, p in enumerate(texts)]
    decode(decoder, first, DecodingSettings(1, 3, (ALWAYS, NEVER)))
    # The first token comes from the prefill's full depth; every later one from the first exit.
    assert all(r.exits == [2] + [0] * 11 for r in first)
    assert [r.generated for r in first] != [r.generated for r in reference]
    # A threshold at the median first-exit confidence of the reference tokens: some leave early, some not.
    with torch.inference_mode():
        ids = torch.tensor([r.generated[:8] for r in reference])
        positions = torch.arange(8).expand(len(reference), 8)
        cache = KVCache(decoder.spec, len(reference))
        hidden = decoder.layers(0, 1, decoder.embed(ids, positions), cache, decoder.place(0, positions))
        median = float(softmax_confidence(decoder.exit_logits(hidden))[0].median())
    middle = [Row(i, list(p), 12, "confident") for i, p in enumerate(texts)]
    decode(decoder, middle, DecodingSettings(1, 3, (median, median)))
    exits = {e for r in middle for e in r.exits[1:]}
    assert len(exits) >= 2


def confident_step(decoder: ExitDecoder, texts, thresholds, check_vocabulary=()):
    """Prefill ``texts`` as one confident group and take one step: each row's (token, exit), the
    multiply-accumulates the step spent, and each row's max-prob at the first exit."""
    group = ConfidentGroup(decoder, thresholds, len(texts), check_vocabulary)
    rows = [Row(i, list(p), 4, "confident") for i, p in enumerate(texts)]
    with torch.inference_mode():
        for row in rows:
            group.admit(row)
        for row, token in zip(rows, group.prefill(rows), strict=True):
            row.generated.append(token)
        positions = group._positions()
        scratch = KVCache(decoder.spec, len(rows))
        hidden = decoder.layers(0, decoder.spec.exit_layers[0], decoder.embed(group._pending(), positions),
                                scratch, decoder.place(0, positions))  # fmt: skip
        first_exit = softmax_confidence(decoder.exit_logits(hidden[:, 0]))[0]
        taken = [(tokens[0], exits[0]) for _, tokens, exits in group.step()]
    return taken, group.spent, first_exit


def test_an_exit_scores_its_check_vocabulary_first_and_lets_only_the_same_tokens_leave(decoders):
    decoder = decoders["llama"]
    texts = prompts(16, seed=5)
    _, _, first_exit = confident_step(decoder, texts, (NEVER, NEVER))
    median = float(first_exit.median())  # some rows leave at the first exit, some go on
    alone, _, _ = confident_step(decoder, texts, (median, median))
    assert 0 < sum(e == 0 for _, e in alone) < len(texts)
    everything, _, _ = confident_step(decoder, texts, (median, median), tuple(range(VOCAB)))
    assert everything == alone  # a check over every token decides nothing the full product does not
    # Over a third of the tokens: a row leaves at an exit only where the one-stage rule lets it, with
    # the same token; where the exit's argmax is outside the check it may go on.
    checked, _, _ = confident_step(decoder, texts, (median, median), tuple(range(8, 40)))
    for (token, exit_index), (token_alone, exit_alone) in zip(checked, alone, strict=True):
        assert exit_index >= exit_alone
        assert exit_index > exit_alone or token == token_alone


def test_confident_counts_the_work_it_does(decoders):
    """``spent`` per step of n rows (exits after layers 1, 2 and 4 of 4), in multiply-accumulates."""
    decoder = decoders["llama"]
    work, n, hidden = decoder.work, 6, decoder.spec.hidden
    texts = prompts(n, seed=7)
    assert work.full_token == 4 * (work.projections + work.rest_of_layer) + hidden * VOCAB
    _, never, _ = confident_step(decoder, texts, (NEVER, NEVER))
    assert never == n * work.full_token  # exits never asked cost nothing: full's work exactly
    # Thresholds no max-prob reaches (1.0) ask both early exits and let nobody leave: every row pays
    # its checks on top of full's work, the whole head each or a check vocabulary of 8 tokens each
    # (its max-prob is well under 1, so no full product follows).
    _, unchecked, _ = confident_step(decoder, texts, (1.0, 1.0))
    assert unchecked == n * (work.full_token + 2 * hidden * VOCAB)
    _, checked, _ = confident_step(decoder, texts, (1.0, 1.0), tuple(range(8, 16)))
    assert checked == n * (work.full_token + 2 * hidden * 8)
    # Every row leaves at the first exit: one layer, the head once, and the keys and values of the
    # three layers it skips, in one product.
    _, first, _ = confident_step(decoder, texts, (ALWAYS, NEVER))
    assert first == n * (work.projections + work.rest_of_layer + hidden * VOCAB + 3 * work.keys_values)


def test_a_row_near_its_budget_does_not_shorten_the_pass_of_the_others(decoders):
    decoder = decoders["llama"]
    prompts_and_budgets = list(zip(prompts(2, seed=5), (3, 24), strict=True))
    references = [Row(i, list(p), budget, "full") for i, (p, budget) in enumerate(prompts_and_budgets)]
    decode(decoder, references)
    engine = GenerationEngine(decoder, DecodingSettings(1, 5, (NEVER, NEVER)), detokenize, end_of_text=0)
    rows = [Row(i, list(p), b, "self_speculative") for i, (p, b) in enumerate(prompts_and_budgets)]
    lengths = []
    with torch.inference_mode():
        engine.add(rows)
        while engine.running:
            engine.step()
            if engine.last_verification is not None:
                lengths.append(engine.last_verification.draft_length)
    # The first row has 2 tokens left after its prefill's: its pass drafts 5 all the same, and it
    # commits no more than its budget; the tokens are full's.
    assert lengths[0] == 5
    assert [r.generated for r in rows] == [r.generated for r in references]
    assert rows[0].finish_reason == FINISH_MAX_TOKENS and len(rows[0].generated) == 3


def test_rows_finish_on_their_own(decoders):
    decoder = decoders["llama"]
    texts = prompts(8, seed=6)
    probe = [Row(i, list(p), 20, "full") for i, p in enumerate(texts)]
    decode(decoder, probe)
    # A stop string taken from each row's own completion (its 5th..6th characters) ends it there.
    stops = [detokenize(r.generated)[4:6] for r in probe]
    rows = [Row(i, list(p), 20, "self_speculative", (stops[i],)) for i, p in enumerate(texts)]
    decode(decoder, rows, joining_per_step=3)
    for row, full in zip(rows, probe, strict=True):
        whole = detokenize(full.generated)
        assert row.finish_reason == FINISH_STOP
        assert row.text == whole[: whole.index(row.stop[0])]
    # The end-of-text token ends a row without entering its text; the context ends the longest.
    end = Row(0, list(texts[0]), 20, "full")
    decoder_end = GenerationEngine(decoder, DecodingSettings(1, 3, (NEVER, NEVER)), detokenize,
                                   end_of_text=probe[0].generated[2])  # fmt: skip
    with torch.inference_mode():
        decoder_end.add([end])
        while decoder_end.running:
            decoder_end.step()
    assert end.finish_reason == FINISH_END_OF_TEXT and end.generated == probe[0].generated[:2]
    long = Row(1, list(range(8, 8 + 60)), 20, "self_speculative")
    decode(decoder, [long])
    assert (
        long.finish_reason == FINISH_CONTEXT
        and len(long.prompt) + len(long.generated) == decoder.spec.context
    )
    assert probe[0].finish_reason == FINISH_MAX_TOKENS


def test_a_deadline_finishes_the_row_at_the_cheapest_exit(decoders):
    decoder = decoders["llama"]
    now = [0.0]
    texts = prompts(4, seed=7)
    rows = [
        Row(i, list(p), 16, mode, deadline=None if i == 0 else 1.0)
        for i, (p, mode) in enumerate(
            zip(texts, ["self_speculative", "self_speculative", "full", "confident"], strict=True)
        )
    ]
    engine = GenerationEngine(decoder, DecodingSettings(1, 3, (NEVER, NEVER)), detokenize, end_of_text=0,
                              clock=lambda: now[0])  # fmt: skip
    with torch.inference_mode():
        engine.add(rows)
        for _ in range(2):
            engine.step()
        now[0] = 2.0  # past the deadline of rows 1-3
        while engine.running:
            engine.step()
    assert not rows[0].past_deadline and set(rows[0].exits) == {2}
    for row in rows[1:]:
        assert row.past_deadline
        cut = row.exits.index(0)
        assert set(row.exits[:cut]) == {2} and set(row.exits[cut:]) == {0}
        assert len(row.generated) == 16
