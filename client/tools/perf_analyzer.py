"""Run Triton's ``perf_analyzer`` (the binary that ships inside the ``tritonclient`` wheel) and read its CSV.

The ``tritonclient==2.49.0`` wheel installs ``perf_analyzer`` as a data file (``bin/perf_analyzer`` of
the environment). It needs ``libb64.so.0d`` (Debian package ``libb64-0d``) and ``libcudart.so.12``
even on a machine without a GPU; the pip package ``nvidia-cuda-runtime-cu12`` provides the latter,
and :func:`perf_analyzer_environment` puts it on ``LD_LIBRARY_PATH``. Later wheels need glibc 2.38.

One run measures one model at one concurrency: :func:`run_perf_analyzer` returns a
:class:`PerfResult` (throughput in rows per second, latency percentiles in milliseconds, and
perf_analyzer's own client/server split of the average latency). :func:`search_request_rate` runs
perf_analyzer's own search over Poisson request rates, which stops at the first rate whose latency
passes a threshold, and returns a result per rate within it.
"""

from __future__ import annotations

import base64
import csv
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

BINARY = "perf_analyzer"
CUDA_RUNTIME_PIN = "nvidia-cuda-runtime-cu12==12.9.79"
# What the loader says when a library is missing, and what installs it.
_MISSING_LIBRARIES = {
    "libb64.so": "apt-get install libb64-0d",
    "libcudart.so.12": f"pip install {CUDA_RUNTIME_PIN}",
    "GLIBC_": "use the perf_analyzer of tritonclient==2.49.0 (later wheels need glibc 2.38)",
}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, cannot start, or a measurement failed; the message says which."""


# --- Finding the binary and its libraries -----------------------------------------------------------


def _binary_from_wheel() -> Path | None:
    # The wheel lists its data files in RECORD; pip puts them under the environment's bin/.
    try:
        files = importlib.metadata.distribution("tritonclient").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == BINARY:
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path
    return None


def perf_analyzer_binary() -> Path:
    """Return the ``perf_analyzer`` executable: ``$OFFRAMP_PERF_ANALYZER``, the tritonclient wheel's, or
    PATH's.

    Raises:
        PerfAnalyzerError: none of them exists.
    """
    override = os.environ.get("OFFRAMP_PERF_ANALYZER")
    if override:
        if not Path(override).is_file():
            raise PerfAnalyzerError(f"OFFRAMP_PERF_ANALYZER={override} is not a file")
        return Path(override)
    for candidate in (_binary_from_wheel(), Path(sys.prefix) / "bin" / BINARY):
        if candidate is not None and candidate.is_file():
            return candidate
    on_path = shutil.which(BINARY)
    if on_path:
        return Path(on_path)
    raise PerfAnalyzerError(
        "perf_analyzer not found: it ships inside the tritonclient wheel (pip install "
        "'tritonclient[grpc]==2.49.0'), "
        "or set OFFRAMP_PERF_ANALYZER to the binary"
    )


def cuda_runtime_library_directory() -> Path | None:
    """The folder of ``libcudart.so.12`` from the pip package ``nvidia-cuda-runtime-cu12``, if installed."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:  # No `nvidia` namespace package at all.
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        lib = Path(location) / "lib"
        if (lib / "libcudart.so.12").exists():
            return lib
    return None


def perf_analyzer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment with the CUDA runtime's folder first on ``LD_LIBRARY_PATH`` (when installed)."""
    env = dict(os.environ if base is None else base)
    lib = cuda_runtime_library_directory()
    if lib is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))
    return env


def explain_start_failure(output: str) -> str | None:
    """The install step for a missing library that ``output`` (the loader's message) names, or None."""
    if "error while loading shared libraries" not in output and "version `GLIBC_" not in output:
        return None
    for marker, remedy in _MISSING_LIBRARIES.items():
        if marker in output:
            return f"{output.strip().splitlines()[-1]} -> {remedy}"
    return output.strip().splitlines()[-1]


