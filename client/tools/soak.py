"""``make soak``: perf_analyzer at high concurrency against the early-exit model for a long time, then checks.

The run is a sequence of back-to-back perf_analyzer invocations, one per window (default one minute),
each sending an exact number of requests (``--request-count``, sized from the rate of a short
warm-up run): so every window has its own latency percentiles, and the requests sent are known
exactly and can be checked against Triton's own statistics of the model. A sampler
thread reads, every few seconds, the resident memory of ``tritonserver`` and of its Python stubs
(``offramp.client.serving.processes``) and the size of the stubs' ``/dev/shm`` regions.

Checks, stated bounds (all configurable):

- no failed request: perf_analyzer reports none, and Triton counts no failure on any model;
- every request answered once: Triton's success count of the model grew by exactly the number of
  requests perf_analyzer sent;
- server memory stable: after the first window (a minute), the summed VmRSS of the server and its
  stubs never rises more than ``memory_growth`` (10%) above its level at the end of that window;
- ``/dev/shm`` stable: the same bound on the server's shared-memory regions (allocated bytes), but
  never less than one growth step (``shm_growth_step_bytes``, 1 MiB, passed to the server) per region:
  a region grows by whole steps when a burst in flight does not fit, and never shrinks, so one more
  step after the warm-up is a burst; a leak takes step after step;
- the same processes throughout (no stub died or was restarted);
- latency stable: p50 and p99 of the last window at most ``p50_ratio`` (1.5x) and ``p99_ratio`` (2x)
  those of the first window (a shared 2-core machine moves latency by tens of percent by itself);
- answers unchanged: 256 test rows classified before and after the load get the same exits and labels.

Writes ``summary.json``, ``summary.md``, ``samples.csv``, the server's log and perf_analyzer's CSV and
output per window to ``--out``; the repository and input data go to ``<workdir>/soak``.
"""

from __future__ import annotations

import csv
import datetime as dt
import glob
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offramp.build.markdown import markdown_table
from offramp.client.cli.options import option
from offramp.client.serving.processes import (
    machine_description,
    python_stubs,
    resident_memory,
    server_processes,
)
from offramp.client.serving.statistics import model_statistics, statistics_delta

DEFAULT_WORKDIR = Path(".cache/offramp")
DEFAULT_OUT = Path("benchmarks/soak")
CHECK_ROWS = 256  # test rows classified before and after the load
HEALING_GOAL_S = 10.0  # a killed stub's model restarted within this long


@dataclass(frozen=True)
class SoakConfig:
    """What ``offramp soak`` runs and checks; each field is also its command-line option."""

    duration_s: float = option(600.0, flag="--duration", help="seconds of load")
    # One perf_analyzer run, one set of latency percentiles.
    window_s: float = option(60.0, flag="--window", help="seconds per perf_analyzer run and latency figure")
    concurrency: int = option(32, help="requests in flight")
    rows_per_request: int = option(4, help="test rows per request")
    data_rows: int = option(1000, help="distinct test rows sent")
    sample_interval_s: float = option(5.0, flag="--sample-interval", help="seconds between memory samples")
    warmup_s: float = 5.0  # the run that sizes the windows (not counted in the stability checks)
    memory_growth: float = option(0.10, help="allowed RSS growth after the first window")
    shm_growth: float = option(0.10, help="allowed /dev/shm growth after the first window")
    # The Python backend's shm-growth-byte-size, given to the server: the quantum its regions grow by.
    shm_growth_step_bytes: int = option(
        1 << 20, flag="--shm-growth-step", help="the Python backend's shm-growth-byte-size"
    )
    p50_ratio: float = option(1.5, help="allowed last/first window p50")
    p99_ratio: float = option(2.0, help="allowed last/first window p99")
    orchestrator_instances: int = 2
    segment_instances: int = 1
    workdir: Path = option(DEFAULT_WORKDIR, help="build cache")
    out: Path = option(DEFAULT_OUT, help="summary.json, summary.md, samples.csv")
    epochs: int = option(3, help="training epochs of the demo build")
    quick: bool = option(False, help="the small test build (seconds to train) instead of the demo's")
    seed: int = 0
    # Self-healing under load: SIGKILL one model's stub mid-run; the supervisor must restart it.
    kill: str = option("", help="SIGKILL the stub of this model of the repository once, mid-run (a name)")
    kill_after_s: float = option(30.0, help="seconds into the load for --kill")
    # Replicas already running instead of a server of its own: offramp.client.tools.fleet_soak.
    fleet: str = option("", help="soak these running replicas instead (HOST:PORT,... or @FILE) with the "
                        "multi-address client, counted against each replica's statistics")  # fmt: skip
    model: str = option("fashion_cnn", help="--fleet: the model the replicas serve (Fashion-MNIST images in)")

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.window_s <= 0 or self.window_s > self.duration_s:
            raise ValueError("duration and window must be positive, the window no longer than the duration")
        if self.concurrency < 1 or self.rows_per_request < 1 or self.sample_interval_s <= 0:
            raise ValueError("concurrency, rows per request and the sample interval must be positive")
        if self.shm_growth_step_bytes < 1:
            raise ValueError("the shared-memory growth step must be positive")
        if self.kill and not 0 <= self.kill_after_s < self.duration_s:
            raise ValueError(f"--kill-after-s must fall inside the run (0 to {self.duration_s:.0f} s)")
        if self.kill and self.fleet:
            raise ValueError("--kill needs the server's processes on this machine; not with --fleet")


