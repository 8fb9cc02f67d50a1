"""``offramp bench --spike``: a traffic spike against the full model, a fixed policy and a ladder.

For each workload, one server holds three models over the same segments:

    <name>_full     the network without exits
    <name>          early exit under one certified policy (rung 0 of the ladder)
    <name>_ladder   early exit under the whole ladder, with the SLO controller on

The SLO is ``slo_factor`` times the full model's p99 at light load (concurrency 1), both measured
first, with the full model's capacity (rows per second at saturation). Each model then meets the same
schedule of offered load, in multiples of that capacity (``spike_steps``, default comfortable, at
capacity, twice, three times, back): perf_analyzer at a fixed request rate per step (open loop: a
request is sent on time whether or not the earlier ones were answered, so overload queues up as it
would with real users). Recorded per step: p50/p99 latency and rows per second (perf_analyzer), the
agreement of the answers with the full model's (a probe thread sends labelled test rows at a low rate
alongside and compares its answers with the full model's labels, computed offline on the same rows),
and, for the ladder, its rung over time (the orchestrators' ``offramp_slo_rung`` gauge, polled).

Writes ``<out>/spike/<workload>/summary.json``, ``SPIKE.md`` and a plot, and prints the table.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from offramp.build.markdown import markdown_table
from offramp.client.cli.options import comma_list, option

FULL, FIXED, LADDER = "full", "fixed", "ladder"


@dataclass(frozen=True)
class SpikeConfig:
    """The spike's own options (``offramp bench --spike``); the rest are the benchmark's."""

    spike: bool = option(False, help="run the spike benchmark (full model, fixed policy, ladder) instead")
    spike_steps: tuple[float, ...] = option(
        (0.5, 1.0, 2.0, 3.0, 1.0, 0.5), parse=comma_list(float), help="offered load per step, times the full model's capacity"
    )  # fmt: skip
    spike_step_s: float = option(24.0, help="seconds per step")
    ladder: tuple[float, ...] = option(
        (0.01, 0.02, 0.05, 0.1), parse=comma_list(float), help="the ladder's risk levels, rung 0 first"
    )
    slo_factor: float = option(2.0, help="the SLO: this times the full model's p99 at light load")
    shed_max_exit: int = option(-1, help="past the top rung, cap every row at this exit (-1: no shedding)")
    probe_rate: float = option(10.0, help="labelled probe requests per second, for the agreement per step")


@dataclass(frozen=True)
class Step:
    arm: str
    offered: float  # times the full model's capacity
    requests_per_s: float  # the rate asked of perf_analyzer
    rows_per_s: float  # answered
    p50_ms: float
    p99_ms: float
    agreement: float  # of the probe's answers with the full model's labels; NaN: no probe answered
    probes: int
    rungs: tuple[int, ...]  # the ladder's rung at each poll in the step (empty for the others)
    started_s: float


# --- Watching the service while the load runs ------------------------------------------------------


class RungWatch:
    """Polls the highest ``offramp_slo_rung`` over the orchestrator instances of ``model``."""

    def __init__(self, metrics_url: str, model: str, interval_s: float = 0.5) -> None:
        self.metrics_url, self.model, self.interval_s = metrics_url, model, interval_s
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), rung)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offramp-rung-watch", daemon=True)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _run(self) -> None:
        pattern = re.compile(
            rf'^offramp_slo_rung{{[^}}]*model="{re.escape(self.model)}"[^}}]*}} (\S+)$', re.MULTILINE
        )
        while not self._stop.wait(self.interval_s):
            try:
                text = self._opener.open(self.metrics_url, timeout=5).read().decode()
            except OSError:
                continue
            values = [float(v) for v in pattern.findall(text)]
            if values:
                self.samples.append((time.monotonic(), int(max(values))))

    def between(self, start: float, end: float) -> tuple[int, ...]:
        return tuple(rung for t, rung in self.samples if start <= t <= end)

    def __enter__(self) -> RungWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Probe:
    """Sends labelled test rows to ``model`` at ``rate`` requests per second from a few threads, and
    records when each answer came and whether it agreed with the full model's label."""

    def __init__(
        self, url: str, model: str, inputs: Mapping[str, np.ndarray], full_labels: np.ndarray, rate: float
    ) -> None:
        self.url, self.model, self.inputs, self.full_labels, self.rate = url, model, inputs, full_labels, rate
        self.answers: list[tuple[float, bool]] = []  # (time answered, agreed)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(4)]

    def _run(self) -> None:
        from offramp.client.grpc_client import OfframpClient

        with OfframpClient(self.url, timeout_s=120) as client:
            while not self._stop.is_set():
                with self._lock:
                    row, self._next = self._next % len(self.full_labels), self._next + 1
                started = time.monotonic()
                try:
                    answer = client.classify(
                        self.model, {n: a[row : row + 1] for n, a in self.inputs.items()}
                    )
                    with self._lock:
                        self.answers.append(
                            (time.monotonic(), bool(answer.label[0] == self.full_labels[row]))
                        )
                except Exception:  # noqa: BLE001 (an overloaded server may time a probe out: not an answer)
                    pass
                self._stop.wait(max(0.0, len(self._threads) / self.rate - (time.monotonic() - started)))

    def agreement(self, start: float, end: float) -> tuple[float, int]:
        with self._lock:
            agreed = [ok for t, ok in self.answers if start <= t <= end]
        return (float(np.mean(agreed)) if agreed else math.nan), len(agreed)

    def __enter__(self) -> Probe:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)


