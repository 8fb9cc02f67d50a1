"""``offramp bench``: early exit against the full model, side by side under perf_analyzer, on real inputs.

For each workload (a multi-exit model's artifacts, its real test split with labels, and the policy
the benchmark serves) it writes ONE model repository holding every model under test, all configured
alike (same instance counts, threads and dynamic batching):

    <name>                the early-exit service (orchestrator over the segments, compaction on)
    <name>_full           the network without exits (the baseline)
    <name>_nocompact      the same orchestrator without compaction (batch-level early exit)
    <name>_segments_full  an orchestrator whose policy routes forced rows through every segment

starts one embedded tritonserver, sends the whole test split through each model once (accuracy,
agreement with the full model, exit distribution, mean compute fraction, measured through the
server), then drives perf_analyzer over gRPC at each concurrency level, alternating the models and
repeating every round, with requests of R real test rows each. Ratios are formed within a round and
their medians reported. Triton's statistics and the processes' CPU times are recorded around every
run, so the report can say where the time goes.

Results: ``<out>/results/<workload>/`` (summary.json, runs.csv, perf_analyzer's CSVs) and
``<out>/BENCHMARKS.md`` with plots in ``<out>/plots/``. Run ``offramp bench``.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from offramp.backend.policy import Policy
from offramp.build.artifacts import ModelArtifacts
from offramp.client.cli.options import comma_list, option, positive_int
from offramp.client.serving.processes import (
    cpu_seconds,
    machine_busy_cpu_seconds,
    machine_description,
    server_processes,
)
from offramp.client.serving.statistics import model_statistics, orchestrator_parts, statistics_delta
from offramp.client.tools.bench_summary import (
    EARLY,
    FORWARD_FULL,
    FULL,
    NOCOMPACT,
    SEGMENTS_FULL,
    TRUNCATED,
    Goals,
    accuracy_compute_curve,
    quality_summary,
    truncation_exit,
    with_derived_figures,
)

if TYPE_CHECKING:
    from offramp.build.calibrate import CalibrationData

DEFAULT_WORKDIR = Path(".cache/offramp")
DEFAULT_OUT = Path("benchmarks")
DEFAULT_CONCURRENCY = (1, 4, 8, 16)
ARM_KEYS = (EARLY, FULL, NOCOMPACT, SEGMENTS_FULL, FORWARD_FULL, TRUNCATED)
# Shared max-prob thresholds for the accuracy / compute curve: from "every row leaves at exit 0" (a
# max-prob is at least 1/C) to "almost none leaves early".
CURVE_THRESHOLDS = tuple(
    np.round(np.concatenate([np.linspace(0.0, 0.9, 46), 1 - np.logspace(-1, -4, 25)]), 6)
)


# --- Workloads -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one benchmark serves and measures.

    ``test_inputs`` are the model's inputs for the real test split, each (N, ...) in the dtype the
    model takes and with one shape per input (pad text to a fixed length): perf_analyzer and the
    accuracy pass send these rows. ``calibration_logits`` (exits, M, C) are every exit's logits on
    the held-out calibration rows, with ``calibration_labels``: the policy was chosen on them and the
    report draws the accuracy / compute curve from them.
    """

    name: str
    artifacts: ModelArtifacts
    artifacts_dir: Path
    test_inputs: Mapping[str, np.ndarray]
    test_labels: np.ndarray
    calibration_logits: np.ndarray
    calibration_labels: np.ndarray
    policy: Policy
    goals: Goals = field(default_factory=Goals)
    description: str = ""

    @property
    def test_rows(self) -> int:
        return len(self.test_labels)


@dataclass(frozen=True)
class WorkloadSettings:
    """What a workload factory is told: where to cache builds, and whether to build quickly (tests)."""

    workdir: Path = DEFAULT_WORKDIR
    quick: bool = False
    epochs: int = 3


WorkloadFactory = Callable[[WorkloadSettings], Workload]


