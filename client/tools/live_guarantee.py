"""Measurements of the live guarantee (benchmarks/live_guarantee.md):

- ``simulate``: the risk test alone on simulated streams: false alarms of healthy policies over a
  million rows at 1% checks, and the rows a policy at twice its epsilon takes to be flagged;
- ``switch``: the issue's experiment on the served demo CNN: in-domain rows, then rows of another domain,
  then in-domain rows again, one request of 16 rows at a time; what the answers, the metrics and the
  audit say (rows until conservative mode, until it clears, the drift score);
- ``cost``: what shadowing at 1% costs, p99 and throughput at concurrency 8, the same orchestrator with
  and without shadow checks side by side in one server, interleaved rounds, medians of the ratios;
- ``novelty``: the confidence and novelty rule families certified on the same calibration rows of the
  demo CNN, then their exit profiles in domain and on each foreign domain, in process (the same exit
  logic as the cascade, over the ONNX segments' logits): do foreign rows leave at the first exit more
  often than in-domain rows, and at what in-domain compute.

Run ``python -m offramp.client.tools.live_guarantee {simulate,switch,cost,novelty} --help``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from offramp.backend.sequential import AlarmConfig, Observations, RiskAlarm


def simulated_rows_until(
    alarm: RiskAlarm, risk: float, rate: float, rows: int, batch: int, rng
) -> int | None:
    """Rows of a stream (disagreement probability ``risk``, each row checked with probability ``rate``)
    until the alarm rises, looked at after every ``batch`` rows; None if it never does within ``rows``."""
    seen = 0
    while seen < rows:
        n = min(batch, rows - seen)
        hits = int(np.count_nonzero((rng.random(n) < risk) & (rng.random(n) < rate)))
        observed = Observations(np.full(hits, 1.0 / rate), n - hits, bet_scale=rate, z_max=1.0 / rate)
        seen += n
        if alarm.advance(alarm.growth(observed), n) == "raised":
            return seen
    return None


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    config = AlarmConfig(args.epsilon, alpha=args.alpha)
    healthy = {}
    for share in (1.0, 0.5):  # the risk at epsilon (the hardest healthy case) and at half of it
        alarms = [
            simulated_rows_until(
                RiskAlarm(config), share * args.epsilon, args.rate, args.rows, args.batch, rng
            )
            for _ in range(args.runs)
        ]
        raised = [a for a in alarms if a is not None]
        healthy[f"risk {share:g} epsilon"] = {
            "runs": args.runs,
            "false_alarms": len(raised),
            "at_rows": raised,
        }
    flagged = [
        simulated_rows_until(RiskAlarm(config), 2 * args.epsilon, args.rate, args.rows, args.batch, rng)
        for _ in range(args.runs)
    ]
    done = np.array([f for f in flagged if f is not None])
    return {
        "epsilon": args.epsilon,
        "alpha": args.alpha,
        "check_rate": args.rate,
        "rows_per_run": args.rows,
        "healthy": healthy,
        "twice_epsilon": {
            "runs": args.runs,
            "flagged": len(done),
            "median_rows": float(np.median(done)) if len(done) else None,
            "p90_rows": float(np.quantile(done, 0.9)) if len(done) else None,
            "max_rows": int(done.max()) if len(done) else None,
        },
    }


def demo_model(workdir: Path, epsilon: float, method: str) -> tuple[Any, Path, Any]:
    """The demo's CNN (cached build) and a policy calibrated on its held-out split, as the demo does."""
    from offramp.build.calibrate import calibrate_artifacts, held_out_data
    from offramp.build.recipes import served_fashion_cnn

    artifacts, directory = served_fashion_cnn(workdir)
    policy, _, _ = calibrate_artifacts(
        artifacts, directory, held_out_data(artifacts, directory), epsilon=epsilon, method=method
    )
    return artifacts, directory, policy


FOREIGN_DOMAINS = ("digits", "photo", "shuffled")  # build/foreign_images.py


def foreign_images(domain: str, rows: int) -> np.ndarray:
    """``rows`` images of a domain the demo CNN never saw (``FOREIGN_DOMAINS``), in its input form."""
    from offramp.build.fashion_mnist import load_fashion_mnist
    from offramp.build.foreign_images import (
        load_digits_as_fashion,
        load_photo_crops_as_fashion,
        shuffle_pixels,
    )

    if domain == "digits":
        return load_digits_as_fashion()[0][:rows]
    if domain == "shuffled":
        return shuffle_pixels(load_fashion_mnist("test")[0][:rows])
    if domain == "photo":
        return load_photo_crops_as_fashion(rows)
    raise ValueError(f"domain must be one of {FOREIGN_DOMAINS}, not {domain!r}")


