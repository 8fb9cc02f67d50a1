"""``offramp tune``: measure a model's serving costs on this machine, keep the exits that pay, serve that.

1. Every exit set (``build/exit_selection.py``), under each data-free rule family (max-prob and
   patience), is calibrated on a third of the build's calibration rows (an estimate to rank by); the
   pick alone is certified at ``delta`` on the rest, under its family.
2. In process, on one ONNX Runtime thread as a stub runs it: every range of segments merged into one
   model (what a set of exits serves), and the full model, each timed at several batch sizes and
   fitted as a cost per call plus a cost per row.
3. On the real embedded Triton server with the segments over BLS, perf_analyzer at the chosen
   concurrency, interleaved rounds, three arms: the full model alone; the orchestrator with every row
   forced through every segment; the orchestrator forwarding every row to the full model. The
   server's CPU per execute in these arms, less the in-process compute, gives the BLS hop's cost and
   the orchestrator's fixed cost per execute; its own part timings give the cascade's cost per exit.
4. Every (exit set, rule family, segment mode) is ranked by predicted CPU per row against the full model's
   measured CPU per row; the best is written as a build of its own (segments between kept exits
   merged) with its certified policy, and ``tune.json`` / ``TUNE.md`` record every measurement and
   prediction. When nothing beats the full model it says so (call ``<name>_full``), and the build it
   writes keeps the early-exit interface at least cost: the whole network as one segment, with its
   own predicted ratio (``--prefer-exits``: the best set with early exits instead).
5. ``--verify``: ``offramp bench`` on the written build against the full model, the measured ratio
   beside the predicted one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from offramp.build.exit_selection import SEGMENT_MODES, CallCost, Candidate, Choice, ServingCosts
from offramp.build.risk_control import check_accuracy_bound
from offramp.client.cli.options import comma_list, option, positive_int
from offramp.client.cli.subcommand import DEFAULT_WORKDIR


@dataclass(frozen=True)
class TuneConfig:
    """What ``offramp tune`` measures and writes; each field is also its command-line option."""

    artifacts: Path = option(DEFAULT_WORKDIR / "fashion_cnn", help="the build's folder")
    out: Path | None = option(None, parse=Path, shown="<artifacts>-tuned", help="the tuned build's folder")
    epsilon: float = option(0.01, help="allowed disagreement with the full model")
    max_accuracy_loss: float | None = option(
        None, parse=float, shown="none",
        help="also certify that accuracy falls at most this far below the full model's (0.005: half a point)",
    )  # fmt: skip
    delta: float = option(0.05, help="the pick's guarantee holds with probability 1-delta")
    concurrency: int = option(8, help="requests in flight while the serving costs are measured")
    rows_per_request: int = option(8, help="rows per request")
    repeats: int = option(2, help="interleaved rounds of the three served arms")
    measurement_interval_ms: int = option(1500, help="perf_analyzer window; a run is three")
    modes: tuple[str, ...] = option(SEGMENT_MODES, parse=comma_list(str), help="segment modes to consider")
    batch_sizes: tuple[int, ...] = option(
        (1, 8, 16, 32), parse=comma_list(positive_int), help="batch sizes of the in-process timings"
    )
    verify: bool = option(False, help="then serve the pick against the full model and measure the ratio")
    prefer_exits: bool = option(
        False, help="where no set of exits beats the full model, write the best set with early exits anyway"
    )
    report: Path | None = option(None, parse=Path, shown="none", help="also write tune.json and TUNE.md here")
    workdir: Path = option(DEFAULT_WORKDIR, help="repository and server log")
    progress: bool = option(True, flag="--no-progress", help="no progress bars")

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(SEGMENT_MODES)
        if unknown or not self.modes:
            raise ValueError(f"modes must be among {list(SEGMENT_MODES)}, not {sorted(unknown)}")
        if not 0 < self.epsilon < 1 or not 0 < self.delta < 1:
            raise ValueError("epsilon and delta must lie in (0, 1)")
        check_accuracy_bound(self.max_accuracy_loss)

    @property
    def out_dir(self) -> Path:
        return self.out or self.artifacts.with_name(self.artifacts.name + "-tuned")


# --- In process ----------------------------------------------------------------------------------------


def range_costs(
    artifacts: Any, directory: Path, inputs: Mapping[str, np.ndarray], batch_sizes: Sequence[int]
) -> tuple[dict[tuple[int, int], CallCost], CallCost]:
    """Every range of segments merged and the full model, on one ONNX Runtime thread, each fitted as
    per call + per row. inputs: the model's raw inputs, (N, ...) with N >= max(batch_sizes)."""
    import onnx

    from offramp.backend.contract import HIDDEN_IN, HIDDEN_OUT
    from offramp.backend.segment_runner import OnnxRunner
    from offramp.build.merge_segments import merge_onnx_chain
    from offramp.client.tools.bench import best_seconds

    rows = max(batch_sizes)
    raw = {n: np.ascontiguousarray(a[:rows]) for n, a in inputs.items()}
    side = {n: raw[n] for n in artifacts.side_inputs}
    # What each segment is fed: the raw inputs, then the previous segment's hidden state and side inputs.
    feeds: list[dict[str, np.ndarray]] = [raw]
    models = [onnx.load(str(directory / s.onnx)) for s in artifacts.segments]
    for segment in artifacts.segments[:-1]:
        hidden = OnnxRunner(directory / segment.onnx).run(feeds[-1], [HIDDEN_OUT])[HIDDEN_OUT]
        feeds.append({HIDDEN_IN: hidden, **side})

    def fitted(runner: Any, feed: Mapping[str, np.ndarray]) -> CallCost:
        seconds = [
            best_seconds(lambda b=b: runner.run({n: a[:b] for n, a in feed.items()}), budget_s=0.3)
            for b in batch_sizes
        ]
        return CallCost.fit(batch_sizes, seconds)

    costs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for first in range(artifacts.num_exits):
            for last in range(first, artifacts.num_exits):
                path = Path(scratch) / f"range_{first}_{last}.onnx"
                onnx.save(merge_onnx_chain(models[first : last + 1], artifacts.side_inputs), str(path))
                costs[(first, last)] = fitted(OnnxRunner(path), feeds[first])
    full = fitted(OnnxRunner(directory / artifacts.full_onnx), raw)
    return costs, full


