"""The demo: build (or reuse) the Fashion-MNIST multi-exit CNN, serve it, and measure it through gRPC.

What it serves is what ``offramp tune`` picks on this machine (the exits that pay for their calls, the
segments over BLS or in the orchestrator's process, or the full model when no exit pays); ``--no-tune``
serves every exit over BLS, the design's default.

Prints accuracy of the early-exit service against ``<name>_full`` through the same server, the exit
distribution, the mean compute fraction, both throughputs (medians of ROUNDS passes each, in
alternating order, and the median of the per-round ratios: one pass each swung the ratio by a tenth on
this shared machine) and where an early-exit request's time went in the orchestrator.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from offramp.backend.environment import prepare_execution_env
from offramp.backend.orchestrator import ServingOptions
from offramp.backend.policy import Policy
from offramp.build.artifacts import ModelArtifacts
from offramp.build.calibrate import calibrate_artifacts, held_out_data
from offramp.build.fashion_mnist import load_fashion_mnist
from offramp.build.recipes import served_fashion_cnn
from offramp.build.repository import RepositoryOptions, full_model_name, write_repository
from offramp.client.grpc_client import OfframpClient, Predictions
from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts
from offramp.client.serving.statistics import ORCHESTRATOR_PARTS, orchestrator_parts
from offramp.client.tools.bench_report import rule_value
from offramp.client.tools.tune import TuneConfig, run_tune

ROUNDS = 3


@dataclass(frozen=True)
class RunResult:
    seconds: float
    rows: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


def send_all(
    url: str,
    rows: int,
    rows_per_request: int,
    concurrency: int,
    call: Callable[[OfframpClient, slice], object],
    desc: str,
) -> tuple[list[object], RunResult]:
    """Sends ``rows`` in requests of ``rows_per_request`` from ``concurrency`` threads; keeps the order."""
    slices = [slice(s, min(s + rows_per_request, rows)) for s in range(0, rows, rows_per_request)]
    local = threading.local()
    clients: list[OfframpClient] = []

    def work(part: slice) -> object:
        if not hasattr(local, "client"):
            local.client = OfframpClient(url)
            clients.append(local.client)
        return call(local.client, part)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(tqdm(pool.map(work, slices), total=len(slices), desc=desc, unit="req"))
    elapsed = time.perf_counter() - started
    for client in clients:
        client.close()
    return results, RunResult(elapsed, rows)


@dataclass(frozen=True)
class DemoWorkload:
    """A built model and its test split, as the demo sends it: rows by slice, labels (N,)."""

    artifacts: ModelArtifacts
    artifacts_dir: Path
    labels: np.ndarray
    classify: Callable[[OfframpClient, str, slice], Predictions]  # the early-exit model, raw inputs
    full_logits: Callable[[OfframpClient, str, slice], np.ndarray]  # `<name>_full`, its own inputs
    description: str


def fashion_cnn_workload(workdir: Path, epochs: int) -> DemoWorkload:
    artifacts, artifacts_dir = served_fashion_cnn(workdir, epochs)
    images, labels = load_fashion_mnist("test")
    return DemoWorkload(
        artifacts,
        artifacts_dir,
        labels,
        lambda client, name, part: client.classify(name, images[part]),
        lambda client, name, part: client.full_logits(name, images[part]),
        f"multi-exit CNN on Fashion-MNIST ({epochs} epochs)",
    )


def text_workload(task: str, workdir: Path, epochs: int | None) -> DemoWorkload:
    """A fine-tuned multi-exit MiniLM; the service tokenizes raw text, the full model gets token ids."""
    from offramp.build.text_recipes import served_text_classifier, text_splits_of
    from offramp.build.transformer import encode_texts, load_tokenizer

    artifacts, artifacts_dir = served_text_classifier(workdir, task, epochs)
    test = text_splits_of(artifacts).test
    tokenizer = load_tokenizer(artifacts_dir)

    def full_logits(client: OfframpClient, name: str, part: slice) -> np.ndarray:
        ids, mask = encode_texts(tokenizer, test.texts[part])
        return client.full_logits(name, {"INPUT_IDS": ids, "ATTENTION_MASK": mask})

    return DemoWorkload(
        artifacts,
        artifacts_dir,
        test.labels,
        lambda client, name, part: client.classify_text(name, test.texts[part]),
        full_logits,
        f"multi-exit MiniLM fine-tuned on {task} ({artifacts.build['settings']['epochs']} epochs)",
    )


def run_demo(
    workdir: Path,
    repository: Path,
    model: str = "fashion_cnn",
    epochs: int | None = None,
    concurrency: int = 8,
    rows_per_request: int = 16,
    tune: bool = True,
) -> int:
    print(f"[1/4] build: {model} (reused when cached) -> {workdir}")
    workload = (
        fashion_cnn_workload(workdir, epochs or 3)
        if model == "fashion_cnn"
        else text_workload(model, workdir, epochs)
    )
    artifacts, artifacts_dir = workload.artifacts, workload.artifacts_dir
    print(f"      {workload.description}")
    print(
        "      per-exit test accuracy (PyTorch): "
        + ", ".join(f"{a:.2%}" for a in artifacts.exit_test_accuracy)
    )
    print("      exit costs (fraction of full):   " + ", ".join(f"{c:.2f}" for c in artifacts.exit_costs))

    in_process = False
    if tune:
        print("[2/4] tune: every set of exits ranked by its serving cost measured here; the pick certified "
              "by Learn-then-Test (disagreement with the full model <= 1% w.p. >= 95%)")  # fmt: skip
        # Where no set of exits pays, tune says so and the demo still shows the best set with early exits.
        report = run_tune(
            TuneConfig(
                artifacts=artifacts_dir,
                concurrency=concurrency,
                rows_per_request=rows_per_request,
                workdir=workdir,
                progress=False,
                prefer_exits=True,
            )
        )
        artifacts_dir = Path(report["out"])
        artifacts = ModelArtifacts.load(artifacts_dir)
        policy = Policy.load(artifacts_dir / "policy.json")
        in_process = report["decision"]["mode"] == "in_process"
    else:
        print("[2/4] policy: Learn-then-Test on the held-out calibration split, disagreement with the full "
              "model <= 1% w.p. >= 95%; every exit served, segments over BLS")  # fmt: skip
        data = held_out_data(artifacts, artifacts_dir)
        policy, _, _ = calibrate_artifacts(artifacts, artifacts_dir, data, epsilon=0.01, delta=0.05)
    thresholds = ", ".join(f"{r.threshold:.4f}" for r in policy.exits[:-1]) or "none (no early exit)"
    print(f"      {policy.provenance['calibration_rows']:,} calibration rows; {policy.rule} rule, "
          f"{rule_value(asdict(policy.exits[0]))} thresholds {thresholds}; expected compute "
          f"{policy.provenance['expected_cost']:.2f}")  # fmt: skip

    print(f"[3/4] repository -> {repository}")
    serving = ServingOptions(segments_in_process=in_process)
    # Every model as many instances as the orchestrator has, as the benchmark serves them: with the
    # segments in the orchestrator's process, a one-instance full model against a two-instance
    # orchestrator would compare one core with two (measured: 1.49x that was no early exit's doing).
    options = RepositoryOptions(
        execution_env=prepare_execution_env(),
        serving=serving,
        segment_instances=RepositoryOptions.orchestrator_instances,
    )
    written = write_repository(artifacts, artifacts_dir, policy, repository, options)

    rows = len(workload.labels)
    name, full_name = artifacts.name, full_model_name(artifacts.name)
    # Only the models written above: the folder may hold others (an earlier demo of another model, a
    # user's), and one written by an older offramp fails to import today's adapter, which failed the
    # whole start when every model was loaded (`make demo MODEL=trec` after an upgrade).
    loaded = [model_dir.name for model_dir in written]
    with EmbeddedTritonServer(
        repository, ports=ServerPorts.free(), model_control="explicit", load_models=loaded
    ) as server:
        print(f"[4/4] serving on {server.grpc_url} (gRPC); {rows:,} test rows, "
              f"{rows_per_request} per request, concurrency {concurrency}")  # fmt: skip
        calls = {
            name: lambda client, part: workload.classify(client, name, part),
            full_name: lambda client, part: workload.full_logits(client, full_name, part),
        }
        answers, runs = {}, {name: [], full_name: []}
        for round_index in range(ROUNDS):
            for model in (name, full_name) if round_index % 2 == 0 else (full_name, name):
                parts, run = send_all(server.grpc_url, rows, rows_per_request, concurrency, calls[model],
                                      f"{model:>16} {round_index + 1}/{ROUNDS}")  # fmt: skip
                answers.setdefault(model, parts)
                runs[model].append(run)
        time.sleep(1.5)  # the orchestrators publish their metrics once a second
        timing = orchestrator_parts(server.metrics_url, name)
    early = Predictions.concatenate(answers[name])
    full_labels = np.concatenate(answers[full_name]).argmax(axis=1)
    print_summary(early, full_labels, workload.labels, runs[name], runs[full_name], artifacts.num_exits)
    print_timing(timing)
    return 0


def print_summary(
    early: Predictions,
    full_labels: np.ndarray,
    labels: np.ndarray,
    early_runs: list[RunResult],
    full_runs: list[RunResult],
    exits: int,
) -> None:
    """Accuracy and agreement; throughput as the median of the rounds, the measured speed-up as the
    median of the rounds' ratios (each round's two passes ran back to back)."""
    counts = np.bincount(early.exit, minlength=exits)
    mean_cost = float(early.cost.mean())
    early_rate = float(np.median([r.rows_per_second for r in early_runs]))
    full_rate = float(np.median([r.rows_per_second for r in full_runs]))
    ratios = [e.rows_per_second / f.rows_per_second for e, f in zip(early_runs, full_runs, strict=True)]
    print()
    print(f"{'':24}{'early exit':>14}{'full':>14}")
    print(f"{'accuracy':24}{(early.label == labels).mean():>14.2%}{(full_labels == labels).mean():>14.2%}")
    print(f"{'throughput (rows/s)':24}{early_rate:>14.0f}{full_rate:>14.0f}")
    print(f"agreement with full:    {(early.label == full_labels).mean():.2%}")
    print(f"mean compute fraction:  {mean_cost:.3f} (ideal speed-up {1 / mean_cost:.2f}x; "
          f"measured {np.median(ratios):.2f}x, median of rounds "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    print(
        "exit distribution:      "
        + ", ".join(f"exit {k}: {c / len(early):.1%}" for k, c in enumerate(counts))
    )


def print_timing(timing: dict[str, float]) -> None:
    """Where the orchestrator's time per request went (its own timing, all passes)."""
    requests = timing.get("requests", 0.0)
    if not requests:
        return
    per = {part: timing.get(part, 0.0) / requests * 1e3 for part in ORCHESTRATOR_PARTS}
    print(
        f"orchestrator per request: {sum(per.values()):.2f} ms, of which segment calls "
        f"{per['segments']:.2f} ms (the segments' compute, and BLS round trips where they run over BLS), "
        "cascade "
        f"{per['cascade']:.2f}, metrics/drift/audit {per['observe']:.2f}, parsing and responses "
        f"{per['parse'] + per['respond']:.2f}"
    )


def main_demo(args: object) -> int:
    try:
        return run_demo(
            Path(args.workdir),
            Path(args.repository),
            args.model,
            args.epochs,
            args.concurrency,
            args.rows_per_request,
            not args.no_tune,
        )
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