# --- The run -----------------------------------------------------------------------------------------


def ladder_policy(workload: Any, ladder: Sequence[float], delta: float = 0.05) -> Any:
    """The workload's ladder, certified on its calibration logits at every level at once."""
    from offramp.build.calibrate import policy_version
    from offramp.build.risk_control import LearnThenTest, calibrate_exit_policy

    calibrated = calibrate_exit_policy(
        workload.calibration_logits,
        workload.artifacts.exit_costs,
        LearnThenTest(ladder[0], delta),
        labels=workload.calibration_labels,
        ladder=ladder[1:],
    )
    return calibrated.to_policy(
        policy_version("ladder", calibrated.rules(), {}), workload.artifacts.fingerprint
    )


def run_spike(workload: Any, bench: Any, spike: SpikeConfig, progress: bool = True) -> dict:
    """Measure ``workload`` under the spike schedule; ``bench`` is the BenchConfig (instances, rows per
    request, workdir, out)."""
    from offramp.backend.orchestrator import ServingOptions
    from offramp.build.calibrate import exit_logits_from_onnx
    from offramp.build.repository import write_orchestrator, write_repository
    from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts
    from offramp.client.tools.bench import pick_data_rows, repository_options
    from offramp.client.tools.perf_analyzer import PerfAnalyzerOptions, run_perf_analyzer, write_input_data

    def say(message: str) -> None:
        if progress:
            print(message, flush=True)

    name = workload.name
    out = Path(bench.out) / "spike" / name
    out.mkdir(parents=True, exist_ok=True)
    policy = ladder_policy(workload, spike.ladder)
    fixed = replace(policy, rungs=())  # rung 0 alone, the same rules
    rows = pick_data_rows(workload.test_rows, bench.data_rows, bench.seed)
    inputs = {n: a[rows] for n, a in workload.test_inputs.items()}
    data = write_input_data(out / "input_data.json", inputs)
    full_labels = exit_logits_from_onnx(workload.artifacts, workload.artifacts_dir, dict(inputs))[-1].argmax(
        axis=1
    )
    repository = Path(bench.workdir) / "spike" / "repository"
    options = repository_options(bench)
    write_repository(workload.artifacts, workload.artifacts_dir, fixed, repository, options)
    ports = ServerPorts.free()
    steps: list[Step] = []
    with EmbeddedTritonServer(
        repository,
        ports=ports,
        log_path=out / "tritonserver.log",
        model_control="explicit",
        load_models=("*",),
    ) as server:

        def perf(
            model: str, concurrency: int = 1, request_rate: float | None = None, seconds: float = 6.0
        ) -> Any:
            # Three windows make one measurement (stability is not sought: the step is what it is).
            run_options = PerfAnalyzerOptions(
                url=server.grpc_url, model=model, input_data=data, concurrency=concurrency,
                batch_size=bench.rows_per_request, measurement_interval_ms=int(seconds * 1000 / 3),
                stability_percentage=1000, max_trials=3, request_rate=request_rate,
            )  # fmt: skip
            csv_path = out / "perf" / f"{model}-{concurrency}-{request_rate}.csv"
            return run_perf_analyzer(run_options, csv_path, timeout_s=seconds * 10 + 120).result

        say(f"[{name}] light-load p99 and capacity of the full model")
        light = perf(f"{name}_full", concurrency=1)
        saturated = perf(
            f"{name}_full", concurrency=4 * bench.orchestrator_instances * bench.segment_instances
        )
        slo_ms = spike.slo_factor * light.p99_ms
        capacity = saturated.rows_per_s / bench.rows_per_request  # requests per second
        say(f"[{name}] full model: p99 {light.p99_ms:.1f} ms at concurrency 1 (SLO {slo_ms:.1f} ms); "
            f"capacity {saturated.rows_per_s:.0f} rows/s")  # fmt: skip

        serving = ServingOptions(
            slo_p99_ms=slo_ms,
            slo_shed_max_exit=spike.shed_max_exit,
            metrics_url=server.metrics_url,
            segments_in_process=bench.segments_in_process,
        )
        write_orchestrator(workload.artifacts, policy, repository, replace(options, serving=serving),
                           f"{name}_ladder", artifacts_dir=workload.artifacts_dir)  # fmt: skip
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            client.load_model(f"{name}_ladder")
        arms = {FULL: f"{name}_full", FIXED: name, LADDER: f"{name}_ladder"}
        origin = time.monotonic()
        with RungWatch(server.metrics_url, arms[LADDER]) as watch:
            for arm, model in arms.items():
                with Probe(server.grpc_url, model, inputs, full_labels, spike.probe_rate) as probe:
                    for offered in spike.spike_steps:
                        rate = offered * capacity
                        start = time.monotonic()
                        result = perf(model, request_rate=rate, seconds=spike.spike_step_s)
                        end = time.monotonic()
                        agreement, probes = probe.agreement(start, end)
                        step = Step(arm, offered, rate, result.rows_per_s, result.p50_ms, result.p99_ms, agreement,
                                    probes, watch.between(start, end) if arm == LADDER else (), start - origin)  # fmt: skip
                        steps.append(step)
                        say(f"[{name}] {arm:>6} x{offered:<4} {result.rows_per_s:8.0f} rows/s  p50 {result.p50_ms:8.1f} ms  "
                            f"p99 {result.p99_ms:8.1f} ms  agreement {agreement:.3f} ({probes})"
                            + (f"  rungs {sorted(set(step.rungs))}" if step.rungs else ""))  # fmt: skip
            rung_trace = [(round(t - origin, 2), rung) for t, rung in watch.samples]
    summary = {
        "workload": name,
        "slo_p99_ms": slo_ms,
        "full_light_p99_ms": light.p99_ms,
        "full_capacity_rows_per_s": saturated.rows_per_s,
        "ladder": [{"epsilon": spike.ladder[0], "expected_cost": policy.provenance["expected_cost"]}]
        + [{"epsilon": r.epsilon, "expected_cost": r.expected_cost} for r in policy.rungs],
        "config": {"spike": asdict(spike), "rows_per_request": bench.rows_per_request},
        "steps": [asdict(s) for s in steps],
        "rung_trace": rung_trace,
        "goals": spike_goals(steps, slo_ms, [spike.ladder[0], *(r.epsilon for r in policy.rungs)]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out / "SPIKE.md").write_text(spike_markdown(summary))
    write_spike_plot(summary, out / "spike.png")
    say(f"[{name}] report: {out / 'SPIKE.md'}")
    return summary


def spike_goals(steps: Sequence[Step], slo_ms: float, epsilons: Sequence[float]) -> dict[str, Any]:
    """The issue's goals, checked on the measured steps: the ladder holds the SLO in the overload steps
    (offered >= 2x) where the full model and the fixed policy do not; its agreement at each step is at
    least 1 - epsilon of the highest rung it used; it is back at rung 0 by the end."""
    over = [s for s in steps if s.offered >= 2.0]
    held = {arm: all(s.p99_ms <= slo_ms for s in over if s.arm == arm) for arm in (FULL, FIXED, LADDER)}
    ladder_steps = [s for s in steps if s.arm == LADDER]
    agreement_ok = all(
        math.isnan(s.agreement) or s.agreement >= 1 - epsilons[max(s.rungs, default=0)] for s in ladder_steps
    )
    back = bool(ladder_steps) and bool(ladder_steps[-1].rungs) and ladder_steps[-1].rungs[-1] == 0
    return {
        "slo_held_in_overload": held,
        "ladder_holds_where_others_do_not": held[LADDER] and not held[FULL] and not held[FIXED],
        "agreement_at_least_one_minus_epsilon": agreement_ok,
        "back_at_rung_0_at_the_end": back,
    }


def spike_markdown(summary: Mapping[str, Any]) -> str:
    rows = [
        [s["arm"], f"x{s['offered']:g}", f"{s['rows_per_s']:.0f}", f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}",
         "yes" if s["p99_ms"] <= summary["slo_p99_ms"] else "NO",
         "n/a" if math.isnan(s["agreement"]) else f"{s['agreement']:.3f} ({s['probes']})",
         ",".join(str(r) for r in sorted(set(s["rungs"]))) or "-"]
        for s in summary["steps"]
    ]  # fmt: skip
    ladder = ", ".join(f"ε={r['epsilon']:g}: compute {r['expected_cost']:.3f}" for r in summary["ladder"])
    goals = "\n".join(f"- {k}: {v}" for k, v in summary["goals"].items())
    return (
        f"# Spike: {summary['workload']}\n\n"
        f"SLO p99 {summary['slo_p99_ms']:.1f} ms ({summary['config']['spike']['slo_factor']:g} x the full "
        f"model's {summary['full_light_p99_ms']:.1f} ms at concurrency 1); offered load in multiples of the full "
        f"model's capacity, {summary['full_capacity_rows_per_s']:.0f} rows/s; "
        f"{summary['config']['rows_per_request']} rows per request. Ladder: {ladder}.\n\n"
        + markdown_table(
            ["model", "offered", "rows/s", "p50 ms", "p99 ms", "within SLO", "agreement (probes)", "rungs"],
            rows,
        )
        + f"\n\nGoals:\n{goals}\n"
    )