# --- What the server holds: processes, memory, shared memory ----------------------------------------


def shm_usage(prefix: str) -> dict[str, int]:
    """The regions named ``/dev/shm/<prefix>*``: how many, their size and what is allocated, in bytes."""
    count = size = allocated = 0
    for path in glob.glob(f"/dev/shm/{glob.escape(prefix)}*"):
        try:
            info = os.stat(path)
        except OSError:
            continue
        count += 1
        size += info.st_size
        allocated += info.st_blocks * 512
    return {"regions": count, "size": size, "allocated": allocated}


@dataclass
class Sample:
    t: float  # seconds since the load began
    rss: int  # summed VmRSS of tritonserver and its stubs
    rss_anon: int
    server_rss: int  # tritonserver alone
    processes: int
    shm_regions: int
    shm_size: int
    shm_allocated: int
    pids: tuple[int, ...] = ()


def take_sample(pgid: int, shm_prefix: str, t: float) -> Sample:
    roles = server_processes(pgid)
    memory = resident_memory(roles)
    shm = shm_usage(shm_prefix)
    return Sample(
        t=round(t, 2),
        rss=sum(m.rss for m in memory.values()),
        rss_anon=sum(m.anonymous for m in memory.values()),
        server_rss=memory[pgid].rss if pgid in memory else 0,
        processes=len(roles),
        shm_regions=shm["regions"],
        shm_size=shm["size"],
        shm_allocated=shm["allocated"],
        pids=tuple(sorted(roles)),
    )


class Sampler:
    """Samples the server every ``interval_s`` on a thread, from ``start()`` to ``stop()``."""

    def __init__(self, pgid: int, shm_prefix: str, interval_s: float) -> None:
        self.pgid, self.shm_prefix, self.interval_s = pgid, shm_prefix, interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="offramp-soak-sampler", daemon=True)
        self._origin = 0.0

    def start(self, origin: float) -> None:
        self._origin = origin
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self.samples.append(take_sample(self.pgid, self.shm_prefix, time.monotonic() - self._origin))
            if self._stop.wait(self.interval_s):
                break

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(30)
        return self.samples


# --- Triton's statistics --------------------------------------------------------------------------


def requests_since(before: Mapping[str, Mapping[str, float]], grpc_url: str, model: str) -> tuple[int, int]:
    """Requests ``model`` answered, and requests every model failed, since Triton's statistics ``before``."""
    delta = statistics_delta(before, model_statistics(grpc_url))
    return int(delta.get(model, {}).get("success", 0)), int(sum(d.get("fail", 0) for d in delta.values()))


# --- The checks ---------------------------------------------------------------------------------------


