"""``offramp bench --spike``: a traffic spike against the full model, a fixed policy and a ladder.

For each workload, one server holds the models over the same segments:

    <name>_full          the network without exits
    <name>               early exit under one certified policy (rung 0 of the ladder)
    <name>_ladder        early exit under the whole ladder, with the SLO controller on
    <name>_ladder_shed   the same, shedding past the top rung (only with ``shed_max_exit`` >= 0)

The SLO is ``slo_factor`` times the full model's p99 at light load (concurrency 1), both measured first,
with the full model's capacity (rows per second at saturation) and the capacity of each rung of the
ladder alone at the same concurrency (rung 0 is the fixed policy); then what the full model and each
rung hold within the SLO alone under Poisson arrivals (perf_analyzer's own search over rates,
:data:`WITHIN_SLO_SHARES` of the capacity, that stops at the first whose p99 passes the SLO): a rung
answers its tail over the target well before it is saturated, and a step's onset lands on the rung of
the step before. Each model then meets the same schedule of offered load, in multiples of the full
model's capacity (``spike_steps``, default comfortable, at capacity, twice, three times, back),
``spike_step_s`` per step: one perf_analyzer run per model sends the whole schedule (a
``--request-intervals`` file of Poisson arrivals, the same file for every model), open loop: a request
is sent on time whether or not the earlier ones were answered, so overload queues up as it would with
real users, and the run ends when every request is answered. Its profile export holds each request's
send and response times and its answers, from which each step's statistics come
(:func:`step_statistics`): by send time, p50/p99 latency, requests not answered, agreement of every
answered row with the full model's label (computed offline on the same rows), the mean compute and the
share of rows shed; by response time, rows answered per second; and how late the client sent against the
schedule. For the ladders, their rung over time (the orchestrators' ``offramp_slo_rung`` gauge, polled).
Between models the server is left to go idle, so one model's backlog never reaches the next one's
measurement.

Writes ``<out>/spike/<workload>/summary.json``, ``SPIKE.md`` and a plot, and prints the table.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from offramp.build.markdown import markdown_table
from offramp.client.cli.options import comma_list, option

FULL, FIXED, LADDER, LADDER_SHED = "full", "fixed", "ladder", "ladder_shed"
LADDERS = (LADDER, LADDER_SHED)
FLAG_SHED = 512  # offramp.backend.contract.FLAG_SHED: the row's depth was capped by load shedding


@dataclass(frozen=True)
class SpikeConfig:
    """The spike's own options (``offramp bench --spike``); the rest are the benchmark's."""

    spike: bool = option(False, help="run the spike benchmark (full model, fixed policy, ladder) instead")
    spike_steps: tuple[float, ...] = option(
        (0.5, 1.0, 2.0, 3.0, 1.0, 0.5),
        parse=comma_list(float),
        help="offered load per step, times the full model's capacity",
    )
    spike_step_s: float = option(24.0, help="seconds per step")
    ladder: tuple[float, ...] = option(
        (0.01, 0.02, 0.05, 0.1), parse=comma_list(float), help="the ladder's risk levels, rung 0 first"
    )
    slo_factor: float = option(2.0, help="the SLO: this times the full model's p99 at light load")
    shed_max_exit: int = option(
        -1, help="also run the ladder shedding past its top rung, capping every row at this exit (-1: not)"
    )
    drain_s: float = option(300.0, help="after the schedule, wait at most this long for the last answers")
    spike_headroom: float | None = option(
        None,
        parse=float,
        shown="the schedule's steepest rise",
        help="the ladders' slo_headroom: the multiple of the steady load a rung must carry to be served",
    )
    spike_headroom_load: float = option(
        0.7,
        help="the ladders' slo_headroom_load: the share of what a rung carries that the risen load may fill",
    )
    spike_headroom_load_above: float = option(
        0.5,
        help="the ladders' slo_headroom_load_above: that share for the rungs above rung 0",
    )

    def __post_init__(self) -> None:
        from offramp.backend.slo import SloConfig

        # Refused here, not after minutes of measuring: the ladders' own settings check these.
        headroom = 1.0 if self.spike_headroom is None else self.spike_headroom
        SloConfig(
            p99_ms=1.0,
            headroom=headroom,
            headroom_load=self.spike_headroom_load,
            headroom_load_above=self.spike_headroom_load_above,
        )

    def resolved(self) -> SpikeConfig:
        """This configuration with its headroom decided: where not given, the steepest rise from one step
        of the schedule to the next (2 for the default), the step its ladders are told to absorb. A
        reactive controller sees a step a second late; with a headroom of 1 the rung of the step before
        built its queue in that second at half the 2x onsets of TREC and Rotten Tomatoes (README)."""
        if self.spike_headroom is not None:
            return self
        return replace(self, spike_headroom=steepest_rise(self.spike_steps))


def steepest_rise(steps: Sequence[float]) -> float:
    """The largest ratio of a step's offered load to the one before it; 1 where the load never rises."""
    pairs = zip(steps[:-1], steps[1:], strict=True)
    return max([1.0, *(after / before for before, after in pairs if before > 0)])


@dataclass(frozen=True)
class Step:
    arm: str
    offered: float  # times the full model's capacity
    requests_per_s: float  # the rate of the schedule in this step
    requests: int  # sent in this step
    unanswered: int  # of those, without an answer (counted as infinitely late in the percentiles)
    rows_per_s: float  # answered: rows of the responses that arrived during the step
    p50_ms: float  # of the requests sent in the step
    p99_ms: float
    agreement: float  # of every answered row (of the requests sent in the step) with the full model
    rows_compared: int
    compute: float  # mean COST of the answered rows (the orchestrator's; NaN for the full model)
    shed: float  # share of the answered rows whose depth load shedding capped
    send_late_p99_ms: float  # how late the client sent, against the schedule
    send_late_max_ms: float
    rungs: tuple[int, ...]  # the ladder's rung at each poll in the step (empty for the others)
    started_s: float  # from the start of the arm's schedule
    # Agreement of the rows a rung answered (shed rows left out: no rung's guarantee covers them).
    rung_agreement: float = math.nan
    # Seconds from the step's start to the poll from which the ladder stayed at rung 0 to the step's
    # end (0: all the step); NaN where it ended the step above rung 0, or is no ladder.
    rung_0_from_s: float = math.nan


