"""``offramp tune`` end to end on a briefly trained CNN: real server, real perf_analyzer, the written
build served and answering as the cascade predicts offline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offramp.client.tools.perf_analyzer import PerfAnalyzerError


def quick_tune_config(directory, tmp_path, batch_sizes: tuple[int, ...]):
    """A short tune of a quick build (skips where perf_analyzer is missing): two rows in flight, one
    round of 400 ms windows, enough to rank what these tests check."""
    from offramp.client.tools.perf_analyzer import check_perf_analyzer
    from offramp.client.tools.tune import TuneConfig

    try:
        check_perf_analyzer()
    except PerfAnalyzerError as error:
        pytest.skip(str(error))
    return TuneConfig(
        artifacts=directory, out=tmp_path / "tuned", concurrency=2, repeats=1, measurement_interval_ms=400,
        batch_sizes=batch_sizes, workdir=tmp_path / "work", progress=False,
    )  # fmt: skip


@pytest.mark.integration
def test_tune_measures_chooses_and_writes_a_build_that_serves(
    quick_cnn, running_server, execution_env, tmp_path
):
    from offramp.backend.orchestrator import ServingOptions
    from offramp.backend.policy import Policy
    from offramp.build.artifacts import ModelArtifacts
    from offramp.build.calibrate import exit_logits_from_onnx, held_out_data, simulate_exits
    from offramp.build.repository import RepositoryOptions, write_repository
    from offramp.client.grpc_client import OfframpClient
    from offramp.client.tools.tune import run_tune

    artifacts, directory = quick_cnn
    config = quick_tune_config(directory, tmp_path, batch_sizes=(1, 4, 8))
    report = run_tune(config)

    # Every set of exits (each ending at the last) under each data-free rule family (the last exit alone
    # once: no family changes it), in both modes, ranked by predicted CPU per row.
    sets = 2 ** (artifacts.num_exits - 1)
    families = len(report["rules"])
    assert report["sets"] == sets and report["rules"] == ["confidence", "patience"]
    assert len(report["candidates"]) == 2 * (1 + (sets - 1) * families)
    assert {c["rule"] for c in report["candidates"]} == set(report["rules"])
    assert report["selection_rows"] + report["certification_rows"] == 5000  # the quick build's split
    predicted = [c["predicted_cpu_per_row_ms"] for c in report["candidates"]]
    assert predicted == sorted(predicted) and all(p > 0 for p in predicted)
    costs = report["costs"]
    assert costs["full_per_row_s"] > 0 and costs["rows_per_execute"] >= 1
    assert len(costs["ranges"]) == artifacts.num_exits * (artifacts.num_exits + 1) // 2
    assert set(report["arms"]) == {"full", "segments_full", "forward_full"}
    decision = report["decision"]
    best = report["candidates"][0]
    if decision["serves_full_model"]:
        # Said so; the build written is the early-exit interface at least cost: the network as one segment.
        assert best["predicted_speedup"] <= 1 and "call fashion_cnn_full directly" in decision["summary"]
        best = next(c for c in report["candidates"] if len(c["kept_exits"]) == 1)
    assert decision["kept_exits"] == best["kept_exits"] and decision["mode"] == best["mode"]
    assert decision["rule"] == best["rule"]
    # The compute fraction is a float32 mean: all rows at the last exit (which also runs the early heads:
    # its cost is over 1) can read a little over that exit's cost.
    last = artifacts.exit_costs[-1]
    assert decision["predicted_speedup"] > 0 and 0 < decision["certified_compute"] <= last + 1e-3
    assert json.loads((config.out_dir / "tune.json").read_text())["decision"] == decision
    assert "Decision" in (config.out_dir / "TUNE.md").read_text()

    # The written build and its policy: bound to each other, certified at delta on the rows not choosing it.
    tuned = ModelArtifacts.load(config.out_dir)
    policy = Policy.load(config.out_dir / "policy.json")
    policy.validate(tuned.num_exits, tuned.num_classes, tuned.fingerprint)
    assert tuned.num_exits == len(decision["kept_exits"])
    assert policy.provenance["method"] == "learn_then_test" and policy.provenance["delta"] == 0.05
    assert policy.provenance["calibration_rows"] <= report["certification_rows"]
    assert policy.provenance["tune"]["kept_exits"] == decision["kept_exits"]
    assert policy.rule == decision["rule"]  # certified under the family it was chosen with

    # Served as tune says, it answers every row as the cascade predicts from the merged segments.
    test = held_out_data(tuned, config.out_dir, "test")
    images = test.inputs["IMAGE"][:64]
    expected = simulate_exits(exit_logits_from_onnx(tuned, config.out_dir, {"IMAGE": images}), policy.exits)
    serving = ServingOptions(segments_in_process=decision["mode"] == "in_process")
    options = RepositoryOptions(execution_env=execution_env, serving=serving)
    write_repository(tuned, config.out_dir, policy, tmp_path / "repo", options)
    with running_server(tmp_path / "repo") as server, OfframpClient(server.grpc_url) as client:
        answers = client.classify(tuned.name, images)
    np.testing.assert_array_equal(answers.exit, expected)


@pytest.mark.integration
def test_tune_serves_the_full_model_where_the_model_is_too_small_to_pay(quick_text_model, tmp_path):
    """A tiny encoder (2 blocks, width 32) computes a row in microseconds, where any set of exits adds the
    orchestrator's fixed cost per execute (a Python stub's parsing, cascade and responses, a millisecond
    or so on this machine) that calling the full model directly does not pay: every candidate's
    predicted CPU per row is over the full model's by that mechanism, not by a measured margin."""
    from offramp.client.tools.tune import run_tune

    artifacts, directory = quick_text_model
    config = quick_tune_config(directory, tmp_path, batch_sizes=(1, 8))
    decision = run_tune(config)["decision"]
    assert decision["serves_full_model"], decision["summary"]
    assert f"call {artifacts.name}_full directly" in decision["summary"]
    assert decision["predicted_speedup"] < 1
    # The build written: the early-exit interface at least cost, the network as one segment.
    assert decision["kept_exits"] == [artifacts.num_exits - 1]