@dataclass
class Window:
    index: int
    started_s: float
    wall_s: float
    requests: int  # what perf_analyzer was told to send
    answered: int  # Triton's success count delta of the model
    failed: int  # Triton's fail count delta over every model
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    error: str | None = None
    tool_hung: bool = False  # perf_analyzer had to be killed after Triton answered all its requests


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def evaluate(
    config: SoakConfig,
    windows: Sequence[Window],
    samples: Sequence[Sample],
    answers_equal: bool,
    healing: Mapping[str, Any] | None = None,
) -> dict:
    """The checks and their figures; ``passed`` is True when every check holds. ``healing`` is what
    ``--kill`` saw: when the stub was killed and when the supervisor had it back (seconds into the load)."""
    checks: dict[str, dict[str, Any]] = {}
    sent = sum(w.requests for w in windows)
    answered = sum(w.answered for w in windows)
    failed = sum(w.failed for w in windows)
    errors = [w.error for w in windows if w.error]
    checks["no_failed_requests"] = {
        "passed": failed == 0 and not errors,
        "failed": failed,
        "errors": errors[:3],
    }
    checks["answered_equals_sent"] = {
        "passed": answered == sent and not errors,
        "sent": sent,
        "answered": answered,
    }

    # Memory and /dev/shm may grow while the first window warms the server up; after it, they must stay
    # within the bound of their level at its end: a leak grows without end, a warm server does not.
    # A shared-memory region grows by whole steps to the largest burst of data in flight so far, and
    # rarer bursts keep coming: in a short run one step is over 10% of a small pool (CI saw 13 -> 15 MiB
    # in 24 s), so the allowance is never less than one step per region.
    first, last = windows[0], windows[-1]
    in_first = [s for s in samples if s.t <= first.started_s + first.wall_s]
    later = [s for s in samples if s.t > first.started_s + first.wall_s]
    in_last = [s for s in samples if last.started_s <= s.t <= last.started_s + last.wall_s]
    regions = in_first[-1].shm_regions if in_first else 0
    for name, attribute, bound, floor_bytes in [
        ("memory_stable", "rss", config.memory_growth, 0),
        ("shm_stable", "shm_allocated", config.shm_growth, regions * config.shm_growth_step_bytes),
    ]:
        base = getattr(in_first[-1], attribute) if in_first else 0
        end = _median([getattr(s, attribute) for s in in_last])
        peak = max((getattr(s, attribute) for s in later), default=0)
        allowed = max(bound * base, floor_bytes)
        growth = end / base - 1.0 if base else float("nan")
        peak_growth = peak / base - 1.0 if base else float("nan")
        checks[name] = {
            "passed": bool(len(windows) > 1 and base > 0 and later and peak - base <= allowed),
            "after_first_window_bytes": base,
            "last_window_bytes": end,
            "peak_bytes": peak,
            "allowed_growth_bytes": allowed,
            "growth": round(growth, 4),
            "peak_growth": round(peak_growth, 4),
            "bound": bound,
        }
    # A killed stub is replaced once; the processes must be the same from the replacement on.
    settled = [s for s in samples if healing is None or s.t > healing["healed_at_s"]]
    checks["processes_stable"] = {
        "passed": len({s.pids for s in settled}) == 1 and len({s.processes for s in samples}) <= 2,
        "process_counts": sorted({s.processes for s in samples}),
    }
    if config.kill:
        recovered = healing is not None and healing["healed_at_s"] - healing["killed_at_s"] <= HEALING_GOAL_S
        checks["healed"] = {
            "passed": recovered,
            "goal_s": HEALING_GOAL_S,
            **(healing or {"error": "no restart"}),
        }
    # perf_analyzer's figures; a window whose perf_analyzer hung has none (the next or previous one stands
    # in).
    measured = [w for w in windows if math.isfinite(w.p50_ms)]
    first, last = (measured[0], measured[-1]) if measured else (windows[0], windows[-1])
    p50 = last.p50_ms / first.p50_ms if first.p50_ms else float("nan")
    p99 = last.p99_ms / first.p99_ms if first.p99_ms else float("nan")
    checks["latency_stable"] = {
        "passed": bool(len(measured) > 1 and p50 <= config.p50_ratio and p99 <= config.p99_ratio),
        "windows_without_figures": [w.index for w in windows if w.tool_hung],
        "first": {"p50_ms": first.p50_ms, "p99_ms": first.p99_ms},
        "last": {"p50_ms": last.p50_ms, "p99_ms": last.p99_ms},
        "p50_ratio": round(p50, 3),
        "p99_ratio": round(p99, 3),
        "bounds": {"p50_ratio": config.p50_ratio, "p99_ratio": config.p99_ratio},
    }
    checks["answers_unchanged"] = {"passed": answers_equal, "rows": CHECK_ROWS}
    return {"passed": all(c["passed"] for c in checks.values()), "checks": checks}