def bench_policy(
    artifacts: ModelArtifacts,
    calibration_logits: np.ndarray,
    calibration_labels: np.ndarray,
    max_accuracy_loss: float | None = None,
) -> Policy:
    """The exit policy every workload serves in the benchmark: change it here, and only here.

    ``offramp calibrate --rule all`` at its defaults, on the calibration logits already recorded:
    Learn-then-Test at 1% disagreement with the full model, with probability 0.95 over the calibration
    rows, every rule family certified at delta / families and the one certifying the least compute kept
    (``benchmarks/exit_rules.md`` compares them). The policy records the family it serves.

    ``max_accuracy_loss``, the workload's accuracy goal, is certified with it (``--max-accuracy-loss``),
    so the goal is what the policy guarantees rather than what one test split happens to show, where the
    calibration rows can show it at all: TREC's 602 certifying rows cannot show half a point at delta / 4
    even without a single loss (``CalibratedExitPolicy.accuracy_bound_in_reach``), and certifying it
    there would exit nowhere; that workload is certified on disagreement alone, as its policy states.
    """
    from offramp.build.calibrate import CalibrationSettings, calibrate_logits
    from offramp.build.risk_control import CalibratedExitPolicy, CalibrationWarning

    def calibrated(bound: float | None) -> tuple[Policy, CalibratedExitPolicy]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)  # out of reach: the fallback below says so
            return calibrate_logits(
                calibration_logits,
                artifacts.exit_costs,
                artifacts.fingerprint,
                calibration_labels,
                settings=CalibrationSettings(rule="all", max_accuracy_loss=bound),
            )

    policy, result = calibrated(max_accuracy_loss)
    if not result.accuracy_bound_in_reach:
        policy, _ = calibrated(None)
    return policy


def _recipe_workload(
    artifacts: ModelArtifacts,
    directory: Path,
    test: CalibrationData,
    goals: Goals,
    description: str,
    policy: Policy | None = None,
) -> Workload:
    """A workload on a recipe's own splits: its test split served, under ``policy`` or else the bench's
    policy calibrated on its calibration split."""
    from offramp.build.calibrate import exit_logits_from_onnx, held_out_data

    calibration = held_out_data(artifacts, directory)
    calibration_logits = exit_logits_from_onnx(artifacts, directory, calibration.inputs)
    return Workload(
        name=artifacts.name,
        artifacts=artifacts,
        artifacts_dir=directory,
        test_inputs=test.inputs,
        test_labels=test.labels,
        calibration_logits=calibration_logits,
        calibration_labels=calibration.labels,
        policy=policy
        or bench_policy(artifacts, calibration_logits, calibration.labels, goals.max_accuracy_loss),
        goals=goals,
        description=description,
    )


def fashion_cnn_workload(settings: WorkloadSettings) -> Workload:
    """The multi-exit ResNet on Fashion-MNIST, built as the demo builds it (reused when cached)."""
    from offramp.build.calibrate import held_out_data
    from offramp.build.recipes import served_fashion_cnn

    artifacts, directory = served_fashion_cnn(settings.workdir, settings.epochs, settings.quick)
    return _recipe_workload(
        artifacts,
        directory,
        held_out_data(artifacts, directory, "test"),
        Goals(throughput_ratio=1.0, throughput_ratio_in_process=1.3, ideal_speedup=2.2),
        "Fashion-MNIST, multi-exit ResNet (an exit per stage)",
    )


def text_workload(task: str) -> WorkloadFactory:
    """The fine-tuned multi-exit MiniLM on ``task`` (an exit after every layer), built as the demo
    builds it. perf_analyzer sends one shape per input, so every test row is padded to the split's
    longest (the mask makes padding inert: answers are unchanged, work grows alike for both models);
    the report states the real and the padded length."""

    def factory(settings: WorkloadSettings) -> Workload:
        from offramp.build.calibrate import held_out_data
        from offramp.build.text_recipes import served_text_classifier

        artifacts, directory = served_text_classifier(settings.workdir, task, quick=settings.quick)
        test = held_out_data(artifacts, directory, "test")
        mask = test.inputs["ATTENTION_MASK"]
        return _recipe_workload(
            artifacts,
            directory,
            test,
            Goals(
                throughput_ratio=1.7,
                throughput_ratio_in_process=1.9,
                ideal_speedup=2.0,
                max_accuracy_loss=0.005,
            ),
            f"{task}, multi-exit MiniLM-L6 fine-tuned (an exit per layer); rows padded to "
            f"{mask.shape[1]} tokens, {mask.sum(axis=1).mean():.1f} real on average",
        )

    return factory


def artifacts_workload(directory: Path) -> WorkloadFactory:
    """Any build, from its folder (``offramp bench --artifacts DIR``): the folder's own ``policy.json``
    when it was made for this build (``offramp calibrate``, ``offramp tune``), else the bench's policy
    chosen on its calibration split; its test split served (text padded to the split's longest row, as
    for the recipes). No throughput goal: what a model can gain depends on it and its policy."""

    def factory(settings: WorkloadSettings) -> Workload:
        from offramp.build.calibrate import held_out_data

        artifacts = ModelArtifacts.load(directory)
        test = held_out_data(artifacts, directory, "test")
        goals = Goals()
        description = f"{artifacts.name} ({artifacts.build.get('mode', 'joint')} mode), from {directory}"
        policy_file = directory / "policy.json"
        policy = Policy.load(policy_file) if policy_file.is_file() else None
        if policy is not None and policy.model_fingerprint != artifacts.fingerprint:
            policy = None  # made for another build of the same folder
        return _recipe_workload(artifacts, directory, test, goals, description, policy)

    return factory


