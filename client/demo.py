"""The demo: build (or reuse) the Fashion-MNIST multi-exit CNN, serve it, and measure it through gRPC.

Prints accuracy of the early-exit service against ``<name>_full`` through the same server, the exit
distribution, the mean compute fraction and both throughputs.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from offramp.backend.environment import prepare_execution_env
from offramp.build.calibrate import calibrate_artifacts, recipe_calibration_data
from offramp.build.fashion_mnist import load_fashion_mnist
from offramp.build.recipes import build_fashion_mnist_cnn
from offramp.build.repository import RepositoryOptions, full_model_name, write_repository
from offramp.build.train import TrainConfig
from offramp.client.client import OfframpClient, Predictions
from offramp.client.server import EmbeddedTritonServer, ServerPorts


@dataclass(frozen=True)
class RunResult:
    seconds: float
    rows: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


def send_all(
    url: str, rows: int, rows_per_request: int, concurrency: int, call: Callable[[OfframpClient, slice], object], desc: str
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


def run_demo(
    workdir: Path, repository: Path, epochs: int = 3, concurrency: int = 8, rows_per_request: int = 16
) -> int:
    artifacts_dir = workdir / "fashion_cnn"
    print(f"[1/4] build: multi-exit CNN on Fashion-MNIST ({epochs} epochs; reused when cached) -> {artifacts_dir}")
    artifacts = build_fashion_mnist_cnn(artifacts_dir, train=TrainConfig(epochs=epochs))
    print("      per-exit test accuracy (PyTorch): " + ", ".join(f"{a:.2%}" for a in artifacts.exit_test_accuracy))
    print("      exit costs (fraction of full):   " + ", ".join(f"{c:.2f}" for c in artifacts.exit_costs))

    print("[2/4] policy: Learn-then-Test on 5,000 held-out rows, disagreement with the full model <= 1% w.p. >= 95%")
    policy, _, _ = calibrate_artifacts(
        artifacts, artifacts_dir, recipe_calibration_data(artifacts), epsilon=0.01, delta=0.05
    )
    thresholds = ", ".join(f"{r.threshold:.4f}" for r in policy.exits[:-1])
    print(f"      max-prob thresholds {thresholds}; expected compute {policy.provenance['expected_cost']:.2f}")

    print(f"[3/4] repository -> {repository}")
    options = RepositoryOptions(execution_env=prepare_execution_env())
    write_repository(artifacts, artifacts_dir, policy, repository, options)

    images, labels = load_fashion_mnist("test")
    with EmbeddedTritonServer(repository, ports=ServerPorts.free()) as server:
        print(f"[4/4] serving on {server.grpc_url} (gRPC); {len(labels):,} test images, "
              f"{rows_per_request} per request, concurrency {concurrency}")
        name = artifacts.name
        early_parts, early_run = send_all(
            server.grpc_url, len(labels), rows_per_request, concurrency,
            lambda client, part: client.classify(name, images[part]), f"{name:>16}",
        )  # fmt: skip
        full_parts, full_run = send_all(
            server.grpc_url, len(labels), rows_per_request, concurrency,
            lambda client, part: client.full_logits(full_model_name(name), images[part]), f"{full_model_name(name):>16}",
        )  # fmt: skip
    early = Predictions.concatenate(early_parts)
    full_labels = np.concatenate(full_parts).argmax(axis=1)
    print_summary(early, full_labels, labels, early_run, full_run, artifacts.num_exits)
    return 0


def print_summary(
    early: Predictions, full_labels: np.ndarray, labels: np.ndarray, early_run: RunResult, full_run: RunResult, exits: int
) -> None:
    counts = np.bincount(early.exit, minlength=exits)
    mean_cost = float(early.cost.mean())
    print()
    print(f"{'':24}{'early exit':>14}{'full':>14}")
    print(f"{'accuracy':24}{(early.label == labels).mean():>14.2%}{(full_labels == labels).mean():>14.2%}")
    print(f"{'throughput (rows/s)':24}{early_run.rows_per_second:>14.0f}{full_run.rows_per_second:>14.0f}")
    print(f"agreement with full:    {(early.label == full_labels).mean():.2%}")
    print(f"mean compute fraction:  {mean_cost:.3f} (ideal speed-up {1 / mean_cost:.2f}x; "
          f"measured {early_run.rows_per_second / full_run.rows_per_second:.2f}x)")  # fmt: skip
    print("exit distribution:      " + ", ".join(f"exit {k}: {c / len(early):.1%}" for k, c in enumerate(counts)))


def main_demo(args: object) -> int:
    try:
        return run_demo(Path(args.workdir), Path(args.repository), args.epochs, args.concurrency, args.rows_per_request)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