def write_spike_plot(summary: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, rung) = plt.subplots(2, 1, figsize=(9, 6), sharex=False)
    for arm in (FULL, FIXED, LADDER):
        steps = [s for s in summary["steps"] if s["arm"] == arm]
        latency.plot(range(len(steps)), [s["p99_ms"] for s in steps], marker="o", label=arm)
    steps = [s for s in summary["steps"] if s["arm"] == LADDER]
    latency.set_xticks(range(len(steps)), [f"x{s['offered']:g}" for s in steps])
    latency.axhline(summary["slo_p99_ms"], color="k", linestyle="--", label="SLO")
    latency.set_yscale("log")
    latency.set_ylabel("p99 ms")
    latency.set_xlabel("step (offered load, times the full model's capacity)")
    latency.legend()
    if summary["rung_trace"]:
        times, rungs = zip(*summary["rung_trace"])
        rung.step(times, rungs, where="post")
    rung.set_ylabel("ladder rung")
    rung.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main_spike(bench: Any, spike: SpikeConfig) -> int:
    from offramp.client.tools.bench import WorkloadSettings, resolve_workload

    for spec in bench.workloads:
        workload = resolve_workload(spec)(
            WorkloadSettings(workdir=bench.workdir, quick=bench.quick, epochs=bench.epochs)
        )
        run_spike(workload, bench, spike, progress=bench.progress)
    return 0