# --- The schedule and what perf_analyzer recorded ---------------------------------------------------


def spike_schedule(
    rates: Sequence[float], step_s: float, seed: int = 0, arrivals: str = "poisson"
) -> np.ndarray:
    """The send times (seconds from the start) of a schedule of ``rates`` (requests per second), one
    per step of ``step_s`` seconds: Poisson arrivals at each step's rate (seeded), or ``constant`` gaps."""
    if arrivals not in ("poisson", "constant"):
        raise ValueError(f"arrivals are 'poisson' or 'constant', not {arrivals!r}")
    rng = np.random.default_rng(seed)
    times = []
    for index, rate in enumerate(rates):
        if not rate > 0:
            raise ValueError(f"every step needs a positive rate, not {rate}")
        start, end = index * step_s, (index + 1) * step_s
        if arrivals == "constant":
            times.append(start + np.arange(0.0, step_s, 1.0 / rate))
            continue
        # Enough exponential gaps to pass the step's end (mean + 10 sd), cut at the end.
        count = int(rate * step_s + 10 * math.sqrt(rate * step_s) + 10)
        sends = start + np.cumsum(rng.exponential(1.0 / rate, count))
        times.append(sends[sends < end])
    return np.concatenate(times)


def write_request_intervals(path: Path, sends_s: np.ndarray) -> Path:
    """Write ``sends_s`` as perf_analyzer's ``--request-intervals`` file: one gap in whole microseconds
    per line, the first from the start. Gaps are taken between the rounded send times, so rounding does
    not accumulate: perf_analyzer sends request ``i`` at the sum of the first ``i + 1`` gaps."""
    micros = np.round(np.asarray(sends_s) * 1e6).astype(np.int64)
    gaps = np.diff(micros, prepend=0)
    if len(gaps) == 0 or (gaps < 0).any():
        raise ValueError("send times must be a non-empty, non-decreasing sequence from 0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{gap}\n" for gap in gaps))
    return path


@dataclass(frozen=True)
class Exported:
    """What perf_analyzer's profile export says about one request (times in seconds, Unix clock)."""

    sent: float
    answered: float | None  # the first response's time; None: no response
    first_row: Mapping[str, tuple]  # the first row of the request's inputs, as sent
    outputs: Mapping[str, np.ndarray]  # its first response's outputs, flat


@dataclass(frozen=True)
class ProfileExport:
    start: float  # the schedule's origin: perf_analyzer sends request i at start + its scheduled time
    requests: list[Exported]  # in order of sending


def parse_profile_export(text: str) -> ProfileExport:
    """Read perf_analyzer 2.49's ``--profile-export-file`` JSON of a single run.

    Its shape: ``{"experiments": [{"experiment": {...}, "requests": [{"timestamp": ns,
    "request_inputs": {name: [first row, flat]}, "response_timestamps": [ns, ...],
    "response_outputs": [{name: [values, flat]}, ...]}, ...], "window_boundaries": [ns, ns]}], ...}``.
    The window's first boundary is the schedule's origin (the first request leaves one interval after
    it). Outputs that are not numbers (strings) are left out.

    Raises:
        ValueError: not one experiment, or no requests.
    """
    document = json.loads(text)
    experiments = document.get("experiments", [])
    if len(experiments) != 1:
        raise ValueError(f"expected one experiment in the profile export, found {len(experiments)}")
    (experiment,) = experiments
    requests = []
    for entry in experiment.get("requests", []):
        responses = entry.get("response_timestamps") or []
        outputs = {}
        for name, values in ((entry.get("response_outputs") or [{}])[0] or {}).items():
            array = np.asarray(values).reshape(-1)
            if array.dtype.kind in "biuf":
                outputs[name] = array
        requests.append(
            Exported(
                sent=entry["timestamp"] / 1e9,
                answered=responses[0] / 1e9 if responses else None,
                first_row={n: tuple(v) for n, v in (entry.get("request_inputs") or {}).items()},
                outputs=outputs,
            )
        )
    if not requests:
        raise ValueError("the profile export holds no requests")
    requests.sort(key=lambda r: r.sent)
    boundaries = experiment.get("window_boundaries") or []
    start = boundaries[0] / 1e9 if boundaries else requests[0].sent
    return ProfileExport(start, requests)


def nearest_rank(values: Sequence[float], percent: float) -> float:
    """The ``percent`` percentile by nearest rank (an observed value; ``inf`` stays ``inf``); NaN if empty."""
    if len(values) == 0:
        return math.nan
    ordered = np.sort(np.asarray(values, dtype=float))
    return float(ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)])


def row_index(inputs: Mapping[str, np.ndarray]) -> dict[tuple, int]:
    """Each data row's position, keyed by its inputs (as the export writes a request's first row)."""
    names = sorted(inputs)
    rows = len(next(iter(inputs.values())))
    return {tuple(tuple(inputs[n][i].reshape(-1).tolist()) for n in names): i for i in range(rows)}


