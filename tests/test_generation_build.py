"""The code model's data, training, checkpoint import and the calibration's measures (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from offramp.backend.exit_decoder import ExitDecoder, reproducible_gemm
from offramp.backend.generation_policy import GenerationPolicy
from offramp.build.code_data import (
    SourceModule,
    completion_tasks,
    split_modules,
    stdlib_modules,
    token_stream,
)
from offramp.build.decoder import (
    DecoderArtifacts,
    DecoderShape,
    ExitTraining,
    exit_logits_of,
    import_checkpoint,
    layer_keep_probabilities,
    tiny_random_checkpoint,
    train_code_model,
    training_report,
)
from offramp.build.generation_calibrate import (
    CalibrationSettings,
    CandidateResult,
    DraftPasses,
    ServedCost,
    ServedSteps,
    cheapest_certified,
    choose_draft,
    draft_counts,
    pass_parts_s,
    predicted_speedup,
    served_probe,
    token_disagreement,
    tokens_per_verify,
)
from tests.generation_support import tiny_tokenizer

reproducible_gemm()  # before this process' first matrix product: MKL fixes its rounding mode there


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_modules_split_disjointly_seeded_and_stably():
    modules = [SourceModule(f"pkg.m{i}", Path(f"m{i}.py"), "x = 1\n") for i in range(300)]
    splits = split_modules(modules, seed=0)
    names = [{m.name for m in part} for part in splits.values()]
    assert sum(len(n) for n in names) == 300 and not (
        names[0] & names[1] or names[0] & names[2] or names[1] & names[2]
    )
    assert 0.7 < len(splits["train"]) / 300 < 0.9
    # A module keeps its split when others go, and another seed splits otherwise.
    fewer = split_modules(modules[::3], seed=0)
    assert all(m.name in {x.name for x in splits[split]} for split, part in fewer.items() for m in part)
    assert split_modules(modules, seed=1)["test"] != splits["test"]


def test_the_standard_library_is_read_without_its_test_suites():
    names = {m.name for m in stdlib_modules()}
    assert {"json.decoder", "asyncio.events", "textwrap"} <= names
    assert not any(n == "test" or n.startswith("test.") or ".tests." in n for n in names)


def test_newlines_are_tokens_of_their_own(tokenizer):
    text = "def f(x):\n        return x + 1\n\n\nclass A:\n    pass\n"
    encoding = tokenizer.encode(text)
    assert tokenizer.decode(encoding.ids) == text
    pieces = [tokenizer.decode([i]) for i in encoding.ids]
    assert all(p == "\n" or "\n" not in p for p in pieces)
    assert pieces.count("\n") == text.count("\n")


def test_completion_tasks_cut_functions_at_a_line(tokenizer):
    module = next(m for m in stdlib_modules() if m.name == "textwrap")
    tasks = completion_tasks([module], tokenizer, max_prompt_tokens=96, seed=3)
    lines = module.text.splitlines()
    assert len(tasks) > 10
    for task in tasks:
        assert task.prompt.endswith("\n") and task.target.strip()
        assert lines[task.line - 1] == task.target
        before = "".join(module.text.splitlines(keepends=True)[: task.line - 1])
        assert before.endswith(task.prompt)  # the prompt is what precedes the line, whole lines of it
        assert len(tokenizer.encode(task.prompt).ids) <= 96
    assert [t.line for t in completion_tasks([module], tokenizer, 96, seed=3)] == [t.line for t in tasks]


@pytest.mark.slow  # a minute on this machine under load
def test_layerskip_training_lowers_every_exit_loss(tokenizer):
    shape = DecoderShape(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        layers=4,
        heads=2,
        intermediate_size=128,
        context=32,
        exit_layers=(1, 2, 4),
    )
    from transformers import LlamaForCausalLM

    assert layer_keep_probabilities(4, 0.2).tolist() == pytest.approx([1.0, 1 - 0.2 / 3, 1 - 0.4 / 3, 0.8])
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.llama_config(0))
    stream = token_stream([m for m in stdlib_modules() if m.name in ("textwrap", "string")], tokenizer)
    settings = ExitTraining(steps=24, batch_size=4, learning_rate=5e-3, warmup_steps=4, log_every=8)
    curve = train_code_model(
        model, stream, shape, settings, Path("/nonexistent/state.pt"), "k", progress=lambda _: None
    )
    for exit_index in range(3):
        assert curve[-1][f"loss_exit_{exit_index}"] < curve[0][f"loss_exit_{exit_index}"] - 0.3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_users_checkpoint_is_imported_and_served_as_transformers_computes_it(family, tokenizer, tmp_path):
    checkpoint = tiny_random_checkpoint(tmp_path / "checkpoint", family, tokenizer, seed=3)
    artifacts, directory = import_checkpoint(checkpoint, tmp_path / "artifacts")
    assert artifacts.family == family and artifacts.exit_layers == (1, 2, 3, 4)
    decoder = ExitDecoder.load(directory)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b\n").ids])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    from offramp.backend.exit_decoder import KVCache

    with torch.inference_mode():
        hidden = decoder.layers(
            0, 4, decoder.embed(ids, positions), KVCache(decoder.spec, 1), decoder.place(0, positions)
        )
        torch.testing.assert_close(decoder.exit_logits(hidden), reference(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exit layers"):
        import_checkpoint(checkpoint, tmp_path / "bad", exit_layers=(2, 3))
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        import_checkpoint(checkpoint, tmp_path / "again")


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        import_checkpoint(tmp_path, tmp_path / "out")


def test_the_calibrations_measures():
    assert token_disagreement([1, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert token_disagreement([1, 2, 3, 4], [1, 9, 3, 4]) == 0.25
    assert token_disagreement([1, 2], [1, 2, 3, 4]) == 0.5  # positions only one has count
    assert token_disagreement([], []) == 0.0
    accepted = np.array([0, 1, 3, 5])  # drafts agreeing, out of more than any d below
    # d = 2: commits min(a, 2) and, where a < 2, the full model's token: 1, 2, 2, 2
    assert tokens_per_verify(accepted, 2) == pytest.approx(7 / 4)
    assert tokens_per_verify(accepted, 4) == pytest.approx((1 + 2 + 4 + 4) / 4)


def test_confident_takes_the_cheapest_certified_threshold_and_never_one_dearer_than_full():
    def candidate(threshold, p_value, compute):
        return CandidateResult(threshold, 0.01, p_value, compute, ())

    never = candidate(2.0, 0.0, 1.0)
    # 0.8 is the cheapest certified; 0.7 is cheaper but its test failed, which ends testing.
    tested = [never, candidate(0.9, 0.001, 0.98), candidate(0.8, 0.01, 0.95), candidate(0.7, 0.2, 0.9)]
    assert cheapest_certified(tested, delta=0.05) == 2
    # Every certified threshold's checks cost more than the exits save: "never", confident is full.
    dearer = [never, candidate(0.9, 0.001, 1.02), candidate(0.8, 0.01, 1.05)]
    assert cheapest_certified(dearer, delta=0.05) == 0
    assert cheapest_certified([never, candidate(0.9, 0.3, 0.5)], delta=0.05) == 0


def test_a_draft_stop_is_replayed_per_group_of_rows_drafted_together():
    # Four rows of one step and one of the next; each draft's max-prob, six drafts each.
    passes = DraftPasses(
        accepted=np.array([0, 2, 6, 1, 3]),
        confidence=np.array(
            [
                [0.3, 0.9, 0.9, 0.9, 0.9, 0.9],  # unsure at its first draft
                [0.9, 0.9, 0.4, 0.9, 0.9, 0.9],  # at its third
                [0.9, 0.9, 0.9, 0.9, 0.9, 0.9],  # never
                [0.9, 0.2, 0.1, 0.9, 0.9, 0.9],  # at its second
                [0.9, 0.9, 0.9, 0.9, 0.5, 0.9],  # at its fifth
            ]
        ),
        steps=np.array([0, 0, 0, 0, 1]),
    )
    assert draft_counts(passes, 6, 0.0, 1).tolist() == [6] * 5  # no stop
    assert draft_counts(passes, 6, 0.6, 1).tolist() == [1, 3, 6, 2, 5]  # alone: up to the first unsure
    assert draft_counts(passes, 4, 0.6, 1).tolist() == [1, 3, 4, 2, 4]  # at most d
    # Two at a time within a step: (1, 3) -> 3, (6, 2) -> 6; the next step's row alone.
    assert draft_counts(passes, 6, 0.6, 2).tolist() == [3, 3, 6, 6, 5]
    counts = draft_counts(passes, 6, 0.6, 1)
    costs = {"full": 1.0, "draft": {0: {64: 0.25}}, "verify": {0: {n: 0.5 + 0.1 * n for n in range(1, 7)}}}
    tokens = (1 + 3 + 6 + 2 + 4) / 5  # min(a, n) + [a < n]: 1, 2 + 1, 6, 1 + 1, 3 + 1
    seconds = np.mean([0.25 * n + 0.5 + 0.1 * n for n in [1, 3, 6, 2, 5]])
    assert predicted_speedup(counts, passes.accepted, costs, 0, 64) == pytest.approx(tokens / seconds)
    # Served, a step takes k times its parts plus o: the o a full step and a pass of several tokens
    # each pay once favours the pass; the k slows both by their compute.
    served = predicted_speedup(counts, passes.accepted, costs, 0, 64, ServedCost(1.5, 2.0))
    assert served == pytest.approx(tokens * (1.5 * 1.0 + 2.0) / (1.5 * seconds + 2.0))
    assert served > tokens / seconds


def test_the_served_cost_goes_through_a_served_full_step_and_a_served_pass():
    costs = {
        "full": 0.010,
        "draft": {0: {64: 0.002, 128: 0.003}},
        "verify": {0: {1: 0.008, 2: 0.010, 3: 0.012}},
    }
    # A pass of 2.5 drafts from the 64-token head: 2.5 * 2 ms + the verify between 2 and 3 drafts, 11 ms.
    assert pass_parts_s(costs, 0, 64, 2.5) == pytest.approx(0.016)
    assert pass_parts_s(costs, 0, 64, 3.0) == pytest.approx(
        3 * 0.002 + 0.012
    )  # the longest: no interpolation
    # Served: full 10 ms -> 15 ms, the pass 16 ms -> 24 ms: k = 9 / 6 = 1.5, o = 15 - 15 = 0.
    cost = ServedSteps(0.015, 0.024, 0, 64, 2.5).cost(costs)
    assert (cost.compute_factor, cost.per_step_s) == pytest.approx((1.5, 0.0))
    # A constant 4 ms a step: k = 1, o = 4 ms. All tokens (0) reads the largest head.
    cost = ServedSteps(0.014, 0.0225, 0, 0, 2.5).cost(costs)  # parts 2.5 * 3 + 11 = 18.5 ms
    assert (cost.compute_factor, cost.per_step_s) == pytest.approx((1.0, 0.004), abs=1e-9)
    # Noise that would make serving speed compute up is clamped, and so is a negative per-step cost.
    cost = ServedSteps(0.012, 0.016, 0, 64, 2.5).cost(costs)
    assert cost.compute_factor == 1.0 and cost.per_step_s == pytest.approx(0.002)


def test_the_served_probe_drafts_long_from_the_deepest_early_exit():
    calibrated = GenerationPolicy("ltt-x", "weights", 0, 3, (0.9, 0.9, 0.9), {}, (5, 6, 7), 0.2)
    probe = served_probe(calibrated, CalibrationSettings(draft_lengths=(2, 4, 8)), exits=4)
    assert (probe.draft_exit, probe.draft_length, probe.draft_stop) == (2, 8, 0.0)
    assert probe.thresholds == calibrated.thresholds and probe.draft_vocabulary == (5, 6, 7)
    assert probe.version.startswith("probe-")  # not the calibrated policy's name


def test_served_steps_are_needed_at_every_timing_batch():
    settings = CalibrationSettings(timing_batches=(1, 8))
    with pytest.raises(ValueError, match=r"at each timing batch \[1, 8\], got \[1\]"):
        choose_draft(None, None, [], settings, 0, 0, served_steps={1: ServedSteps(0.01, 0.02, 0, 0, 2.0)})


def test_exit_logits_of_the_training_forward_match_the_model():
    from transformers import LlamaForCausalLM

    shape = DecoderShape(vocab_size=128, hidden_size=64, layers=4, heads=2, intermediate_size=128, context=16,
                         exit_layers=(2, 4))  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.llama_config(0)).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exit_logits_of(model, ids, shape.exit_layers)[-1], model(ids).logits)


@pytest.mark.parametrize("entries", [1, 12, 20, 25])
def test_the_training_report_shows_each_logged_step_once_and_the_last(entries):
    metrics = {"accuracy": [0.3, 0.4], "agreement_with_last": [0.8, 1.0], "loss": [4.0, 3.9]}
    curve = [
        {"step": 25 * (i + 1), "loss": 4.0, "seconds": 60.0 * i, "loss_exit_0": 4.1, "loss_exit_1": 4.0}
        for i in range(entries)
    ]
    build = {
        "shape": {"exit_layers": [1, 2], "layers": 2}, "parameters": 1e6, "threads": 2, "train_seconds": 60.0,
        "settings": {"split_seed": 0, "steps": 25 * entries, "batch_size": 4, "learning_rate": 1e-3,
                     "warmup_steps": 1, "layer_dropout": 0.1, "eval_windows": 8},
        "modules": {"train": ["a"]}, "tokens": {"train": 10}, "loss_curve": curve,
        "exit_metrics": {"test": metrics},
    }  # fmt: skip
    report = training_report(DecoderArtifacts("m", "llama", (1, 2), 256, 0, "f", build))
    steps = [
        int(line.split("|")[1]) for line in report.splitlines() if line[:2] == "| " and line[2].isdigit()
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 25 * entries and 25 in steps


@pytest.mark.parametrize("step", ["calibrate", "repository"])
def test_generate_steps_on_a_folder_without_a_code_model_say_what_to_pass(step, tmp_path, capsys):
    from offramp.client.cli.main import main

    assert main(["generate", step, "--artifacts", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path} holds no decoder.json" in error and "offramp generate build" in error