def check_perf_analyzer() -> Path:
    """Return the binary after checking that it starts; raise :class:`PerfAnalyzerError` saying what to
    install."""
    binary = perf_analyzer_binary()
    result = subprocess.run(
        [str(binary), "--version"],
        env=perf_analyzer_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    problem = explain_start_failure(output)
    if problem or result.returncode != 0:
        raise PerfAnalyzerError(f"{binary} does not start: {problem or output.strip()[-500:]}")
    return binary


# --- Options and results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PerfAnalyzerOptions:
    """One perf_analyzer measurement: one model, one concurrency, real input data, over gRPC.

    ``batch_size`` rows per request: perf_analyzer takes that many consecutive entries of the
    ``input_data`` file for each request and cycles through the file.
    ``stability_percentage``: perf_analyzer repeats windows until the last three agree within this
    many percent, and fails with "Failed to obtain stable measurement" after ``max_trials`` windows.
    The default asks for no such search (a run is normally three windows, then the report): on a
    shared or busy machine three windows rarely agree by perf_analyzer's own 10% (a CI run of the
    printed ``offramp input-data`` command failed so), and our tools get their stability from
    interleaved repeats and medians instead. ``max_trials`` stays at perf_analyzer's 10: even at 1000%
    three windows can fail the check (measured: Rotten Tomatoes at concurrency 16, whose long
    requests leave a 1.5 s window nearly empty), and more windows then settle it. Tools that must not
    run longer than planned set it to 3.
    """

    url: str  # host:port of the gRPC endpoint
    model: str
    input_data: Path
    concurrency: int = 1
    batch_size: int = 1
    shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)  # per input, batch axis left out
    measurement_interval_ms: int = 2000
    stability_percentage: float = 1000.0
    max_trials: int = 10
    percentile: int | None = None  # stabilise on this latency percentile instead of the mean
    request_parameters: Mapping[str, bool | int | str] = field(default_factory=dict)
    protocol: str = "grpc"
    extra_args: Sequence[str] = ()
    # Requests per second, sent on schedule whether or not earlier ones were answered (open loop, as
    # real users arrive), instead of ``concurrency`` requests in flight; asynchronous, Poisson arrivals.
    request_rate: float | None = None
    # Or perf_analyzer's own search over rates (start, end, step, requests/s), each measured in turn,
    # that stops at the first whose latency (the p99 where ``percentile`` is 99) passes
    # ``latency_threshold_ms``: :func:`search_request_rate`.
    request_rate_range: tuple[float, float, float] | None = None
    latency_threshold_ms: float | None = None
    # Or a schedule: a ``--request-intervals`` file (the gaps between successive sends, in microseconds),
    # open loop and asynchronous like a request rate, over ``max_threads`` sending threads.
    request_intervals: Path | None = None
    max_threads: int = 16
    request_count: int = 0  # send this many requests in all, then wait for their answers (0: windows)
    # Where perf_analyzer writes every request's send time, response times, inputs and outputs (JSON).
    profile_export: Path | None = None

    def __post_init__(self) -> None:
        loads = [self.request_rate, self.request_rate_range, self.request_intervals]
        if sum(load is not None for load in loads) > 1:
            raise ValueError("give one of request_rate, request_rate_range and request_intervals")
        if self.request_rate_range is not None:
            start, end, step = self.request_rate_range
            if not 0 < start <= end or not step > 0:
                raise ValueError(f"need 0 < start <= end and step > 0: request_rate_range={start, end, step}")
        if self.latency_threshold_ms is not None and not self.latency_threshold_ms >= 1:
            raise ValueError(f"perf_analyzer's latency threshold is >= 1 ms: {self.latency_threshold_ms}")

    def command(self, binary: Path, csv_path: Path) -> list[str]:
        load = ["--concurrency-range", str(self.concurrency)]
        rates = (self.request_rate,) if self.request_rate is not None else self.request_rate_range
        if self.request_intervals is not None:
            load = ["--request-intervals", str(self.request_intervals), "--async",
                    "--max-threads", str(self.max_threads)]  # fmt: skip
        elif rates is not None:
            load = ["--request-rate-range", ":".join(f"{rate:.3f}" for rate in rates), "--async",
                    "--request-distribution", "poisson", "--max-threads", str(self.max_threads)]  # fmt: skip
        command = [
            str(binary),
            "-i", self.protocol,
            "-u", self.url,
            "-m", self.model,
            "-b", str(self.batch_size),
            *load,
            "--input-data", str(self.input_data),
            "--measurement-interval", str(self.measurement_interval_ms),
            "--stability-percentage", f"{self.stability_percentage:g}",
            "--max-trials", str(self.max_trials),
            "-f", str(csv_path),
        ]  # fmt: skip
        for name, shape in self.shapes.items():
            command += ["--shape", f"{name}:{','.join(str(d) for d in shape)}"]
        if self.percentile is not None:
            command += ["--percentile", str(self.percentile)]
        if self.latency_threshold_ms is not None:
            # Whole milliseconds, rounded down: a rate it lets through is within the threshold asked.
            command += ["--latency-threshold", str(math.floor(self.latency_threshold_ms))]
        if self.request_count:
            command += ["--request-count", str(self.request_count)]
        if self.profile_export is not None:
            command += ["--profile-export-file", str(self.profile_export)]
        for name, value in self.request_parameters.items():
            command += ["--request-parameter", f"{name}:{_parameter_text(value)}"]
        return command + list(self.extra_args)