# --- Served ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmCost:
    """One served arm, its rounds pooled: CPU seconds of every server process per execute and per row."""

    cpu_per_execute: float
    cpu_per_row: float
    rows_per_execute: float
    cascade_per_execute: float  # the orchestrator's own cascade timing (0 for the full model)


def arm_cost(records: Sequence[Mapping], model: str) -> ArmCost:
    cpu = sum(sum(r["server_cpu_s"].values()) for r in records)
    rows = sum(r["stats"][model]["inference_count"] for r in records)
    executes = sum(r["stats"][model]["execution_count"] for r in records)
    parts = [r.get("orchestrator_parts", {}) for r in records]
    timed = sum(p.get("executes", 0.0) for p in parts)
    cascade = sum(p.get("cascade", 0.0) for p in parts) / timed if timed else 0.0
    return ArmCost(cpu / executes, cpu / rows, rows / executes, cascade)


def serving_costs(
    ranges: Mapping[tuple[int, int], CallCost], full: CallCost, arms: Mapping[str, ArmCost], num_exits: int
) -> tuple[ServingCosts, list[str]]:
    """The cost model's BLS hop, fixed cost per execute and cost per exit, from the three served arms
    (module doc) and the in-process timings; with a note for each figure the noise drove below zero
    (then taken as zero)."""
    from offramp.client.tools.bench_summary import FORWARD_FULL, FULL, SEGMENTS_FULL

    through, forward = arms[SEGMENTS_FULL], arms[FORWARD_FULL]
    exit_cost = through.cascade_per_execute / num_exits
    # Forced through every segment: request + E (hop + exit) + every segment's compute, per execute.
    compute = sum(ranges[(k, k)].of(through.rows_per_execute) for k in range(num_exits))
    through_rest = through.cpu_per_execute - compute - num_exits * exit_cost  # request + E hops
    forward_rest = forward.cpu_per_execute - full.of(forward.rows_per_execute)  # request + 1 hop
    notes = []
    hop = (through_rest - forward_rest) / (num_exits - 1) if num_exits > 1 else 0.0
    if hop < 0:
        notes.append(f"the BLS hop measured {hop * 1e3:.3f} ms (noise): taken as 0")
        hop = 0.0
    request = forward_rest - hop
    if request < 0:
        notes.append(f"the fixed cost per execute measured {request * 1e3:.3f} ms (noise): taken as 0")
        request = 0.0
    costs = ServingCosts(
        ranges=dict(ranges),
        hop=hop,
        request=request,
        exit=exit_cost,
        full_per_row=arms[FULL].cpu_per_row,
        rows_per_execute=through.rows_per_execute,
    )
    return costs, notes


