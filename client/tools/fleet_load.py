"""Closed-loop load on the replicas of a service through the multi-address ``OfframpClient``.

perf_analyzer sends to one address and retries nothing; a fleet is driven the way its clients drive it.
``FleetLoad`` runs ``threads`` threads, each with its own ``OfframpClient`` over every replica, sending
requests of ``rows_per_request`` rows one after the other until stopped. Request k carries the rows
starting at ``k * rows_per_request`` (cycling through the inputs) and the request id ``load-<k>``, so
what each answer must be is known. It records every answer (rows, exits, labels, the replica that
answered, latency) and every failure: what ``offramp soak --fleet``, ``offramp bench --fleet`` and the
fleet tests check.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Answer:
    request: int
    rows: np.ndarray  # indices into the inputs
    exit: np.ndarray
    label: np.ndarray
    replica: str
    latency_s: float
    ended_s: float  # since the load began


@dataclass
class LoadResult:
    seconds: float
    answers: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    retried: int = 0  # requests another replica answered after one refused them (UNAVAILABLE, NOT_FOUND)

    @property
    def requests_per_s(self) -> float:
        return len(self.answers) / self.seconds if self.seconds else 0.0

    @property
    def rows_per_s(self) -> float:
        return sum(len(a.rows) for a in self.answers) / self.seconds if self.seconds else 0.0

    def by_replica(self) -> dict[str, int]:
        return dict(sorted(Counter(a.replica for a in self.answers).items()))

    def latency_ms(self, percentile: float) -> float:
        latencies = [a.latency_s for a in self.answers]
        return float(np.percentile(latencies, percentile) * 1000) if latencies else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "requests": len(self.answers),
            "failed": len(self.failures),
            "retried": self.retried,
            "requests_per_s": round(self.requests_per_s, 1),
            "rows_per_s": round(self.rows_per_s, 1),
            "p50_ms": round(self.latency_ms(50), 2),
            "p99_ms": round(self.latency_ms(99), 2),
            "by_replica": self.by_replica(),
            "failures": self.failures[:3],
        }


class FleetLoad:
    """Requests from ``threads`` threads until ``stop`` (module docstring). ``full_logits`` sends to the
    network without exits (``<name>_full``) instead, whose answers have no exit (-1) and the argmax label."""

    def __init__(
        self,
        addresses: Sequence[str],
        model: str,
        inputs: Mapping[str, np.ndarray],
        rows_per_request: int = 8,
        threads: int = 4,
        parameters: Mapping[str, Any] | None = None,
        full_logits: bool = False,
        timeout_s: float = 30.0,
    ) -> None:
        self.addresses, self.model, self.inputs = tuple(addresses), model, dict(inputs)
        self.rows = len(next(iter(self.inputs.values())))
        self.rows_per_request, self.threads = rows_per_request, threads
        self.parameters, self.full_logits, self.timeout_s = dict(parameters or {}), full_logits, timeout_s
        self._requests = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._result = LoadResult(0.0)
        self._began = 0.0

    def rows_of(self, request: int) -> np.ndarray:
        start = request * self.rows_per_request
        return np.arange(start, start + self.rows_per_request) % self.rows

    def _work(self) -> None:
        from offramp.client.grpc_client import OfframpClient

        with OfframpClient(self.addresses, timeout_s=self.timeout_s) as client:
            while not self._stop.is_set():
                with self._lock:
                    request = next(self._requests)
                rows = self.rows_of(request)
                batch = {name: array[rows] for name, array in self.inputs.items()}
                sent = time.monotonic()
                try:
                    if self.full_logits:
                        label = client.full_logits(self.model, batch).argmax(axis=1)
                        exits = np.full(len(rows), -1)
                    else:
                        answer = client.classify(
                            self.model, batch, request_id=f"load-{request}", **self.parameters
                        )
                        label, exits = answer.label, answer.exit
                except Exception as error:  # noqa: BLE001 (every failure is a finding, recorded)
                    with self._lock:
                        self._result.failures.append(f"request {request}: {error}"[:300])
                    continue
                ended = time.monotonic()
                record = Answer(
                    request, rows, exits, label, client.last_address or "", ended - sent, ended - self._began
                )
                with self._lock:
                    self._result.answers.append(record)
            with self._lock:
                self._result.retried += client.retried

    def start(self) -> FleetLoad:
        self._began = time.monotonic()
        self._workers = [
            threading.Thread(target=self._work, name=f"fleet-load-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        for worker in self._workers:
            worker.join(self.timeout_s + 10)
        self._result.seconds = time.monotonic() - self._began
        return self._result

    def run_for(self, seconds: float) -> LoadResult:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def __enter__(self) -> FleetLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
