"""The benchmark driver: perf_analyzer's launcher and CSV, the input-data file, the ratio arithmetic,
and perf_analyzer against a real server."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from offramp.client.cli.options import add_config_options, config_from_args
from offramp.client.serving.statistics import flatten_model_stats, model_statistics, statistics_delta
from offramp.client.tools import bench
from offramp.client.tools.bench_summary import (
    Goals,
    accuracy_compute_curve,
    evaluate_goals,
    machine_load,
    median,
    model_timing,
    paired_ratio,
    paired_ratios,
    quality_summary,
    sweep_summary,
    time_breakdown,
)
from offramp.client.tools.perf_analyzer import (
    PerfAnalyzerError,
    PerfAnalyzerOptions,
    explain_start_failure,
    parse_perf_csv,
    perf_analyzer_binary,
    perf_analyzer_environment,
    read_input_data,
    write_input_data,
)

# What perf_analyzer 2.49 wrote here with --verbose-csv (one concurrency level).
VERBOSE_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
    "Avg latency,request/response,response wait\n"
    "8,1658.15,5,2012,95,16,147,82,1,438,7638,11286,23119,2362,6,2329\n"
)
# Without --verbose-csv and with --percentile: no "Avg latency" column.
PERCENTILE_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "1,1302.69,5,2402,24,19,366,81,1,428,11512,12108,17758\n"
    "\n"
    "Concurrency,Server Utilization\n"
    "1,0.5\n"
)


# --- perf_analyzer's CSV and command line ---------------------------------------------------------------


def test_parse_verbose_csv_in_rows_per_second_and_milliseconds():
    (result,) = parse_perf_csv(VERBOSE_CSV, batch_size=8)
    assert result.concurrency == 8
    assert result.rows_per_s == pytest.approx(1658.15)
    assert result.requests_per_s == pytest.approx(1658.15 / 8)
    assert (result.p50_ms, result.p90_ms, result.p95_ms, result.p99_ms) == pytest.approx(
        (0.438, 7.638, 11.286, 23.119)
    )
    assert result.avg_ms == pytest.approx(2.362)
    assert result.server_queue_ms == pytest.approx(0.095)
    assert result.network_ms == pytest.approx(2.012)
    assert result.to_dict()["requests_per_s"] == pytest.approx(1658.15 / 8)


def test_parse_csv_without_average_stops_at_the_first_block():
    (result,) = parse_perf_csv(PERCENTILE_CSV)
    assert result.avg_ms is None
    assert result.p99_ms == pytest.approx(17.758)
    assert result.batch_size == 1 and result.requests_per_s == pytest.approx(1302.69)


def test_parse_csv_with_several_levels():
    text = VERBOSE_CSV + "16,2000,5,2012,95,16,147,82,1,500,8000,12000,24000,2400,6,2329\n"
    assert [r.concurrency for r in parse_perf_csv(text)] == [8, 16]


@pytest.mark.parametrize("text", ["", "no header here\n1,2,3\n", "Concurrency,Inferences/Second\n"])
def test_parse_csv_rejects_what_is_not_a_report(text):
    with pytest.raises(ValueError):
        parse_perf_csv(text)


def test_command_line(tmp_path):
    options = PerfAnalyzerOptions(
        url="127.0.0.1:9001",
        model="fashion_cnn",
        input_data=tmp_path / "data.json",
        concurrency=4,
        batch_size=8,
        shapes={"IMAGE": [1, 28, 28]},
        measurement_interval_ms=750,
        request_parameters={"force_full": True, "max_exit": 2, "cohort": "night"},
    )
    command = options.command(Path("/bin/perf_analyzer"), tmp_path / "out.csv")
    text = " ".join(command)
    assert command[0] == "/bin/perf_analyzer"
    for expected in ("-i grpc", "-u 127.0.0.1:9001", "-m fashion_cnn", "-b 8", "--concurrency-range 4",
                     f"--input-data {tmp_path / 'data.json'}", "--measurement-interval 750",
                     "--stability-percentage 1000", "--max-trials 10", "--shape IMAGE:1,28,28",
                     f"-f {tmp_path / 'out.csv'}",
                     "--request-parameter force_full:true:bool", "--request-parameter max_exit:2:int",
                     "--request-parameter cohort:night:string"):  # fmt: skip
        assert expected in text
    with pytest.raises(ValueError):
        PerfAnalyzerOptions("u", "m", tmp_path, request_parameters={"cohort": "a:b"}).command(
            Path("p"), tmp_path
        )


def test_request_rate_mode_is_open_loop_and_its_report_parses(tmp_path):
    options = PerfAnalyzerOptions(
        "127.0.0.1:9001", "trec", tmp_path / "data.json", batch_size=8, request_rate=312.5
    )
    text = " ".join(options.command(Path("/bin/perf_analyzer"), tmp_path / "out.csv"))
    assert "--request-rate-range 312.500 --async --request-distribution poisson" in text
    assert "--concurrency-range" not in text
    report = (
        "Request Rate,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute "
        "Input,"
        "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 "
        "latency\n"
        "312.5,2500.0,4,10,2295,860,7684,404,2,12041,14289,15843,20295\n"
    )
    (result,) = parse_perf_csv(report, batch_size=8)
    assert result.request_rate == 312.5 and result.concurrency == 0
    assert result.requests_per_s == pytest.approx(312.5) and result.p99_ms == pytest.approx(20.295)


def test_a_rate_search_steps_through_poisson_rates_up_to_a_latency_threshold(tmp_path):
    options = PerfAnalyzerOptions(
        "127.0.0.1:9001", "trec", tmp_path / "data.json", batch_size=8, percentile=99,
        request_rate_range=(4.0, 20.0, 2.5), latency_threshold_ms=216.9,
    )  # fmt: skip
    text = " ".join(options.command(Path("/bin/perf_analyzer"), tmp_path / "out.csv"))
    assert "--request-rate-range 4.000:20.000:2.500 --async --request-distribution poisson" in text
    # whole milliseconds, rounded down: no rate over the threshold asked is let through
    assert "--percentile 99" in text and "--latency-threshold 216" in text
    for bad in (
        {"request_rate": 5.0, "request_rate_range": (4.0, 20.0, 2.5)},
        {"request_rate_range": (4.0, 2.0, 1.0)},
        {"request_rate_range": (4.0, 20.0, 0.0)},
        {"latency_threshold_ms": 0.5},
    ):
        with pytest.raises(ValueError):
            PerfAnalyzerOptions("u", "m", tmp_path, **bad)


def test_a_schedule_is_sent_open_loop_and_every_request_is_exported(tmp_path):
    options = PerfAnalyzerOptions(
        "127.0.0.1:9001", "trec", tmp_path / "data.json", batch_size=8, concurrency=4,
        request_intervals=tmp_path / "gaps.txt", request_count=806, profile_export=tmp_path / "export.json",
    )  # fmt: skip
    text = " ".join(options.command(Path("/bin/perf_analyzer"), tmp_path / "out.csv"))
    assert f"--request-intervals {tmp_path / 'gaps.txt'} --async --max-threads 16" in text
    assert "--request-count 806" in text and f"--profile-export-file {tmp_path / 'export.json'}" in text
    # perf_analyzer refuses a schedule with either of these
    assert "--concurrency-range" not in text and "--request-rate-range" not in text


def test_missing_libraries_are_explained():
    loader = "perf_analyzer: error while loading shared libraries: {}: cannot open shared object file"
    assert "apt-get install libb64-0d" in explain_start_failure(loader.format("libb64.so.0d"))
    assert "nvidia-cuda-runtime-cu12" in explain_start_failure(loader.format("libcudart.so.12"))
    assert "2.49.0" in explain_start_failure("perf_analyzer: /lib/libc.so.6: version `GLIBC_2.38' not found")
    assert explain_start_failure("Perf Analyzer Version  (commit unknown)") is None


def test_binary_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFRAMP_PERF_ANALYZER", str(tmp_path / "nothing"))
    with pytest.raises(PerfAnalyzerError, match="not a file"):
        perf_analyzer_binary()
    binary = tmp_path / "perf_analyzer"
    binary.write_text("")
    monkeypatch.setenv("OFFRAMP_PERF_ANALYZER", str(binary))
    assert perf_analyzer_binary() == binary


def test_environment_puts_the_cuda_runtime_first(monkeypatch, tmp_path):
    monkeypatch.setattr("offramp.client.tools.perf_analyzer.cuda_runtime_library_directory", lambda: tmp_path)
    env = perf_analyzer_environment({"LD_LIBRARY_PATH": "/opt/lib"})
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path}:/opt/lib"
    monkeypatch.setattr("offramp.client.tools.perf_analyzer.cuda_runtime_library_directory", lambda: None)
    assert "LD_LIBRARY_PATH" not in perf_analyzer_environment({})


# --- The input-data file -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["b64", "content"])
def test_input_data_holds_one_real_row_per_entry(tmp_path, fashion_test, encoding):
    images = fashion_test[0]
    rows = bench.pick_data_rows(len(images), 24, seed=3)
    assert len(set(rows.tolist())) == 24
    path = write_input_data(tmp_path / "data.json", {"IMAGE": images[rows]}, encoding)
    entries = json.loads(path.read_text())["data"]
    assert len(entries) == 24
    assert all(e["IMAGE"]["shape"] == [1, 28, 28] for e in entries)
    back = read_input_data(path, {"IMAGE": "float32"})["IMAGE"]
    assert back.shape == (24, 1, 28, 28) and back.dtype == np.float32
    np.testing.assert_array_equal(back, images[rows])  # exact: the real test rows, in the chosen order


def test_input_data_with_several_inputs(tmp_path):
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    mask = np.ones((3, 4), dtype=np.int64)
    path = write_input_data(tmp_path / "text.json", {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
    entry = json.loads(path.read_text())["data"][1]
    assert set(entry) == {"INPUT_IDS", "ATTENTION_MASK"} and entry["INPUT_IDS"]["shape"] == [4]
    back = read_input_data(path, {"INPUT_IDS": "int64", "ATTENTION_MASK": "int64"})
    np.testing.assert_array_equal(back["INPUT_IDS"], ids)
    with pytest.raises(ValueError, match="row counts"):
        write_input_data(tmp_path / "bad.json", {"A": ids, "B": mask[:2]})


# --- Ratios and summaries on fixed inputs -----------------------------------------------------------------


def record(arm, concurrency, rep, rows_per_s, p50=1.0, p90=2.0, p99=4.0, **extra):
    model = {"early": "m", "full": "m_full", "forward_full": "m"}.get(arm, f"m_{arm}")
    return {
        "arm": arm,
        "model": model,
        "concurrency": concurrency,
        "rep": rep,
        "perf": {"rows_per_s": rows_per_s, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99},
        **extra,
    }


FIXED = [
    # Round 0 at concurrency 8: early 3x full; round 1: 2x; round 2: 2.5x -> median 2.5x.
    record("early", 8, 0, 300.0, p50=1.0, p99=5.0),
    record("full", 8, 0, 100.0, p50=2.0, p99=4.0),
    record("early", 8, 1, 200.0, p50=1.0, p99=6.0),
    record("full", 8, 1, 100.0, p50=2.0, p99=4.0),
    record("early", 8, 2, 250.0, p50=1.0, p99=2.0),
    record("full", 8, 2, 100.0, p50=2.0, p99=4.0),
    record("segments_full", 8, 0, 90.0, p50=2.2),
    record("segments_full", 8, 1, 95.0, p50=2.2),
    record("segments_full", 8, 2, 80.0, p50=2.2),
    record("nocompact", 8, 0, 200.0),
    record("nocompact", 8, 1, 200.0),
    record("nocompact", 8, 2, 200.0),
    record("forward_full", 8, 0, 98.0),
    record("forward_full", 8, 1, 99.0),
    record("forward_full", 8, 2, 97.0),
    record("early", 1, 0, 50.0, p99=1.0),
    record("full", 1, 0, 40.0, p99=2.0),
]


def test_paired_ratios_are_taken_within_a_round():
    assert paired_ratios(FIXED, "early", "full", "rows_per_s", 8) == pytest.approx([3.0, 2.0, 2.5])
    assert paired_ratio(FIXED, "early", "full", "rows_per_s", 8) == pytest.approx(2.5)
    assert paired_ratio(FIXED, "early", "full", "p99_ms", 8) == pytest.approx(1.25)  # 1.25, 1.5, 0.5
    assert math.isnan(paired_ratio(FIXED, "early", "nocompact", "rows_per_s", 1))  # never paired at c=1
    assert median([3.0, float("nan"), 1.0, None]) == 2.0 and math.isnan(median([]))


def test_sweep_summary():
    low, high = sweep_summary(FIXED, ideal_speedup=4.0)
    assert low["concurrency"] == 1 and high["concurrency"] == 8
    assert low["throughput_ratio"] == pytest.approx(1.25)
    assert high["throughput_ratio"] == pytest.approx(2.5)
    assert high["realised_share"] == pytest.approx(2.5 / 4.0)
    assert high["p50_ratio"] == pytest.approx(0.5)
    assert high["tax"] == pytest.approx(1 - 0.9)  # segments_full / full per round: 0.9, 0.95, 0.8
    assert high["tax_p50"] == pytest.approx(0.1)
    assert high["forward_tax"] == pytest.approx(1 - 0.98)
    assert high["compaction_gain"] == pytest.approx(0.25)  # 1.5, 1.0, 1.25 -> 1.25
    assert high["arms"]["early"]["rows_per_s"] == 250.0 and high["arms"]["early"]["reps"] == 3
    assert (high["arms"]["early"]["rows_per_s_min"], high["arms"]["early"]["rows_per_s_max"]) == (
        200.0,
        300.0,
    )
    assert math.isnan(low["tax"])


def test_goals():
    """Each goal judged on its figure; the throughput target of the segment mode measured; p99 judged from
    concurrency 4 on; goals left out where not asked for or not measured (no truncation arm)."""
    levels = sweep_summary(FIXED, ideal_speedup=2.6)
    quality = {"ideal_speedup": 2.6, "accuracy_full": 0.910, "accuracy_early": 0.902}
    goals = Goals(
        throughput_ratio=3.0, throughput_ratio_in_process=2.0, ideal_speedup=2.5, max_accuracy_loss=0.005
    )
    over_bls = {g["goal"]: g for g in evaluate_goals(levels, goals, quality)}
    throughput = over_bls["throughput early/full at concurrency 8, segments over BLS"]
    assert throughput["measured"] == pytest.approx(2.5) and throughput["met"] is False
    in_process = {g["goal"]: g for g in evaluate_goals(levels, goals, quality, in_process=True)}
    assert in_process["throughput early/full at concurrency 8, segments in process"]["met"] is True
    assert over_bls["ideal speed-up (1 / mean compute on the test rows)"]["met"] is True
    loss = over_bls["accuracy lost against the full model (test rows, through the server)"]
    assert (
        loss["measured"] == pytest.approx(0.008) and loss["met"] is False and loss["shown"] == "0.80 points"
    )
    p99 = over_bls["p99 latency early/full, worst level from concurrency 4"]
    assert p99["measured"] == pytest.approx(1.25) and p99["met"] is False and "concurrency 8" in p99["shown"]
    assert not any("truncation" in goal for goal in over_bls)  # no truncation arm was measured
    with_truncation = sweep_summary(FIXED + [record("truncated", 8, r, 200.0) for r in range(3)])
    beaten = evaluate_goals(with_truncation, Goals(max_p99_ratio=None))
    assert [(g["goal"], g["measured"], g["met"]) for g in beaten] == [
        ("throughput early/static truncation at concurrency 8", pytest.approx(1.25), True)
    ]
    assert evaluate_goals(levels, Goals(beat_truncation=False, max_p99_ratio=None), quality) == []


def test_goals_of_an_older_summary_keep_what_these_goals_still_ask():
    older = {"concurrency": 8, "throughput_ratio": 3.0, "realised_share": 0.9, "max_tax": 0.05}
    assert Goals.from_settings(older) == Goals(throughput_ratio=3.0)
    assert Goals.from_settings(None) == Goals()


def test_quality_summary():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    full = np.array([0, 1, 2, 3, 0, 1, 2, 0])  # 7/8 right
    early = np.array([0, 1, 2, 3, 0, 1, 1, 0])  # 6/8 right, 7/8 agree with full
    exits = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    costs = np.array([0.25, 0.25, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0])
    q = quality_summary(labels, full, early, exits, costs, num_exits=3)
    assert q["accuracy_full"] == 7 / 8 and q["accuracy_early"] == 6 / 8 and q["agreement"] == 7 / 8
    assert q["mean_compute_fraction"] == pytest.approx(0.5) and q["ideal_speedup"] == pytest.approx(2.0)
    assert q["exit_counts"] == [4, 2, 2] and q["exit_fractions"] == [0.5, 0.25, 0.25]


def stats(requests, rows, executions, queue_ms, compute_ms, fail=0):
    return {
        "success": requests,
        "fail": fail,
        "inference_count": rows,
        "execution_count": executions,
        "queue_ns": queue_ms * 1e6,
        "compute_input_ns": 0.0,
        "compute_infer_ns": compute_ms * 1e6,
        "compute_output_ns": 0.0,
        "batch_exec_count": executions,
        "batch_exec_ns": compute_ms * 1e6,
    }


def test_time_breakdown():
    # 100 orchestrator executions of 10 ms each (1 request, 8 rows); 100 calls to segment 0 (2 ms each,
    # 1 ms queued) and 50 to segment 1 (4 ms each): 4 ms + 2 ms per execution inside segments.
    early = record(
        "early",
        8,
        0,
        800.0,
        server_cpu_s={"tritonserver": 0.2, "m": 0.3, "m_segment_0": 0.1, "m_segment_1": 0.2},
        client_cpu_s=0.1,
        stats={
            "m": stats(100, 800, 100, 0.0, 1000.0),
            "m_segment_0": stats(100, 800, 100, 100.0, 200.0),
            "m_segment_1": stats(50, 200, 50, 0.0, 200.0),
        },
    )
    full = record("full", 8, 0, 400.0, server_cpu_s={"tritonserver": 0.1, "m_full": 0.7}, client_cpu_s=0.1,
                  stats={"m_full": stats(100, 800, 50, 0.0, 800.0)})  # fmt: skip
    b = time_breakdown([early, full], 8, "m", "m_full", ["m_segment_0", "m_segment_1"], 0.4)
    assert b["orchestrator"]["execution_ms"] == pytest.approx(10.0)
    assert b["segments"]["m_segment_0"]["request_ms"] == pytest.approx(3.0)
    assert b["segment_time_per_execution_ms"] == pytest.approx(3.0 + 4.0 * 50 / 100)
    assert b["orchestrator_overhead_per_execution_ms"] == pytest.approx(5.0)
    assert b["bls_calls_per_execution"] == pytest.approx(1.5)
    assert b["overhead_per_bls_call_ms"] == pytest.approx(500.0 / 150)
    assert b["measured_compute_fraction"] == pytest.approx((400.0 / 800) / (800.0 / 800))
    assert b["full"]["rows_per_execution"] == pytest.approx(16.0)
    cpu = b["cpu_per_row_ms"]
    assert cpu["early"]["server total"] == pytest.approx(0.8 / 800 * 1e3)
    assert cpu["full"]["server total"] == pytest.approx(0.8 / 800 * 1e3)
    assert cpu["early"]["client (perf_analyzer)"] == pytest.approx(0.1 / 800 * 1e3)
    assert time_breakdown([early], 8, "m", "m_full", []) == {}
    assert model_timing([early], "absent")["requests"] == 0


def test_machine_load():
    runs = [
        {"wall_s": 10.0, "client_cpu_s": 2.0, "server_cpu_s": {"a": 8.0}, "machine": {"busy_cores": 1.5}},
        {"wall_s": 10.0, "client_cpu_s": 0.0, "server_cpu_s": {"a": 5.0}, "machine": {"busy_cores": 1.9}},
    ]
    load = machine_load(runs)
    assert load["other_cores_min"] == pytest.approx(0.5) and load["other_cores_max"] == pytest.approx(1.4)
    assert load["busy_cores_median"] == pytest.approx(1.7)


def test_accuracy_compute_curve():
    # Exit 0 is sure of class 0 for rows 0-1 and unsure for rows 2-3; the last exit is always right.
    logits = np.zeros((2, 4, 3), dtype=np.float32)
    logits[0, :2, 0] = 10.0
    logits[1, np.arange(4), [1, 1, 2, 2]] = 10.0
    labels = np.array([1, 1, 2, 2])
    low, high = accuracy_compute_curve(logits, labels, [0.5, 1.0], [0.9, 1.01])
    assert low["mean_compute_fraction"] == pytest.approx(0.75) and low["accuracy"] == pytest.approx(0.5)
    assert low["agreement"] == pytest.approx(0.5)
    assert high["mean_compute_fraction"] == pytest.approx(1.0) and high["accuracy"] == 1.0


def test_the_bench_serves_the_rule_family_that_certifies_the_least_compute():
    """As ``offramp calibrate --rule all``: every family tried at delta / families, the cheapest kept."""
    from types import SimpleNamespace

    from offramp.backend.policy import RULE_FAMILIES
    from tests.fakes import synthetic_exits

    logits, labels = synthetic_exits()  # (3 exits, rows, classes), more accurate exit by exit
    artifacts = SimpleNamespace(exit_costs=[0.3, 0.6, 1.0], fingerprint="f" * 16)
    policy = bench.bench_policy(artifacts, logits, labels)
    tried = policy.provenance["rules_tried"]
    assert sorted(tried) == sorted(RULE_FAMILIES)
    assert policy.rule == min(tried, key=tried.get)
    assert policy.provenance["expected_cost"] == pytest.approx(tried[policy.rule])
    assert policy.provenance["expected_cost"] < 1.0  # the noise lets some rows leave early


def test_sweep_order_rotates_and_alternates():
    arms = ["early", "full", "nocompact"]
    assert bench.sweep_order(arms, 0, 0) == ["early", "full", "nocompact"]
    assert bench.sweep_order(arms, 0, 1) == ["full", "nocompact", "early"]
    assert bench.sweep_order(arms, 1, 0) == ["nocompact", "full", "early"]
    firsts = {bench.sweep_order(arms, 0, rep)[0] for rep in range(3)}
    assert firsts == set(arms)


def test_statistics_are_flattened_and_differenced():
    entry = {
        "name": "m",
        "inference_count": 40,
        "execution_count": 3,
        "inference_stats": {
            "success": {"count": 5, "ns": 9},
            "fail": {"count": 1, "ns": 1},
            "queue": {"count": 5, "ns": 100},
            "compute_input": {"count": 5, "ns": 10},
            "compute_infer": {"count": 5, "ns": 500},
            "compute_output": {"count": 5, "ns": 20},
        },
        "batch_stats": [
            {
                "batch_size": 8,
                "compute_input": {"count": 2, "ns": 4},
                "compute_infer": {"count": 2, "ns": 200},
                "compute_output": {"count": 2, "ns": 6},
            },
            {
                "batch_size": 24,
                "compute_input": {"count": 1, "ns": 1},
                "compute_infer": {"count": 1, "ns": 100},
                "compute_output": {"count": 1, "ns": 2},
            },
        ],
    }
    flat = flatten_model_stats(json_format.ParseDict(entry, service_pb2.ModelStatistics()))
    assert flat["success"] == 5 and flat["fail"] == 1 and flat["queue_ns"] == 100
    assert flat["batch_exec_count"] == 3 and flat["batch_exec_ns"] == 313
    before = {"m": {**flat, "success": 2.0, "queue_ns": 40.0}, "idle": {"success": 7.0}}
    delta = statistics_delta(before, {"m": flat, "idle": {"success": 7.0}})
    assert set(delta) == {"m"} and delta["m"]["success"] == 3 and delta["m"]["queue_ns"] == 60


def test_quick_flag_sets_short_defaults_that_options_override():
    parser = argparse.ArgumentParser()
    add_config_options(parser, bench.BenchConfig)
    quick = config_from_args(
        bench.BenchConfig, parser.parse_args(["--repeats", "2"]), bench.BenchConfig.quick_defaults()
    )
    assert (
        quick.quick
        and quick.repeats == 2
        and quick.concurrency == (1, 4)
        and quick.measurement_interval_ms == 500
    )
    assert quick.out != bench.DEFAULT_OUT
    default = config_from_args(bench.BenchConfig, parser.parse_args([]))
    assert default.concurrency == (1, 4, 8, 16) and default.repeats == 3 and default.rows_per_request == 8
    assert default.out == bench.DEFAULT_OUT and default.workloads == (
        "fashion_cnn",
        "trec",
        "rotten_tomatoes",
    )
    with pytest.raises(ValueError, match="early"):
        bench.BenchConfig(arms=("full",))
    with pytest.raises(KeyError, match="unknown workload"):
        bench.resolve_workload("no_such_workload")
    assert (
        bench.resolve_workload("offramp.client.tools.bench:fashion_cnn_workload")
        is bench.fashion_cnn_workload
    )


# --- Against a real server --------------------------------------------------------------------------------


def _quick_workload(quick_cnn, fashion_test):
    from offramp.build.calibrate import exit_logits_from_onnx
    from offramp.build.recipes import fashion_mnist_train_and_calibration

    artifacts, directory = quick_cnn
    _, (cal_images, cal_labels) = fashion_mnist_train_and_calibration()
    cal_images, cal_labels = cal_images[:1000], cal_labels[:1000]
    logits = exit_logits_from_onnx(artifacts, directory, {"IMAGE": cal_images})
    images, labels = fashion_test
    return bench.Workload(
        name=artifacts.name, artifacts=artifacts, artifacts_dir=directory, test_inputs={"IMAGE": images},
        test_labels=labels, calibration_logits=logits, calibration_labels=cal_labels,
        policy=bench.bench_policy(artifacts, logits, cal_labels), description="quick CNN",
    )  # fmt: skip


def _cnn_for_perf_analyzer(quick_cnn, fashion_test, execution_env, tmp_path: Path) -> tuple:
    """The quick CNN's repository and 64 real rows as perf_analyzer's input data: (artifacts, repository
    folder, input data file); skips the test where perf_analyzer cannot start here."""
    from offramp.build.repository import RepositoryOptions, write_repository
    from offramp.client.tools.perf_analyzer import check_perf_analyzer

    try:
        check_perf_analyzer()
    except PerfAnalyzerError as error:
        pytest.skip(str(error))
    artifacts, directory = quick_cnn
    workload = _quick_workload(quick_cnn, fashion_test)
    repository = tmp_path / "repo"
    write_repository(
        artifacts, directory, workload.policy, repository, RepositoryOptions(execution_env=execution_env)
    )
    data = write_input_data(
        tmp_path / "data.json", {"IMAGE": fashion_test[0][bench.pick_data_rows(10000, 64, 0)]}
    )
    return artifacts, repository, data


@pytest.mark.integration
def test_perf_analyzer_against_a_real_server(
    quick_cnn, fashion_test, running_server, execution_env, tmp_path
):
    from offramp.client.tools.perf_analyzer import run_perf_analyzer

    artifacts, repository, data = _cnn_for_perf_analyzer(quick_cnn, fashion_test, execution_env, tmp_path)
    with running_server(repository) as server:
        for model, parameters in (
            (artifacts.name, {}),
            (f"{artifacts.name}_full", {}),
            (artifacts.name, {"force_full": True}),
        ):
            before = model_statistics(server.grpc_url)
            options = PerfAnalyzerOptions(
                url=server.grpc_url, model=model, input_data=data, concurrency=2, batch_size=4,
                shapes={"IMAGE": [1, 28, 28]}, measurement_interval_ms=500,
                request_parameters=parameters, extra_args=("--verbose-csv",),
            )  # fmt: skip
            run = run_perf_analyzer(options, tmp_path / f"{model}.csv")
            delta = statistics_delta(before, model_statistics(server.grpc_url))
            result = run.result
            assert result.concurrency == 2 and result.batch_size == 4
            assert result.rows_per_s > 0 and result.requests_per_s > 0
            assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
            assert result.avg_ms > 0
            assert (
                delta[model]["success"] > 0 and delta[model]["inference_count"] == 4 * delta[model]["success"]
            )
            assert sum(s["fail"] for s in delta.values()) == 0, delta
            if parameters:  # forced rows reach the full model through the orchestrator
                assert delta[f"{artifacts.name}_full"]["success"] > 0
            cpu = bench.server_cpu_seconds_by_role(server.pid, server.repository)
            assert cpu["tritonserver"] > 0 and cpu[model] > 0


@pytest.mark.integration
def test_a_rate_search_against_a_real_server_stops_at_its_latency_threshold(
    quick_cnn, fashion_test, running_server, execution_env, tmp_path
):
    """perf_analyzer's own search: under a threshold no request reaches, a result per rate asked; under
    one every request passes (1 ms: a request through Triton's gRPC takes more here), none, and no
    error (perf_analyzer then writes no CSV)."""
    from offramp.client.tools.perf_analyzer import search_request_rate

    artifacts, repository, data = _cnn_for_perf_analyzer(quick_cnn, fashion_test, execution_env, tmp_path)
    with running_server(repository) as server:
        search = PerfAnalyzerOptions(
            url=server.grpc_url, model=artifacts.name, input_data=data, batch_size=4,
            shapes={"IMAGE": [1, 28, 28]}, measurement_interval_ms=500, max_trials=3, percentile=99,
            request_rate_range=(10.0, 30.0, 10.0), latency_threshold_ms=60_000,
        )  # fmt: skip
        within = search_request_rate(search, tmp_path / "all.csv", timeout_s=120)
        assert [r.request_rate for r in within] == [10.0, 20.0, 30.0]
        assert all(r.p99_ms < 60_000 and r.batch_size == 4 for r in within)
        tight = replace(search, latency_threshold_ms=1)
        assert search_request_rate(tight, tmp_path / "none.csv", timeout_s=120) == []


@pytest.mark.integration
@pytest.mark.slow
def test_quick_benchmark_end_to_end(quick_cnn, fashion_test, tmp_path):
    """The whole driver on a briefly trained model: a sweep of one level, every arm, and the report."""
    from offramp.client.tools.bench_report import write_report
    from offramp.client.tools.perf_analyzer import check_perf_analyzer

    try:
        check_perf_analyzer()
    except PerfAnalyzerError as error:
        pytest.skip(str(error))
    workload = _quick_workload(quick_cnn, fashion_test)
    config = bench.BenchConfig(
        concurrency=(4,), repeats=2, measurement_interval_ms=400, data_rows=64, quality_rows=256,
        workdir=tmp_path / "work", out=tmp_path / "out", quick=True, progress=False,
    )  # fmt: skip
    summary = bench.run_workload(workload, config)
    (level,) = summary["levels"]
    assert level["throughput_ratio"] > 0 and set(level["arms"]) == set(bench.ARM_KEYS)
    assert len(level["throughput_ratios"]) == 2
    quality = summary["quality"]
    assert quality["rows"] == 256 and 0 < quality["mean_compute_fraction"] <= 1
    assert quality["nocompact_same_labels"] == 1.0 and quality["segments_full_agreement_with_full"] == 1.0
    assert summary["breakdown"]["orchestrator"]["requests"] > 0
    assert all(r["stats"] for r in summary["records"])
    report = write_report(config.out)
    text = report.read_text()
    assert "Throughput and latency" in text and "Where the time goes" in text
    for name in ("throughput", "latency", "accuracy_compute"):
        assert (config.out / "plots" / f"fashion_cnn_{name}.png").stat().st_size > 1000
    assert (config.out / "results" / "fashion_cnn" / "runs.csv").read_text().count("\n") == 1 + 2 * len(
        bench.ARM_KEYS
    )


@pytest.mark.integration
def test_a_text_workload_under_perf_analyzer(quick_text_model, tmp_path):
    """Token ids padded to one length go through perf_analyzer to both models; the served answers
    of the padded rows agree with the offline ones."""
    from offramp.build.calibrate import exit_logits_from_onnx, held_out_data
    from offramp.client.tools.bench_summary import Goals
    from offramp.client.tools.perf_analyzer import check_perf_analyzer

    try:
        check_perf_analyzer()
    except PerfAnalyzerError as error:
        pytest.skip(str(error))
    artifacts, directory = quick_text_model
    test = held_out_data(artifacts, directory, "test")
    workload = bench._recipe_workload(artifacts, directory, test, Goals(), "quick text")
    assert {a.shape[1] for a in workload.test_inputs.values()} == {test.inputs["INPUT_IDS"].shape[1]}
    config = bench.BenchConfig(
        concurrency=(2,), repeats=1, measurement_interval_ms=300, data_rows=32, quality_rows=64,
        arms=("early", "full"), workdir=tmp_path / "work", out=tmp_path / "out", progress=False,
    )  # fmt: skip
    summary = bench.run_workload(workload, config)
    (level,) = summary["levels"]
    assert level["throughput_ratio"] > 0 and set(level["arms"]) == {"early", "full"}
    quality = summary["quality"]
    # The last exit costs a little over 1: every exit head runs on the way (the full model has one).
    assert quality["rows"] == 64 and 0 < quality["mean_compute_fraction"] <= artifacts.exit_costs[-1] + 1e-6
    offline = bench._policy_exits(
        exit_logits_from_onnx(artifacts, directory, {n: a[:64] for n, a in test.inputs.items()}),
        workload.policy,
    )
    # A row on a threshold may flip with the batch it runs in (float noise): at most one here.
    expected = np.bincount(offline, minlength=artifacts.num_exits) / 64
    assert quality["exit_fractions"] == pytest.approx(expected, abs=1.5 / 64)


def test_report_from_saved_results(tmp_path):
    """BENCHMARKS.md and the plots are written from a summary.json alone (no server, no model)."""
    from offramp.client.tools.bench_report import write_report

    cpu = {"tritonserver": 0.2, "m": 0.3, "m_segment_0": 0.1, "m_segment_1": 0.2}
    timed = [
        {**r, "server_cpu_s": cpu if r["arm"] == "early" else {"tritonserver": 0.1, "m_full": 0.5},
         "client_cpu_s": 0.1, "wall_s": 5.0, "machine": {"busy_cores": 1.5},
         "stats": {"m": stats(100, 800, 100, 0.0, 1000.0), "m_segment_0": stats(100, 800, 100, 1.0, 200.0),
                   "m_segment_1": stats(50, 200, 50, 0.0, 200.0), "m_full": stats(100, 800, 50, 0.0, 800.0)}}
        for r in FIXED
    ]  # fmt: skip
    quality = quality_summary(np.zeros(4), np.zeros(4), np.zeros(4), np.array([0, 0, 1, 1]),
                              np.array([0.4, 0.4, 1.0, 1.0]), 2)  # fmt: skip
    quality.update(concurrency=8, rows_per_request=8, nocompact_same_labels=1.0, nocompact_same_exits=1.0,
                   segments_full_agreement_with_full=1.0)  # fmt: skip
    levels = sweep_summary(timed, quality["ideal_speedup"])
    curve = [{"threshold": 0.5, "accuracy": 0.8, "agreement": 0.9, "mean_compute_fraction": 0.6}]
    summary = {
        "workload": "m", "description": "synthetic", "date": "2026-01-01T00:00:00+00:00", "duration_s": 60.0,
        "machine": {"nproc": 2, "cpu_model": "CPU", "memory_gib": 8.0, "kernel": "6", "python": "3.11",
                    "loadavg_at_start": ["1.0", "1.0", "1.0"]},
        "versions": {"tritonserver": "2.51.0", "nvidia-pytriton": "0.7.0", "tritonclient": "2.49.0",
                     "onnxruntime": "1", "torch": "2", "numpy": "1"},
        "config": {"quick": False, "segment_instances": 2, "threads_per_instance": 1, "max_queue_delay_us": 0,
                   "orchestrator_instances": 2, "rows_per_request": 8, "concurrency": [1, 8],
                   "measurement_interval_ms": 1500, "repeats": 3},
        "model": {"exits": 2, "exit_costs": [0.4, 1.0], "exit_test_accuracy": [0.8, 0.9]},
        "policy": {"version": "p-1", "provenance": {"method": "test", "expected_cost": 0.7},
                   "rule": "patience",
                   "exits": [{"threshold": 0.9, "metric": "max_prob", "patience": 2}, {"threshold": 1.0}]},
        "data": {"rows": 64, "offline_exit_fractions": [0.5, 0.5], "offline_mean_compute_fraction": 0.7},
        "quality": quality, "levels": levels, "goal_settings": {"throughput_ratio": 3.0},
        "goals": evaluate_goals(levels, Goals(throughput_ratio=3.0), quality),
        "breakdown": time_breakdown(timed, 8, "m", "m_full", ["m_segment_0", "m_segment_1"], 0.7),
        "offline": {"8": {"segment_ms": [0.5, 0.8], "full_ms": 1.2, "cumulative_time_fraction": [0.4, 1.1],
                          "mac_fraction": [0.4, 1.0], "cascade_logic_ms": 0.2}},
        "curves": {"calibration": curve, "test": curve}, "load": machine_load(timed), "records": timed,
    }  # fmt: skip
    results = tmp_path / "results" / "m"
    results.mkdir(parents=True)
    (results / "summary.json").write_text(json.dumps(summary))
    # offramp tune's decisions for this model are stated under its goals (one for another model is not).
    candidates = [{"predicted_speedup": 0.9}, {"predicted_speedup": 0.74}]
    for run, model, modes, decision, verified in (
        ("m_bls", "m", ["bls"], {"serves_full_model": True}, {"throughput_ratio": 0.74, "rounds": 3}),
        ("m", "m", ["bls", "in_process"],
         {"serves_full_model": False, "kept_exits": [0, 2], "mode": "in_process", "rule": "patience"},
         {"throughput_ratio": 1.33, "rounds": 3}),
        ("m_accuracy", "m", ["in_process"],
         {"serves_full_model": False, "kept_exits": [0, 1, 2], "mode": "in_process", "rule": "confidence"},
         {"throughput_ratio": 1.2, "rounds": 3}),
        ("other", "n", ["bls"], {"serves_full_model": True}, {}),
    ):  # fmt: skip
        (tmp_path / "tune" / run).mkdir(parents=True)
        config = {"modes": modes, "max_accuracy_loss": 0.005 if run.endswith("accuracy") else None}
        record = {"model": model, "date": run, "config": config, "decision": decision,
                  "verified": verified, "candidates": candidates}  # fmt: skip
        (tmp_path / "tune" / run / "tune.json").write_text(json.dumps(record))
    text = write_report(tmp_path).read_text()
    assert (
        "| throughput early/full as `offramp tune` serves it, segments over BLS (`tune/m_bls`) | >= 1x "
        "| the full model, called directly: 1.00x (no set of exits predicted above 0.90x; the early-exit "
        "interface kept at least cost measured 0.74x) | yes |"
    ) in text
    chosen = "exits [0, 2] in process, patience rule: 1.33x (3 rounds) | yes |"
    assert f"segments over BLS and in process (`tune/m`) | >= 1x | {chosen}" in text
    bounded = "exits [0, 1, 2] in process, confidence rule, accuracy loss <= 0.5 points: 1.20x (3 rounds)"
    assert f"segments in process (`tune/m_accuracy`) | >= 1x | {bounded} | yes |" in text
    assert "tune/other" not in text
    assert "| 8 | 250 | 100 | 2.50x |" in text  # medians and the paired ratio
    assert "rule family patience; max-prob (discounted where the label held at the last 2 exits)" in text
    # Server CPU per row at c=8, 3 rounds pooled: early 3 x 0.8 s / 2400 rows, full 3 x 0.6 s / 2400 rows.
    assert "| 1.000 / 0.750 | 0.75x |" in text
    assert "compaction gain" in text and "| 8 | 90 | 10.0% |" in text
    assert "throughput early/full at concurrency 8, segments over BLS | >= 3x | 2.50x | **no** |" in text
    assert "Where the time goes (concurrency 8" in text and "per BLS call" in text
    for name in ("throughput", "latency", "accuracy_compute"):
        assert (tmp_path / "plots" / f"m_{name}.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "empty")


def test_any_builds_folder_is_a_workload(quick_text_model):
    """`offramp bench --artifacts DIR`: the build's own splits, its test rows padded to one length (the
    one shape perf_analyzer sends), a policy calibrated on its calibration rows."""
    from offramp.client.tools.bench import BenchConfig, WorkloadSettings, resolve_workload

    artifacts, directory = quick_text_model
    assert BenchConfig(artifacts=(directory,)).artifacts == (directory,)
    workload = resolve_workload(str(directory))(WorkloadSettings())
    assert workload.name == artifacts.name and workload.test_rows == artifacts.build["split_sizes"]["test"]
    ids, mask = workload.test_inputs["INPUT_IDS"], workload.test_inputs["ATTENTION_MASK"]
    assert ids.shape == mask.shape and mask.sum(axis=1).max() == ids.shape[1]
    assert workload.policy.model_fingerprint == artifacts.fingerprint
    calibration_rows = artifacts.build["split_sizes"]["calibration"]
    assert workload.calibration_logits.shape[:2] == (artifacts.num_exits, calibration_rows)


def test_the_orchestrators_parts_are_read_per_model_summed_over_instances_and_pooled_per_execution():
    """Two instances of `m` and one of another model on a metrics page (served by a local HTTP server):
    only `m`'s series count, summed; pooled over two runs, the parts are ms per execution."""
    import http.server
    import threading

    from offramp.client.serving.statistics import orchestrator_parts
    from offramp.client.tools.bench_summary import orchestrator_parts_per_execution

    page = "\n".join(
        [
            'offramp_execute_seconds_total{instance="a",model="m",part="cascade"} 0.5',
            'offramp_execute_seconds_total{instance="b",model="m",part="cascade"} 0.25',
            'offramp_execute_seconds_total{instance="a",model="m",part="segments"} 2',
            'offramp_execute_seconds_total{instance="c",model="other",part="cascade"} 9',
            'offramp_executes_total{instance="a",model="m"} 100',
            'offramp_executes_total{instance="b",model="m"} 50',
            'offramp_execute_requests_total{instance="a",model="m"} 300',
            'offramp_exits_total{instance="a",model="m",exit="0",cohort=""} 7',
        ]
    ).encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        read = orchestrator_parts(f"http://127.0.0.1:{server.server_port}/metrics", "m")
    finally:
        server.shutdown()
    assert read == {"cascade": 0.75, "segments": 2.0, "executes": 150.0, "requests": 300.0}
    pooled = orchestrator_parts_per_execution([{"orchestrator_parts": read}, {"orchestrator_parts": read}])
    assert pooled["cascade"] == pytest.approx(5.0) and pooled["segments"] == pytest.approx(2000 / 150)
    assert pooled["parse"] == 0.0 and pooled["requests_per_execution"] == 2.0
    assert pooled["sum"] == pytest.approx(
        sum(pooled[p] for p in ("parse", "cascade", "segments", "observe", "respond"))
    )
    assert orchestrator_parts_per_execution([{"orchestrator_parts": {}}]) == {}