def _parameter_text(value: bool | int | str) -> str:
    """``value:type`` as ``--request-parameter`` takes it (bool before int: a bool is an int in Python)."""
    if isinstance(value, bool):
        return f"{str(value).lower()}:bool"
    if isinstance(value, int):
        return f"{value}:int"
    if isinstance(value, str):
        if ":" in value:
            raise ValueError(f"a request parameter cannot hold ':' ({value!r})")
        return f"{value}:string"
    raise TypeError(f"request parameters are bool, int or str, not {type(value).__name__}")


@dataclass(frozen=True)
class PerfResult:
    """One row of perf_analyzer's CSV, in rows per second and milliseconds.

    perf_analyzer's "Inferences/Second" counts rows (requests times batch size). The split of the
    average latency (client send, network and server send/receive, server queue, compute input,
    infer, output, client receive) is perf_analyzer's own, averaged per request.
    """

    concurrency: int
    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float | None = None
    client_send_ms: float | None = None
    network_ms: float | None = None
    server_queue_ms: float | None = None
    server_compute_input_ms: float | None = None
    server_compute_infer_ms: float | None = None
    server_compute_output_ms: float | None = None
    client_recv_ms: float | None = None
    batch_size: int = 1
    request_rate: float | None = None  # the rate asked for, in request-rate mode (concurrency is 0 then)

    @property
    def requests_per_s(self) -> float:
        return self.rows_per_s / self.batch_size

    def to_dict(self) -> dict:
        return {**asdict(self), "requests_per_s": self.requests_per_s}


_CSV_COLUMNS = {  # perf_analyzer's column -> PerfResult field (microseconds unless it is a rate)
    "p50 latency": "p50_ms",
    "p90 latency": "p90_ms",
    "p95 latency": "p95_ms",
    "p99 latency": "p99_ms",
    "Avg latency": "avg_ms",
    "Client Send": "client_send_ms",
    "Network+Server Send/Recv": "network_ms",
    "Server Queue": "server_queue_ms",
    "Server Compute Input": "server_compute_input_ms",
    "Server Compute Infer": "server_compute_infer_ms",
    "Server Compute Output": "server_compute_output_ms",
    "Client Recv": "client_recv_ms",
}


# The first column of the latency report: the load it was measured at.
_LOAD_COLUMNS = ("Concurrency", "Request Rate")