WORKLOADS: dict[str, WorkloadFactory] = {
    "fashion_cnn": fashion_cnn_workload,
    "trec": text_workload("trec"),
    "rotten_tomatoes": text_workload("rotten_tomatoes"),
}


def register_workload(name: str, factory: WorkloadFactory) -> None:
    """Make ``--workload name`` build its workload with ``factory``."""
    WORKLOADS[name] = factory


class UnknownWorkload(KeyError):
    """A workload spec that names no registered workload, build folder or factory; its message says
    which ones there are (the CLI prints it, without a traceback)."""

    def __str__(self) -> str:
        return str(self.args[0])


def resolve_workload(spec: str) -> WorkloadFactory:
    """A registered name, a build's folder, or ``package.module:function`` naming a factory."""
    if spec in WORKLOADS:
        return WORKLOADS[spec]
    if (Path(spec) / "manifest.json").is_file():
        return artifacts_workload(Path(spec))
    if ":" in spec:
        module, _, attribute = spec.partition(":")
        return getattr(importlib.import_module(module), attribute)
    raise UnknownWorkload(
        f"unknown workload {spec!r}; known: {sorted(WORKLOADS)}, a build's folder, or module:function"
    )


# --- The models under test ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One thing perf_analyzer measures: a model and the request parameters every request carries."""

    key: str
    model: str
    parameters: Mapping[str, bool | int | str] = field(default_factory=dict)
    description: str = ""


def arms_of(name: str, truncation_exit: int = 0) -> dict[str, Arm]:
    """The arms of model ``name``; the static-truncation arm answers every row at ``truncation_exit``."""
    return {
        EARLY: Arm(EARLY, name, {}, "early exit (compaction on)"),
        FULL: Arm(FULL, f"{name}_full", {}, "full model, no exits"),
        NOCOMPACT: Arm(NOCOMPACT, f"{name}_nocompact", {}, "early exit, batch-level (no compaction)"),
        SEGMENTS_FULL: Arm(
            SEGMENTS_FULL,
            f"{name}_segments_full",
            {"force_full": True},
            "forced full depth through every segment (orchestration tax)",
        ),
        FORWARD_FULL: Arm(
            FORWARD_FULL,
            name,
            {"force_full": True},
            "forced full depth, forwarded to the full model (one BLS hop)",
        ),
        TRUNCATED: Arm(
            TRUNCATED,
            name,
            {"min_exit": truncation_exit, "max_exit": truncation_exit},
            f"static truncation: every row answered at exit {truncation_exit}",
        ),
    }


def repository_options(config: BenchConfig) -> Any:
    from offramp.backend.environment import prepare_execution_env
    from offramp.backend.orchestrator import ServingOptions
    from offramp.build.repository import RepositoryOptions

    return RepositoryOptions(
        execution_env=prepare_execution_env(),
        serving=ServingOptions(segments_in_process=config.segments_in_process),
        orchestrator_instances=config.orchestrator_instances,
        segment_instances=config.segment_instances,
        threads_per_instance=config.threads_per_instance,
        max_queue_delay_us=config.max_queue_delay_us,
    )


def write_bench_repository(workload: Workload, repository: Path, options: Any) -> list[str]:
    """The early-exit model, ``<name>_full``, and the two orchestrator variants, in one fresh repository.

    Segments and the full model share one configuration (``segment_instances`` instances of
    ``threads_per_instance`` threads, the same dynamic batching); every orchestrator has
    ``orchestrator_instances``. Returns the model names.
    """
    from offramp.build.repository import write_orchestrator, write_repository

    if repository.exists():
        shutil.rmtree(repository)
    name = workload.name
    written = write_repository(
        workload.artifacts, workload.artifacts_dir, workload.policy, repository, options
    )
    artifacts, directory = workload.artifacts, workload.artifacts_dir
    write_orchestrator(artifacts, workload.policy, repository, options, f"{name}_nocompact", False, directory)
    segments_policy = replace(workload.policy, full_depth_route="segments")
    write_orchestrator(
        artifacts, segments_policy, repository, options, f"{name}_segments_full", artifacts_dir=directory
    )
    return sorted([p.name for p in written] + [f"{name}_nocompact", f"{name}_segments_full"])


