"""``offramp gpu-check`` (``make gpu-check``): the CUDA kernels and the device-resident cascade on a real GPU.

Installs nothing: it needs a Python with CuPy and NumPy. Installed, it is ``offramp gpu-check``; from a
checkout where offramp is not installed, it maps ``offramp.kernels`` and ``offramp.backend`` onto the
checkout's folders itself:

    python client/tools/gpu_check.py [--quick]

1. Kernel checks: the checks the CPU shim runs (``offramp.kernels.testing``), now with NVRTC-compiled
   kernels on the device, against the float64 references, plus the worst confidence error as a
   fraction of the bound the checks allow.
2. Speed: each kernel's median time against its memory-bandwidth floor, the bytes it must read and
   write over the device-to-device copy bandwidth measured here (CUDA events, medians).
3. The cascade on the device (CuPy arrays, ``xp=cupy``, the kernels deciding and moving rows) against
   the NumPy cascade, on a synthetic multi-exit network whose CuPy and NumPy matmuls are exact (small
   integers), so the two must agree bit for bit on exits, labels and logits.
4. A table. Exit status 0 when every check passed, 1 when one failed, 2 without CuPy or a CUDA device.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout: client/tools/gpu_check.py

NO_DEVICE_STATUS = 2


def _import_offramp() -> None:
    """offramp.kernels and offramp.backend: installed, or else from this checkout."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import offramp.backend.cascade
        import offramp.kernels.cuda  # noqa: F401

        return
    except ImportError:
        pass
    package = sys.modules.setdefault("offramp", types.ModuleType("offramp"))
    package.__path__ = []
    for name, folder in {"kernels": "kernels", "backend": "python_backend"}.items():
        spec = importlib.util.spec_from_file_location(
            f"offramp.{name}", ROOT / folder / "__init__.py", submodule_search_locations=[str(ROOT / folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)


def no_device_reason() -> str | None:
    """Why there is nothing to check here, or None where CuPy sees a CUDA device."""
    try:
        import cupy
    except ImportError as error:
        return f"CuPy is not installed ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 (CUDARuntimeError without a driver or a device)
        return f"{type(error).__name__}: {error}"
    return None if count > 0 else "0 devices visible"


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    section: str
    name: str
    ok: bool | None  # None: a measurement, not a pass/fail check
    detail: str


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def check(self, section: str, name: str, body: Callable[[], str | None]) -> None:
        """Runs ``body``; a raised exception fails the row (its message kept), a string is its detail."""
        start = time.perf_counter()
        try:
            detail = body() or ""
            ok = True
        except Exception as error:  # noqa: BLE001 (every failure is reported, then the next check runs)
            detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]
            traceback.print_exc(file=sys.stderr)
            ok = False
        took = time.perf_counter() - start
        self.rows.append(Row(section, name, ok, f"{detail} ({took:.1f} s)".strip()))
        print(f"[{'ok' if ok else 'FAIL'}] {section}: {name} {detail}", flush=True)

    def measure(self, section: str, name: str, detail: str) -> None:
        self.rows.append(Row(section, name, None, detail))
        print(f"[--] {section}: {name} {detail}", flush=True)

    @property
    def failed(self) -> int:
        return sum(1 for row in self.rows if row.ok is False)

    def table(self) -> str:
        width = max(len(f"{r.section}: {r.name}") for r in self.rows) if self.rows else 10
        lines = [f"{'check':<{width}}  {'result':<6}  detail", "-" * (width + 60)]
        for r in self.rows:
            result = "-" if r.ok is None else ("ok" if r.ok else "FAIL")
            lines.append(f"{r.section + ': ' + r.name:<{width}}  {result:<6}  {r.detail}")
        passed = sum(1 for r in self.rows if r.ok)
        lines.append(f"{passed} checks passed, {self.failed} failed")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 1. Kernel checks on the device


@dataclass(frozen=True)
class CheckSizes:
    classes: tuple[int, ...]  # class counts of the confidence checks
    float16_patterns: int  # how many of the 65536 float16 bit patterns (evenly spaced)
    error_batches: int  # batches of mixed rows (17 each, C=1000) for the error-against-bound figure
    exit_rule_classes: tuple[int, ...]
    partition_rows: tuple[int, ...]
    copy_rows: int  # rows of the gather and scatter checks


SIZES = {
    "full": CheckSizes(
        (1, 2, 10, 33, 1000, 1025, 4099, 32000, 50257),
        65536,
        64,
        (33, 4099),
        (0, 1, 31, 33, 1000, 3000, 100_003),
        4096,
    ),
    "quick": CheckSizes(
        (1, 2, 10, 33, 1000, 4099), 65536, 64, (33, 4099), (0, 1, 31, 33, 1000, 3000, 100_003), 4096
    ),
    # For the CPU shim (a test runs the script's checks there): the same checks, at sizes a CPU gets through.
    "smoke": CheckSizes((1, 33, 1025), 2048, 2, (33,), (0, 1, 33, 3000), 512),
}


def kernel_checks(report: Report, sizes: CheckSizes, xp: Any = None, kernel: Callable | None = None) -> None:
    """The checks, with ``xp`` and ``kernel`` CuPy and ``cupy_kernel`` unless given (tests run this
    function with NumPy and the CPU shim's kernels, to check the script itself)."""
    import numpy as np

    from offramp.kernels import testing as kc
    from offramp.kernels.confidence import METRICS, confidence_reference
    from offramp.kernels.cuda import Launchers, RowLayout, cupy_kernel

    if xp is None:
        import cupy as xp

        kernel = cupy_kernel
        report.check("compile", "NVRTC, every entry point", _compile_all)

    def launchers() -> Launchers:
        return Launchers(kc.SentinelArrays(xp), kernel)

    rng = np.random.default_rng(11)
    layouts = [
        None,
        RowLayout(block_per_row=False, threads_per_block=256),
        RowLayout(block_per_row=True, threads_per_block=96),
        RowLayout(block_per_row=True, threads_per_block=1024),
    ]

    def confidence_cases(num_classes: int) -> Callable[[], str]:
        def run() -> str:
            logits, kinds = kc.mixed_logits(num_classes, rng)
            cases = 0
            for dtype in (np.float32, np.float16):
                with np.errstate(over="ignore"):
                    typed = logits.astype(dtype)
                for layout in layouts:
                    for temperature in (1.0, 0.37, 2.5):
                        kc.check_confidence(launchers(), typed, kinds, temperature, layout)
                        cases += 1
            return f"{cases} cases (f32, f16; 4 layouts; 3 temperatures)"

        return run

    for num_classes in sizes.classes:
        report.check(
            "confidence", f"C={num_classes}, peaked/flat/outlier/NaN rows", confidence_cases(num_classes)
        )

    def every_float16() -> str:
        bits = np.arange(0, 2**16, 2**16 // sizes.float16_patterns, dtype=np.uint32).astype(np.uint16)
        logits = np.stack([bits, np.zeros_like(bits)], axis=1).view(np.float16)
        kc.check_confidence(launchers(), logits, ["pattern"] * bits.size, 1.0)
        return f"{bits.size} patterns"

    report.check("confidence", "every float16 bit pattern", every_float16)

    def error_against_bound() -> str:
        logits = np.concatenate([kc.mixed_logits(1000, rng)[0] for _ in range(sizes.error_batches)])
        got, _ = kc.run_confidence(launchers(), logits, 0.37)
        kc.assert_confidence_close(got, logits, 0.37, ["mixed"] * logits.shape[0])
        # The same tolerances as assert_confidence_close, reported as the worst fraction used.
        want = confidence_reference(kc.scaled_logits(logits, 0.37).astype(np.float64))
        valid, rel = want.valid, kc.relative_error_bound(1000)
        gap = want.entropy + np.log(want.max_prob)
        tolerances = {
            "max_prob": rel * want.max_prob,
            "margin": rel * want.max_prob,
            "entropy": rel * (1 + np.log(1000) + 2 * gap),
        }
        used = {
            figure: float(
                np.max(np.abs(getattr(got, figure)[valid] - getattr(want, figure)[valid]) / tolerance[valid])
            )
            for figure, tolerance in tolerances.items()
        }
        return "worst |device - float64| / tolerance: " + ", ".join(f"{k} {v:.3f}" for k, v in used.items())

    figure = f"error vs float64 reference, {17 * sizes.error_batches}x1000"
    report.check("confidence", figure, error_against_bound)

    def exit_rules() -> str:
        cases = 0
        for metric in METRICS:
            for per_class in (False, True):
                for never_exit in (False, True):
                    for num_classes in sizes.exit_rule_classes:
                        logits, _ = kc.mixed_logits(num_classes, rng)
                        flags = (rng.random(logits.shape[0]) < 0.3).astype(np.uint8) if never_exit else None
                        kc.check_exit_rule(launchers(), logits, metric, per_class, flags, rng)
                        cases += 1
        return f"{cases} cases at the thresholds' exact boundaries"

    report.check("confidence", "exit rule: metrics, per-class, never-exit", exit_rules)
    report.check(
        "confidence",
        "exit rule: subnormal thresholds (no flush-to-zero)",
        lambda: kc.check_subnormal_thresholds(launchers()),
    )

    def batch_invariance() -> str:
        for num_classes in (40, 3000):
            kc.check_batch_invariance(launchers(), kc.mixed_logits(num_classes, rng)[0], rng)
        return "alone = in a batch = compacted, bit for bit"

    report.check("confidence", "batch invariance", batch_invariance)

    def partitions() -> str:
        for rows in sizes.partition_rows:
            for mask in kc.exit_masks(rows, rng).values():
                kc.check_partition(launchers(), mask)
        return f"B in {sizes.partition_rows}, 5 mask kinds"

    report.check("compaction", "partition (scan)", partitions)

    def gathers_and_scatters() -> str:
        rows = sizes.copy_rows
        for kind, src in kc.row_tensors(rows, rng).items():
            survivors = kc.check_partition(
                launchers(), kc.exit_masks(rows, rng)["random, nonzero means exit"]
            )
            kc.check_gather(launchers(), src, kc.to_host(survivors.survivor_rows), int(survivors.counts[0]))
            kc.check_gather(launchers(), src, rng.integers(0, rows, size=rows // 4), rows // 5)
            dst = kc.row_tensors(rows + 900, rng)[kind]
            kc.check_scatter(
                launchers(),
                src,
                dst,
                rng.permutation(rows + 900)[: rows // 2],
                rows // 2 - 1,
                rng.permutation(rows)[: rows // 2],
            )
            kc.check_scatter(
                launchers(), src, dst, rng.permutation(rows + 900)[: rows // 2], rows // 2 - 1, None
            )
        return f"7 row types (1 to 1536 bytes), {rows} rows"

    report.check("compaction", "gather and scatter rows", gathers_and_scatters)

    def compaction() -> str:
        tensors = list(kc.row_tensors(sizes.copy_rows // 2, rng).values())
        for mask in kc.exit_masks(sizes.copy_rows // 2, rng).values():
            kc.check_compact(launchers(), mask, tensors)
        return "5 masks x 7 tensors"

    report.check("compaction", "compact (partition + gathers)", compaction)


def _compile_all() -> str:
    from offramp.kernels.cuda import ENTRY_POINTS, cupy_kernel

    for name in ENTRY_POINTS:
        cupy_kernel(name)
    return f"{len(ENTRY_POINTS)} kernels"


# ----------------------------------------------------------------------------------------------
# 2. Speed against the memory-bandwidth floor


def time_on_device(launch: Callable[[], None], launches: int = 10, repeats: int = 7) -> float:
    """Median seconds per launch: ``repeats`` runs of ``launches`` back-to-back launches between two
    CUDA events (back to back, the GPU does not wait for Python between launches of large kernels)."""
    import cupy

    launch()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(launches):
            launch()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1000 / launches)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 512 << 20) -> float:
    """Device-to-device copy bandwidth in bytes per second, counting each byte read and written."""
    import cupy

    src = cupy.ones(nbytes, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    runtime = cupy.cuda.runtime

    def copy() -> None:
        runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, runtime.memcpyDeviceToDevice, 0)

    return 2 * nbytes / time_on_device(copy, launches=5)


def recorded_launch(call: Callable[[Any], Any]) -> Callable[[], None]:
    """The one kernel launch ``call(launchers)`` makes, as a function that repeats exactly that launch."""
    import cupy

    from offramp.kernels.cuda import Launchers, cupy_kernel

    launched: list[tuple] = []

    def lookup(name: str) -> Callable:
        kernel = cupy_kernel(name)
        return lambda grid, block, args: (
            launched.append((kernel, grid, block, args)) or kernel(grid, block, args)
        )

    call(Launchers(cupy, lookup))
    if len(launched) != 1:
        raise RuntimeError(f"expected one launch, saw {len(launched)}")
    kernel, grid, block, args = launched[0]
    return lambda: kernel(grid, block, args)


def speed(report: Report, quick: bool) -> None:
    import cupy
    import numpy as np

    bandwidth = copy_bandwidth(128 << 20 if quick else 512 << 20)
    report.measure("speed", "device-to-device copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s (read + write)")
    rng = np.random.default_rng(3)

    def confidence_case(rows: int, classes: int, dtype: Any) -> tuple[Callable, int]:
        logits = cupy.asarray(rng.normal(size=(rows, classes)).astype(dtype))
        moved = logits.nbytes + rows * (3 * 4 + 8 + 1)  # logits in; three figures, label, mask out
        return recorded_launch(lambda launchers: launchers.confidence(logits, 1.0, "max_prob", 0.9)), moved

    def partition_case(rows: int) -> tuple[Callable, int]:
        mask = cupy.asarray((rng.random(rows) < 0.4).astype(np.uint8))
        moved = rows * (1 + 8) + 8  # the mask in; every row's index out once; the counts
        return recorded_launch(lambda launchers: launchers.partition_rows(mask)), moved

    def gather_case(rows: int, row_shape: tuple, dtype: Any) -> tuple[Callable, int]:
        src = cupy.asarray(rng.normal(size=(rows, *row_shape)).astype(dtype))
        survivors = cupy.asarray(np.sort(rng.choice(rows, rows // 2, replace=False)))
        count = cupy.asarray(np.array([rows // 2], np.int32))
        moved = (rows // 2) * (2 * (src.nbytes // rows) + 8)  # each survivor read and written, its index read
        return recorded_launch(lambda launchers: launchers.gather_rows(src, survivors, count)), moved

    def scatter_case(rows: int, classes: int) -> tuple[Callable, int]:
        src = cupy.asarray(rng.normal(size=(rows, classes)).astype(np.float32))
        dst = cupy.zeros((2 * rows, classes), dtype=cupy.float32)
        positions = cupy.asarray(rng.permutation(2 * rows)[:rows])
        count = cupy.asarray(np.array([rows], np.int32))
        moved = rows * (2 * classes * 4 + 8)
        return recorded_launch(lambda launchers: launchers.scatter_rows(src, dst, positions, count)), moved

    n = 4 if quick else 1
    cases = [
        (f"confidence float32 {8192 // n}x1000", lambda: confidence_case(8192 // n, 1000, np.float32)),
        (f"confidence float16 {8192 // n}x1000", lambda: confidence_case(8192 // n, 1000, np.float16)),
        (
            f"confidence float32 {512 // n}x32000 (block per row)",
            lambda: confidence_case(512 // n, 32000, np.float32),
        ),
        (f"confidence float32 {65536 // n}x10", lambda: confidence_case(65536 // n, 10, np.float32)),
        (f"partition {65536 // n} rows (one block)", lambda: partition_case(65536 // n)),
        (
            f"gather {4096 // n} of {8192 // n} rows of 768 float16",
            lambda: gather_case(8192 // n, (768,), np.float16),
        ),
        (
            f"gather {1024 // n} of {2048 // n} rows of 64x384 float32",
            lambda: gather_case(2048 // n, (64, 384), np.float32),
        ),
        (f"scatter {4096 // n} rows of 1000 float32", lambda: scatter_case(4096 // n, 1000)),
    ]
    for name, make in cases:

        def run(make: Callable = make) -> str:
            launch, moved = make()
            seconds = time_on_device(launch)
            floor = moved / bandwidth
            return (
                f"{seconds * 1e6:8.1f} us, floor {floor * 1e6:7.1f} us ({floor / seconds:6.1%} of bandwidth)"
            )

        report.check("speed", name, run)


# ----------------------------------------------------------------------------------------------
# 3. The cascade on the device against NumPy


@dataclass
class ExactNetwork:
    """A multi-exit network whose arithmetic is exact in float32 on any device: small integer inputs
    and weights, hidden states clipped to 0..15, logits in multiples of 1/64. CuPy's matmuls (cuBLAS)
    and NumPy's then agree bit for bit, so the two cascades must as well."""

    features: int = 64
    hidden: int = 256
    mask_width: int = 8
    num_classes: int = 10
    num_exits: int = 4
    seed: int = 5
    weights: list = field(default_factory=list)

    def __post_init__(self) -> None:
        import numpy as np

        rng = np.random.default_rng(self.seed)

        def ternary(*shape: int) -> Any:
            return rng.integers(-1, 2, size=shape).astype(np.float32)

        for k in range(self.num_exits):
            fan_in = self.features if k == 0 else self.hidden
            # Later exits scale their logits up (sharper, as a trained network's are), set so that the
            # rows spread over all exits at a max-prob threshold of 0.9.
            scale = np.float32(2.0 ** (k + (-5 if self.num_classes < 100 else -4)))
            self.weights.append(
                (
                    ternary(fan_in, self.hidden),
                    ternary(self.mask_width, self.hidden),
                    ternary(self.hidden, self.num_classes),
                    scale,
                )
            )

    def inputs(self, rows: int) -> dict[str, Any]:
        import numpy as np

        rng = np.random.default_rng(self.seed + 1)
        return {
            "X": rng.integers(-3, 4, size=(rows, self.features)).astype(np.float32),
            "MASK": (rng.random((rows, self.mask_width)) < 0.5).astype(np.int64),
        }

    def segment(self, xp: Any) -> Callable:
        weights = [tuple(xp.asarray(w) for w in layer[:3]) + (layer[3],) for layer in self.weights]

        def run_segment(index: int, tensors: dict, need_hidden: bool) -> tuple:
            previous = tensors["X"] if index == 0 else tensors["hidden_in"]  # (n, F) or (n, H)
            w, m, v, scale = weights[index]
            mask = tensors["MASK"].astype(xp.float32)  # (n, 8)
            hidden = xp.clip(previous @ w + mask @ m, 0, 15)  # (n, H) integers
            logits = (hidden @ v) * scale  # (n, C) integers times a power of two: exact
            return (hidden if need_hidden else None), logits.astype(xp.float32)

        return run_segment

    def full(self, xp: Any) -> Callable:
        run_segment = self.segment(xp)

        def run_full(tensors: dict) -> Any:
            current = dict(tensors)
            for index in range(self.num_exits):
                hidden, logits = run_segment(index, current, True)
                current = {"hidden_in": hidden, "MASK": tensors["MASK"]}
            return logits

        return run_full


def cascade_scenarios(rows: int, num_exits: int) -> list[tuple[str, dict[str, Any], Any]]:
    """(name, CascadeBatch fields but the inputs, policy): max-prob; cohorts with their own metric and
    temperature; forced rows, minimum and maximum exits."""
    import numpy as np

    from offramp.backend.policy import ExitRule, Policy

    plain_policy = Policy("gpu-check", "fp", (ExitRule("max_prob", 0.9),) * num_exits)
    cohorts = Policy(
        "gpu-check",
        "fp",
        (ExitRule("entropy", 0.4, temperature=1.5),) * num_exits,
        cohorts={"strict": (ExitRule("margin", 0.8, temperature=0.7),) * num_exits},
    )
    positions = np.arange(rows)

    def batch(**overrides: Any) -> Any:
        fields = {
            "force_full": np.zeros(rows, bool),
            "min_exit": np.zeros(rows, np.int64),
            "max_exit": np.full(rows, num_exits - 1, np.int64),
        }
        return fields | overrides

    return [
        ("max-prob", batch(), plain_policy),
        ("cohorts, temperatures", batch(rule_set=positions % 2), cohorts),
        (
            "forced rows, min/max exit",
            batch(
                force_full=positions % 17 == 0,
                min_exit=(positions % 5 == 0).astype(np.int64),
                max_exit=np.where(positions % 7 == 0, 1, num_exits - 1),
            ),
            plain_policy,
        ),
    ]


def compare_cascades(device_xp: Any, kernels: Any, rows: int, num_classes: int) -> str:
    """The device cascade (``DeviceCascade(device_xp, kernels)``) against the NumPy one, on every scenario.

    Raises AssertionError where they differ; returns a summary. ``device_xp`` is CuPy on the GPU
    (tests call it with NumPy and the CPU shim's kernels, to check this function itself).
    """
    import numpy as np

    from offramp.backend.cascade import CascadeBatch, run_cascade
    from offramp.backend.device import DeviceCascade
    from offramp.kernels.testing import relative_error_bound

    net = ExactNetwork(num_classes=num_classes)
    inputs = net.inputs(rows)
    costs = tuple((k + 1) / net.num_exits for k in range(net.num_exits))
    host_segment, host_full = net.segment(np), net.full(np)
    foreign: list[str] = []
    device_segment, device_full = net.segment(device_xp), net.full(device_xp)

    def device_run_segment(index: int, tensors: dict, need_hidden: bool) -> tuple:
        for name, tensor in tensors.items():
            if not isinstance(tensor, device_xp.ndarray):
                foreign.append(f"segment {index} got {name} as {type(tensor).__name__}")
        return device_segment(index, tensors, need_hidden)

    summaries = []
    device = DeviceCascade(device_xp, kernels)
    bound = 2 * relative_error_bound(num_classes) * (1 + math.log(num_classes))
    for name, fields, policy in cascade_scenarios(rows, net.num_exits):
        batch = CascadeBatch(inputs=inputs, **fields)
        common = {"policy": policy, "exit_costs": costs, "side_inputs": ("MASK",)}
        want = run_cascade(batch, host_segment, run_full=host_full, **common)
        got = device(batch, device_run_segment, run_full=device_full, **common)
        assert not foreign, f"{name}: host arrays reached a segment: {foreign[:3]}"
        for field_name in ("exit", "label", "logits", "flags", "cost", "policy_exit"):
            got_field, want_field = getattr(got, field_name), getattr(want, field_name)  # both on the host
            np.testing.assert_array_equal(got_field, want_field, err_msg=f"{name}: {field_name}")
        assert got.rows_per_segment == want.rows_per_segment, (name, got.rows_per_segment)
        np.testing.assert_allclose(got.confidence, want.confidence, rtol=bound, atol=bound, err_msg=name)
        exits = np.bincount(want.exit, minlength=net.num_exits)
        summaries.append(f"{name}: exits {'/'.join(map(str, exits))}")
    return f"{rows} rows, C={num_classes}: " + "; ".join(summaries)


def cascade_checks(report: Report, quick: bool) -> None:
    import cupy
    import numpy as np

    from offramp.backend.cascade import CascadeBatch, run_cascade
    from offramp.backend.device import DeviceCascade
    from offramp.kernels.cuda import cupy_launchers

    rows = 2048 if quick else 8192
    for num_classes in (10, 1000):
        report.check(
            "cascade",
            f"device (CuPy + kernels) = NumPy, C={num_classes}",
            lambda c=num_classes: compare_cascades(cupy, cupy_launchers(), rows, c),
        )

    def timing() -> str:
        from offramp.backend.policy import ExitRule, Policy

        net = ExactNetwork(num_classes=1000)
        inputs = net.inputs(rows)
        batch = CascadeBatch.plain(inputs, net.num_exits)
        policy = Policy("gpu-check", "fp", (ExitRule("max_prob", 0.9),) * net.num_exits)
        costs = tuple((k + 1) / net.num_exits for k in range(net.num_exits))
        device = DeviceCascade(cupy, cupy_launchers())
        device_segment = net.segment(cupy)

        def on_device() -> None:
            device(batch, device_segment, policy, costs, ("MASK",))
            cupy.cuda.Device().synchronize()

        host_segment = net.segment(np)
        seconds = {}
        for name, run in (
            ("device", on_device),
            ("NumPy", lambda: run_cascade(batch, host_segment, policy, costs, ("MASK",))),
        ):
            run()
            samples = []
            for _ in range(3 if quick else 7):
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            seconds[name] = statistics.median(samples)
        return (
            f"{rows} rows x 4 segments, C=1000: device {seconds['device'] * 1e3:.1f} ms "
            f"(upload, cascade, download), NumPy {seconds['NumPy'] * 1e3:.1f} ms"
        )

    report.check("cascade", "wall time, median", timing)


# ----------------------------------------------------------------------------------------------


def describe_device() -> str:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    memory = props["totalGlobalMem"] / 2**30
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    return (
        f"{name}, sm_{props['major']}{props['minor']}, {memory:.0f} GiB; CuPy {cupy.__version__}, "
        f"CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}"
    )


def run_gpu_check(quick: bool = False) -> int:
    """Every section, then the table; the exit status (0 passed, 1 a check failed, 2 no device)."""
    reason = no_device_reason()
    if reason is not None:
        print(f"gpu-check: no CUDA device ({reason}); nothing was checked.", file=sys.stderr)
        return NO_DEVICE_STATUS
    _import_offramp()
    from offramp.kernels.cuda import load_pip_nvrtc

    load_pip_nvrtc()
    print(f"gpu-check on {describe_device()}", flush=True)
    report = Report()
    started = time.perf_counter()
    sections = {
        "kernel checks": lambda: kernel_checks(report, SIZES["quick" if quick else "full"]),
        "speed": lambda: speed(report, quick),
        "cascade": lambda: cascade_checks(report, quick),
    }
    for name, section in sections.items():
        try:
            section()
        except Exception as error:  # noqa: BLE001 (a section that cannot even start is one failed row)
            traceback.print_exc(file=sys.stderr)
            report.rows.append(Row(name, "could not run", False, f"{type(error).__name__}: {error}"[:160]))
    print()
    print(report.table())
    print(f"({time.perf_counter() - started:.0f} s)")
    return 1 if report.failed else 0


if __name__ == "__main__":  # from a checkout, offramp not installed: python client/tools/gpu_check.py
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    raise SystemExit(run_gpu_check(parser.parse_args().quick))