def parse_perf_csv(text: str, batch_size: int = 1) -> list[PerfResult]:
    """The rows of perf_analyzer's ``-f`` CSV (one per concurrency level or request rate), latencies in ms.

    The first block is the latency report: a header line starting ``Concurrency,`` (``Request Rate,``
    in request-rate mode) and one line per level; it ends at the first blank line (server metrics may follow
    with ``--collect-metrics``).
    With ``--percentile`` perf_analyzer drops the "Avg latency" column; it is then None.

    Raises:
        ValueError: no header, or a row that lacks a required column.
    """
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(_LOAD_COLUMNS))
    except StopIteration:
        raise ValueError(
            "perf_analyzer CSV has no 'Concurrency,...' (or 'Request Rate,...') header"
        ) from None
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    results = []
    for row in csv.DictReader(io.StringIO("\n".join(block))):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        load = next(c for c in _LOAD_COLUMNS if c in row)
        missing = [c for c in (load, "Inferences/Second", "p50 latency", "p99 latency") if not row.get(c)]
        if missing:
            raise ValueError(f"perf_analyzer CSV row lacks {missing}: {row}")
        values = {f: float(row[c]) / 1000.0 for c, f in _CSV_COLUMNS.items() if row.get(c) not in (None, "")}
        for required in ("p90_ms", "p95_ms"):
            values.setdefault(required, float("nan"))
        results.append(
            PerfResult(
                concurrency=int(float(row["Concurrency"])) if load == "Concurrency" else 0,
                request_rate=float(row[load]) if load != "Concurrency" else None,
                rows_per_s=float(row["Inferences/Second"]),
                batch_size=batch_size,
                **values,
            )
        )
    if not results:
        raise ValueError("perf_analyzer CSV has a header but no rows")
    return results


@dataclass(frozen=True)
class PerfRun:
    """A finished perf_analyzer run: its result, the command, and what it cost the client."""

    result: PerfResult
    command: list[str]
    wall_s: float
    client_cpu_s: float  # perf_analyzer's own user+system CPU time
    output: str  # its stdout and stderr
    csv_text: str


def run_perf_analyzer(
    options: PerfAnalyzerOptions,
    csv_path: Path,
    timeout_s: float = 300.0,
    binary: Path | None = None,
    hang_grace_s: float = 20.0,
) -> PerfRun:
    """Run one measurement and parse its CSV (kept at ``csv_path``).

    WAR: perf_analyzer 2.49 now and then never exits after it has written its CSV (seen here after
    overload in request-rate mode, and in --request-count mode; SIGINT does not stop it). The CSV is
    written once the measurement is over, so a run still going ``hang_grace_s`` after it appeared is
    killed and its CSV taken.

    Raises:
        PerfAnalyzerError: the binary is missing or cannot start (the message names the library and
            its install step), a request failed, or the run timed out; the message carries the end
            of perf_analyzer's output.
    """
    finished = _run(options, csv_path, timeout_s, binary, hang_grace_s)
    if finished.csv_text is None:
        raise PerfAnalyzerError(
            f"perf_analyzer on {options.model} (concurrency {options.concurrency}) exited with "
            f"{finished.returncode}:\n{_tail(finished.output)}"
        )
    (result,) = parse_perf_csv(finished.csv_text, options.batch_size)
    return PerfRun(
        result, finished.command, finished.wall_s, finished.cpu_s, finished.output, finished.csv_text
    )


# What perf_analyzer prints where a rate search stopped at a rate over its latency threshold.
_OVER_THRESHOLD = "Measured latency went over the set limit"


def search_request_rate(
    options: PerfAnalyzerOptions, csv_path: Path, timeout_s: float = 600.0, binary: Path | None = None
) -> list[PerfResult]:
    """perf_analyzer's own search (``options.request_rate_range`` with ``latency_threshold_ms``): the
    rates it measured within the threshold, lowest first; empty where the first one was over it
    already (perf_analyzer then writes no CSV).

    Raises:
        PerfAnalyzerError: as :func:`run_perf_analyzer`, or a run that stopped without a CSV for
            another reason than the threshold.
    """
    if options.request_rate_range is None or options.latency_threshold_ms is None:
        raise ValueError("a rate search needs request_rate_range and latency_threshold_ms")
    finished = _run(options, csv_path, timeout_s, binary)
    if finished.csv_text is not None:
        return parse_perf_csv(finished.csv_text, options.batch_size)
    if finished.returncode == 0 and _OVER_THRESHOLD in finished.output:
        return []
    raise PerfAnalyzerError(
        f"perf_analyzer's rate search on {options.model} exited with {finished.returncode} without a "
        f"report:\n{_tail(finished.output)}"
    )