def pick_data_rows(rows: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct test rows in a seeded random order (so consecutive requests mix classes)."""
    return np.random.default_rng(seed).choice(rows, size=min(count, rows), replace=False)


# --- What is recorded around each run ------------------------------------------------------------------


def server_cpu_seconds_by_role(pgid: int, repository: Path) -> dict[str, float]:
    """User+system CPU seconds of the server's processes, summed by role: ``tritonserver`` or the model a
    stub serves."""
    roles = server_processes(pgid, repository)
    totals: dict[str, float] = {}
    for pid, seconds in cpu_seconds(roles).items():
        totals[roles[pid]] = totals.get(roles[pid], 0.0) + seconds
    return totals


# --- Configuration --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What ``offramp bench`` measures and how; each field is also its command-line option."""

    workloads: tuple[str, ...] = option(
        ("fashion_cnn", "trec", "rotten_tomatoes"), flag="--workload", parse=str, repeatable=True,
        help="workload to measure, repeatable: a registered name or module:function",
    )  # fmt: skip
    artifacts: tuple[Path, ...] = option(
        (),
        parse=Path,
        repeatable=True,
        shown="none",
        help=(
            "a build's folder to measure instead of the workloads (repeatable): any model offramp build made"
        ),
    )
    concurrency: tuple[int, ...] = option(
        DEFAULT_CONCURRENCY, parse=comma_list(positive_int), help="concurrency levels"
    )
    repeats: int = option(3, help="interleaved rounds per level")
    rows_per_request: int = option(8, help="test rows per request")
    data_rows: int = option(512, help="distinct test rows perf_analyzer cycles through")
    measurement_interval_ms: int = option(1500, help="perf_analyzer window; a run is three")
    arms: tuple[str, ...] = option(ARM_KEYS, parse=comma_list(str), help="what to measure")
    quality_rows: int | None = option(None, parse=int, help="test rows for the accuracy pass")  # None: all
    quality_concurrency: int = option(8, help="requests in flight in the accuracy pass")
    workdir: Path = option(DEFAULT_WORKDIR, help="builds, repository and server log")
    out: Path = option(DEFAULT_OUT, help="results and BENCHMARKS.md")
    epochs: int = option(3, help="training epochs of a build")
    orchestrator_instances: int = option(2, help="instances of the orchestrator")
    segment_instances: int = option(2, help="instances of every segment and of the full model")
    threads_per_instance: int = option(1, help="ONNX Runtime threads per instance")
    max_queue_delay_us: int = option(0, help="dynamic batching delay")
    seed: int = option(0, help="picks the perf_analyzer rows")
    segments_in_process: bool = option(
        False, help="orchestrators run the segments' ONNX in their own process instead of over BLS"
    )
    quick: bool = option(False, help="a quick build and a short sweep (about a minute after the build)")
    progress: bool = option(True, flag="--no-progress", help="no progress bars")
    # Replicas already running instead of a server of its own: offramp.client.tools.fleet_bench.
    fleet: str = option("", help="measure these running replicas instead (HOST:PORT,... or @FILE) with the "
                        "multi-address client: early exit against <name>_full at each level")  # fmt: skip

    def __post_init__(self) -> None:
        unknown = set(self.arms) - set(ARM_KEYS)
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; known: {list(ARM_KEYS)}")
        if EARLY not in self.arms or FULL not in self.arms:
            raise ValueError("the arms must include 'early' and 'full'")
        if self.repeats < 1 or self.rows_per_request < 1 or not self.concurrency:
            raise ValueError("repeats, rows per request and the concurrency levels must be positive")

    @classmethod
    def quick_defaults(cls) -> dict[str, Any]:
        """A run of about a minute (after the quick build): for tests and smoke checks."""
        return {
            "concurrency": (1, 4), "repeats": 1, "measurement_interval_ms": 500, "data_rows": 64,
            "quality_rows": 512, "quick": True, "out": DEFAULT_WORKDIR / "bench-quick",
        }  # fmt: skip


# --- The measurements -------------------------------------------------------------------------------------


def _progress(iterable: Any = None, **kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)


def served_quality(
    url: str, workload: Workload, arms: Mapping[str, Arm], rows: int, config: BenchConfig
) -> tuple[dict, dict[str, Any]]:
    """Send the first ``rows`` test rows through each arm once (concurrency ``quality_concurrency``).

    Returns the quality summary (early exit against the full model and the labels) and the raw
    per-row answers by arm (labels; for the orchestrators also exit and cost).
    """
    from offramp.client.grpc_client import Predictions
    from offramp.client.tools.demo import send_all

    inputs = {n: a[:rows] for n, a in workload.test_inputs.items()}
    labels = workload.test_labels[:rows]
    answers: dict[str, Any] = {}
    passes: dict[str, dict] = {}
    for key, arm in arms.items():
        if key == FORWARD_FULL:
            continue  # the same model as `early`; forced rows are checked by the tests
        if key == FULL:

            def call(client, part, arm=arm):
                return client.full_logits(arm.model, {n: a[part] for n, a in inputs.items()})
        else:

            def call(client, part, arm=arm):
                return client.classify(
                    arm.model, {n: a[part] for n, a in inputs.items()}, **dict(arm.parameters)
                )

        parts, run = send_all(url, rows, config.rows_per_request, config.quality_concurrency, call,
                              f"accuracy {arm.model:>24}")  # fmt: skip
        if key == FULL:
            answers[key] = {"label": np.concatenate(parts).argmax(axis=1)}
        else:
            predictions = Predictions.concatenate(parts)
            answers[key] = {"label": predictions.label, "exit": predictions.exit, "cost": predictions.cost}
        passes[key] = {"rows_per_s": run.rows_per_second, "seconds": run.seconds}
    early, full = answers[EARLY], answers[FULL]
    summary = quality_summary(labels, full["label"], early["label"], early["exit"], early["cost"],
                              workload.artifacts.num_exits)  # fmt: skip
    if NOCOMPACT in answers:
        summary["nocompact_same_labels"] = float(np.mean(answers[NOCOMPACT]["label"] == early["label"]))
        summary["nocompact_same_exits"] = float(np.mean(answers[NOCOMPACT]["exit"] == early["exit"]))
    if TRUNCATED in answers:
        summary["truncated_accuracy"] = float(np.mean(answers[TRUNCATED]["label"] == labels))
        summary["truncated_agreement"] = float(np.mean(answers[TRUNCATED]["label"] == full["label"]))
    if SEGMENTS_FULL in answers:
        summary["segments_full_agreement_with_full"] = float(
            np.mean(answers[SEGMENTS_FULL]["label"] == full["label"])
        )
    summary["passes"] = passes
    summary["concurrency"] = config.quality_concurrency
    summary["rows_per_request"] = config.rows_per_request
    return summary, answers


def sweep_order(arms: Sequence[str], level_index: int, rep: int) -> list[str]:
    """The order of the arms in one round: rotated each round, reversed on odd levels, so no arm
    always runs first or right after another."""
    order = list(arms)
    if level_index % 2:
        order.reverse()
    shift = rep % len(order)
    return order[shift:] + order[:shift]


def run_sweep(
    server: Any,
    workload: Workload,
    arms: Mapping[str, Arm],
    data_file: Path,
    config: BenchConfig,
    raw_dir: Path,
) -> list[dict]:
    """perf_analyzer at every concurrency level, every arm, ``repeats`` interleaved rounds."""
    from offramp.client.tools.perf_analyzer import PerfAnalyzerOptions, check_perf_analyzer, run_perf_analyzer

    binary = check_perf_analyzer()
    shapes = {
        spec.name: list(np.asarray(workload.test_inputs[spec.name]).shape[1:])
        for spec in workload.artifacts.inputs
    }
    plan = [
        (concurrency, rep, key)
        for level_index, concurrency in enumerate(config.concurrency)
        for rep in range(config.repeats)
        for key in sweep_order(list(arms), level_index, rep)
    ]
    records = []
    bar = _progress(
        total=len(plan), desc=f"perf_analyzer {workload.name}", unit="run", disable=not config.progress
    )
    for position, (concurrency, rep, key) in enumerate(plan):
        arm = arms[key]
        bar.set_postfix_str(f"c={concurrency} round {rep + 1}/{config.repeats} {key}")
        options = PerfAnalyzerOptions(
            url=server.grpc_url,
            model=arm.model,
            input_data=data_file,
            concurrency=concurrency,
            batch_size=config.rows_per_request,
            shapes=shapes,
            measurement_interval_ms=config.measurement_interval_ms,
            # Each run is three windows (the options' default); stability comes from the interleaved
            # rounds (module doc).
            request_parameters=dict(arm.parameters),
            extra_args=("--verbose-csv",),
        )
        csv_path = raw_dir / f"{key}_c{concurrency}_r{rep}.csv"
        stats_before = model_statistics(server.grpc_url)
        parts_before = orchestrator_parts(server.metrics_url, arm.model)
        cpu_before = server_cpu_seconds_by_role(server.pid, server.repository)
        busy_before = machine_busy_cpu_seconds()
        run = run_perf_analyzer(
            options, csv_path, binary=binary, timeout_s=60 + 40 * config.measurement_interval_ms / 1000
        )
        busy_after = machine_busy_cpu_seconds()
        cpu_after = server_cpu_seconds_by_role(server.pid, server.repository)
        stats = statistics_delta(stats_before, model_statistics(server.grpc_url))
        parts = orchestrator_parts(server.metrics_url, arm.model)
        parts = {k: v - parts_before.get(k, 0.0) for k, v in parts.items() if v > parts_before.get(k, 0.0)}
        failed = sum(int(s.get("fail", 0)) for s in stats.values())
        if failed:
            raise RuntimeError(f"{failed} requests failed while measuring {arm.model}; see {server.log_path}")
        records.append(
            {
                "arm": key,
                "model": arm.model,
                "parameters": dict(arm.parameters),
                "concurrency": concurrency,
                "rep": rep,
                "position": position,
                "perf": run.result.to_dict(),
                "wall_s": run.wall_s,
                "client_cpu_s": run.client_cpu_s,
                "server_cpu_s": {
                    k: v - cpu_before.get(k, 0.0)
                    for k, v in cpu_after.items()
                    if v - cpu_before.get(k, 0.0) > 0
                },
                "machine": {"busy_cores": (busy_after - busy_before) / run.wall_s, "cores": os.cpu_count()},
                "stats": stats,
                "orchestrator_parts": parts,  # seconds by part, executes, requests (orchestrator arms)
                "csv": csv_path.name,
                "command": " ".join(run.command),
            }
        )
        bar.update()
        bar.set_postfix_str(f"c={concurrency} {key} {run.result.rows_per_s:,.0f} rows/s")
    bar.close()
    return records


def best_seconds(call: Callable[[], object], budget_s: float = 0.6, at_least: int = 5) -> float:
    """The fastest of repeated calls (at least ``at_least``, for about ``budget_s``, at most 200): the
    run least disturbed by other load on a shared machine."""
    times, started = [], time.perf_counter()
    while len(times) < at_least or time.perf_counter() - started < budget_s:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return min(times)


def offline_timings(workload: Workload, inputs: Mapping[str, np.ndarray], batch_sizes: Sequence[int]) -> dict:
    """ONNX Runtime on one thread, in this process: each segment and the full model per batch size,
    and the cascade's own logic with segments that cost nothing. Minimum of repeated runs (the
    least disturbed by other load)."""
    from offramp.backend.cascade import CascadeBatch, run_cascade
    from offramp.backend.contract import HIDDEN_IN, HIDDEN_OUT, LOGITS_OUT
    from offramp.backend.segment_runner import OnnxRunner

    artifacts, directory = workload.artifacts, workload.artifacts_dir
    segments = [OnnxRunner(directory / s.onnx, threads=1) for s in artifacts.segments]
    full = OnnxRunner(directory / artifacts.full_onnx, threads=1)

    result = {}
    for batch in batch_sizes:
        raw = {n: np.ascontiguousarray(a[:batch]) for n, a in inputs.items()}
        tensors, outputs, segment_ms = dict(raw), [], []
        for runner in segments:
            feed = dict(tensors)
            segment_ms.append(1e3 * best_seconds(lambda r=runner, f=feed: r.run(f)))
            out = runner.run(feed)
            outputs.append(out)
            tensors = {HIDDEN_IN: out[HIDDEN_OUT], **{n: raw[n] for n in artifacts.side_inputs}}
        full_ms = 1e3 * best_seconds(lambda raw=raw: full.run(raw))

        def fake_segment(
            index: int, tensors: Mapping[str, Any], need_hidden: bool, outputs: list = outputs
        ) -> tuple[Any, Any]:
            rows = len(next(iter(v for v in tensors.values() if v is not None)))
            out = outputs[index]
            return (out[HIDDEN_OUT][:rows] if need_hidden else None), out[LOGITS_OUT][:rows]

        try:
            cascade_ms = 1e3 * best_seconds(
                lambda raw=raw, fake_segment=fake_segment: run_cascade(
                    CascadeBatch.plain(raw, artifacts.num_exits),
                    fake_segment,
                    workload.policy,
                    artifacts.exit_costs,
                    artifacts.side_inputs,
                )
            )
        except Exception as error:  # noqa: BLE001 - the cascade's signature may move; the rest still holds
            cascade_ms = None
            print(f"offline cascade timing skipped: {error}", file=sys.stderr)
        result[str(batch)] = {
            "segment_ms": segment_ms,
            "full_ms": full_ms,
            "cumulative_time_fraction": (np.cumsum(segment_ms) / full_ms).tolist(),
            "mac_fraction": list(artifacts.exit_costs),
            "cascade_logic_ms": cascade_ms,
        }
    return result


def machine_record() -> dict[str, Any]:
    """The machine as the summary records it (the load average as /proc/loadavg writes it)."""
    machine = machine_description()
    return {
        "nproc": machine.cores,
        "cpu_model": machine.cpu_model,
        "memory_gib": round(machine.memory_bytes / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [f"{load:.2f}" for load in machine.load_average],
    }


def package_versions() -> dict[str, str | None]:
    versions = {}
    for package in (
        "nvidia-pytriton",
        "tritonclient",
        "torch",
        "onnxruntime",
        "numpy",
        "nvidia-cuda-runtime-cu12",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def server_version(http_url: str) -> str | None:
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{http_url}/v2", timeout=10) as response:
            return json.load(response).get("version")
    except OSError:
        return None


def warm_up(url: str, workload: Workload, arms: Mapping[str, Arm], rows: int) -> None:
    """One request per arm, so no measurement pays a first call (stub imports, ONNX session warm-up)."""
    from offramp.client.grpc_client import OfframpClient

    inputs = {n: a[:rows] for n, a in workload.test_inputs.items()}
    with OfframpClient(url) as client:
        for _ in range(3):
            for key, arm in arms.items():
                if key == FULL:
                    client.full_logits(arm.model, inputs)
                else:
                    client.classify(arm.model, inputs, **dict(arm.parameters))


def run_workload(workload: Workload, config: BenchConfig) -> dict:
    """Everything measured for one workload; writes its raw results and returns its summary."""
    from offramp.build.calibrate import exit_logits_from_onnx
    from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts
    from offramp.client.tools.perf_analyzer import write_input_data

    started = time.time()
    results_dir = config.out / "results" / workload.name
    raw_dir = results_dir / "perf"
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    raw_dir.mkdir(parents=True)
    scratch = config.workdir / "bench" / workload.name
    repository = scratch / "model_repository"
    models = write_bench_repository(workload, repository, repository_options(config))

    data_rows = pick_data_rows(workload.test_rows, config.data_rows, config.seed)
    data_inputs = {n: np.asarray(a)[data_rows] for n, a in workload.test_inputs.items()}
    data_file = write_input_data(scratch / "input_data.json", data_inputs)
    quality_rows = min(workload.test_rows, config.quality_rows or workload.test_rows)

    print(f"[{workload.name}] offline: every exit on the test split, ONNX timings", flush=True)
    test_logits = exit_logits_from_onnx(
        workload.artifacts,
        workload.artifacts_dir,
        {n: a[:quality_rows] for n, a in workload.test_inputs.items()},
    )
    r = config.rows_per_request
    offline = offline_timings(workload, data_inputs, sorted({1, r, 2 * r, 4 * r}))
    costs = workload.artifacts.exit_costs
    curves = {
        "calibration": accuracy_compute_curve(
            workload.calibration_logits, workload.calibration_labels, costs, CURVE_THRESHOLDS
        ),
        "test": accuracy_compute_curve(
            test_logits, workload.test_labels[:quality_rows], costs, CURVE_THRESHOLDS
        ),
    }
    # The static-truncation baseline: the cheapest exit as accurate on the test rows as the policy is.
    test_labels = np.asarray(workload.test_labels[:quality_rows])
    exit_accuracy = [float(np.mean(logits.argmax(axis=1) == test_labels)) for logits in test_logits]
    policy_labels = np.take_along_axis(
        np.stack([logits.argmax(axis=1) for logits in test_logits], axis=1),
        _policy_exits(test_logits, workload.policy)[:, None],
        axis=1,
    )[:, 0]
    policy_loss = max(0.0, exit_accuracy[-1] - float(np.mean(policy_labels == test_labels)))
    truncation = {
        "exit": truncation_exit(exit_accuracy, policy_loss),
        "policy_accuracy_loss": policy_loss,
        "exit_accuracy": exit_accuracy,
    }
    arms = {k: v for k, v in arms_of(workload.name, truncation["exit"]).items() if k in config.arms}
    # The served rows' exits, predicted offline, tell whether the perf_analyzer rows are a fair sample.
    data_exits = _policy_exits(
        exit_logits_from_onnx(workload.artifacts, workload.artifacts_dir, data_inputs), workload.policy
    )

    log_path = scratch / "tritonserver.log"
    print(f"[{workload.name}] serving {len(models)} models from {repository}", flush=True)
    with EmbeddedTritonServer(
        repository, ports=ServerPorts.free(), log_path=log_path, startup_timeout_s=600
    ) as server:
        warm_up(server.grpc_url, workload, arms, config.rows_per_request)
        quality, _ = served_quality(server.grpc_url, workload, arms, quality_rows, config)
        records = run_sweep(server, workload, arms, data_file, config, raw_dir)
        version = server_version(server.http_url)

    summary = {
        "workload": workload.name,
        "description": workload.description,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "machine": machine_record(),
        "versions": {**package_versions(), "tritonserver": version},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "model": {
            "exits": workload.artifacts.num_exits,
            "exit_costs": list(costs),
            "exit_test_accuracy": list(workload.artifacts.exit_test_accuracy),
            "full_test_accuracy": workload.artifacts.full_test_accuracy,
            "fingerprint": workload.artifacts.fingerprint,
            "build": {k: v for k, v in workload.artifacts.build.items() if k != "epoch_losses"},
        },
        "policy": json.loads(workload.policy.to_json()),
        "arms": {k: asdict(a) for k, a in arms.items()},
        "data": {
            "rows": len(data_rows),
            "row_indices": data_rows.tolist(),
            "offline_exit_fractions": (
                np.bincount(data_exits, minlength=len(costs)) / len(data_exits)
            ).tolist(),
            "offline_mean_compute_fraction": float(np.asarray(costs)[data_exits].mean()),
        },
        "quality": quality,
        "truncation": truncation,
        "curves": curves,
        "offline": offline,
        "goal_settings": asdict(workload.goals),
        "records": records,
    }
    summary = with_derived_figures(summary)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    write_runs_csv(records, results_dir / "runs.csv")
    return summary


def _policy_exits(exit_logits: np.ndarray, policy: Policy) -> np.ndarray:
    from offramp.build.calibrate import simulate_exits

    return simulate_exits(exit_logits, policy.exits)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


RUN_KEYS = ("arm", "model", "concurrency", "rep", "position")  # what a run was
PERF_KEYS = (
    "rows_per_s",
    "requests_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "avg_ms",
)  # perf_analyzer's
RUNS_CSV_FIELDS = (*RUN_KEYS, *PERF_KEYS, "wall_s", "client_cpu_s", "server_cpu_s", "busy_cores")


def write_runs_csv(records: Sequence[Mapping], path: Path) -> Path:
    """One flat line per perf_analyzer run."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUNS_CSV_FIELDS)
        writer.writeheader()
        for r in records:
            writer.writerow(
                {
                    **{k: r[k] for k in RUN_KEYS},
                    **{k: r["perf"].get(k) for k in PERF_KEYS},
                    "wall_s": round(r["wall_s"], 3),
                    "client_cpu_s": round(r["client_cpu_s"], 3),
                    "server_cpu_s": round(sum(r["server_cpu_s"].values()), 3),
                    "busy_cores": round(r["machine"]["busy_cores"], 3),
                }
            )
    return path


def run_bench(config: BenchConfig) -> list[dict]:
    """Measure every workload of ``config``, then write the report; returns the summaries."""
    from offramp.client.tools.bench_report import write_report
    from offramp.client.tools.perf_analyzer import check_perf_analyzer

    check_perf_analyzer()  # before any build: fail in a second, saying what to install
    specs = [str(directory) for directory in config.artifacts] or list(config.workloads)
    factories = [resolve_workload(spec) for spec in specs]
    summaries = []
    for spec, factory in zip(specs, factories, strict=True):
        print(f"[{spec}] build (reused when cached) and calibrate", flush=True)
        workload = factory(WorkloadSettings(workdir=config.workdir, quick=config.quick, epochs=config.epochs))
        summaries.append(run_workload(workload, config))
    report = write_report(config.out)
    print(f"report: {report}")
    return summaries


def measurement_status(command: str, run: Callable[[], object]) -> int:
    """The exit status of a measuring command: 0 when ``run`` finishes, 1 with ``<command>: error: ...``
    on stderr when the measurement cannot go on (perf_analyzer failed, the server did not start, a
    bad value or a missing file)."""
    from offramp.client.serving.server import ServerStartError
    from offramp.client.tools.perf_analyzer import PerfAnalyzerError

    try:
        run()
        return 0
    except (PerfAnalyzerError, ServerStartError, ValueError, FileNotFoundError) as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 1


def main_bench(config: BenchConfig, report_only: bool = False) -> int:
    """``offramp bench``: returns the exit status."""
    from offramp.client.serving.server import ServerStartError
    from offramp.client.tools.bench_report import write_report
    from offramp.client.tools.perf_analyzer import PerfAnalyzerError

    try:
        if report_only:
            print(f"report: {write_report(config.out)}")
            return 0
        if config.fleet:
            from offramp.client.tools.fleet_bench import run_fleet_bench

            run_fleet_bench(config)
            return 0
        run_bench(config)
        return 0
    except (PerfAnalyzerError, ServerStartError, ValueError, KeyError, FileNotFoundError) as error:
        print(f"offramp bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
