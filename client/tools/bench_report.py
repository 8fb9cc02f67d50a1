"""``BENCHMARKS.md`` and its plots, from the ``summary.json`` of each workload that ``offramp bench`` saved.

Regenerated as a whole on every run (and by ``offramp bench --report-only``), so
it only states what the saved results say.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from offramp.backend.policy import certified_bounds
from offramp.build.markdown import markdown_table
from offramp.client.serving.statistics import ORCHESTRATOR_PARTS
from offramp.client.tools.bench_summary import (
    EARLY,
    FORWARD_FULL,
    FULL,
    IDLE_PROCESSES,
    NOCOMPACT,
    SEGMENTS_FULL,
    TRUNCATED,
    with_derived_figures,
)

REPORT = "BENCHMARKS.md"
# <out>/tune/<run>/tune.json: an ``offramp tune`` run's decision, stated under its workload's goals (the
# goal for a model too small to pay is what tune chooses: the full model, when no set of exits beats it).
TUNE_RUNS = "tune"
MODE_NAMES = {"bls": "over BLS", "in_process": "in process"}
ARM_STYLE = {  # label, colour, marker
    EARLY: ("early exit", "tab:blue", "o"),
    FULL: ("full model", "tab:red", "s"),
    NOCOMPACT: ("early exit, no compaction", "tab:cyan", "v"),
    SEGMENTS_FULL: ("forced full, through segments", "tab:gray", "x"),
    FORWARD_FULL: ("forced full, forwarded", "tab:olive", "+"),
}


def load_summaries(out: Path) -> list[dict]:
    """Every workload's saved summary, its derived figures recomputed from its runs."""
    paths = sorted((Path(out) / "results").glob("*/summary.json"))
    return [with_derived_figures(json.loads(p.read_text())) for p in paths]


def write_report(out: Path) -> Path:
    """Write ``<out>/BENCHMARKS.md`` and ``<out>/plots/*.png`` from ``<out>/results/*/summary.json``."""
    out = Path(out)
    summaries = load_summaries(out)
    if not summaries:
        raise FileNotFoundError(f"no results under {out / 'results'}: run the benchmark first")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    sections = []
    for summary in summaries:
        images = write_plots(summary, plots)
        images = {k: p.relative_to(out).as_posix() for k, p in images.items()}
        sections.append(workload_section(summary, images, tune_runs(out, summary["workload"])))
    text = header(summaries) + "\n".join(sections)
    path = out / REPORT
    path.write_text(text)
    return path


def tune_runs(out: Path, model: str) -> list[dict]:
    """The ``offramp tune`` decisions saved under ``<out>/tune`` for ``model``, each with its folder's
    name as ``run``, by date."""
    runs = []
    for path in sorted((Path(out) / TUNE_RUNS).glob("*/tune.json")):
        record = json.loads(path.read_text())
        if record.get("model") == model and "decision" in record:
            runs.append({**record, "run": path.parent.name})
    return sorted(runs, key=lambda r: r.get("date", ""))


def tune_goal_row(run: Mapping) -> list[str]:
    """A goal line for one tune run: what it chose to serve and its measured throughput against the full
    model's (met when it beats it, or when tune says to serve the full model itself)."""
    decision, verified = run["decision"], run.get("verified") or {}
    modes = " and ".join(MODE_NAMES.get(m, m) for m in run["config"]["modes"])
    goal = f"throughput early/full as `offramp tune` serves it, segments {modes} (`{TUNE_RUNS}/{run['run']}`)"
    measured = verified.get("throughput_ratio")
    if decision["serves_full_model"]:
        best = max((c["predicted_speedup"] for c in run.get("candidates", [])), default=math.nan)
        kept = f"; the early-exit interface kept at least cost measured {measured:.2f}x" if measured else ""
        shown = f"the full model, called directly: 1.00x (no set of exits predicted above {best:.2f}x{kept})"
        return [goal, ">= 1x", shown, "yes"]
    bound = run["config"].get("max_accuracy_loss")
    chosen = (
        f"exits {decision['kept_exits']} {MODE_NAMES.get(decision['mode'], decision['mode'])}, "
        f"{decision['rule']} rule" + ("" if bound is None else f", accuracy loss <= {bound * 100:g} points")
    )
    if measured is None:
        shown, met = f"{chosen}: not measured (predicted {decision['predicted_speedup']:.2f}x)", "n/a"
    else:
        shown = f"{chosen}: {measured:.2f}x ({verified.get('rounds', '?')} rounds)"
        met = "yes" if measured >= 1 else "**no**"
    return [goal, ">= 1x", shown, met]