def in_process_figures(artifacts: Any, directory: Path, policy: Any, images: np.ndarray) -> dict[str, Any]:
    """The policy's exit profile and disagreement with the full network on ``images``, in process."""
    from offramp.build.calibrate import exit_logits_from_onnx, simulate_exits

    logits = exit_logits_from_onnx(artifacts, directory, {"IMAGE": images})  # (K, N, C)
    exits = simulate_exits(logits, policy.exits)
    labels = logits[exits, np.arange(len(images))].argmax(axis=1)
    return {
        "exit_profile": (np.bincount(exits, minlength=artifacts.num_exits) / len(images)).round(4).tolist(),
        "disagreement": round(float(np.mean(labels != logits[-1].argmax(axis=1))), 4),
    }


def switch(args: argparse.Namespace) -> dict[str, Any]:
    """3,000 in-domain rows, 3,000 foreign, 4,000 in-domain, in requests of 16 rows, one at a time."""
    import tritonclient.grpc as grpcclient

    from offramp.backend.contract import FLAG_CONSERVATIVE
    from offramp.backend.environment import prepare_execution_env
    from offramp.backend.orchestrator import ServingOptions
    from offramp.backend.shadow import ShadowConfig
    from offramp.build.fashion_mnist import load_fashion_mnist
    from offramp.build.repository import RepositoryOptions, write_repository
    from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts

    artifacts, directory, policy = demo_model(Path(args.workdir), args.epsilon, args.method)
    images = load_fashion_mnist("test")[0]
    foreign = foreign_images(args.domain, args.foreign_rows)
    phases = [
        ("in-domain", images[: args.before_rows]),
        (args.domain, foreign),
        ("in-domain again", images[args.before_rows : args.before_rows + args.after_rows]),
    ]
    out = Path(args.out)
    shutil.rmtree(out / "audit", ignore_errors=True)  # a previous run's events are not this one's
    serving = ServingOptions(
        audit_path=str(out / "audit" / "rows.jsonl"), shadow=ShadowConfig(rate=args.rate)
    )
    repository = out / "repository"
    write_repository(
        artifacts,
        directory,
        policy,
        repository,
        RepositoryOptions(execution_env=prepare_execution_env(), serving=serving),
    )
    timeline = []  # per request: phase, rows so far in the phase, conservative share, exit profile
    with EmbeddedTritonServer(repository, ports=ServerPorts.free(), log_path=out / "server.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for phase, rows in phases:
            for start in range(0, len(rows), 16):
                batch = np.ascontiguousarray(rows[start : start + 16])
                tensor = grpcclient.InferInput("IMAGE", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                result = client.infer(
                    artifacts.name,
                    [tensor],
                    outputs=[grpcclient.InferRequestedOutput(n) for n in ("EXIT", "FLAGS")],
                )
                flags, exits = (
                    result.as_numpy("FLAGS").reshape(-1),
                    result.as_numpy("EXIT").reshape(-1),
                )  # (16,)
                timeline.append(
                    {
                        "phase": phase,
                        "rows": start + len(batch),
                        "time": time.time(),
                        "conservative": float(np.mean(flags & FLAG_CONSERVATIVE != 0)),
                        "exits": np.bincount(exits, minlength=artifacts.num_exits).tolist(),
                    }
                )
                if len(timeline) % 8 == 0:  # every 128 rows: what the metrics say (published each second)
                    timeline[-1]["metrics"] = _metrics(server.metrics_url)
        time.sleep(2.0)  # the last checks settle and the metrics are published
        metrics = _metrics(server.metrics_url)
        client.close()
    events = []
    for path in sorted((out / "audit").glob("rows.*.jsonl")):
        events += [
            json.loads(line) for line in path.read_text().splitlines() if '"kind":"risk_alarm"' in line
        ]
    return {
        "policy": {"version": policy.version, "epsilon": args.epsilon, "method": args.method},
        "domain": args.domain,
        "shadow_rate": args.rate,
        "in_process": {
            "in-domain": in_process_figures(artifacts, directory, policy, phases[2][1]),
            args.domain: in_process_figures(artifacts, directory, policy, foreign),
        },
        "summary": _switch_summary(timeline, args.domain),
        "events": sorted(events, key=lambda e: e["time"]),
        "metrics": metrics,
        "timeline": timeline,
    }


def _switch_summary(timeline: list[dict], domain: str) -> dict[str, Any]:
    """Rows of each phase until the first conservative answer, until every answer is, and until none is."""

    def first(phase: str, predicate) -> int | None:
        return next((t["rows"] for t in timeline if t["phase"] == phase and predicate(t)), None)

    summary = {}
    for phase in ("in-domain", domain, "in-domain again"):
        steps = [t for t in timeline if t["phase"] == phase]
        exits = np.sum([t["exits"] for t in steps], axis=0)
        drift = [t["metrics"].get("offramp_drift_score", 0.0) for t in steps if "metrics" in t]
        summary[phase] = {
            "max_drift_score": round(max(drift, default=0.0), 4),
            "drift_alarm_seen": any(
                t["metrics"].get("offramp_drift_alarm") == 1.0 for t in steps if "metrics" in t
            ),
            "rows": steps[-1]["rows"],
            "first_conservative_at": first(phase, lambda t: t["conservative"] > 0),
            "all_conservative_at": first(phase, lambda t: t["conservative"] == 1.0),
            "conservative_rows": round(sum(t["conservative"] * sum(t["exits"]) for t in steps)),
            "served_exit_profile": (exits / exits.sum()).round(4).tolist(),
        }
    again = [t for t in timeline if t["phase"] == "in-domain again"]
    cleared = next((t["rows"] for t in again if t["conservative"] == 0.0), None)
    summary["in-domain again"]["cleared_at"] = cleared
    return summary


def _metrics(url: str) -> dict[str, float]:
    """The offramp metrics that tell the story, summed over instances (gauges: max)."""
    import re

    from offramp.client.serving.fleet_stats import read_metrics

    text = read_metrics(url, timeout_s=10.0)
    totals: dict[str, float] = {}
    for name, labels, value in re.findall(
        r"^(offramp_(?:shadow|risk|drift|conservative)\w*)\{(.*)\} (\S+)$", text, re.MULTILINE
    ):
        key = name
        exit_label = re.search(r'exit="(\d+)"', labels)
        if exit_label:
            key += f"{{exit={exit_label.group(1)}}}"
        if name.endswith("_total"):
            totals[key] = totals.get(key, 0.0) + float(value)
        else:
            totals[key] = max(totals.get(key, float("-inf")), float(value))
    return totals


def cost(args: argparse.Namespace) -> dict[str, Any]:
    """The orchestrator with and without shadow checks at ``rate`` in one server, perf_analyzer at
    concurrency 8 in alternating order, ``rounds`` times; medians of the per-round ratios. Beside
    throughput and p99, the server's CPU per served row (all its processes, during each arm's run):
    what shadowing costs a CPU-bound server, and a figure other load on the machine moves less."""
    from offramp.backend.environment import prepare_execution_env
    from offramp.backend.orchestrator import ServingOptions
    from offramp.backend.shadow import ShadowConfig
    from offramp.build.fashion_mnist import load_fashion_mnist
    from offramp.build.repository import RepositoryOptions, write_orchestrator, write_repository
    from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts
    from offramp.client.serving.statistics import model_statistics, statistics_delta
    from offramp.client.tools.bench import server_cpu_seconds_by_role
    from offramp.client.tools.perf_analyzer import PerfAnalyzerOptions, run_perf_analyzer, write_input_data

    artifacts, directory, policy = demo_model(Path(args.workdir), args.epsilon, args.method)
    out = Path(args.out)
    repository = out / "repository"
    base = RepositoryOptions(execution_env=prepare_execution_env())
    write_repository(artifacts, directory, policy, repository, base)
    shadowed = replace(base, serving=ServingOptions(shadow=ShadowConfig(rate=args.rate)))
    name, shadow_name = artifacts.name, f"{artifacts.name}_shadow"
    write_orchestrator(artifacts, policy, repository, shadowed, shadow_name, artifacts_dir=directory)
    images = load_fashion_mnist("test")[0][np.random.default_rng(0).permutation(10_000)[:2048]]
    data = write_input_data(out / "input.json", {"IMAGE": images})
    rounds = []
    with EmbeddedTritonServer(repository, ports=ServerPorts.free(), log_path=out / "server.log") as server:

        def perf(model: str, interval_ms: int, csv: Path) -> Any:
            options = PerfAnalyzerOptions(
                server.grpc_url,
                model,
                data,
                concurrency=args.concurrency,
                batch_size=args.rows_per_request,
                shapes={"IMAGE": (1, 28, 28)},
                measurement_interval_ms=interval_ms,
                max_trials=3,
            )
            return run_perf_analyzer(options, csv).result

        # Warm up, and past the shadowed model's first rows (a new cohort's, checked at 10%).
        for model in (name, shadow_name):
            perf(model, 3000, out / "warmup" / f"{model}.csv")
        for index in range(args.rounds):
            order = (name, shadow_name) if index % 2 == 0 else (shadow_name, name)
            measured = {}
            for model in order:
                stats_before = model_statistics(server.grpc_url)
                cpu_before = sum(server_cpu_seconds_by_role(server.pid, repository).values())
                result = perf(model, args.interval_ms, out / f"round{index}" / f"{model}.csv")
                cpu = sum(server_cpu_seconds_by_role(server.pid, repository).values()) - cpu_before
                stats = statistics_delta(stats_before, model_statistics(server.grpc_url))
                measured["shadow" if model == shadow_name else "plain"] = {
                    "rows_per_s": result.rows_per_s,
                    "p99_ms": result.p99_ms,
                    "p50_ms": result.p50_ms,
                    "server_cpu_ms_per_row": cpu / stats[model]["inference_count"] * 1e3,
                }
            rounds.append(measured)
            print(f"round {index}: {measured}", file=sys.stderr, flush=True)
        metrics = _metrics(server.metrics_url)
    ratios = {
        "throughput": [r["shadow"]["rows_per_s"] / r["plain"]["rows_per_s"] for r in rounds],
        "p99": [r["shadow"]["p99_ms"] / r["plain"]["p99_ms"] for r in rounds],
        "server_cpu_per_row": [
            r["shadow"]["server_cpu_ms_per_row"] / r["plain"]["server_cpu_ms_per_row"] for r in rounds
        ],
    }
    return {
        "concurrency": args.concurrency,
        "rows_per_request": args.rows_per_request,
        "shadow_rate": args.rate,
        "rounds": rounds,
        "median_ratio": {k: float(np.median(v)) for k, v in ratios.items()},
        "ratios": ratios,
        "metrics": metrics,
    }


def exit_figures(
    logits: np.ndarray, rules: Any, exit_costs: Any, labels: np.ndarray | None
) -> dict[str, Any]:
    """What ``rules`` do to rows whose exit logits are ``logits`` (E, N, C): the share leaving at each
    exit, mean compute fraction, agreement with the full network (and accuracy, given ``labels``)."""
    from offramp.build.calibrate import simulate_exits

    taken = simulate_exits(logits, rules)  # (N,)
    rows = np.arange(logits.shape[1])
    answer, full = logits[taken, rows].argmax(axis=1), logits[-1].argmax(axis=1)
    figures = {
        "rows": int(logits.shape[1]),
        "exit_profile": (np.bincount(taken, minlength=logits.shape[0]) / len(taken)).round(4).tolist(),
        "compute": round(float(np.asarray(exit_costs)[taken].mean()), 4),
        "agreement": round(float(np.mean(answer == full)), 4),
    }
    if labels is not None:
        figures["accuracy"] = round(float(np.mean(answer == labels)), 4)
    return figures


def novelty(args: argparse.Namespace) -> dict[str, Any]:
    """The confidence and novelty families certified on the same calibration rows (``calibrate_logits``,
    what ``offramp calibrate --rule R`` runs), judged in domain (the test split) and on foreign rows."""
    from offramp.build.calibrate import (
        CalibrationSettings,
        calibrate_logits,
        exit_logits_from_onnx,
        held_out_data,
    )
    from offramp.build.recipes import served_fashion_cnn

    artifacts, directory = served_fashion_cnn(Path(args.workdir), quick=args.quick)
    calibration, test = (held_out_data(artifacts, directory, split) for split in ("calibration", "test"))
    calibration_logits = exit_logits_from_onnx(artifacts, directory, calibration.inputs)  # (E, N, C)
    domains = {"in-domain": (exit_logits_from_onnx(artifacts, directory, test.inputs), test.labels)}
    for domain in args.domains:
        images = foreign_images(domain, args.foreign_rows)
        domains[domain] = (exit_logits_from_onnx(artifacts, directory, {"IMAGE": images}), None)
    rules = {}
    for family in ("confidence", "novelty"):
        settings = CalibrationSettings(epsilon=args.epsilon, delta=args.delta, rule=family)
        policy, calibrated = calibrate_logits(
            calibration_logits,
            artifacts.exit_costs,
            artifacts.fingerprint,
            calibration.labels,
            None,
            settings,
        )
        rules[family] = {
            "version": policy.version,
            "certified_compute": round(calibrated.result.expected_cost, 4),
            "certifying_rows": calibrated.calibration_rows,
            "fit_rows": calibrated.fit_rows,
            "thresholds": [r.threshold for r in policy.exits[:-1]],
            "energy_limits": [r.energy_limit for r in policy.exits[:-1]],
            "distance_limits": [r.distance_limit for r in policy.exits[:-1]],
            "domains": {
                name: exit_figures(logits, policy.exits, artifacts.exit_costs, labels)
                for name, (logits, labels) in domains.items()
            },
        }
    gated = rules["novelty"]
    first = {name: figures["exit_profile"][0] for name, figures in gated["domains"].items()}
    compute_ratio = gated["certified_compute"] / rules["confidence"]["certified_compute"]
    return {
        "epsilon": args.epsilon,
        "delta": args.delta,
        "exit_costs": list(artifacts.exit_costs),
        "rules": rules,
        "goal": {
            "novelty_first_exit_share": first,
            "foreign_no_earlier": {d: first[d] <= first["in-domain"] for d in args.domains},
            "certified_compute_ratio": round(compute_ratio, 4),
            "met": all(first[d] <= first["in-domain"] for d in args.domains) and compute_ratio <= 1.05,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m offramp.client.tools.live_guarantee",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="the risk test on simulated streams")
    sim.add_argument("--epsilon", type=float, default=0.05)
    sim.add_argument("--alpha", type=float, default=0.05)
    sim.add_argument("--rate", type=float, default=0.01, help="share of rows checked")
    sim.add_argument("--rows", type=int, default=1_000_000, help="rows per run")
    sim.add_argument("--runs", type=int, default=200)
    sim.add_argument("--batch", type=int, default=1000, help="rows between looks at the alarm")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", help="folder for simulate.json")
    for served in (
        commands.add_parser("switch", help="the domain switch on the served demo CNN"),
        commands.add_parser("cost", help="what shadowing costs at concurrency 8"),
    ):
        served.add_argument(
            "--workdir", default=".cache/offramp", help="where the demo CNN is built (cached)"
        )
        served.add_argument("--epsilon", type=float, default=0.01, help="the policy's (the demo's: 0.01)")
        served.add_argument("--method", default="ltt")
        served.add_argument("--rate", type=float, default=0.01, help="shadow check rate")
        served.add_argument("--out", required=True)
    commands.choices["switch"].add_argument("--domain", choices=FOREIGN_DOMAINS, default="digits")
    commands.choices["switch"].add_argument("--before-rows", type=int, default=3000)
    commands.choices["switch"].add_argument("--foreign-rows", type=int, default=3000)
    commands.choices["switch"].add_argument("--after-rows", type=int, default=4000)
    commands.choices["cost"].add_argument("--concurrency", type=int, default=8)
    commands.choices["cost"].add_argument("--rows-per-request", type=int, default=16)
    commands.choices["cost"].add_argument("--rounds", type=int, default=5)
    commands.choices["cost"].add_argument("--interval-ms", type=int, default=4000)
    gate = commands.add_parser("novelty", help="the novelty rule against the confidence rule on foreign rows")
    gate.add_argument("--workdir", default=".cache/offramp", help="where the demo CNN is built (cached)")
    gate.add_argument("--epsilon", type=float, default=0.01)
    gate.add_argument("--delta", type=float, default=0.05)
    gate.add_argument("--domains", nargs="+", choices=FOREIGN_DOMAINS, default=list(FOREIGN_DOMAINS))
    gate.add_argument("--foreign-rows", type=int, default=3000, help="rows per foreign domain")
    gate.add_argument("--out", help="folder for novelty.json")
    gate.add_argument("--quick", action="store_true", help="a seconds-long build of the CNN (tests)")
    args = parser.parse_args(argv)
    commands_run = {"simulate": simulate, "switch": switch, "cost": cost, "novelty": novelty}
    result = commands_run[args.command](args)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = json.dumps(result, indent=1)
    if getattr(args, "out", None):
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{args.command}.json").write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("timeline",)}, indent=1)[:20000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
