"""The spike benchmark's parts that need no server: the schedule it sends, how it reads perf_analyzer's
profile export, and the statistics per step it reports.

``data/perf_analyzer_profile_export.json`` is six requests of a real export (perf_analyzer 2.49 against
``trec_minilm_ladder_shed``, 8 rows per request, a schedule of two 5 s steps), in the order perf_analyzer
wrote them (not the order it sent them)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from offramp.client.tools.perf_analyzer import PerfResult
from offramp.client.tools.spike import (
    FIXED,
    FLAG_SHED,
    FULL,
    LADDER,
    Exported,
    ProfileExport,
    SpikeConfig,
    Step,
    distinct_rows,
    latency_trace,
    main_spike,
    median_capacities,
    nearest_rank,
    parse_profile_export,
    pending_requests,
    row_index,
    rung_0_from,
    rung_changes,
    rung_from_metrics,
    slo_gauges,
    spike_goals,
    spike_markdown,
    spike_schedule,
    steepest_rise,
    step_statistics,
    wait_until_idle,
    within_slo,
    write_request_intervals,
)

EXPORT = Path(__file__).parent / "data" / "perf_analyzer_profile_export.json"
ORIGIN_NS = 1796222078668039707  # the export's first window boundary
# (sent, first response) of the fixture's requests in the order they were sent, ns
TIMES_NS = [
    (1796222078846859207, 1796222079063694873),
    (1796222080813446669, 1796222080962068604),
    (1796222084023312762, 1796222084464192760),
    (1796222084687965994, 1796222084895762180),
    (1796222085475771264, 1796222085645824846),
    (1796222086444541606, 1796222086637143570),
]


# --- The schedule ---------------------------------------------------------------------------------


def test_poisson_schedule_sends_each_steps_rate_within_its_step():
    sends = spike_schedule([10.0, 40.0, 5.0], step_s=20.0, seed=3)
    assert np.all(np.diff(sends) >= 0) and sends[0] >= 0 and sends[-1] < 60.0
    counts = np.histogram(sends, bins=[0, 20, 40, 60])[0]
    for count, expected in zip(counts, (200, 800, 100), strict=True):
        assert abs(count - expected) < 4 * math.sqrt(expected)  # Poisson: sd = sqrt(mean)
    gaps = np.diff(sends[(sends > 20) & (sends < 40)])
    assert np.std(gaps) == pytest.approx(np.mean(gaps), rel=0.15)  # exponential gaps: sd = mean
    assert np.array_equal(sends, spike_schedule([10.0, 40.0, 5.0], step_s=20.0, seed=3))
    assert not np.array_equal(sends, spike_schedule([10.0, 40.0, 5.0], step_s=20.0, seed=4))


def test_constant_schedule_has_even_gaps_at_each_steps_rate():
    sends = spike_schedule([2.0, 4.0], step_s=1.0, arrivals="constant")
    assert sends.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.25, 1.5, 1.75])


@pytest.mark.parametrize(("rates", "arrivals"), [([1.0, 0.0], "poisson"), ([1.0], "bursty")])
def test_a_bad_schedule_is_refused(rates, arrivals):
    with pytest.raises(ValueError):
        spike_schedule(rates, step_s=1.0, arrivals=arrivals)


def test_the_intervals_file_holds_gaps_that_add_up_to_the_schedule_without_drift(tmp_path):
    sends = np.arange(1, 30001) / 3000.0  # a gap of 333.33 us: rounding each gap would drift by 10 ms
    path = write_request_intervals(tmp_path / "intervals.txt", sends)
    gaps = [int(line) for line in path.read_text().splitlines()]
    assert len(gaps) == len(sends) and gaps[0] == 333  # the first gap is from the start
    assert set(gaps[1:]) == {333, 334}
    assert np.cumsum(gaps)[-1] == 10_000_000
    assert np.abs(np.cumsum(gaps) - sends * 1e6).max() <= 0.5


@pytest.mark.parametrize("sends", [[], [0.2, 0.1]])
def test_an_empty_or_backward_schedule_is_not_written(tmp_path, sends):
    with pytest.raises(ValueError):
        write_request_intervals(tmp_path / "intervals.txt", np.array(sends))


# --- The export -----------------------------------------------------------------------------------


def test_the_export_is_read_in_sending_order_with_times_inputs_and_numeric_outputs():
    export = parse_profile_export(EXPORT.read_text())
    assert export.start == ORIGIN_NS / 1e9
    assert [(r.sent, r.answered) for r in export.requests] == [(s / 1e9, a / 1e9) for s, a in TIMES_NS]
    first = export.requests[0]
    assert set(first.first_row) == {"INPUT_IDS", "ATTENTION_MASK"}
    assert first.first_row["INPUT_IDS"][:4] == (101, 3005, 8308, 2011)  # one row, as sent
    assert set(first.outputs) == {"LOGITS", "LABEL", "EXIT", "FLAGS", "COST", "CONFIDENCE"}  # no LABEL_NAME
    assert first.outputs["LABEL"].tolist() == [3, 3, 5, 2, 3, 4, 2, 3]
    assert first.outputs["LOGITS"].shape == (8 * 6,)


def test_an_export_of_several_runs_or_none_is_refused():
    document = json.loads(EXPORT.read_text())
    with pytest.raises(ValueError):
        parse_profile_export(json.dumps({**document, "experiments": document["experiments"] * 2}))
    document["experiments"][0]["requests"] = []
    with pytest.raises(ValueError):
        parse_profile_export(json.dumps(document))


# --- The statistics per step ----------------------------------------------------------------------


def test_nearest_rank_is_an_observed_value_and_keeps_infinity():
    assert nearest_rank([4.0, 1.0, 3.0, 2.0], 50) == 2.0
    assert nearest_rank(list(range(1, 101)), 99) == 99
    assert nearest_rank([1.0] * 99 + [math.inf], 99) == 1.0
    assert nearest_rank([1.0] * 98 + [math.inf] * 2, 99) == math.inf
    assert math.isnan(nearest_rank([], 99))


def fixture_rows_and_labels(export: ProfileExport) -> tuple[dict, np.ndarray]:
    """48 data rows: the fixture's requests start at rows 0, 8, ..., 40 in sending order; the full model's
    labels are the answers, except one row of the third request (sent in the second step)."""
    rows = {tuple(r.first_row[n] for n in sorted(r.first_row)): 8 * i for i, r in enumerate(export.requests)}
    labels = np.concatenate([r.outputs["LABEL"] for r in export.requests])
    labels[16 + 5] = (labels[16 + 5] + 1) % 6
    return rows, labels


def test_steps_from_the_real_export():
    export = parse_profile_export(EXPORT.read_text())
    rows, labels = fixture_rows_and_labels(export)
    sent = np.array([s - ORIGIN_NS for s, _ in TIMES_NS]) / 1e9
    schedule = sent - np.array([0.001, 0.002, 0.0, 0.004, 0.0, 0.010])  # how late each was sent
    steps = step_statistics(
        export, LADDER, [0.5, 2.0], [1.0, 4.0], schedule, 5.0, 8, rows, labels, rungs=[(1.0, 0), (6.0, 2)]
    )
    first, second = steps
    assert (first.requests, second.requests) == (2, 4) and first.unanswered == second.unanswered == 0
    # Latencies (ms) by sending order: 216.8, 148.6 | 440.9, 207.8, 170.1, 192.6
    assert first.p50_ms == pytest.approx(148.622, abs=1e-3) and first.p99_ms == pytest.approx(
        216.836, abs=1e-3
    )
    assert second.p50_ms == pytest.approx(192.602, abs=1e-3) and second.p99_ms == pytest.approx(
        440.880, abs=1e-3
    )
    # Answers that arrived in [0, 5 s): two requests; in [5 s, 10 s): four.
    assert first.rows_per_s == pytest.approx(2 * 8 / 5) and second.rows_per_s == pytest.approx(4 * 8 / 5)
    assert (first.agreement, first.rows_compared) == (1.0, 16)
    assert (second.agreement, second.rows_compared) == (31 / 32, 32)
    assert second.rung_agreement == 31 / 32  # nothing shed: the same rows
    assert first.rung_0_from_s == 0.0 and math.isnan(second.rung_0_from_s)  # rung 0 all the first step
    costs = [
        np.mean(np.concatenate([r.outputs["COST"] for r in part]))
        for part in (export.requests[:2], export.requests[2:])
    ]
    assert [first.compute, second.compute] == pytest.approx(costs)
    assert first.shed == second.shed == 0.0
    assert first.send_late_max_ms == pytest.approx(2.0, abs=1e-3)
    assert second.send_late_max_ms == pytest.approx(10.0, abs=1e-3)
    assert (first.rungs, second.rungs) == ((0,), (2,))
    assert (first.offered, second.requests_per_s, second.started_s) == (0.5, 4.0, 5.0)


def request(sent: float, latency: float | None, labels: list[int], flags: list[int]) -> Exported:
    outputs = {"LABEL": np.array(labels), "FLAGS": np.array(flags), "COST": np.full(len(labels), 0.25)}
    first_row = {"INPUT_IDS": (len(labels), int(sent * 10))}
    return Exported(sent, None if latency is None else sent + latency, first_row, outputs)


def test_an_unanswered_request_is_infinitely_late_and_shed_rows_are_counted():
    export = ProfileExport(
        100.0,
        [
            request(100.1, 0.05, [1, 1], [0, FLAG_SHED]),
            request(100.2, None, [1, 1], [0, 0]),
            request(100.3, 0.05, [0, 1], [FLAG_SHED | 4, 4]),
        ],
    )
    rows = {((2, 1001),): 0, ((2, 1003),): 2}  # the unanswered request's rows are not even known
    (step,) = step_statistics(
        export, FIXED, [1.0], [3.0], np.array([0.1, 0.2, 0.3]), 1.0, 2, rows, np.ones(4)
    )
    assert (step.requests, step.unanswered) == (3, 1)
    assert step.p99_ms == math.inf and step.p50_ms == pytest.approx(50.0)
    assert step.rows_per_s == 4.0  # two answered requests of two rows in a 1 s step
    assert (step.agreement, step.rows_compared) == (3 / 4, 4)
    assert step.shed == 0.5 and step.compute == 0.25
    # The disagreeing row was shed: the rungs answered two rows, and both agreed.
    assert step.rung_agreement == 1.0


def test_without_known_rows_or_labels_agreement_is_not_made_up():
    export = ProfileExport(0.0, [request(0.1, 0.05, [1, 1], [0, 0])])
    (step,) = step_statistics(export, FULL, [1.0], [1.0], np.array([0.1]), 1.0, 2)
    assert math.isnan(step.agreement) and step.rows_compared == 0


def test_requests_sent_after_the_last_step_count_in_it():
    export = ProfileExport(0.0, [request(0.5, 0.1, [1], [0]), request(2.5, 0.1, [1], [0])])
    steps = step_statistics(export, FULL, [1.0, 2.0], [1.0, 2.0], np.array([0.5, 1.5]), 1.0, 1)
    assert [s.requests for s in steps] == [1, 1]
    assert steps[1].send_late_max_ms == pytest.approx(1000.0)  # a client that could not keep up shows


def test_distinct_rows_drops_repeats_and_the_index_finds_each_row():
    inputs = {"INPUT_IDS": np.array([[1, 2], [3, 4], [1, 2], [5, 6]]), "ATTENTION_MASK": np.ones((4, 2), int)}
    kept = distinct_rows(inputs)
    assert kept["INPUT_IDS"].tolist() == [[1, 2], [3, 4], [5, 6]]
    index = row_index(kept)
    assert index[((1, 1), (5, 6))] == 2 and len(index) == 3  # names in sorted order, as the parser keys them


# --- What the server's metrics page says ----------------------------------------------------------

METRICS = """# HELP nv_inference_pending_request_count Instantaneous number of pending requests
nv_inference_pending_request_count{model="trec_minilm_full",version="1"} 3
nv_inference_pending_request_count{model="trec_minilm_segment_0",version="1"} 2
offramp_slo_rung{instance="a",model="trec_minilm_ladder"} 1
offramp_slo_rung{instance="b",model="trec_minilm_ladder"} 3
offramp_slo_rung{instance="a",model="trec_minilm_ladder_shed"} 0
offramp_slo_load_rps{instance="b",model="trec_minilm_ladder"} 28.5
offramp_slo_below_p99_ms{instance="b",model="trec_minilm_ladder"} 97.25
"""


class MetricsPages:
    """A metrics endpoint on loopback that serves ``pages`` in turn (the last one from then on)."""

    def __init__(self, pages: list[str]) -> None:
        import http.server
        import threading

        served = self.served = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the handler's name)
                body = pages[min(len(served), len(pages) - 1)].encode()
                served.append(body)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_waiting_for_idle_waits_for_no_pending_request_and_every_ladder_at_rung_0():
    busy = 'nv_inference_pending_request_count{model="m",version="1"} 2\nofframp_slo_rung{model="l"} 0\n'
    climbed = 'nv_inference_pending_request_count{model="m",version="1"} 0\nofframp_slo_rung{model="l"} 2\n'
    idle = 'nv_inference_pending_request_count{model="m",version="1"} 0\nofframp_slo_rung{model="l"} 0\n'
    for sequence, looks in (([busy, busy, climbed, idle], 4), ([idle], 1)):
        pages = MetricsPages(sequence)
        try:
            wait_until_idle(pages.url, ["l"], timeout_s=30, settle_s=0)
            assert len(pages.served) == looks  # it read until the idle page, and not after
        finally:
            pages.close()


def test_pending_requests_and_the_rung_are_read_off_the_metrics_page():
    assert pending_requests(METRICS) == 5.0
    assert pending_requests("offramp_slo_rung 1\n") is None
    assert rung_from_metrics(METRICS, "trec_minilm_ladder") == 3  # the highest instance
    assert rung_from_metrics(METRICS, "trec_minilm_ladder_shed") == 0
    assert rung_from_metrics(METRICS, "trec_minilm") is None
    assert slo_gauges(METRICS, "trec_minilm_ladder") == {
        "a": {"rung": 1.0},
        "b": {"rung": 3.0, "load_rps": 28.5, "below_p99_ms": 97.25},
    }
    assert slo_gauges(METRICS, "trec_minilm") == {}


# --- The goals and the report ---------------------------------------------------------------------


def step(arm: str, offered: float, p99: float, agreement: float = 1.0, rungs: tuple = ()) -> Step:
    return Step(arm, offered, offered * 10, 100, 0, offered * 80, p99 / 2, p99, agreement, 800,
                0.5, 0.0, 1.0, 2.0, rungs, 0.0, rung_agreement=agreement)  # fmt: skip


def test_the_goals_say_where_the_ladder_holds_and_where_its_agreement_is_short():
    steps = [
        step(FULL, 1.0, 300), step(FULL, 3.0, 9000), step(FIXED, 3.0, 800),
        step(LADDER, 1.0, 300, rungs=(0, 1)), step(LADDER, 3.0, 390, 0.97, (2, 3)),
        replace(step(LADDER, 1.0, 200, 0.985, (1, 0)), rung_0_from_s=3.5),
    ]  # fmt: skip
    goals = spike_goals(steps, slo_ms=400, epsilons=[0.01, 0.02, 0.05, 0.1])
    assert goals["slo_held_in_overload"] == {FULL: False, FIXED: False, LADDER: True}
    assert goals[LADDER] == {
        "holds_where_others_do_not": True,
        "agreement_at_least_one_minus_epsilon": True,  # 0.97 at rung 3 (10%), 0.985 at rung 1 (2%)
        "back_at_rung_0_at_the_end": True,
        "back_at_rung_0_after_s": 3.5,
    }
    short = [*steps[:-1], step(LADDER, 1.0, 200, 0.975, (1, 0))]  # under 1 - 2% at rung 1
    goals = spike_goals(short, slo_ms=400, epsilons=[0.01, 0.02, 0.05, 0.1])
    assert goals[LADDER]["agreement_at_least_one_minus_epsilon"] is False
    stuck = [*steps[:-1], step(LADDER, 1.0, 200, 0.99, (2, 1))]
    assert spike_goals(stuck, 400, [0.01, 0.02, 0.05, 0.1])[LADDER]["back_at_rung_0_at_the_end"] is False
    shed = [*steps[:-1], replace(step(LADDER, 1.0, 200, 0.85, (1, 0)), rung_agreement=0.99)]
    assert spike_goals(shed, 400, [0.01, 0.02, 0.05, 0.1])[LADDER]["agreement_at_least_one_minus_epsilon"]
    missed = [*steps[:4], step(LADDER, 3.0, 410, 0.97, (3,)), steps[-1]]
    assert spike_goals(missed, 400, [0.01, 0.02, 0.05, 0.1])[LADDER]["holds_where_others_do_not"] is False


def test_the_report_marks_each_step_against_the_slo():
    steps = [step(FULL, 3.0, math.inf), step(LADDER, 3.0, 390, 0.97, (3,))]
    steps[1] = replace(steps[1], shed=0.1, rung_agreement=0.99)
    summary = {
        "workload": "w", "slo_p99_ms": 400.0, "full_light_p99_ms": 200.0, "full_capacity_rows_per_s": 90.0,
        "ladder": [{"epsilon": 0.01, "expected_cost": 0.66}], "schedule": {"requests": 200},
        "config": {"spike": {"slo_factor": 2.0, "spike_step_s": 15.0}, "rows_per_request": 8},
        "arms": {FULL: {"drain_s": 40.0}, LADDER: {"drain_s": 0.2}}, "saturating_concurrency": 16,
        "capacity_rows_per_s": {FULL: 53.2, FIXED: 80.0, "top_rung": 201.0},
        "rung_capacity_rows_per_s": [80.0, 120.4, 201.0],
        "steps": [s.__dict__ for s in steps], "goals": spike_goals(steps, 400.0, [0.01, 0.02, 0.05, 0.1]),
    }  # fmt: skip
    text = spike_markdown(summary)
    full_row, ladder_row = (line for line in text.splitlines() if line.startswith(("| full", "| ladder")))
    assert "Capacity at concurrency 16: full 53 rows/s, fixed 80 rows/s, top_rung 201 rows/s." in text
    assert "Each rung alone, rung 0 first: 80, 120, 201 rows/s" in text
    assert "| ∞ | NO |" in full_row
    assert "| 390.0 | yes | 0.970 (800); rung rows 0.990 |" in ladder_row and "| 3 |" in ladder_row
    assert "Within the SLO" not in text  # a summary from before the bench searched for it
    within = {
        "full_within_slo_rows_per_s": 0.0, "rung_within_slo_rows_per_s": [40.0, 72.2, 160.8],
        "within_slo_shares": (0.2, 1.0, 0.1),
    }  # fmt: skip
    assert (
        "Within the SLO alone (Poisson arrivals; the highest rate of perf_analyzer's search over 20%, "
        "30%, ... 100% of what each carries at saturation whose p99 was within it), full model / rungs 0-2: "
        "under 20% / 40 (50%) / 72 (60%) / 161 (80%) rows/s; the schedule's 1x is 225% of rung 0's."
    ) in spike_markdown({**summary, **within})
    config = {
        **summary["config"],
        "spike": {**summary["config"]["spike"], "spike_headroom": 2.0, "spike_headroom_load": 0.7},
    }
    headroom = "The ladders serve a rung only where 2 x the steady load fills at most 70% of what it carries"
    settings = "(slo_headroom, slo_headroom_load, slo_headroom_load_above)."
    assert f"{headroom} {settings}" in spike_markdown({**summary, "config": config})
    config["spike"]["spike_headroom_load_above"] = 0.5
    shares = "fills at most 70% (rung 0) or 50% (the rungs above) of what it carries"
    assert f"{shares} {settings}" in spike_markdown({**summary, "config": config})


def test_what_a_model_holds_within_the_slo_is_the_highest_rate_of_the_search_in_rows():
    found = [PerfResult(0, 41.0, 20.0, 30.0, 35.0, 90.0, batch_size=8, request_rate=r) for r in (4.0, 6.0)]
    assert within_slo(found, batch=8) == 48.0  # 6 requests/s of 8 rows
    assert within_slo([], batch=8) == 0.0  # the first rate was over the SLO already


def test_rung_changes_are_counted_per_instance_and_reported():
    """The gauges polled every half second: instance b went 0, 1, 1, 0, 2 (three changes), a stayed."""
    trace = [(t, {"b": {"rung": r}, "a": {"rung": 0.0}}) for t, r in enumerate((0.0, 1.0, 1.0, 0.0, 2.0))]
    assert rung_changes(trace) == [0, 3]
    steps = [step(FULL, 3.0, math.inf), step(LADDER, 3.0, 390, 0.97, (3,))]
    summary = {
        "workload": "w", "slo_p99_ms": 400.0, "full_light_p99_ms": 200.0, "full_capacity_rows_per_s": 90.0,
        "ladder": [{"epsilon": 0.01, "expected_cost": 0.66}], "schedule": {"requests": 200},
        "config": {"spike": {"slo_factor": 2.0, "spike_step_s": 15.0}, "rows_per_request": 8},
        "arms": {FULL: {"drain_s": 40.0}, LADDER: {"drain_s": 0.2, "controller_trace": trace}},
        "saturating_concurrency": 16, "steps": [s.__dict__ for s in steps],
        "goals": spike_goals(steps, 400.0, [0.01, 0.02, 0.05, 0.1]),
    }  # fmt: skip
    text = spike_markdown(summary)
    assert "Rung changes over the schedule, per orchestrator instance: ladder 0, 3." in text


def test_a_late_answer_counts_in_the_step_that_sent_it_and_in_the_throughput_of_the_step_it_arrived():
    export = ProfileExport(0.0, [request(0.9, 0.5, [1], [0]), request(1.2, 0.1, [1], [0])])
    first, second = step_statistics(export, FULL, [1.0, 1.0], [1.0, 1.0], np.array([0.9, 1.2]), 1.0, 1)
    assert (first.requests, first.p99_ms, first.rows_per_s) == (1, pytest.approx(500.0), 0.0)
    assert (second.requests, second.p99_ms, second.rows_per_s) == (1, pytest.approx(100.0), 2.0)


def test_the_latency_trace_bins_requests_by_send_second():
    export = ProfileExport(
        10.0, [request(10.2, 0.1, [1], [0]), request(10.7, 0.3, [1], [0]), request(12.5, None, [1], [0])]
    )
    assert latency_trace(export) == [
        (0.0, 2, pytest.approx(100.0), pytest.approx(300.0)),
        (2.0, 1, math.inf, math.inf),
    ]


@pytest.mark.parametrize("family", ["confidence", "patience", "score"])
def test_the_ladder_is_certified_under_the_family_the_fixed_policy_serves(family):
    """Rung 0 and the fixed arm decide a row's exit the same way; the rungs above cost no more."""
    from types import SimpleNamespace

    from offramp.client.tools.spike import ladder_policy
    from tests.fakes import synthetic_exits

    logits, labels = synthetic_exits()  # (3 exits, rows, classes), more accurate exit by exit
    workload = SimpleNamespace(
        calibration_logits=logits, calibration_labels=labels, policy=SimpleNamespace(rule=family),
        artifacts=SimpleNamespace(exit_costs=[0.3, 0.6, 1.0], fingerprint="f" * 16),
    )  # fmt: skip
    policy = ladder_policy(workload, [0.01, 0.05, 0.1])
    assert policy.rule == family and [r.epsilon for r in policy.rungs] == [0.05, 0.1]
    costs = [policy.provenance["expected_cost"], *(r.expected_cost for r in policy.rungs)]
    assert costs == sorted(costs, reverse=True)