# --- The run -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountedRun:
    result: Any  # offramp.client.tools.perf_analyzer.PerfResult, or None
    error: str | None
    tool_hung: bool


def run_counted(
    options: Any,
    requests: int,
    answered: Callable[[], int],
    csv_path: Path,
    binary: Path,
    timeout_s: float,
    grace_s: float = 15.0,
) -> CountedRun:
    """perf_analyzer sending exactly ``requests`` requests (``--request-count``).

    WAR: perf_analyzer 2.49 in this mode now and then never exits after its last response (seen on a
    loaded 2-core machine: Triton had answered every request; SIGINT does not stop it). So it runs
    under watch: once ``answered()`` (Triton's count) reaches ``requests`` and it is still running
    ``grace_s`` later, it is killed and the window has no latency figures, but its count still holds.
    """
    from offramp.client.tools.perf_analyzer import (
        explain_start_failure,
        parse_perf_csv,
        perf_analyzer_environment,
    )

    command = [*options.command(binary, csv_path), "--request-count", str(requests)]
    csv_path.unlink(missing_ok=True)
    log_path = csv_path.with_suffix(".log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, env=perf_analyzer_environment(), stdout=log, stderr=subprocess.STDOUT
        )
    started, all_answered_at = time.monotonic(), None
    while process.poll() is None:
        now = time.monotonic()
        if all_answered_at is None and answered() >= requests:
            all_answered_at = now
        if (all_answered_at is not None and now - all_answered_at > grace_s) or now - started > timeout_s:
            process.kill()
            process.wait()
            if all_answered_at is not None:
                return CountedRun(None, None, True)
            return CountedRun(None, f"perf_analyzer ran past {timeout_s:.0f} s", False)
        time.sleep(0.5)
    output = log_path.read_text(errors="replace")
    problem = explain_start_failure(output)
    if problem or process.returncode != 0 or not csv_path.exists():
        tail = "\n".join(output.strip().splitlines()[-10:])
        return CountedRun(None, problem or f"perf_analyzer exited with {process.returncode}:\n{tail}", False)
    (result,) = parse_perf_csv(csv_path.read_text(), options.batch_size)
    return CountedRun(result, None, False)


def prepare_model(config: SoakConfig) -> tuple[Any, Path, Any]:
    """The Fashion-MNIST multi-exit CNN and its calibrated policy, built like the demo's (reused when
    cached)."""
    from offramp.build.calibrate import calibrate_artifacts, held_out_data
    from offramp.build.recipes import served_fashion_cnn

    artifacts, directory = served_fashion_cnn(config.workdir, config.epochs, config.quick)
    policy, _, _ = calibrate_artifacts(
        artifacts, directory, held_out_data(artifacts, directory), epsilon=0.01, delta=0.05
    )
    return artifacts, directory, policy


