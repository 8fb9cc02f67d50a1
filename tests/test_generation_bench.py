"""The generation benchmark's bookkeeping: ratios within rounds, identity, the report."""

from __future__ import annotations

import json

import pytest

from offramp.build.generation_calibrate import token_disagreement
from offramp.client.tools.generation_bench import (
    confident_phrase,
    generation_report,
    prompt_input_data,
    rotated,
    summarize,
)


def run(
    mode: str, round_: int, tokens_per_s: float, completions: list[list[int]], exits: list[list[int]]
) -> dict:
    return {
        "workload": "next_line",
        "mode": mode,
        "concurrency": 8,
        "round": round_,
        "errors": 0,
        "tokens_per_s": tokens_per_s,
        "ms_per_token_p50": 1000 / tokens_per_s,
        "ms_per_token_p99": 2000 / tokens_per_s,
        "ttft_ms_p50": 30.0,
        "ttft_ms_p99": 60.0,
        "exact_line_match": 0.5,
        "tokens_per_step": 2.0 if mode != "full" else 1.0,
        "drafted": 40.0 if mode == "self_speculative" else 0.0,
        "accepted": 30.0 if mode == "self_speculative" else 0.0,
        "verify_passes": 10.0,
        "completions": completions,
        "exits": exits,
    }


def test_ratios_are_formed_within_rounds_and_their_median_reported():
    same = [[1, 2, 3], [4, 5]]
    runs = [
        run("full", 0, 100.0, same, [[3, 3, 3], [3, 3]]),
        run("self_speculative", 0, 150.0, same, [[3, 3, 3], [3, 3]]),
        run("confident", 0, 300.0, [[1, 2, 9], [4, 5]], [[3, 0, 0], [3, 0]]),
        # A slower round for every mode: its ratios are the same, the medians of rates would not be.
        run("full", 1, 50.0, same, [[3, 3, 3], [3, 3]]),
        run("self_speculative", 1, 80.0, [[1, 2, 3], [4, 6]], [[3, 3, 3], [3, 3]]),
        run("confident", 1, 140.0, [[1, 2, 9], [4, 5]], [[3, 0, 1], [3, 0]]),
    ]
    (row,) = summarize(runs, token_disagreement)
    assert row["self_speculative"]["ratio"] == (1.5 + 1.6) / 2
    assert row["confident"]["ratio"] == (3.0 + 2.8) / 2
    assert row["full"]["tokens_per_s"] == 75.0
    assert (row["identical"], row["compared"]) == (
        3,
        4,
    )  # round 1 differed on one prompt: counted, not hidden
    assert row["acceptance_rate"] == 0.75
    assert row["confident_disagreement"] == pytest.approx((1 / 3 + 0 + 1 / 3 + 0) / 4)
    assert row["confident_exit_shares"] == pytest.approx(
        [5 / 6, 1 / 6]
    )  # the first token (the prefill's) left out
    summary = {
        "policy": {"version": "v", "draft_exit": 1, "draft_length": 3, "thresholds": [0.9, 0.9, 0.9],
                   "provenance": {"method": "uncalibrated"}},
        "model": {"name": "m", "exit_layers": [2, 4, 6, 8]}, "config": {"requests": 2, "repeats": 2},
        "machine": {"nproc": 2, "cpu_model": "x", "loadavg_at_start": ["0.1"]}, "date": "d", "duration_s": 60,
        "table": [row], "perf_analyzer": [], "reference": None,
    }  # fmt: skip
    report = generation_report(summary)
    assert "The draft, chosen on the server" not in report  # a summary from before it
    assert "| 8 | 75.0 | 115.0 | 1.55x | 220.0 | 2.90x |" in report
    assert "| confident at c=8 | next_line | 2x | 2.90x | met |" in report
    assert "| self_speculative at c=8 | next_line | 1.3x | 1.55x | met |" in report


def test_rounds_rotate_the_mode_order():
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"] and rotated(["a", "b", "c"], 3) == ["a", "b", "c"]


def test_prompts_for_perf_analyzer(tmp_path):
    data = json.loads(prompt_input_data(tmp_path / "p.json", ["def f():\n", "x = 1\n"]).read_text())
    assert data == {"data": [{"PROMPT": {"content": ["def f():\n"], "shape": [1]}},
                             {"PROMPT": {"content": ["x = 1\n"], "shape": [1]}}]}  # fmt: skip