@dataclass(frozen=True)
class _Finished:
    command: list[str]
    returncode: int  # negative: killed (after it wrote its CSV: the hang of run_perf_analyzer)
    wall_s: float
    cpu_s: float
    output: str
    csv_text: str | None  # None: it wrote no CSV


def _tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def _run(
    options: PerfAnalyzerOptions,
    csv_path: Path,
    timeout_s: float,
    binary: Path | None = None,
    hang_grace_s: float = 20.0,
) -> _Finished:
    """Runs perf_analyzer to its end (or to ``hang_grace_s`` past its CSV, :func:`run_perf_analyzer`)."""
    binary = binary or perf_analyzer_binary()
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.unlink(missing_ok=True)
    command = options.command(binary, csv_path)
    log_path = csv_path.with_suffix(".log")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, env=perf_analyzer_environment(), stdout=log, stderr=subprocess.STDOUT
        )
    written_at = None
    while process.poll() is None:
        now = time.perf_counter()
        if written_at is None and csv_path.exists() and csv_path.stat().st_size > 0:
            written_at = now
        if now - started > timeout_s or (written_at is not None and now - written_at > hang_grace_s):
            process.kill()
            process.wait()
            if written_at is None:
                raise PerfAnalyzerError(f"perf_analyzer on {options.model} ran past {timeout_s:.0f} s")
            break
        time.sleep(0.2)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = log_path.read_text(errors="replace")
    problem = explain_start_failure(output)
    if problem:
        raise PerfAnalyzerError(f"{binary} does not start: {problem}")
    # A CSV counts where the run ended well or hung after writing it; a failed run's stale CSV does not.
    written = csv_path.exists() and (process.returncode == 0 or written_at is not None)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    csv_text = csv_path.read_text() if written else None
    return _Finished(command, process.returncode, wall, cpu, output, csv_text)


# --- Input data ---------------------------------------------------------------------------------------


def write_input_data(path: Path, inputs: Mapping[str, np.ndarray], encoding: str = "b64") -> Path:
    """Write real rows as a perf_analyzer ``--input-data`` JSON file: one entry per row.

    ``inputs`` maps each model input to an array (rows, ...) in the dtype the model takes; every
    input has the same number of rows. Each entry carries one row (its shape without the batch
    axis); with ``-b R`` perf_analyzer sends R consecutive entries per request and cycles through
    the file, so each request carries R distinct real rows. ``encoding``: ``"b64"`` (raw bytes,
    exact and compact) or ``"content"`` (a flat list of numbers, readable).
    """
    arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise ValueError(f"inputs have different row counts: { {n: len(a) for n, a in arrays.items()} }")
    if encoding not in ("b64", "content"):
        raise ValueError(f"encoding must be 'b64' or 'content', not {encoding!r}")
    entries = []
    for row in range(counts.pop()):
        entry = {}
        for name, array in arrays.items():
            value = array[row]
            data = (
                {"b64": base64.b64encode(value.tobytes()).decode("ascii")}
                if encoding == "b64"
                else {"content": value.reshape(-1).tolist()}
            )
            entry[name] = {**data, "shape": list(value.shape)}
        entries.append(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": entries}))
    return path


def read_input_data(path: Path, dtypes: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The rows of a file :func:`write_input_data` wrote, as arrays (rows, ...) of ``dtypes``."""
    entries = json.loads(Path(path).read_text())["data"]
    out = {}
    for name, dtype in dtypes.items():
        rows = []
        for entry in entries:
            item = entry[name]
            flat = (
                np.frombuffer(base64.b64decode(item["b64"]), dtype=dtype)
                if "b64" in item
                else np.asarray(item["content"], dtype=dtype)
            )
            rows.append(flat.reshape(item["shape"]))
        out[name] = np.stack(rows)
    return out