def measure_served(workload: Any, config: TuneConfig, out: Path) -> dict[str, ArmCost]:
    """The three arms on the embedded Triton server, segments over BLS (module doc); perf_analyzer's
    own reports stay in ``out/perf``."""
    from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts
    from offramp.client.tools.bench import (
        BenchConfig,
        arms_of,
        pick_data_rows,
        repository_options,
        run_sweep,
        warm_up,
        write_bench_repository,
    )
    from offramp.client.tools.bench_summary import FORWARD_FULL, FULL, SEGMENTS_FULL
    from offramp.client.tools.perf_analyzer import write_input_data

    bench = BenchConfig(
        concurrency=(config.concurrency,),
        repeats=config.repeats,
        rows_per_request=config.rows_per_request,
        measurement_interval_ms=config.measurement_interval_ms,
        workdir=config.workdir,
        progress=config.progress,
    )
    scratch = config.workdir / "tune" / workload.name
    repository = scratch / "model_repository"
    write_bench_repository(workload, repository, repository_options(bench))
    rows = pick_data_rows(workload.test_rows, bench.data_rows, bench.seed)
    data = {n: np.asarray(a)[rows] for n, a in workload.test_inputs.items()}
    data_file = write_input_data(scratch / "input_data.json", data)
    arms = {k: a for k, a in arms_of(workload.name).items() if k in (FULL, SEGMENTS_FULL, FORWARD_FULL)}
    raw = out / "perf"
    raw.mkdir(parents=True, exist_ok=True)
    with EmbeddedTritonServer(
        repository, ports=ServerPorts.free(), log_path=scratch / "tritonserver.log", startup_timeout_s=600
    ) as server:
        warm_up(server.grpc_url, workload, arms, config.rows_per_request)
        records = run_sweep(server, workload, arms, data_file, bench, raw)
    return {key: arm_cost([r for r in records if r["arm"] == key], arm.model) for key, arm in arms.items()}


# --- The pick, written ------------------------------------------------------------------------------------


def test_figures(candidate: Candidate, test_logits: np.ndarray, test_labels: np.ndarray) -> dict[str, float]:
    """A set's policy judged on the test split. test_logits: (E, N, C) every exit's; test_labels: (N,)."""
    from offramp.build.calibrate import simulate_exits

    kept_logits = test_logits[list(candidate.kept)]  # (K, N, C)
    taken = simulate_exits(kept_logits, candidate.calibrated.rules())
    labels = kept_logits.argmax(axis=2)[taken, np.arange(len(taken))]
    return {
        "test_accuracy": float(np.mean(labels == test_labels)),
        "test_disagreement": float(np.mean(labels != test_logits[-1].argmax(axis=1))),
        "test_compute": float(np.asarray(candidate.calibrated.exit_costs)[taken].mean()),
    }