def distinct_rows(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``inputs`` without rows that repeat an earlier one, so a request's first row names its rows."""
    names = sorted(inputs)
    seen, keep = set(), []
    for i in range(len(inputs[names[0]])):
        key = tuple(inputs[n][i].tobytes() for n in names)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return {n: a[keep] for n, a in inputs.items()}


def request_labels(request: Exported, batch: int) -> np.ndarray | None:
    """The labels a request was answered with: its LABEL output, else the argmax of its LOGITS."""
    if "LABEL" in request.outputs:
        return request.outputs["LABEL"].astype(np.int64)
    if "LOGITS" in request.outputs:
        return request.outputs["LOGITS"].reshape(batch, -1).argmax(axis=1)
    return None


def step_statistics(
    export: ProfileExport,
    arm: str,
    offered: Sequence[float],
    rates: Sequence[float],
    schedule_s: np.ndarray,
    step_s: float,
    batch: int,
    rows: Mapping[tuple, int] | None = None,
    full_labels: np.ndarray | None = None,
    rungs: Sequence[tuple[float, int]] = (),
) -> list[Step]:
    """One :class:`Step` per step of the schedule, from what perf_analyzer recorded.

    A request belongs to the step in which it was sent (its send time from the schedule's origin); its
    latency is its first response's time minus its send time; an unanswered request counts as
    infinitely late. Rows answered per step are those of the responses that arrived during the step (the
    server's throughput then, whichever step sent them). How late the client sent: the i-th send against
    the schedule's i-th time. Agreement: each answered row's label against ``full_labels`` of its data
    row; a request's rows are consecutive data rows (cycling), the first found by its inputs in
    ``rows``. ``rungs``: (seconds from the origin, rung) samples of the ladder.
    """
    requests = export.requests
    sent = np.array([r.sent - export.start for r in requests])
    late_ms = (sent[: len(schedule_s)] - np.asarray(schedule_s)[: len(sent)]) * 1000.0
    answered_at = np.array([math.nan if r.answered is None else r.answered - export.start for r in requests])
    latency_ms = np.where(np.isnan(answered_at), math.inf, (answered_at - sent) * 1000.0)
    step_of = np.minimum((sent // step_s).astype(int), len(offered) - 1)
    steps = []
    for index, (multiple, rate) in enumerate(zip(offered, rates, strict=True)):
        start, end = index * step_s, (index + 1) * step_s
        mine = np.flatnonzero(step_of == index)
        arrived = np.count_nonzero((answered_at >= start) & (answered_at < end))
        agreed, compared, rung_agreed, rung_compared, costs, shed = 0, 0, 0, 0, [], []
        for i in mine:
            request = requests[i]
            if request.answered is None:
                continue
            if "COST" in request.outputs:
                costs.extend(request.outputs["COST"].tolist())
            flags = request.outputs.get("FLAGS")
            capped = (flags.astype(np.int64) & FLAG_SHED != 0) if flags is not None else None
            if capped is not None:
                shed.extend(capped.tolist())
            labels = request_labels(request, batch)
            first = rows.get(tuple(request.first_row[n] for n in sorted(request.first_row))) if rows else None
            if labels is None or first is None or full_labels is None:
                continue
            expected = full_labels[(first + np.arange(len(labels))) % len(full_labels)]
            agreed += int(np.count_nonzero(labels == expected))
            compared += len(labels)
            by_rung = (
                ~capped if capped is not None and len(capped) == len(labels) else np.ones(len(labels), bool)
            )
            rung_agreed += int(np.count_nonzero((labels == expected) & by_rung))
            rung_compared += int(np.count_nonzero(by_rung))
        mine_late = late_ms[mine[mine < len(late_ms)]]
        steps.append(
            Step(
                arm=arm,
                offered=float(multiple),
                requests_per_s=float(rate),
                requests=len(mine),
                unanswered=int(np.count_nonzero(np.isinf(latency_ms[mine]))),
                rows_per_s=arrived * batch / step_s,
                p50_ms=nearest_rank(latency_ms[mine], 50),
                p99_ms=nearest_rank(latency_ms[mine], 99),
                agreement=agreed / compared if compared else math.nan,
                rows_compared=compared,
                compute=float(np.mean(costs)) if costs else math.nan,
                shed=float(np.mean(shed)) if shed else math.nan,
                send_late_p99_ms=nearest_rank(mine_late, 99),
                send_late_max_ms=float(mine_late.max()) if len(mine_late) else math.nan,
                rungs=tuple(rung for t, rung in rungs if start <= t < end),
                started_s=start,
                rung_agreement=rung_agreed / rung_compared if rung_compared else math.nan,
                rung_0_from_s=rung_0_from([(t - start, rung) for t, rung in rungs if start <= t < end]),
            )
        )
    return steps


def rung_0_from(samples: Sequence[tuple[float, int]]) -> float:
    """Of (seconds into a step, rung) polls: the time of the first of the last run at rung 0, if that run
    ends the step (0 where it is the whole step); else NaN."""
    if not samples or samples[-1][1] != 0:
        return math.nan
    first = len(samples) - 1
    while first > 0 and samples[first - 1][1] == 0:
        first -= 1
    return 0.0 if first == 0 else samples[first][0]


def latency_trace(export: ProfileExport, bin_s: float = 1.0) -> list[tuple[float, int, float, float]]:
    """(start of the bin, requests sent in it, their p50 ms, their highest ms) per ``bin_s`` of send
    time from the schedule's origin: where in a step its tail came from. Bins without sends are left out."""
    sent = np.array([r.sent - export.start for r in export.requests])
    latency = np.array(
        [math.inf if r.answered is None else (r.answered - r.sent) * 1000 for r in export.requests]
    )
    bins = (sent // bin_s).astype(int)
    return [
        (float(b * bin_s), int(np.count_nonzero(bins == b)), nearest_rank(latency[bins == b], 50),
         float(latency[bins == b].max()))
        for b in np.unique(bins)
    ]  # fmt: skip


# --- Watching the service while the load runs ------------------------------------------------------


# The SLO controller's gauges the spike bench records per instance, by the short name the trace uses:
# why a ladder stays on a rung shows in them (the load, the quiet windows so far, the p99 predicted for
# the rung below).
SLO_GAUGES = {
    "rung": "offramp_slo_rung",
    "load_rps": "offramp_slo_load_rps",
    "quiet": "offramp_slo_quiet_windows",
    "estimate_ms": "offramp_slo_latency_estimate_ms",
    "own_p99_ms": "offramp_slo_own_p99_ms",
    "below_p99_ms": "offramp_slo_below_p99_ms",
    "shedding": "offramp_slo_shedding",
}


def slo_gauges(metrics_text: str, model: str) -> dict[str, dict[str, float]]:
    """Each orchestrator instance of ``model`` -> its SLO gauges (short name -> value, those published)."""
    by_instance: dict[str, dict[str, float]] = {}
    for short, metric in SLO_GAUGES.items():
        pattern = rf"^{metric}{{([^}}]*)}} (\S+)$"
        for labels, value in re.findall(pattern, metrics_text, re.MULTILINE):
            found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if found.get("model") == model:
                by_instance.setdefault(found.get("instance", ""), {})[short] = float(value)
    return by_instance


def highest_rung(gauges: Mapping[str, Mapping[str, float]]) -> int | None:
    """The highest rung over the instances in ``gauges`` (as :func:`slo_gauges` gives them); None: none."""
    rungs = [figures["rung"] for figures in gauges.values() if "rung" in figures]
    return int(max(rungs)) if rungs else None


def rung_from_metrics(metrics_text: str, model: str) -> int | None:
    """The highest ``offramp_slo_rung`` over the orchestrator instances of ``model``; None: no such gauge."""
    return highest_rung(slo_gauges(metrics_text, model))


def _metrics_page(metrics_url: str) -> str | None:
    from offramp.client.serving.fleet_stats import read_metrics

    try:
        return read_metrics(metrics_url)
    except OSError:
        return None


class RungWatch:
    """Polls the SLO gauges of ``model`` every ``interval_s``: its rung (:func:`highest_rung`) and each
    instance's controller figures (:func:`slo_gauges`)."""

    def __init__(self, metrics_url: str, model: str, interval_s: float = 0.5) -> None:
        self.metrics_url, self.model, self.interval_s = metrics_url, model, interval_s
        self.samples: list[tuple[float, int]] = []  # (time.time(), rung)
        self.controllers: list[tuple[float, dict[str, dict[str, float]]]] = []  # (time.time(), slo_gauges)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offramp-rung-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            text = _metrics_page(self.metrics_url)
            gauges = slo_gauges(text, self.model) if text else {}
            rung = highest_rung(gauges)
            if rung is not None:
                now = time.time()
                self.samples.append((now, rung))
                self.controllers.append((now, gauges))

    def __enter__(self) -> RungWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def pending_requests(metrics_text: str) -> float | None:
    """Requests Triton holds (queued or executing) over all models, from its metrics page; None where the
    page has no ``nv_inference_pending_request_count``."""
    values = re.findall(r"^nv_inference_pending_request_count{[^}]*} (\S+)$", metrics_text, re.MULTILINE)
    return sum(float(v) for v in values) if values else None


# Interleaved rounds of each capacity measurement, of which the bench takes the median (below).
CAPACITY_ROUNDS = 3

# The Poisson request rates, as shares of what a model carries at saturation, that the search for the
# load it holds within the SLO steps through (start, end, step), and its measurement window: three
# 4-second windows hold some 150 requests at a fifth of TREC's rung 0, whose p99 is then their second
# slowest (:func:`within_slo`).
WITHIN_SLO_SHARES = (0.2, 1.0, 0.1)
WITHIN_SLO_WINDOW_MS = 4000


def within_slo(results: Sequence[Any], batch: int) -> float:
    """Rows per second a model holds within the SLO: the highest Poisson rate of a search
    (:func:`offramp.client.tools.perf_analyzer.search_request_rate`, ``results``) whose p99 stayed within
    it, times the rows per request; 0 where even the first rate was over."""
    return max((r.request_rate for r in results), default=0.0) * batch


def median_capacities(
    measure: Callable[[str], float], models: Sequence[str], rounds: int = CAPACITY_ROUNDS
) -> list[float]:
    """Rows/s each of ``models`` answers at saturation (``measure(model)``), the median of ``rounds``
    rounds that take every model in turn, so that a slow spell of the machine falls on one round of
    each rather than on all of one model's: measured once each, TREC's rung 0 came out at 264 rows/s
    where the fixed policy (its rules) answered 354-410 under the spike that followed, so twice the
    half load seemed to fill 79% of it, past the ladders' share, and they stayed off it after the
    spike (run 45)."""
    rows = np.array([[measure(model) for model in models] for _ in range(rounds)])  # (rounds, models)
    return [float(v) for v in np.median(rows, axis=0)]


def wait_until_idle(
    metrics_url: str, models: Sequence[str] = (), timeout_s: float = 120.0, settle_s: float = 3.0
) -> float:
    """Wait until Triton holds no request and every ladder in ``models`` is back at rung 0 (polling the
    metrics page), then ``settle_s`` more; returns the seconds waited. A missing metric is not waited for."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        text = _metrics_page(metrics_url) or ""
        rungs = [rung_from_metrics(text, model) for model in models]
        if not pending_requests(text) and not any(rungs):
            break
        time.sleep(0.5)
    time.sleep(settle_s)
    return time.monotonic() - started


# --- The run -----------------------------------------------------------------------------------------


def ladder_policy(workload: Any, ladder: Sequence[float], delta: float = 0.05) -> Any:
    """The workload's ladder, certified on its calibration logits at every level at once, under the rule
    family its fixed policy serves (the fixed arm and rung 0 then differ only by the ladder's split of
    delta, not by how a row's exit is decided)."""
    from offramp.build.calibrate import policy_version
    from offramp.build.risk_control import LearnThenTest, calibrate_exit_policy

    calibrated = calibrate_exit_policy(
        workload.calibration_logits,
        workload.artifacts.exit_costs,
        LearnThenTest(ladder[0], delta),
        labels=workload.calibration_labels,
        ladder=ladder[1:],
        rule=workload.policy.rule,
    )
    version = policy_version("ladder", calibrated.rules(), {}, calibrated.ladder())
    return calibrated.to_policy(version, workload.artifacts.fingerprint)


def run_spike(workload: Any, bench: Any, spike: SpikeConfig, progress: bool = True) -> dict:
    """Measure ``workload`` under the spike schedule; ``bench`` is the BenchConfig (instances, rows per
    request, workdir, out, seed)."""
    from offramp.backend.orchestrator import ServingOptions
    from offramp.build.calibrate import exit_logits_from_onnx
    from offramp.build.repository import write_orchestrator, write_repository
    from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts
    from offramp.client.tools.bench import pick_data_rows, repository_options
    from offramp.client.tools.perf_analyzer import (
        PerfAnalyzerOptions,
        run_perf_analyzer,
        search_request_rate,
        write_input_data,
    )

    def say(message: str) -> None:
        if progress:
            print(message, flush=True)

    name, batch = workload.name, bench.rows_per_request
    spike = spike.resolved()
    out = Path(bench.out) / "spike" / name
    out.mkdir(parents=True, exist_ok=True)
    policy = ladder_policy(workload, spike.ladder)
    fixed = replace(policy, rungs=())  # rung 0 alone, the same rules
    picked = pick_data_rows(workload.test_rows, bench.data_rows, bench.seed)
    inputs = distinct_rows({n: a[picked] for n, a in workload.test_inputs.items()})
    # A whole number of requests' worth, so a request's rows never wrap around the file.
    inputs = {n: a[: len(a) // batch * batch] for n, a in inputs.items()}
    data = write_input_data(out / "input_data.json", inputs)
    rows = row_index(inputs)
    full_labels = exit_logits_from_onnx(workload.artifacts, workload.artifacts_dir, dict(inputs))[-1].argmax(
        axis=1
    )
    repository = Path(bench.workdir) / "spike" / "repository"
    options = repository_options(bench)
    # From nothing: the server loads every model there, and the ladder and top-rung models an earlier
    # run (an older offramp) wrote beside the base ones would be loaded with their old adapter.
    shutil.rmtree(repository, ignore_errors=True)
    write_repository(workload.artifacts, workload.artifacts_dir, fixed, repository, options)
    steps: list[Step] = []
    arms_run: dict[str, dict[str, Any]] = {}
    with EmbeddedTritonServer(
        repository,
        ports=ServerPorts.free(),
        log_path=out / "tritonserver.log",
        model_control="explicit",
        load_models=("*",),
    ) as server:

        def perf(model: str, concurrency: int, seconds: float = 6.0) -> Any:
            # Three windows make one measurement (stability is not sought: the load is what it is), or more
            # where perf_analyzer's check fails even at 1000%: three trials at most failed a Rotten
            # Tomatoes run at concurrency 16 (2 s windows of requests that take about a second; measured).
            run_options = PerfAnalyzerOptions(
                url=server.grpc_url, model=model, input_data=data, concurrency=concurrency, batch_size=batch,
                measurement_interval_ms=int(seconds * 1000 / 3),
            )  # fmt: skip
            csv_path = out / "perf" / f"{model}-{concurrency}.csv"
            return run_perf_analyzer(run_options, csv_path, timeout_s=seconds * 10 + 120).result

        say(f"[{name}] light-load p99 and capacity of the full model")
        # The SLO's base. Six seconds at concurrency 1 hold some 55 requests of 110 ms, whose p99 is about
        # their slowest: the SLO moved from 267 to 360 ms between two Rotten Tomatoes runs on one machine
        # (and TREC's from 179 to 233 ms); thirty seconds hold five times as many.
        light = perf(f"{name}_full", concurrency=1, seconds=30.0)
        saturating = 4 * bench.orchestrator_instances * bench.segment_instances  # requests in flight
        slo_ms = spike.slo_factor * light.p99_ms

        arms = {FULL: f"{name}_full", FIXED: name, LADDER: f"{name}_ladder"}
        if spike.shed_max_exit >= 0:
            arms[LADDER_SHED] = f"{name}_ladder_shed"
        import tritonclient.grpc as grpcclient

        def load(model: str) -> None:
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                client.load_model(model)

        # Each rung's rules alone, without a controller, at saturation: what each rung carries, which the
        # ladders' controllers are given (slo_rung_capacity); the top rung's is what a ladder carries at
        # most. Rung 0 is the fixed policy, served already.
        rung_models = [name]
        for rung in policy.rungs:
            rung_models.append(f"{name}_rung_{len(rung_models)}")
            write_orchestrator(workload.artifacts, replace(policy, exits=rung.exits, rungs=()), repository,
                               options, rung_models[-1], artifacts_dir=workload.artifacts_dir)  # fmt: skip
            load(rung_models[-1])
        for model in rung_models:  # a model's first requests are slow (ONNX Runtime's)
            perf(model, concurrency=2, seconds=3.0)
        # The full model's capacity (the schedule's unit) and each rung's, in interleaved rounds.
        full_rows_per_s, *rung_rows_per_s = median_capacities(
            lambda model: perf(model, concurrency=saturating).rows_per_s, [f"{name}_full", *rung_models]
        )
        capacity = full_rows_per_s / batch  # requests per second
        say(f"[{name}] full model: p99 {light.p99_ms:.1f} ms at concurrency 1 (SLO {slo_ms:.1f} ms); "
            f"capacity {full_rows_per_s:.0f} rows/s (medians of {CAPACITY_ROUNDS} interleaved rounds, "
            "as the rungs' below)")  # fmt: skip
        capacities = {FIXED: rung_rows_per_s[0], "top_rung": rung_rows_per_s[-1]}
        top_ratio = rung_rows_per_s[-1] / full_rows_per_s
        rung_capacity = ",".join(f"{rows / batch:.2f}" for rows in rung_rows_per_s)  # requests/s
        say(f"[{name}] capacity of each rung alone: {', '.join(f'{rows:.0f}' for rows in rung_rows_per_s)} "
            f"rows/s (the top {top_ratio:.1f}x the full model); at {batch} rows per request, serve with "
            f"--serving slo_rung_capacity={rung_capacity}")  # fmt: skip

        def search_within_slo(model: str, rows_per_s: float) -> list[Any]:
            start, end, step = (share * rows_per_s / batch for share in WITHIN_SLO_SHARES)
            options = PerfAnalyzerOptions(
                url=server.grpc_url, model=model, input_data=data, batch_size=batch, percentile=99,
                request_rate_range=(start, end, step), latency_threshold_ms=slo_ms,
                measurement_interval_ms=WITHIN_SLO_WINDOW_MS,
            )  # fmt: skip
            return search_request_rate(options, out / "perf" / f"{model}-within-slo.csv")

        # What each holds within the SLO under Poisson arrivals, alone: an onset's tail is a latency, and
        # a rung answers its tail over the target well before it is saturated (README).
        models = [f"{name}_full", *rung_models]
        searches = {
            model: search_within_slo(model, rows)
            for model, rows in zip(models, [full_rows_per_s, *rung_rows_per_s], strict=True)
        }
        full_within_slo, *rung_within_slo = (within_slo(found, batch) for found in searches.values())
        rungs_within_slo = " / ".join(f"{rows:.0f}" for rows in rung_within_slo)
        say(f"[{name}] within the SLO alone (Poisson, perf_analyzer's search over "
            f"{WITHIN_SLO_SHARES[0]:.0%}-{WITHIN_SLO_SHARES[1]:.0%} of saturation): full model "
            f"{full_within_slo:.0f} rows/s, rungs {rungs_within_slo} rows/s")  # fmt: skip
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            for model in rung_models[1:]:  # no idle stubs beside the arms under the spike
                client.unload_model(model)
        for arm in (a for a in arms if a in LADDERS):
            serving = ServingOptions(
                slo_p99_ms=slo_ms,
                slo_shed_max_exit=spike.shed_max_exit if arm == LADDER_SHED else -1,
                slo_rung_capacity=rung_capacity,
                slo_headroom=spike.spike_headroom,
                slo_headroom_load=spike.spike_headroom_load,
                slo_headroom_load_above=spike.spike_headroom_load_above,
                metrics_url=server.metrics_url,
                segments_in_process=bench.segments_in_process,
            )
            write_orchestrator(workload.artifacts, policy, repository, replace(options, serving=serving),
                               arms[arm], artifacts_dir=workload.artifacts_dir)  # fmt: skip
            load(arms[arm])
            perf(arms[arm], concurrency=2, seconds=3.0)
        ladders = [model for arm, model in arms.items() if arm in LADDERS]
        rates = [multiple * capacity for multiple in spike.spike_steps]
        schedule = spike_schedule(rates, spike.spike_step_s, seed=bench.seed)
        intervals = write_request_intervals(out / "request_intervals.txt", schedule)
        length_s = len(rates) * spike.spike_step_s
        say(f"[{name}] schedule: {len(schedule)} requests over {length_s:.0f} s, "
            f"{', '.join(f'{r:.1f}' for r in rates)} requests/s")  # fmt: skip
        for arm, model in arms.items():
            export_path = out / "perf" / f"{model}-spike.json"
            export_path.unlink(missing_ok=True)
            run_options = PerfAnalyzerOptions(
                url=server.grpc_url, model=model, input_data=data, batch_size=batch,
                request_intervals=intervals, request_count=len(schedule), profile_export=export_path,
            )  # fmt: skip
            wait_until_idle(server.metrics_url, ladders)  # no backlog and every ladder at rung 0
            load_before = os.getloadavg()[0]
            with RungWatch(server.metrics_url, model) as watch:
                run = run_perf_analyzer(
                    run_options, out / "perf" / f"{model}-spike.csv", timeout_s=length_s + spike.drain_s
                )
            export = parse_profile_export(export_path.read_text())
            idle_s = wait_until_idle(server.metrics_url, settle_s=0.0)
            trace = [(t - export.start, rung) for t, rung in watch.samples] if arm in LADDERS else []
            arm_steps = step_statistics(
                export, arm, spike.spike_steps, rates, schedule, spike.spike_step_s, batch, rows,
                full_labels, trace,
            )  # fmt: skip
            steps += arm_steps
            last_answer = max(
                (r.answered for r in export.requests if r.answered is not None), default=math.nan
            )
            arms_run[arm] = {
                "model": model,
                "requests": len(export.requests),
                "drain_s": last_answer - export.start - length_s,  # the last answer after the schedule's end
                "perf_analyzer_wall_s": run.wall_s,
                "perf_analyzer_cpu_s": run.client_cpu_s,
                "idle_wait_s": idle_s,
                "load_average_1m": [load_before, os.getloadavg()[0]],
                "rung_trace": [(round(t, 2), rung) for t, rung in trace],
                # (seconds from the origin, instance -> its SLO gauges): why the ladder was where it was
                "controller_trace": [(round(t - export.start, 2), gauges) for t, gauges in watch.controllers]
                if arm in LADDERS
                else [],
                "latency_trace": latency_trace(export),
            }
            for step in arm_steps:
                say(f"[{name}] {arm:>11} x{step.offered:<4g} {step.rows_per_s:6.0f} rows/s"
                    f"  p50 {step.p50_ms:8.1f} ms  p99 {step.p99_ms:8.1f} ms"
                    f"  agreement {step.agreement:.3f} ({step.rows_compared})"
                    f"  late p99 {step.send_late_p99_ms:.0f} ms"
                    + (f"  rungs {sorted(set(step.rungs))}" if step.rungs else ""))  # fmt: skip
    epsilons = [spike.ladder[0], *(r.epsilon for r in policy.rungs)]
    summary = {
        "workload": name,
        "slo_p99_ms": slo_ms,
        "full_light_p99_ms": light.p99_ms,
        "full_capacity_rows_per_s": full_rows_per_s,
        "capacity_rows_per_s": {FULL: full_rows_per_s, **capacities},  # at the same concurrency
        "rung_capacity_rows_per_s": rung_rows_per_s,  # rung 0 first, given to the ladders' controllers
        # Alone, under Poisson arrivals, the highest rate whose p99 stayed within the SLO (rows/s)...
        "full_within_slo_rows_per_s": full_within_slo,
        "rung_within_slo_rows_per_s": rung_within_slo,  # rung 0 first
        # ...from perf_analyzer's search: model -> [(requests/s asked, p99 ms)] for the rates within it
        "within_slo_shares": WITHIN_SLO_SHARES,  # the search's (start, end, step), shares of saturation
        "within_slo_search": {
            m: [(r.request_rate, r.p99_ms) for r in found] for m, found in searches.items()
        },
        "saturating_concurrency": saturating,
        "rule": policy.rule,
        "ladder": [{"epsilon": spike.ladder[0], "expected_cost": policy.provenance["expected_cost"]}]
        + [{"epsilon": r.epsilon, "expected_cost": r.expected_cost} for r in policy.rungs],
        "config": {"spike": asdict(spike), "rows_per_request": batch, "data_rows": len(full_labels)},
        "schedule": {"requests": len(schedule), "arrivals": "poisson", "seed": bench.seed},
        "arms": arms_run,
        "steps": [asdict(s) for s in steps],
        "goals": spike_goals(steps, slo_ms, epsilons),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out / "SPIKE.md").write_text(spike_markdown(summary))
    write_spike_plot(summary, out / "spike.png")
    say(f"[{name}] report: {out / 'SPIKE.md'}")
    return summary


def spike_goals(steps: Sequence[Step], slo_ms: float, epsilons: Sequence[float]) -> dict[str, Any]:
    """The issue's goals, checked on the measured steps: a ladder holds the SLO in the overload steps
    (offered >= 2x) where the full model and the fixed policy do not; its agreement at each step is at
    least 1 - epsilon of the highest rung it used, on the rows the rungs answered (rows that shedding
    capped carry no rung's guarantee: they are flagged, counted in ``shed`` and in ``agreement``); it is
    back at rung 0 by the end of the schedule."""
    over = [s for s in steps if s.offered >= 2.0]
    arms = list(dict.fromkeys(s.arm for s in steps))
    held = {arm: all(s.p99_ms <= slo_ms for s in over if s.arm == arm) for arm in arms}
    others_miss = not held.get(FULL, True) and not held.get(FIXED, True)
    goals: dict[str, Any] = {"slo_held_in_overload": held, "full_and_fixed_miss_it": others_miss}
    for arm in (a for a in arms if a in LADDERS):
        mine = [s for s in steps if s.arm == arm]
        goals[arm] = {
            "holds_where_others_do_not": held[arm] and others_miss,
            "agreement_at_least_one_minus_epsilon": all(
                math.isnan(s.rung_agreement) or s.rung_agreement >= 1 - epsilons[max(s.rungs, default=0)]
                for s in mine
            ),
            "back_at_rung_0_at_the_end": bool(mine[-1].rungs) and mine[-1].rungs[-1] == 0,
            # how far into the last (light) step it was back at rung 0 for good; NaN: it was not
            "back_at_rung_0_after_s": mine[-1].rung_0_from_s,
        }
    late = [s.send_late_max_ms for s in steps if not math.isnan(s.send_late_max_ms)]
    goals["client_send_late_max_ms"] = max(late, default=math.nan)
    return goals


def rung_changes(controller_trace: Sequence[tuple[float, Mapping[str, Mapping[str, float]]]]) -> list[int]:
    """How many times each orchestrator instance's rung changed over a run, instances by name, from the
    gauges polled every half second (``controller_trace``): what a steady load must keep low."""
    rungs: dict[str, list[float]] = {}
    for _, gauges in controller_trace:
        for instance, gauge in gauges.items():
            rungs.setdefault(instance, []).append(gauge["rung"])
    return [sum(a != b for a, b in itertools.pairwise(rungs[i])) for i in sorted(rungs)]


def _cell(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else "∞" if math.isinf(value) else f"{value:.{digits}f}"


def _within_slo_sentence(summary: Mapping[str, Any]) -> str:
    """What each model held within the SLO alone, as rows/s and shares of its capacity; empty for
    summaries from before the bench searched for it."""
    rungs = summary.get("rung_within_slo_rows_per_s")
    if rungs is None:
        return ""
    saturation = [summary["full_capacity_rows_per_s"], *summary["rung_capacity_rows_per_s"]]
    held = [summary["full_within_slo_rows_per_s"], *rungs]
    start, end, step = summary["within_slo_shares"]
    shares = " / ".join(
        f"{rows:.0f} ({rows / top:.0%})" if rows else f"under {start:.0%}"
        for rows, top in zip(held, saturation, strict=True)
    )
    one_x = (
        f"; the schedule's 1x is {summary['full_capacity_rows_per_s'] / rungs[0]:.0%} of rung 0's"
        if rungs[0]
        else ""
    )
    return (
        " Within the SLO alone (Poisson arrivals; the highest rate of perf_analyzer's search over "
        f"{start:.0%}, {start + step:.0%}, ... {end:.0%} of what each carries at saturation whose p99 was "
        f"within it), full model / rungs 0-{len(rungs) - 1}: {shares} rows/s{one_x}."
    )


def spike_markdown(summary: Mapping[str, Any]) -> str:
    slo = summary["slo_p99_ms"]
    rows = [
        [s["arm"], f"x{s['offered']:g}", f"{s['requests_per_s']:.1f}", f"{s['rows_per_s']:.0f}",
         _cell(s["p50_ms"]), _cell(s["p99_ms"]), "yes" if s["p99_ms"] <= slo else "NO",
         ("n/a" if math.isnan(s["agreement"]) else f"{s['agreement']:.3f} ({s['rows_compared']})")
         + (f"; rung rows {s.get('rung_agreement', math.nan):.3f}" if s["shed"] > 0 else ""),
         _cell(s["compute"], 2), _cell(s["shed"], 2),
         ",".join(str(r) for r in sorted(set(s["rungs"]))) or "-",
         f"{s['requests']} / {s['unanswered']}", _cell(s["send_late_p99_ms"], 0)]
        for s in summary["steps"]
    ]  # fmt: skip
    ladder = ", ".join(f"ε={r['epsilon']:g}: compute {r['expected_cost']:.3f}" for r in summary["ladder"])
    drains = ", ".join(f"{arm} {a['drain_s']:.1f} s" for arm, a in summary["arms"].items())
    changes = "; ".join(
        f"{arm} {', '.join(map(str, rung_changes(a['controller_trace'])))}"
        for arm, a in summary["arms"].items()
        if a.get("controller_trace")
    )
    goals = "\n".join(f"- {k}: {v}" for k, v in summary["goals"].items())
    spike = summary["config"]["spike"]
    capacities = summary.get("capacity_rows_per_s", {})
    capacity = (
        f" Capacity at concurrency {summary['saturating_concurrency']}: "
        + ", ".join(f"{arm} {rows:.0f} rows/s" for arm, rows in capacities.items())
        + "."
        if capacities
        else ""
    )
    rungs = summary.get("rung_capacity_rows_per_s")
    if rungs:
        capacity += (
            f" Each rung alone, rung 0 first: {', '.join(f'{rows:.0f}' for rows in rungs)} rows/s "
            "(the ladders' controllers are given these)."
        )
    capacity += _within_slo_sentence(summary)
    headroom = spike.get("spike_headroom", 1.0)
    if headroom != 1.0:
        # Summaries from before slo_headroom_load held the risen load to the descent's margin, 80%.
        share = spike.get("spike_headroom_load", 0.8)
        # ...and from before the rungs above rung 0 had a share of their own, the same share.
        above = spike.get("spike_headroom_load_above", share)
        shares = f"{share:.0%}"
        if above != share:
            shares += f" (rung 0) or {above:.0%} (the rungs above)"
        capacity += (
            f" The ladders serve a rung only where {headroom:g} x the steady load fills at most {shares} "
            "of what it carries (slo_headroom, slo_headroom_load, slo_headroom_load_above)."
        )
    return (
        f"# Spike: {summary['workload']}\n\n"
        f"SLO p99 {slo:.1f} ms ({spike['slo_factor']:g} x the full model's "
        f"{summary['full_light_p99_ms']:.1f} ms at concurrency 1); offered load in multiples of the full "
        "model's capacity, "
        f"{summary['full_capacity_rows_per_s']:.0f} rows/s; {summary['config']['rows_per_request']} rows per "
        f"request; {spike['spike_step_s']:g} s per step; one perf_analyzer run per model over the whole "
        f"schedule ({summary['schedule']['requests']} requests, Poisson arrivals, the same for every model). "
        f"Ladder ({summary.get('rule', 'confidence')} rule, as the fixed policy): {ladder}.{capacity}\n\n"
        "Latency and agreement are of the requests sent in the step (unanswered ones count as infinitely "
        "late); agreement with the full model is of every answered row (and, where shedding capped some, "
        "of the rows a rung answered); rows/s are the rows answered during the step; compute is the mean "
        "cost of the answered rows (1 = the full network), shed the share of them whose depth load shedding "
        "capped; late p99 is how "
        "late the client sent against the schedule.\n\n"
        + markdown_table(
            [
                "model",
                "offered",
                "requests/s asked",
                "rows/s answered",
                "p50 ms",
                "p99 ms",
                "within SLO",
                "agreement (rows)",
                "compute",
                "shed",
                "rungs",
                "sent / unanswered",
                "late p99 ms",
            ],
            rows,
        )  # fmt: skip
        + f"\n\nThe last answer after the schedule's end: {drains}."
        + (f" Rung changes over the schedule, per orchestrator instance: {changes}." if changes else "")
        + f"\n\nGoals:\n{goals}\n"
    )


def write_spike_plot(summary: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (latency, over_time, rung) = plt.subplots(3, 1, figsize=(9, 9), sharex=False)
    arms = list(dict.fromkeys(s["arm"] for s in summary["steps"]))
    for arm in arms:
        steps = [s for s in summary["steps"] if s["arm"] == arm]
        latency.plot(range(len(steps)), [s["p99_ms"] for s in steps], marker="o", label=arm)
    latency.set_xticks(range(len(steps)), [f"x{s['offered']:g}" for s in steps])
    latency.axhline(summary["slo_p99_ms"], color="k", linestyle="--", label="SLO")
    latency.set_yscale("log")
    latency.set_ylabel("p99 ms")
    latency.set_xlabel("step (offered load, times the full model's capacity)")
    latency.legend()
    for arm in arms:
        trace = summary["arms"].get(arm, {}).get("latency_trace")
        if trace:
            over_time.plot([t for t, *_ in trace], [m for *_, m in trace], label=arm, linewidth=1)
    over_time.axhline(summary["slo_p99_ms"], color="k", linestyle="--", label="SLO")
    over_time.set_yscale("log")
    over_time.set_ylabel("highest ms of the requests sent in each second")
    over_time.set_xlabel("seconds from the schedule's start (send time)")
    over_time.legend(fontsize="small")
    for arm in arms:
        trace = summary["arms"].get(arm, {}).get("rung_trace")
        if trace:
            times, rungs = zip(*trace, strict=True)
            rung.step(times, rungs, where="post", label=arm)
    step_s = summary["config"]["spike"]["spike_step_s"]
    for index in range(1, len(steps)):
        for axes in (over_time, rung):
            axes.axvline(index * step_s, color="0.85", linewidth=0.8)
    rung.yaxis.set_major_locator(MaxNLocator(integer=True))
    rung.set_ylabel("ladder rung")
    rung.set_xlabel("seconds from the schedule's start")
    rung.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main_spike(bench: Any, spike: SpikeConfig) -> int:
    from offramp.client.tools.bench import UnknownWorkload, WorkloadSettings, resolve_workload

    try:  # every workload before the first run: a typo in the second should not wait for the first's
        factories = [resolve_workload(spec) for spec in bench.workloads]
    except UnknownWorkload as error:
        print(f"offramp bench --spike: error: {error}", file=sys.stderr)
        return 2
    for factory in factories:
        workload = factory(WorkloadSettings(workdir=bench.workdir, quick=bench.quick, epochs=bench.epochs))
        run_spike(workload, bench, spike, progress=bench.progress)
    return 0