def test_static_truncation_takes_the_cheapest_exit_within_the_policys_loss():
    from offramp.client.tools.bench_summary import truncation_exit

    accuracy = [0.80, 0.895, 0.90, 0.91]
    assert truncation_exit(accuracy, 0.0) == 3  # no loss allowed: only the last exit
    assert truncation_exit(accuracy, 0.015) == 1  # 0.895 >= 0.91 - 0.015
    assert truncation_exit(accuracy, 0.2) == 0
    assert truncation_exit([0.9, 0.8, 0.85], 0.0) == 0  # an early exit as good as the last counts
    assert bench.arms_of("m", 1)["truncated"].parameters == {"min_exit": 1, "max_exit": 1}


def test_a_measurement_that_cannot_go_on_exits_1_with_one_line(capsys):
    def fails() -> None:
        raise FileNotFoundError("no manifest.json in /x")

    assert bench.measurement_status("offramp tune", lambda: None) == 0
    assert bench.measurement_status("offramp tune", fails) == 1
    assert capsys.readouterr().err == "offramp tune: error: no manifest.json in /x\n"


@pytest.mark.filterwarnings("ignore::offramp.build.risk_control.CalibrationWarning")
def test_the_bench_policy_certifies_the_accuracy_goal_where_the_rows_can_show_it():
    """With rows enough, the policy states the workload's accuracy bound with the disagreement; where
    loss-free certifying rows could not show it (TREC's 602 at half a point), the bound would certify no
    early exit at all, so the policy is certified on disagreement alone and says so (no bound)."""
    from types import SimpleNamespace

    from tests.fakes import synthetic_exits

    artifacts = SimpleNamespace(exit_costs=(0.3, 0.6, 1.0), fingerprint="fp")
    logits, labels = synthetic_exits(rows=6000)
    bounded = bench.bench_policy(artifacts, logits, labels, max_accuracy_loss=0.02)
    assert bounded.provenance["max_accuracy_loss"] == 0.02
    assert bounded.provenance["achieved_accuracy_loss"] <= 0.02
    plain = bench.bench_policy(artifacts, logits, labels)
    assert plain.provenance["max_accuracy_loss"] is None
    assert bounded.provenance["expected_cost"] >= plain.provenance["expected_cost"]
    few = bench.bench_policy(artifacts, logits[:, :800], labels[:800], max_accuracy_loss=0.005)
    assert few.provenance["max_accuracy_loss"] is None and few.provenance["expected_cost"] < 1.0