def candidate_rows(choice: Choice, test_logits: np.ndarray, test_labels: np.ndarray) -> list[dict]:
    """Every (exit set, mode) as the report lists it, its estimated policy judged on the test split."""
    return [
        {
            "kept_exits": list(candidate.kept),
            "rule": candidate.rule,
            "mode": mode,
            "predicted_cpu_per_row_ms": cpu * 1e3,
            "predicted_speedup": choice.full_per_row / cpu,
            "calibration_compute": candidate.expected_compute,
            "entering": list(candidate.entering),
            **test_figures(candidate, test_logits, test_labels),
        }
        for candidate, mode, cpu in choice.ranked
    ]


def tuned_policy(candidate: Candidate, fingerprint: str, record: Mapping[str, Any]) -> Any:
    from offramp.build.calibrate import policy_version

    calibrated = candidate.calibrated
    version = policy_version("tune", calibrated.rules(), {"kept_exits": list(candidate.kept)})
    policy = calibrated.to_policy(version, fingerprint)
    return replace(policy, provenance={**policy.provenance, "tune": dict(record)})


def write_markdown(report: Mapping[str, Any], path: Path) -> Path:
    from offramp.build.markdown import markdown_table

    costs = report["costs"]
    bound = report["config"].get("max_accuracy_loss")
    accuracy_bound = "" if bound is None else f" with accuracy lost against the full model at most {bound:g}"
    decision = report["decision"]
    lines = [
        f"# offramp tune: {report['model']}",
        "",
        f"Measured {report['date']} on {report['machine']}; serving costs at concurrency "
        f"{report['config']['concurrency']}, {report['config']['rows_per_request']} rows per request, "
        f"segments over BLS on the embedded Triton server ({costs['rows_per_execute']:.1f} rows an execute).",
        "",
        f"- the full model served alone: {costs['full_per_row_s'] * 1e3:.3f} ms of server CPU per row",
        f"- a BLS segment call: {costs['hop_s'] * 1e3:.3f} ms of CPU beyond the segment's own compute",
        f"- the orchestrator's fixed work per execute: {costs['request_s'] * 1e3:.3f} ms; the cascade per "
        f"exit: {costs['exit_s'] * 1e3:.3f} ms",
        *(f"- note: {note}" for note in report["notes"]),
        "",
        f"Every exit set ({report['sets']}), under each rule family "
        f"({', '.join(report['rules'])}), calibrated by a plain search at epsilon "
        f"{report['config']['epsilon']}{accuracy_bound} on {report['selection_rows']} selection rows (an "
        f"estimate, no guarantee: the ranking's input), and ranked by predicted CPU per row; the pick alone "
        f"is then certified by Learn-then-Test (delta {report['config']['delta']}) on the other "
        f"{report['certification_rows']} calibration rows.",
        "",
        "Estimated, best first:",
        "",
        markdown_table(
            [
                "kept exits",
                "rule",
                "mode",
                "CPU/row ms",
                "predicted vs full",
                "compute",
                "test acc",
                "test disagree",
            ],
            [
                [
                    ",".join(map(str, r["kept_exits"])),
                    r["rule"],
                    r["mode"],
                    f"{r['predicted_cpu_per_row_ms']:.3f}",
                    f"{r['predicted_speedup']:.2f}x",
                    f"{r['calibration_compute']:.3f}",
                    f"{r['test_accuracy']:.4f}",
                    f"{r['test_disagreement']:.4f}",
                ]
                for r in report["candidates"]
            ],
        ),  # fmt: skip
        "",
        f"**Decision:** {decision['summary']}. On the test split the certified policy of the pick: "
        f"accuracy {decision['test_accuracy']:.4f}, disagreement with the full model "
        f"{decision['test_disagreement']:.4f}, compute {decision['test_compute']:.3f}.",
        "",
    ]
    verified = report.get("verified")
    if verified:
        lines += [
            f"**Verified** (`offramp bench`, {verified['rounds']} interleaved rounds): early / full "
            f"throughput {verified['throughput_ratio']:.2f}x measured (server CPU per row full / early: "
            f"{verified['cpu_bound_ratio']:.2f}x) against {decision['predicted_speedup']:.2f}x predicted.",
            "",
        ]
    path.write_text("\n".join(lines))
    return path