def test_the_report_sets_the_served_choice_of_the_draft_beside_the_calibrations():
    def row(exit_, length, size, stop, predicted):
        return {"draft_exit": exit_, "draft_layer": 2 * exit_ + 2, "draft_length": length,
                "draft_vocabulary": size, "draft_stop": stop,
                "predicted_speedup": {"1": predicted[0], "8": predicted[1]}}  # fmt: skip

    parts_table = [row(0, 3, 1024, 0.2, (1.10, 1.05)), row(2, 4, 4096, 0.0, (1.02, 1.01))]
    served_table = [row(0, 3, 1024, 0.2, (1.21, 1.12)), row(2, 4, 4096, 0.0, (1.40, 1.18))]
    served = {"table": served_table, "step_seconds": {"1": {"full": 0.0059}, "8": {"full": 0.0143}},
              "served_steps": {"1": {"full_s": 0.0094, "pass_s": 0.0151, "drafts": 2.41},
                               "8": {"full_s": 0.0201, "pass_s": 0.0402, "drafts": 4.52}},
              "served_cost": {"1": {"compute_factor": 1.0, "per_step_s": 0.0035},
                              "8": {"compute_factor": 1.37, "per_step_s": 0.0005}}}  # fmt: skip
    summary = {
        "policy": {"version": "ltt-new", "draft_exit": 2, "draft_length": 4, "draft_vocabulary": [],
                   "draft_stop": 0.0, "thresholds": [0.9, 0.9, 0.9],
                   "provenance": {"method": "uncalibrated", "draft": {"table": parts_table},
                                  "draft_served": served}},
        "calibrated_draft": {"version": "ltt-old", "draft_exit": 0, "draft_length": 3,
                             "draft_vocabulary": 1024, "draft_stop": 0.2},
        "model": {"name": "m", "exit_layers": [2, 4, 6, 8]}, "config": {"requests": 2, "repeats": 2},
        "machine": {"nproc": 2, "cpu_model": "x", "loadavg_at_start": ["0.1"]}, "date": "d", "duration_s": 60,
        "table": [], "perf_analyzer": [], "reference": None,
    }  # fmt: skip
    report = generation_report(summary)
    assert "a full step 9.40 / 20.10 ms against 5.90 / 14.30 ms of its parts" in report
    assert "the probe draft 15.10 / 40.20 ms (2.41 / 4.52 drafts)" in report
    assert "takes 1.00 / 1.37 times its parts plus 3.50 / 0.50 ms" in report
    # The calibration's choice with its own predictions, then rescored; the served choice, all tokens.
    assert "(ltt-old): layer 2, length 3, 1024 tokens, stop 0.2 (predicted 1.10x / 1.05x)" in report
    assert "the same served: layer 2, length 3, 1024 tokens, stop 0.2 (predicted 1.21x / 1.12x)" in report
    assert "(ltt-new): layer 6, length 4, 4096 tokens, stop 0 (predicted 1.40x / 1.18x)" in report


def test_the_report_says_what_confident_does_and_what_its_certificate_covers():
    def candidate(threshold, p_value, compute):
        return {"threshold": threshold, "risk": 0.01, "p_value": p_value, "compute": compute}

    provenance = {"method": "learn_then_test", "epsilon": 0.02, "delta": 0.05, "task": "next line",
                  "calibration_risk": 0.0, "calibration_completions": 100, "test_risk": 0.001,
                  "test_completions": 40, "chosen": 1,
                  "candidates": [candidate(2.0, 0.0, 1.0), candidate(0.9, 0.01, 0.97),
                                 candidate(0.8, 0.02, 1.04), candidate(0.7, 0.2, 0.9)]}  # fmt: skip
    policy = {"thresholds": [0.9] * 3, "confident_vocabulary": list(range(1024)), "provenance": provenance}
    phrase = confident_phrase(policy)
    assert phrase.startswith("confident max-prob threshold 0.9 at every early exit, each scoring the 1024 "
                             "most frequent tokens first (0.970 of full's")  # fmt: skip
    assert "of the task next line" in phrase and "lies outside the certificate" in phrase
    # "never" chosen: the cheapest certified candidate is named, not 0.7, which failed its test.
    dearer = [candidate(2.0, 0.0, 1.0), candidate(0.9, 0.01, 1.02), candidate(0.8, 0.02, 1.04),
              candidate(0.7, 0.2, 0.9)]  # fmt: skip
    never = {**policy, "thresholds": [2.0] * 3,
             "provenance": {**provenance, "chosen": 0, "candidates": dearer}}  # fmt: skip
    assert confident_phrase(never).startswith(
        "confident never leaves early, so it answers as full does: the cheapest certified threshold (0.9) "
        "costs 1.020"
    )