def _classify_check_rows(url: str, model: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from offramp.client.grpc_client import OfframpClient

    with OfframpClient(url) as client:
        parts = [client.classify(model, images[s : s + 32]) for s in range(0, len(images), 32)]
    return np.concatenate([p.exit for p in parts]), np.concatenate([p.label for p in parts])


@dataclass(frozen=True)
class SoakInputs:
    """What the soak serves and sends, written under ``<workdir>/soak`` (large, regenerated each run)."""

    repository: Path
    data_file: Path  # the test rows perf_analyzer sends
    check_images: np.ndarray  # classified before and after the load


def prepare_inputs(config: SoakConfig, artifacts: Any, artifacts_dir: Path, policy: Any) -> SoakInputs:
    """A fresh model repository serving ``artifacts`` under ``policy``, and the rows to send and to check."""
    from offramp.backend.environment import prepare_execution_env
    from offramp.build.fashion_mnist import load_fashion_mnist
    from offramp.build.repository import RepositoryOptions, write_repository
    from offramp.client.tools.perf_analyzer import write_input_data

    scratch = Path(config.workdir) / "soak"
    repository = scratch / "model_repository"
    options = RepositoryOptions(
        execution_env=prepare_execution_env(),
        orchestrator_instances=config.orchestrator_instances,
        segment_instances=config.segment_instances,
    )
    if repository.exists():
        shutil.rmtree(repository)
    write_repository(artifacts, artifacts_dir, policy, repository, options)
    images, _ = load_fashion_mnist("test")
    rows = np.random.default_rng(config.seed).choice(
        len(images), size=min(config.data_rows, len(images)), replace=False
    )
    data_file = write_input_data(scratch / "input_data.json", {"IMAGE": images[rows]})
    return SoakInputs(repository, data_file, images[:CHECK_ROWS])


@dataclass(frozen=True)
class SoakLoad:
    """perf_analyzer against the served model: the warm-up run, then one counted run per window."""

    config: SoakConfig
    grpc_url: str
    model: str
    data_file: Path
    binary: Path
    perf_dir: Path  # perf_analyzer's CSV and output of every run

    def options(self, interval_ms: int) -> Any:
        from offramp.client.tools.perf_analyzer import PerfAnalyzerOptions

        return PerfAnalyzerOptions(
            url=self.grpc_url,
            model=self.model,
            input_data=self.data_file,
            concurrency=self.config.concurrency,
            batch_size=self.config.rows_per_request,
            measurement_interval_ms=interval_ms,
            max_trials=3,
        )

    def warm_up(self) -> Any:
        """The run that sizes the windows; returns its ``offramp.client.tools.perf_analyzer.PerfResult``."""
        from offramp.client.tools.perf_analyzer import run_perf_analyzer

        config = self.config
        return run_perf_analyzer(
            self.options(int(config.warmup_s * 1000 / 3)), self.perf_dir / "warmup.csv",
            timeout_s=120 + 4 * config.warmup_s, binary=self.binary,
        ).result  # fmt: skip

    def window(self, index: int, requests: int, origin: float) -> Window:
        """Window ``index``: ``requests`` requests, counted against Triton's statistics; its times in seconds
        since ``origin`` (``time.monotonic()``)."""
        before = model_statistics(self.grpc_url)
        began = time.monotonic() - origin
        run = run_counted(
            self.options(int(self.config.window_s * 1000)),
            requests,
            lambda: requests_since(before, self.grpc_url, self.model)[0],
            self.perf_dir / f"window_{index:03d}.csv",
            self.binary,
            timeout_s=120 + 4 * self.config.window_s,
        )
        result = run.result
        wall = time.monotonic() - origin - began
        answered, failed = requests_since(before, self.grpc_url, self.model)
        return Window(
            index=index,
            started_s=round(began, 2),
            wall_s=round(wall, 2),
            requests=requests,
            answered=answered,
            failed=failed,
            requests_per_s=round(requests / wall, 1),
            p50_ms=result.p50_ms if result else float("nan"),
            p90_ms=result.p90_ms if result else float("nan"),
            p95_ms=result.p95_ms if result else float("nan"),
            p99_ms=result.p99_ms if result else float("nan"),
            error=run.error,
            tool_hung=run.tool_hung,
        )


def window_progress(window: Window, count: int, last: Sample | None) -> str:
    """The line said after a window, with the server's memory at the last sample."""
    memory = ""
    if last:
        memory = f", server RSS {last.rss / 2**20:.0f} MiB, /dev/shm {last.shm_allocated / 2**20:.1f} MiB"
    return (
        f"soak: window {window.index + 1}/{count}: {window.requests_per_s:.0f} req/s, "
        f"p50 {window.p50_ms:.1f} ms, p99 {window.p99_ms:.1f} ms, "
        f"answered {window.answered}/{window.requests}, failed {window.failed}{memory}"
        + (f"; ERROR {window.error.splitlines()[0]}" if window.error else "")
        + ("; perf_analyzer hung after the last answer and was killed" if window.tool_hung else "")
    )


class StubKiller:
    """SIGKILLs the stub of ``model`` at ``when`` (time.monotonic()), from a timer thread."""

    def __init__(self, pgid: int, model: str, when: float) -> None:
        self.pgid, self.model = pgid, model
        self.killed_at: float | None = None
        self._timer = threading.Timer(max(0.0, when - time.monotonic()), self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        victims = [s.pid for s in python_stubs(self.pgid).values() if s.model == self.model]
        if victims:
            os.kill(victims[0], signal.SIGKILL)
            self.killed_at = time.monotonic()

    def cancel(self) -> None:
        self._timer.cancel()

    def outcome(self, supervisor: Any, origin: float) -> dict[str, Any] | None:
        """When the stub was killed and the supervisor had the model back, seconds into the load; None
        when the kill never happened (the run ended first) or no restart followed."""
        if self.killed_at is None:
            return None
        restarts = [e for e in supervisor.events if e.model == self.model and e.kind == "restarted"]
        if not restarts:
            return None
        return {
            "model": self.model,
            "killed_at_s": round(self.killed_at - origin, 2),
            "healed_at_s": round(restarts[0].time - origin, 2),
            "events": [f"{e.time - origin:.2f} s {e.kind} {e.detail}".strip() for e in supervisor.events],
        }


def run_soak(
    config: SoakConfig, artifacts: Any, artifacts_dir: Path, policy: Any, progress: bool = True
) -> dict:
    """Serve ``artifacts`` under ``policy`` and soak it; returns the summary (also written to
    ``config.out``)."""
    from offramp.build.execution_env import triton_server_flags
    from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts
    from offramp.client.serving.supervisor import supervised
    from offramp.client.tools.perf_analyzer import check_perf_analyzer

    def say(message: str) -> None:
        if progress:
            print(message, flush=True)

    binary = check_perf_analyzer()
    out = Path(config.out)
    (out / "perf").mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(config, artifacts, artifacts_dir, policy)
    name = artifacts.name

    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    windows: list[Window] = []
    with (
        EmbeddedTritonServer(
            inputs.repository,
            ports=ServerPorts.free(),
            log_path=out / "tritonserver.log",
            # The pools' own start size; the growth step stated, as the shm check allows for it.
            extra_args=triton_server_flags(
                shm_default_bytes=None, shm_growth_bytes=config.shm_growth_step_bytes
            ),
            startup_timeout_s=600,
            # As `offramp serve` runs it: explicit model control, supervised.
            model_control="explicit",
            load_models=("*",),
        ) as server,
        supervised(server) as supervisor,
    ):
        if config.kill and config.kill not in {s.model for s in python_stubs(server.pid).values()}:
            raise ValueError(
                f"--kill {config.kill}: no stub serves it; models: "
                f"{sorted(server_processes(server.pid).values())}"
            )
        exits_before, labels_before = _classify_check_rows(server.grpc_url, name, inputs.check_images)
        load = SoakLoad(config, server.grpc_url, name, inputs.data_file, binary, out / "perf")

        say(f"soak: warm-up {config.warmup_s:.0f} s at concurrency {config.concurrency}")
        warm = load.warm_up()
        per_window = max(1, int(warm.requests_per_s * config.window_s))
        count = max(1, round(config.duration_s / config.window_s))
        say(
            f"soak: {warm.requests_per_s:.0f} requests/s; {count} windows of {per_window} requests "
            f"(~{config.window_s:.0f} s each)"
        )

        sampler = Sampler(server.pid, server.shm_region_prefix, config.sample_interval_s)
        origin = time.monotonic()
        sampler.start(origin)
        killer = StubKiller(server.pid, config.kill, origin + config.kill_after_s) if config.kill else None
        try:
            for index in range(count):
                window = load.window(index, per_window, origin)
                windows.append(window)
                say(window_progress(window, count, sampler.samples[-1] if sampler.samples else None))
                if window.error:
                    break
        finally:
            samples = sampler.stop()
            if killer is not None:
                killer.cancel()
        healing = killer.outcome(supervisor, origin) if killer is not None else None
        exits_after, labels_after = _classify_check_rows(server.grpc_url, name, inputs.check_images)
        processes = server_processes(server.pid, inputs.repository)
    answers_equal = bool((exits_before == exits_after).all() and (labels_before == labels_after).all())

    summary = soak_summary(
        config, started_at, name, warm, windows, samples, processes, answers_equal, healing
    )
    write_soak_results(summary, samples, out)
    return summary


def soak_summary(
    config: SoakConfig,
    started_at: str,
    model: str,
    warm_up: Any,
    windows: Sequence[Window],
    samples: Sequence[Sample],
    processes: Mapping[int, str],
    answers_equal: bool,
    healing: Mapping[str, Any] | None = None,
) -> dict:
    """What the soak saw and its verdict: ``warm_up`` is the warm-up run's result, ``processes`` the
    server's roles by pid at the end, ``healing`` what ``--kill`` saw."""
    return {
        "date": started_at,
        "model": model,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "machine": machine_load(),
        "processes": sorted(processes.values()),
        "warmup": {
            "requests_per_s": warm_up.requests_per_s,
            "p50_ms": warm_up.p50_ms,
            "p99_ms": warm_up.p99_ms,
        },
        "windows": [asdict(w) for w in windows],
        **evaluate(config, windows, samples, answers_equal, healing),
    }


def write_soak_results(summary: Mapping[str, Any], samples: Sequence[Sample], out: Path) -> None:
    """``samples.csv``, ``summary.json`` and ``summary.md`` in ``out``."""
    write_samples_csv(samples, out / "samples.csv")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))