def run_tune(config: TuneConfig) -> dict[str, Any]:
    from offramp.build.artifacts import MANIFEST, ModelArtifacts
    from offramp.build.calibrate import exit_logits_from_onnx
    from offramp.build.exit_selection import (
        SELECTION_FRACTION,
        TUNED_RULES,
        calibrated_set,
        choose,
        cpu_per_row,
        estimated_candidates,
        exit_sets,
        selection_split,
    )
    from offramp.build.merge_segments import merged_artifacts
    from offramp.build.risk_control import LearnThenTest
    from offramp.client.tools.bench import WorkloadSettings, artifacts_workload, machine_record

    started = time.time()
    directory = config.artifacts
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{directory} holds no {MANIFEST}: pass a build's folder (offramp build prints it)"
        )
    artifacts = ModelArtifacts.load(directory)
    out = config.out_dir
    print(f"[tune] {artifacts.name}: {artifacts.num_exits} exits; every set of them calibrated", flush=True)
    # Its calibration split's logits (E, N, C) and labels, its test split as perf_analyzer sends it.
    workload = artifacts_workload(directory)(WorkloadSettings(workdir=config.workdir))
    logits, labels = workload.calibration_logits, workload.calibration_labels  # (E, N, C), (N,)
    select, certify = selection_split(len(labels))
    sets = exit_sets(artifacts.num_exits)
    candidates = estimated_candidates(
        logits[:, select], artifacts.exit_costs, labels[select], config.epsilon, sets,
        max_accuracy_loss=config.max_accuracy_loss,
    )  # fmt: skip
    print("[tune] in process: every range of segments merged, and the full model", flush=True)
    ranges, full = range_costs(artifacts, directory, workload.test_inputs, config.batch_sizes)
    print(f"[tune] served: three arms at concurrency {config.concurrency}", flush=True)
    scratch = config.workdir / "tune" / artifacts.name
    arms = measure_served(workload, config, scratch)
    costs, notes = serving_costs(ranges, full, arms, artifacts.num_exits)
    choice = choose(candidates, costs, config.modes)
    test_logits = exit_logits_from_onnx(artifacts, directory, workload.test_inputs)
    rows = candidate_rows(choice, test_logits, np.asarray(workload.test_labels))
    best, mode, cpu = choice.best
    full_name = f"{artifacts.name}_full"
    if choice.serves_full_model:
        verdict = (
            f"no set of exits beats the full model on this machine (best predicted "
            f"{choice.predicted_speedup:.2f}x: exits {list(best.kept)} {mode.replace('_', ' ')}): call "
            f"{full_name} directly"
        )
        early = [item for item in choice.ranked if len(item[0].kept) > 1]
        if config.prefer_exits and early:
            best, mode, cpu = early[0]
            summary = f"{verdict}; written as asked (prefer exits): the best set with early exits, exits "
        else:
            # The early-exit interface at least cost: the whole network as one segment.
            best, mode, cpu = next(item for item in choice.ranked if len(item[0].kept) == 1)
            summary = f"{verdict}; the build written keeps the early-exit interface at least cost: exits "
        summary += f"{list(best.kept)}"
    else:
        summary = f"keep exits {list(best.kept)} of {artifacts.num_exits}"
    # The pick alone, certified on the rows the choice never saw; predicted again with its own exit rates.
    method = LearnThenTest(config.epsilon, config.delta)
    best = calibrated_set(
        logits[:, certify], artifacts.exit_costs, labels[certify], best.kept, method, best.rule,
        config.max_accuracy_loss,
    )  # fmt: skip
    cpu = cpu_per_row(best.kept, best.entering, mode, costs)
    summary += (
        f", {best.rule} rule, segments {mode.replace('_', ' ')}: certified compute "
        f"{best.expected_compute:.3f}, predicted "
        f"{costs.full_per_row / cpu:.2f}x the full model's throughput"
    )
    decision = {
        "kept_exits": list(best.kept),
        "rule": best.rule,
        "mode": mode,
        "serves_full_model": choice.serves_full_model,
        "certified_compute": best.expected_compute,
        "predicted_cpu_per_row_ms": cpu * 1e3,
        "predicted_speedup": costs.full_per_row / cpu,
        **test_figures(best, test_logits, np.asarray(workload.test_labels)),
        "summary": summary,
    }
    machine = machine_record()
    report: dict[str, Any] = {
        "model": artifacts.name,
        "artifacts": str(directory),
        "out": str(out),
        "fingerprint": artifacts.fingerprint,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{machine['nproc']} cores, {machine['cpu_model']}",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "sets": len(sets),
        "rules": list(TUNED_RULES),
        "selection_rows": len(select),
        "certification_rows": len(certify),
        "costs": costs.to_dict(),
        "full_in_process": [full.per_call, full.per_row],
        "arms": {k: asdict(v) for k, v in arms.items()},
        "notes": notes,
        "candidates": rows,
        "decision": decision,
    }
    if out.exists():
        shutil.rmtree(out)
    tuned = merged_artifacts(artifacts, directory, best.kept, out)
    record = {k: decision[k] for k in ("kept_exits", "rule", "mode", "predicted_speedup")} | {
        "tuned_from": artifacts.fingerprint,
        # Which of the build's calibration rows chose the set (selection_split); the rest certified it.
        "selection": {"fraction": SELECTION_FRACTION, "seed": 0, "rows": len(select)},
    }
    policy = tuned_policy(best, tuned.fingerprint, record)
    policy.save(out / "policy.json")
    report["policy_version"] = policy.version
    if config.verify:
        report["verified"] = verify(out, mode, config)
    report["duration_s"] = round(time.time() - started, 1)
    for folder in (out, config.report) if config.report else (out,):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tune.json").write_text(json.dumps(report, indent=1) + "\n")
        write_markdown(report, folder / "TUNE.md")
    print(f"[tune] {summary}")
    print(f"[tune] {out}: build, policy {policy.version}, tune.json, TUNE.md")
    in_process = " --serving segments_in_process=true" if mode == "in_process" else ""
    print(f"[tune] serve it: offramp repository --artifacts {out}{in_process}")
    return report


def verify(directory: Path, mode: str, config: TuneConfig) -> dict[str, Any]:
    """``offramp bench`` on the tuned build: early exit against the full model, interleaved rounds."""
    from offramp.client.tools.bench import BenchConfig, run_bench
    from offramp.client.tools.bench_summary import EARLY, FULL

    bench = BenchConfig(
        artifacts=(directory,),
        concurrency=(config.concurrency,),
        repeats=3,
        rows_per_request=config.rows_per_request,
        measurement_interval_ms=config.measurement_interval_ms,
        arms=(EARLY, FULL),
        segments_in_process=mode == "in_process",
        workdir=config.workdir,
        out=directory / "verify",
        progress=config.progress,
    )
    levels = run_bench(bench)[0]["levels"]
    level = next(item for item in levels if item["concurrency"] == config.concurrency)
    return {
        "rounds": bench.repeats,
        "throughput_ratio": level["throughput_ratio"],
        "cpu_bound_ratio": level["cpu_bound_ratio"],
        "bench": str(bench.out),
    }


def main_tune(config: TuneConfig) -> int:
    from offramp.client.tools.bench import measurement_status

    return measurement_status("offramp tune", lambda: run_tune(config))