def test_back_at_rung_0_is_the_start_of_the_last_run_at_rung_0_that_ends_the_step():
    assert rung_0_from([(0.2, 2), (0.7, 0), (1.2, 1), (1.7, 0), (2.2, 0)]) == 1.7
    assert rung_0_from([(0.2, 0), (0.7, 0)]) == 0.0
    assert math.isnan(rung_0_from([(0.2, 0), (0.7, 1)])) and math.isnan(rung_0_from([]))


def test_the_ladders_headroom_is_the_schedules_steepest_rise_unless_given():
    """The default schedule (0.5, 1, 2, 3, 1, 0.5) doubles at its 2x step: its ladders are told 2; a
    schedule that never rises asks for no headroom; a headroom given is kept."""
    assert steepest_rise((0.5, 1.0, 2.0, 3.0, 1.0, 0.5)) == 2.0
    assert steepest_rise((3.0, 1.0)) == steepest_rise((1.0,)) == 1.0
    assert SpikeConfig().resolved().spike_headroom == 2.0
    assert SpikeConfig(spike_headroom=1.0).resolved().spike_headroom == 1.0
    with pytest.raises(ValueError, match="headroom must be a load multiple >= 1"):
        SpikeConfig(spike_headroom=0.5)


def test_the_ladders_headroom_loads_are_checked_before_any_measuring():
    """0.7 for rung 0 and 0.5 above by default; a share over the descent's margin (80%) is refused when
    the options are read."""
    assert (SpikeConfig().spike_headroom_load, SpikeConfig().spike_headroom_load_above) == (0.7, 0.5)
    with pytest.raises(ValueError, match="headroom_load must lie in"):
        SpikeConfig(spike_headroom_load=0.9)
    with pytest.raises(ValueError, match="headroom_load_above must lie in"):
        SpikeConfig(spike_headroom_load_above=0.0)


def test_capacities_are_medians_of_rounds_that_take_every_model_in_turn():
    """A slow spell of the machine (the second call here) falls on one round of one model, and the
    median of three rounds sets it aside; the models are measured in turn, not each three times over."""
    calls: list[str] = []
    figures = iter([200.0, 90.0, 210.0, 410.0, 205.0, 400.0])  # full, rung 0; three rounds

    def measure(model: str) -> float:
        calls.append(model)
        return next(figures)

    assert median_capacities(measure, ["full", "rung_0"], rounds=3) == [205.0, 400.0]
    assert calls == ["full", "rung_0"] * 3


def test_an_unknown_workload_is_refused_before_any_run_with_what_there_is(capsys):
    from types import SimpleNamespace

    bench = SimpleNamespace(workloads=("trec", "no_such_workload"), workdir=".", quick=True, epochs=1)
    assert main_spike(bench, SpikeConfig(spike=True)) == 2
    error = capsys.readouterr().err
    assert "unknown workload 'no_such_workload'" in error and "a build's folder" in error