def machine_load() -> dict[str, Any]:
    """What the soak shared the machine with: cores and the load averages at the end."""
    machine = machine_description()
    return {"cores": machine.cores, "loadavg_1_5_15": [round(load, 2) for load in machine.load_average]}


def write_samples_csv(samples: Sequence[Sample], path: Path) -> Path:
    fields = [f for f in Sample.__dataclass_fields__ if f != "pids"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for sample in samples:
            writer.writerow([getattr(sample, f) for f in fields])
    return path


def summary_markdown(summary: Mapping[str, Any]) -> str:
    config = summary["config"]

    def mib(b):
        return f"{b / 2**20:.1f} MiB"

    check_rows = []
    for name, check in summary["checks"].items():
        figures = {k: v for k, v in check.items() if k != "passed"}
        for key in ("after_first_window_bytes", "last_window_bytes", "peak_bytes", "allowed_growth_bytes"):
            if key in figures:
                figures[key] = mib(figures[key])
        check_rows.append([name, "pass" if check["passed"] else "FAIL", json.dumps(figures, default=str)])
    window_rows = [
        [w["index"], f"{w['started_s']:.0f}", f"{w['requests_per_s']:.0f}", f"{w['p50_ms']:.1f}",
         f"{w['p90_ms']:.1f}", f"{w['p99_ms']:.1f}", w["requests"], w["answered"], w["failed"]]
        for w in summary["windows"]
    ]  # fmt: skip
    lines = [
        f"# Soak: {summary['model']}, {summary['date']}",
        "",
        (
            f"perf_analyzer, concurrency {config['concurrency']}, {config['rows_per_request']} rows per "
            "request, "
            f"{len(summary['windows'])} windows of ~{config['window_s']:.0f} s; {config['data_rows']} real "
            "test rows. "
            f"Machine: {summary['machine']['cores']} cores, load average "
            f"{summary['machine']['loadavg_1_5_15']} at the end."
        ),
        "",
        f"**{'PASSED' if summary['passed'] else 'FAILED'}**",
        "",
        markdown_table(["check", "result", "figures"], check_rows),
        "",
        markdown_table(
            ["window", "start (s)", "req/s", "p50 ms", "p90 ms", "p99 ms", "sent", "answered", "failed"],
            window_rows,
        ),
    ]
    return "\n".join(lines) + "\n"


# --- Command line --------------------------------------------------------------------------------------


def main_soak(config: SoakConfig) -> int:
    """Build (or reuse) the model, soak it, print the verdict; 0 when every check passed."""
    from offramp.client.serving.fleet import FleetError
    from offramp.client.serving.server import ServerStartError
    from offramp.client.tools.fleet_soak import run_fleet_soak
    from offramp.client.tools.perf_analyzer import PerfAnalyzerError

    try:
        if config.fleet:
            summary = run_fleet_soak(config)
        else:
            artifacts, directory, policy = prepare_model(config)
            summary = run_soak(config, artifacts, directory, policy)
    except (PerfAnalyzerError, ServerStartError, FleetError) as error:
        print(f"offramp soak: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for name, check in summary["checks"].items():
        print(f"  {'pass' if check['passed'] else 'FAIL'}  {name}")
    print(f"soak {'passed' if summary['passed'] else 'FAILED'}; see {Path(config.out) / 'summary.md'}")
    return 0 if summary["passed"] else 1