# --- Formatting ------------------------------------------------------------------------------------------


def _f(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def _pct(value: Any, digits: int = 1) -> str:
    return _f(None if value is None else value * 100, f".{digits}f", "%")


def _machine(machine: Mapping) -> str:
    return (
        f"{machine['nproc']} cores ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}; load average at start "
        f"{' '.join(machine['loadavg_at_start'])}"
    )


def _machines(summaries: Sequence[Mapping]) -> str:
    """One machine line, or one per workload where workloads rerun alone ran on other machines (ratios
    are within a workload's own run, so they stay comparable; absolute rows/s across workloads do not)."""
    kinds = {(s["machine"]["cpu_model"], s["machine"]["kernel"]) for s in summaries}
    if len(kinds) == 1:
        return f"- Machine: {_machine(summaries[0]['machine'])}."
    return (
        "- Machines (workloads rerun alone ran on another): "
        + "; ".join(f"{s['workload']}: {_machine(s['machine'])}" for s in summaries)
        + "."
    )


def header(summaries: Sequence[Mapping]) -> str:
    first = summaries[0]
    machine, versions, config = first["machine"], first["versions"], first["config"]
    load = [s["load"] for s in summaries]
    quick = " --quick" if config.get("quick") else ""
    lines = [
        "# offramp benchmarks: early exit against the full model",
        "",
        "Generated by `offramp bench" + quick + "` (rewrite from saved results: "
        "`offramp bench --report-only`). Raw data: `results/<workload>/` "
        "(`summary.json`: everything below and every run; `runs.csv`: one line per perf_analyzer run; "
        "`perf/`: perf_analyzer's own CSVs).",
        "",
        "## Setup",
        "",
        # Workloads can be rerun alone (``--workload``): each keeps the date of its own run.
        "- Date (UTC) and duration of each workload's run: "
        + "; ".join(f"{s['workload']} {s['date']}, {s['duration_s'] / 60:.1f} min" for s in summaries)
        + ".",
        _machines(summaries),
        "- Load by other processes during the runs (cores busy outside the server and perf_analyzer, "
        "median [min, max] over runs): "
        + "; ".join(
            f"{s['workload']}: {_f(o['other_cores_median'])} [{_f(o['other_cores_min'])}, "
            f"{_f(o['other_cores_max'])}] of {machine['nproc']}"
            for s, o in zip(summaries, load, strict=True)
        )
        + ".",
        (
            f"- Software: tritonserver {versions.get('tritonserver') or '?'} (from nvidia-pytriton "
            f"{versions.get('nvidia-pytriton')}, Python backend, ONNX Runtime {versions.get('onnxruntime')} "
            "inside "
            f"the stubs, CPU), perf_analyzer from tritonclient {versions.get('tritonclient')} (gRPC), "
            f"torch {versions.get('torch')}, numpy {versions.get('numpy')}."
        ),
        (
            f"- Serving: every segment and the full model have {config['segment_instances']} instance(s) of "
            f"{config['threads_per_instance']} thread(s) and dynamic batching (queue delay "
            f"{config['max_queue_delay_us']} us); each orchestrator has {config['orchestrator_instances']} "
            "instance(s)"
            + (
                ", and runs the segments' ONNX files in its own process (no BLS hop per segment)."
                if config.get("segments_in_process")
                else ", and calls the segment models over BLS."
            )
        ),
        (
            f"- Load: perf_analyzer, synchronous, {config['rows_per_request']} real test rows per request "
            f"(it cycles through {first['data']['rows']} distinct rows), concurrency "
            f"{', '.join(str(c) for c in config['concurrency'])}; each run is three "
            f"{config['measurement_interval_ms']} ms windows. Every round measures each model once, in an "
            f"order that rotates from round to round; {config['repeats']} round(s) per level. Ratios are "
            "taken "
            "within a round, then the median over rounds is reported."
        ),
        "",
    ]
    return "\n".join(lines)


def rule_value(rule: Mapping) -> str:
    """What an exit rule's threshold is on, in words (``offramp.backend.exit_rules`` computes it)."""
    value = str(rule.get("metric", "max_prob")).replace("_", "-")
    if rule.get("patience"):
        return f"{value} (discounted where the label held at the last {rule['patience']} exits)"
    return value


def workload_section(s: Mapping, images: Mapping[str, str], tuned: Sequence[Mapping] = ()) -> str:
    model, policy, quality, levels = s["model"], s["policy"], s["quality"], s["levels"]
    exits = model["exits"]
    parts = [f"## {s['workload']}: {s['description']}", ""]

    rules = policy["exits"]
    thresholds = ", ".join(_f(r["threshold"], ".4g") for r in rules[:-1])
    provenance = policy["provenance"]
    certified = certified_bounds(provenance)
    parts += [
        (
            f"Model: {exits} exits at compute fractions "
            f"{', '.join(_f(c, '.3f') for c in model['exit_costs'])} "
            "(multiply-accumulates); per-exit test accuracy "
            f"{', '.join(_pct(a, 2) for a in model['exit_test_accuracy'])}."
        ),
        (
            f"Policy: `{policy['version']}`, {provenance.get('method', '?')} (certified: {certified}), "
            "rule family "
            f"{policy.get('rule', 'confidence')}; {rule_value(rules[0])} thresholds "
            f"{thresholds} at exits 0..{exits - 2}; expected compute on calibration "
            f"{_f(provenance.get('expected_cost'), '.3f')}."
        ),
        "",
        (
            f"### Quality through the server ({quality['rows']:,} test rows, concurrency "
            f"{quality['concurrency']}, "
            f"{quality['rows_per_request']} rows per request)"
        ),
        "",
        markdown_table(
            [
                "accuracy early exit",
                "accuracy full",
                "agreement with full",
                "mean compute fraction",
                "ideal speed-up",
                "exit distribution",
            ],
            [
                [
                    _pct(quality["accuracy_early"], 2),
                    _pct(quality["accuracy_full"], 2),
                    _pct(quality["agreement"], 2),
                    _f(quality["mean_compute_fraction"], ".3f"),
                    _f(quality["ideal_speedup"], ".2f", "x"),
                    " / ".join(_pct(f) for f in quality["exit_fractions"]),
                ]
            ],
        ),
        "",
    ]
    checks = []
    if "nocompact_same_labels" in quality:
        checks.append(
            f"the no-compaction variant gave the same label on {_pct(quality['nocompact_same_labels'], 2)} "
            f"of rows and the same exit on {_pct(quality['nocompact_same_exits'], 2)}"
        )
    if "segments_full_agreement_with_full" in quality:
        checks.append("forced rows through the segments agreed with the full model on "
                      f"{_pct(quality['segments_full_agreement_with_full'], 2)}")  # fmt: skip
    data = s["data"]
    checks.append(f"the {data['rows']} rows perf_analyzer sends would exit "
                  f"{' / '.join(_pct(f) for f in data['offline_exit_fractions'])} (offline), mean compute "
                  f"{_f(data['offline_mean_compute_fraction'], '.3f')}")  # fmt: skip
    parts += ["Checks: " + "; ".join(checks) + ".", ""]

    parts += [
        "### Throughput and latency (medians over rounds)",
        "",
        markdown_table(
            [
                "concurrency",
                "early rows/s",
                "full rows/s",
                "throughput ratio",
                "share of ideal",
                "p50 ms early / full",
                "p90 ms early / full",
                "p99 ms early / full",
                "p50 / p90 / p99 ratio",
                "server CPU ms/row early / full",
                "CPU-bound ratio",
            ],
            [
                [
                    lv["concurrency"],
                    _f(_arm(lv, EARLY, "rows_per_s"), ",.0f"),
                    _f(_arm(lv, FULL, "rows_per_s"), ",.0f"),
                    _f(lv["throughput_ratio"], ".2f", "x"),
                    _pct(lv["realised_share"], 0),
                    f"{_f(_arm(lv, EARLY, 'p50_ms'))} / {_f(_arm(lv, FULL, 'p50_ms'))}",
                    f"{_f(_arm(lv, EARLY, 'p90_ms'))} / {_f(_arm(lv, FULL, 'p90_ms'))}",
                    f"{_f(_arm(lv, EARLY, 'p99_ms'))} / {_f(_arm(lv, FULL, 'p99_ms'))}",
                    f"{_f(lv['p50_ratio'])} / {_f(lv['p90_ratio'])} / {_f(lv['p99_ratio'])}",
                    (
                        f"{_f(lv.get('server_cpu_per_row_ms', {}).get(EARLY), '.3f')} / "
                        f"{_f(lv.get('server_cpu_per_row_ms', {}).get(FULL), '.3f')}"
                    ),
                    _f(lv.get("cpu_bound_ratio"), ".2f", "x"),
                ]
                for lv in levels
            ],
        ),
        "",
        (
            "Share of ideal: the throughput ratio over the ideal speed-up (1 / mean compute fraction). "
            "CPU-bound ratio: full / early server CPU per row (all rounds pooled), the throughput ratio the "
            "server's CPU cost allows once the cores are saturated. On a shared machine it is the steadier "
            "figure: a busy machine gives the arm with more runnable processes (the early-exit pipeline) a "
            "larger share of the CPU at other people's expense."
        ),
        "",
        "Throughput ratio per round: "
        + "; ".join(
            f"c={lv['concurrency']}: " + ", ".join(_f(r, ".2f") for r in lv["throughput_ratios"])
            for lv in levels
        )
        + ".",
        "",
    ]
    if any(SEGMENTS_FULL in lv["arms"] or NOCOMPACT in lv["arms"] for lv in levels):
        parts += [
            "### Orchestration tax and compaction gain",
            "",
            (
                "Tax: throughput lost when every row is forced to full depth through the orchestrator and "
                "all "
                "segments (`force_full`, policy routing forced rows through the segments), against `_full`; "
                "the forwarded variant sends forced rows to `_full` through one BLS hop instead. Compaction "
                "gain: early exit with compaction over the same orchestrator without it."
            ),
            "",
            markdown_table(
                [
                    "concurrency",
                    "through segments rows/s",
                    "tax (throughput)",
                    "tax (p50 latency)",
                    "forwarded rows/s",
                    "forwarded tax",
                    "no-compaction rows/s",
                    "compaction gain",
                ],
                [
                    [
                        lv["concurrency"],
                        _f(_arm(lv, SEGMENTS_FULL, "rows_per_s"), ",.0f"),
                        _pct(lv["tax"]),
                        _pct(lv["tax_p50"]),
                        _f(_arm(lv, FORWARD_FULL, "rows_per_s"), ",.0f"),
                        _pct(lv["forward_tax"]),
                        _f(_arm(lv, NOCOMPACT, "rows_per_s"), ",.0f"),
                        _pct(lv["compaction_gain"]),
                    ]
                    for lv in levels
                ],
            ),
            "",
        ]
    parts += truncation_section(s)
    met = {True: "yes", False: "**no**", None: "n/a"}
    goal_rows = [[g["goal"], g["target"], g["shown"], met[g["met"]]] for g in s["goals"]]
    goal_rows += [tune_goal_row(run) for run in tuned]
    parts += ["### Goals", "", markdown_table(["goal", "target", "measured", "met"], goal_rows), "", ""]
    parts += breakdown_section(s)
    parts += [f"![throughput]({images['throughput']})", f"![p99 latency]({images['latency']})",
              f"![accuracy against compute]({images['curve']})", ""]  # fmt: skip
    return "\n".join(parts) + "\n"


def _arm(level: Mapping, arm: str, key: str) -> float | None:
    return level["arms"].get(arm, {}).get(key)


def truncation_section(s: Mapping) -> list[str]:
    """Early exit against the static-truncation baseline: every row answered at one exit, the cheapest
    as accurate on the test rows as the policy."""
    truncation, levels, quality = s.get("truncation"), s["levels"], s["quality"]
    if not truncation or not any(TRUNCATED in lv["arms"] for lv in levels):
        return []
    k = truncation["exit"]
    last = len(truncation["exit_accuracy"]) - 1
    rows = [
        [
            lv["concurrency"],
            _f(_arm(lv, EARLY, "rows_per_s"), ",.0f"),
            _f(_arm(lv, TRUNCATED, "rows_per_s"), ",.0f"),
            _f(lv["truncation_ratio"], ".2f") + "x",
            "yes" if lv["truncation_ratio"] > 1 else "**no**",
        ]
        for lv in levels
    ]
    choice = (
        f"exit {k} ({_pct(truncation['exit_accuracy'][k])} on the test rows)"
        if k < last
        else "the last exit: no shallower exit is within that loss, so truncation is the full depth"
    )
    return [
        "### Against static truncation",
        "",
        (
            "The baseline a user would try first: every row answered at one exit, the cheapest whose test "
            f"accuracy is within the policy's loss ({_pct(truncation['policy_accuracy_loss'])} below the "
            f"last exit's {_pct(truncation['exit_accuracy'][last])}): {choice}, served through the same "
            f"orchestrator (`min_exit` = `max_exit` = {k}). Served: "
            f"{_pct(quality.get('truncated_accuracy'))} accurate, "
            f"{_pct(quality.get('truncated_agreement'))} agreement with the full model, against "
            f"{_pct(quality['accuracy_early'])} and {_pct(quality['agreement'])} for early exit."
        ),
        "",
        markdown_table(
            ["concurrency", "early rows/s", "truncated rows/s", "early / truncated", "early exit wins"], rows
        ),
        "",
    ]


def orchestrator_parts_lines(b: Mapping) -> list[str]:
    """The orchestrator's own timing of an execution, by part, beside Triton's execution time."""
    parts = b.get("orchestrator_parts_ms") or {}
    if not parts:
        return []
    header = [*ORCHESTRATOR_PARTS, "sum", "Triton's execution"]
    row = [_f(parts[p], ".3f") for p in (*ORCHESTRATOR_PARTS, "sum")] + [
        _f(b["orchestrator"]["execution_ms"], ".3f")
    ]
    return [
        (
            "The orchestrator's own timing of an execution (ms, "
            f"{_f(parts['requests_per_execution'], '.2f')} requests each): parsing, the cascade's own work "
            "(confidence, exit decisions, row compaction), the segment calls (BLS round trips), metrics, "
            "drift, shadow sampling and audit, and the responses; their sum against the execution time "
            "Triton measures around it:"
        ),
        "",
        markdown_table(header, [row]),
        "",
    ]


def breakdown_section(s: Mapping) -> list[str]:
    b = s.get("breakdown") or {}
    if not b:
        return []
    name = s["workload"]
    c = b["concurrency"]
    orch, full = b["orchestrator"], b["full"]
    cpu_early, cpu_full = b["cpu_per_row_ms"][EARLY], b["cpu_per_row_ms"][FULL]
    labels = sorted(set(cpu_early) | set(cpu_full), key=_cpu_order)
    cpu_rows = [[label, _f(cpu_early.get(label), ".4f"), _f(cpu_full.get(label), ".4f")] for label in labels]
    seg_rows = []
    for model, t in b["segments"].items():
        seg_rows.append(
            [
                f"`{model}`",
                _f(t["requests"], ",.0f"),
                _f(t["rows_per_execution"], ".1f"),
                _f(t["queue_ms"], ".3f"),
                _f(t["execution_ms"], ".3f"),
                _f(t["request_ms"], ".3f"),
            ]
        )
    for model, t in ((f"`{name}` (orchestrator)", orch), (f"`{name}_full`", full)):
        seg_rows.append(
            [
                model,
                _f(t["requests"], ",.0f"),
                _f(t["rows_per_execution"], ".1f"),
                _f(t["queue_ms"], ".3f"),
                _f(t["execution_ms"], ".3f"),
                _f(t["request_ms"], ".3f"),
            ]
        )
    split = b["perf_split_ms"]
    split_rows = [
        [arm]
        + [
            _f(split[arm].get(k), ".3f")
            for k in (
                "client_send_ms",
                "network_ms",
                "server_queue_ms",
                "server_compute_input_ms",
                "server_compute_infer_ms",
                "server_compute_output_ms",
                "client_recv_ms",
                "avg_ms",
            )
        ]
        for arm in (EARLY, FULL)
    ]
    offline = s.get("offline", {})
    offline_rows = [
        [batch, " / ".join(_f(m, ".3f") for m in o["segment_ms"]), _f(o["full_ms"], ".3f"),
         _f(o["full_ms"] / int(batch), ".3f"),
         " / ".join(_f(f, ".2f") for f in o["cumulative_time_fraction"]),
         " / ".join(_f(f, ".2f") for f in o["mac_fraction"]), _f(o["cascade_logic_ms"], ".3f")]
        for batch, o in sorted(offline.items(), key=lambda kv: int(kv[0]))
    ]  # fmt: skip
    lines = [
        f"### Where the time goes (concurrency {c}, all rounds pooled)",
        "",
        _breakdown_sentences(s),
        "",
        latency_ladder(s),
        "",
        (
            "CPU time per served row (ms), by process (the server's stubs by the model they serve; "
            "perf_analyzer "
            "runs on the same cores):"
        ),
        "",
        markdown_table(["process", "early exit", "full model"], cpu_rows),
        "",
        (
            "Inside the server, from Triton's statistics (per request: queue and total; per execution: "
            "input + infer + output):"
        ),
        "",
        markdown_table(
            [
                "model",
                "requests",
                "rows per execution",
                "queue ms / request",
                "execution ms",
                "request ms (queue + compute)",
            ],
            seg_rows,
        ),
        "",
        (
            f"Per orchestrator execution: {_f(orch['execution_ms'], '.3f')} ms, of which "
            f"{_f(b['segment_time_per_execution_ms'], '.3f')} ms inside "
            f"{_f(b['bls_calls_per_execution'], '.2f')} segment "
            f"calls (their queue and compute) and {_f(b['orchestrator_overhead_per_execution_ms'], '.3f')} "
            "ms "
            f"({_pct(b['overhead_share'], 0)}) in the orchestrator itself: request parsing, the cascade, "
            "responses "
            f"and the BLS hops, {_f(b['overhead_per_bls_call_ms'], '.3f')} ms per segment call."
        ),
        "",
        *orchestrator_parts_lines(b),
        "perf_analyzer's split of the average request latency (ms):",
        "",
        markdown_table(
            [
                "arm",
                "client send",
                "network + server send/recv",
                "server queue",
                "compute input",
                "compute infer",
                "compute output",
                "client recv",
                "average",
            ],
            split_rows,
        ),
        "",
        (
            "Offline, one ONNX Runtime thread in one process, no server (minimum of repeated runs): each "
            "segment and the full model per batch, the cumulative time fraction of leaving after each "
            "exit against the multiply-accumulate fraction, and the cascade's own NumPy logic with free "
            "segments:"
        ),
        "",
        markdown_table(
            [
                "rows",
                "segment ms",
                "full ms",
                "full ms per row",
                "time fraction",
                "MAC fraction",
                "cascade logic ms",
            ],
            offline_rows,
        ),
        "",
    ]
    return lines


def _cpu_order(label: str) -> tuple[int, str]:
    if label == "server total":
        return (3, label)
    if label.startswith("client"):
        return (4, label)
    if label == "tritonserver":
        return (0, label)
    if label == IDLE_PROCESSES:
        return (2, label)
    return (1, label)


def _breakdown_sentences(s: Mapping) -> str:
    b, quality = s["breakdown"], s["quality"]
    cpu_early, cpu_full = b["cpu_per_row_ms"][EARLY], b["cpu_per_row_ms"][FULL]
    early_total, full_total = cpu_early.get("server total"), cpu_full.get("server total")
    name = s["workload"]
    segments = sum(v for k, v in cpu_early.items() if k.startswith(f"{name}_segment_"))
    orchestrator = cpu_early.get(name, math.nan)
    core_early, core_full = cpu_early.get("tritonserver", math.nan), cpu_full.get("tritonserver", math.nan)
    level = next((lv for lv in s["levels"] if lv["concurrency"] == b["concurrency"]), None)
    measured = f" (measured: {_f(level['throughput_ratio'], '.2f')}x)" if level else ""
    sentences = [
        (
            f"Server CPU per row: early exit {_f(early_total, '.4f')} ms against {_f(full_total, '.4f')} ms "
            "for the "
            f"full model, so on a CPU-bound server the early-exit service can reach at most "
            f"{_f(_ratio(full_total, early_total), '.2f')}x the full model's throughput{measured}, where the "
            "exits' "
            f"compute fraction alone would allow {_f(quality['ideal_speedup'], '.2f')}x."
        ),
        (
            f"Of the early-exit server CPU, the segments take {_pct(_ratio(segments, early_total), 0)}, the "
            f"orchestrator's stub {_pct(_ratio(orchestrator, early_total), 0)} and tritonserver itself "
            "(gRPC, "
            f"batching, BLS routing) {_pct(_ratio(core_early, early_total), 0)}; for the full model "
            "tritonserver "
            f"takes {_pct(_ratio(core_full, full_total), 0)}."
        ),
        (
            f"In time, the segments' compute per served row is {_f(b['measured_compute_fraction'], '.2f')} "
            "of the "
            f"full model's (the multiply-accumulate fraction says {_f(b['mac_compute_fraction'], '.2f')})."
        ),
    ]
    logic = _nearest_offline(s, b["orchestrator"]["rows_per_execution"])
    calls = b["bls_calls_per_execution"]
    if logic is not None and calls and math.isfinite(calls):
        hop = (b["orchestrator_overhead_per_execution_ms"] - logic["cascade_logic_ms"]) / calls
        sentences.append(
            "The orchestrator's own time per execution "
            f"({_f(b['orchestrator_overhead_per_execution_ms'], '.2f')} ms "
            f"beyond its segment calls) is the cascade's NumPy logic ({_f(logic['cascade_logic_ms'], '.2f')} "
            "ms "
            f"offline at {logic['rows']} rows) plus about {_f(hop, '.2f')} ms per BLS call (request and "
            "response "
            "conversion, the hop itself, waiting for the CPU)."
        )
        rows = b["orchestrator"]["rows_per_execution"]
        stub_ms = orchestrator * rows
        server_extra_ms = (core_early - core_full) * rows
        segment_cpu_ms = segments * rows
        sentences.append(
            f"In CPU per orchestrator execution ({_f(rows, '.1f')} rows, {_f(calls, '.2f')} segment calls): "
            "the "
            f"segments use {_f(segment_cpu_ms, '.2f')} ms, the orchestrator's stub {_f(stub_ms, '.2f')} ms "
            "and "
            f"tritonserver {_f(server_extra_ms, '.2f')} ms more than for the same rows sent to the full "
            "model; "
            "without the cascade logic that is about "
            f"{_f((stub_ms - logic['cascade_logic_ms'] + server_extra_ms) / calls, '.2f')} "
            f"ms of CPU per BLS call, against {_f(segment_cpu_ms / calls, '.2f')} ms of segment work per "
            "call."
        )
    return " ".join(sentences)


def _nearest_offline(s: Mapping, rows: float) -> dict | None:
    offline = s.get("offline") or {}
    usable = {int(k): v for k, v in offline.items() if v.get("cascade_logic_ms") is not None}
    if not usable or rows is None or not math.isfinite(rows):
        return None
    nearest = min(usable, key=lambda k: abs(k - rows))
    return {**usable[nearest], "rows": nearest}


def latency_ladder(s: Mapping) -> str:
    """p50 latency at the lowest concurrency, step by step from the full model to early exit."""
    level = s["levels"][0]
    steps = [(FULL, "full model"), (FORWARD_FULL, "+ orchestrator and one BLS hop (forced, forwarded)"),
             (SEGMENTS_FULL, "+ the cascade over three segment calls (forced, through segments)"),
             (NOCOMPACT, "early exit without compaction"), (EARLY, "early exit")]  # fmt: skip
    shown = [
        f"{label} {_f(_arm(level, arm, 'p50_ms'), '.2f')} ms"
        for arm, label in steps
        if _arm(level, arm, "p50_ms")
    ]
    return (
        f"Median latency at concurrency {level['concurrency']}, no queueing to speak of: "
        + "; ".join(shown)
        + "."
    )


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return math.nan
    return a / b


# --- Plots --------------------------------------------------------------------------------------------------


def write_plots(s: Mapping, directory: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = s["workload"]
    levels = s["levels"]
    concurrency = [lv["concurrency"] for lv in levels]
    paths = {}
    for key, field, ylabel, title in (
        ("throughput", "rows_per_s", "rows per second", "throughput"),
        ("latency", "p99_ms", "p99 latency (ms)", "p99 latency"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for arm, (label, colour, marker) in ARM_STYLE.items():
            values = [_arm(lv, arm, field) for lv in levels]
            if all(v is None for v in values):
                continue
            width = 2.2 if arm in (EARLY, FULL) else 1.0
            ax.plot(concurrency, [math.nan if v is None else v for v in values], marker=marker, color=colour,
                    label=label, linewidth=width, alpha=1.0 if arm in (EARLY, FULL) else 0.7)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{name}: {title}, {s['config']['rows_per_request']} rows per request (medians)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths[key] = directory / f"{name}_{key}.png"
        fig.savefig(paths[key])
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for split, style in (("calibration", "-"), ("test", "--")):
        curve = s["curves"].get(split) or []
        ax.plot([p["mean_compute_fraction"] for p in curve], [p["accuracy"] * 100 for p in curve], style,
                label=f"one max-prob threshold, {split} rows (offline)")  # fmt: skip
    model = s["model"]
    ax.plot(
        model["exit_costs"],
        [a * 100 for a in model["exit_test_accuracy"]],
        "k^",
        label="each exit alone (test)",
    )
    quality = s["quality"]
    ax.plot([quality["mean_compute_fraction"]], [quality["accuracy_early"] * 100], "r*", markersize=14,
            label="served policy, measured through the server (test)")  # fmt: skip
    ax.set_xlabel("mean compute fraction (of the full model)")
    ax.set_ylabel("accuracy (%)")
    low = min(model["exit_test_accuracy"]) * 100
    ax.set_ylim(max(0, low - 2), max(model["exit_test_accuracy"] + [quality["accuracy_early"]]) * 100 + 1)
    ax.set_title(f"{name}: accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths["curve"] = directory / f"{name}_accuracy_compute.png"
    fig.savefig(paths["curve"])
    plt.close(fig)
    return paths
