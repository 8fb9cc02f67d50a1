"""The CUDA kernels, compiled with g++ against tests/cuda_shim and run on the CPU, against the references.

The very .cu files the GPU runs: every CUDA thread is a fiber, shuffles and barriers are real
rendezvous, and every check runs with blocks and threads in forward, reversed and shuffled order
(cuda_shim.h says what the shim models and what it does not). Launches go through the real
``Launchers`` of offramp.kernels.cuda, so validation, argument order and launch geometry are covered.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from offramp.kernels.confidence import METRICS
from offramp.kernels.cuda import COMPACT_SOURCE, CONFIDENCE_SOURCE, ENTRY_POINTS, Launchers, RowLayout
from offramp.kernels.testing import (
    SentinelArrays,
    check_batch_invariance,
    check_compact,
    check_confidence,
    check_exit_rule,
    check_gather,
    check_partition,
    check_scatter,
    check_subnormal_thresholds,
    exit_masks,
    mixed_logits,
    row_tensors,
    run_confidence,
)
from tests.cuda_shim import Schedule, ShimLaunchError, ShimModule, build_shim_module

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the CPU shim with")

SCHEDULES = {
    "forward": (Schedule.FORWARD, 0),
    "reversed": (Schedule.REVERSE, 0),
    "shuffled": (Schedule.SHUFFLED, 20240607),
}


@pytest.fixture(scope="module")
def shim_modules(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, ShimModule]:
    build_dir = tmp_path_factory.mktemp("cuda_shim")
    modules = {}
    for source in (CONFIDENCE_SOURCE, COMPACT_SOURCE):
        entry_points = [name for name, defined_in in ENTRY_POINTS.items() if defined_in == source]
        modules[source] = build_shim_module(source, entry_points, build_dir)
    return modules


def shim_launchers(shim_modules: dict[Path, ShimModule], schedule: Schedule, seed: int) -> Launchers:
    """The real launchers over NumPy with sentinel-filled outputs, running kernels in the shim."""
    lookups = {source: module.kernels(schedule, seed) for source, module in shim_modules.items()}
    return Launchers(SentinelArrays(np), lambda name: lookups[ENTRY_POINTS[name]](name))


@pytest.fixture(params=list(SCHEDULES.values()), ids=list(SCHEDULES))
def launchers(request: pytest.FixtureRequest, shim_modules: dict[Path, ShimModule]) -> Launchers:
    """Launchers in each schedule, for everything where threads meet: reductions, scans, copies."""
    return shim_launchers(shim_modules, *request.param)


@pytest.fixture
def shuffled_launchers(shim_modules: dict[Path, ShimModule]) -> Launchers:
    """Launchers in one schedule, for per-row logic no interleaving can change once the reductions
    are checked in every schedule: the float16 load, the exit decision, argument handling."""
    return shim_launchers(shim_modules, *SCHEDULES["shuffled"])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


# ----------------------------------------------------------------------------------------------
# Confidence

# Class counts around the warp width and past the one-block-per-row switch (1024), each with a temperature.
CLASSES_AND_TEMPERATURES = [(1, 1.0), (2, 0.37), (10, 4.0), (33, 1.0), (1000, 0.37), (1500, 1.0), (4099, 2.5)]
LAYOUTS = {
    "default": None,  # row_layout_for(C): a warp per row up to 1024 classes, a 512-thread block beyond
    "warp, 2 rows a block": RowLayout(block_per_row=False, threads_per_block=64),
    "block of 3 warps": RowLayout(block_per_row=True, threads_per_block=96),
}


parametrize_rows = pytest.mark.parametrize(
    "num_classes, temperature",
    CLASSES_AND_TEMPERATURES,
    ids=[f"C={classes},T={temperature}" for classes, temperature in CLASSES_AND_TEMPERATURES],
)
parametrize_layouts = pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))


@parametrize_layouts
@parametrize_rows
def test_confidence_matches_reference(
    launchers: Launchers,
    rng: np.random.Generator,
    num_classes: int,
    temperature: float,
    layout: RowLayout | None,
) -> None:
    logits, kinds = mixed_logits(num_classes, rng)
    check_confidence(launchers, logits, kinds, temperature, layout)


@parametrize_layouts
@parametrize_rows
def test_confidence_of_float16_logits(
    shuffled_launchers: Launchers,
    rng: np.random.Generator,
    num_classes: int,
    temperature: float,
    layout: RowLayout | None,
) -> None:
    logits, kinds = mixed_logits(num_classes, rng)
    with np.errstate(over="ignore"):  # float16 turns the +-3e38 row into infinities: an invalid row
        logits = logits.astype(np.float16)
    check_confidence(shuffled_launchers, logits, kinds, temperature, layout)


def test_float16_every_binade(shuffled_launchers: Launchers, rng: np.random.Generator) -> None:
    """Random mantissas in every float16 exponent and sign, scaled so that their differences matter.

    A temperature of 64 units in the last place puts a binade's values 16 to 32 apart in z (0 to 16
    for subnormals), so a wrong exponent, mantissa or subnormal conversion moves every figure.
    """
    for exponent in range(31):
        mantissas = rng.integers(0, 1024, size=32, dtype=np.uint16)
        positive = (np.uint16(exponent) << 10) | mantissas
        bits = np.stack([positive, positive | np.uint16(0x8000)])  # (2, 32)
        unit_in_last_place = 2.0 ** (max(exponent, 1) - 25)
        kinds = [f"+2^{exponent - 15}", f"-2^{exponent - 15}"]
        check_confidence(shuffled_launchers, bits.view(np.float16), kinds, 64 * unit_in_last_place)


def test_float16_non_finite_patterns_make_rows_invalid(shuffled_launchers: Launchers) -> None:
    """All 2048 infinity and NaN bit patterns, 64 to a row: every row is invalid."""
    positive = np.uint16(0x7C00) | np.arange(1024, dtype=np.uint16)  # exponent all ones: inf and NaNs
    logits = np.concatenate([positive, positive | np.uint16(0x8000)]).reshape(32, 64).view(np.float16)
    got, exit_mask = run_confidence(shuffled_launchers, logits, threshold=0.0)
    assert (got.label == -1).all() and np.isnan(got.max_prob).all() and not exit_mask.any()


@pytest.mark.parametrize("never_exit", [False, True], ids=["no flags", "never-exit flags"])
@pytest.mark.parametrize("per_class", [False, True], ids=["scalar", "per class"])
@pytest.mark.parametrize("metric", METRICS)
def test_exit_rule(
    shuffled_launchers: Launchers, rng: np.random.Generator, metric: str, per_class: bool, never_exit: bool
) -> None:
    logits, _ = mixed_logits(33, rng)
    flags = (rng.random(logits.shape[0]) < 0.3).astype(np.uint8) if never_exit else None
    check_exit_rule(shuffled_launchers, logits, metric, per_class, flags, rng)


def test_a_threshold_one_subnormal_step_from_zero_holds_back_a_figure_of_zero(
    shuffled_launchers: Launchers,
) -> None:
    check_subnormal_thresholds(shuffled_launchers)


def test_never_exit_accepts_bool_and_integer_flags(
    shuffled_launchers: Launchers, rng: np.random.Generator
) -> None:
    logits, _ = mixed_logits(10, rng)
    held = rng.random(logits.shape[0]) < 0.5
    for flags in (held, held.astype(np.int32) * 3):
        _, exit_mask = run_confidence(shuffled_launchers, logits, threshold=0.0, never_exit=flags)
        assert not exit_mask[held].any()


def test_permissive_threshold_exits_valid_rows_only(
    shuffled_launchers: Launchers, rng: np.random.Generator
) -> None:
    logits, _ = mixed_logits(33, rng)
    got, exit_mask = run_confidence(shuffled_launchers, logits, metric="entropy", threshold=np.inf)
    np.testing.assert_array_equal(exit_mask.astype(bool), got.valid)


def test_batch_invariance(launchers: Launchers, rng: np.random.Generator) -> None:
    logits, _ = mixed_logits(40, rng)
    check_batch_invariance(launchers, logits, rng)


def test_empty_batch_launches_nothing() -> None:
    launchers = Launchers(SentinelArrays(np), lambda name: pytest.fail(f"launched {name} for an empty batch"))
    confidence, exit_mask = launchers.confidence(np.zeros((0, 5), np.float32), 1.0, "margin", 0.5)
    assert confidence.label.shape == exit_mask.shape == (0,)


@pytest.mark.parametrize(
    "logits, temperature, metric, threshold, never_exit, error",
    [
        (np.zeros((2, 3), np.float64), 1.0, "max_prob", 0.5, None, TypeError),
        (np.zeros((2, 3, 1), np.float32), 1.0, "max_prob", 0.5, None, ValueError),
        (np.zeros((2, 0), np.float32), 1.0, "max_prob", 0.5, None, ValueError),
        (np.zeros((2, 3), np.float32), 0.0, "max_prob", 0.5, None, ValueError),
        (np.zeros((2, 3), np.float32), np.nan, "max_prob", 0.5, None, ValueError),
        (np.zeros((2, 3), np.float32), 1.0, "top1", 0.5, None, ValueError),
        (np.zeros((2, 3), np.float32), 1.0, "max_prob", [0.5, 0.5], None, ValueError),
        (np.zeros((2, 3), np.float32), 1.0, "max_prob", 0.5, np.zeros(3, bool), ValueError),
    ],
    ids=["float64", "3-d", "no classes", "zero temperature", "NaN temp.", "metric", "threshold", "flags"],
)
def test_confidence_rejects_bad_arguments(logits, temperature, metric, threshold, never_exit, error) -> None:
    launchers = Launchers(SentinelArrays(np), lambda name: pytest.fail(f"launched {name} on bad arguments"))
    with pytest.raises(error):
        launchers.confidence(logits, temperature, metric, threshold, never_exit)


# ----------------------------------------------------------------------------------------------
# Compaction


@pytest.mark.parametrize("mask_kind", list(exit_masks(0, np.random.default_rng())))
@pytest.mark.parametrize("num_rows", [1, 31, 33, 1000, 3000])
def test_partition_rows(
    launchers: Launchers, rng: np.random.Generator, num_rows: int, mask_kind: str
) -> None:
    check_partition(launchers, exit_masks(num_rows, rng)[mask_kind])


def test_partition_of_empty_batch(launchers: Launchers) -> None:
    check_partition(launchers, np.zeros(0, np.uint8))


@pytest.mark.parametrize("tensor_kind", list(row_tensors(0, np.random.default_rng())))
def test_gather_rows(launchers: Launchers, rng: np.random.Generator, tensor_kind: str) -> None:
    src = row_tensors(50, rng)[tensor_kind]
    survivors = check_partition(launchers, exit_masks(50, rng)["random, nonzero means exit"])
    count = int(survivors.counts[0])
    check_gather(launchers, src, np.asarray(survivors.survivor_rows), count)  # count of a B-long buffer
    check_gather(launchers, src, rng.integers(0, 50, size=20), 13)  # unsorted, repeated, fewer than listed


@pytest.mark.parametrize("with_src_rows", [True, False], ids=["indexed source", "dense source"])
@pytest.mark.parametrize("tensor_kind", list(row_tensors(0, np.random.default_rng())))
def test_scatter_rows(
    launchers: Launchers, rng: np.random.Generator, tensor_kind: str, with_src_rows: bool
) -> None:
    src = row_tensors(30, rng)[tensor_kind]
    dst = row_tensors(80, rng)[tensor_kind]
    dst_rows = rng.permutation(80)[:25]
    src_rows = rng.permutation(30)[:25] if with_src_rows else None
    check_scatter(launchers, src, dst, dst_rows, 21, src_rows)


def test_row_copies_use_the_widest_unit_the_rows_and_addresses_allow(
    launchers: Launchers, rng: np.random.Generator
) -> None:
    launched: list[str] = []
    recording = Launchers(launchers.xp, lambda name: launched.append(name) or launchers.kernels(name))
    rows = np.array([3, 0, 2], dtype=np.int64)
    odd_address = np.zeros(4 * 16 + 1, np.uint8)[1:].reshape(4, 16)  # 16-byte rows at an odd address
    odd_address[:] = rng.integers(0, 256, size=(4, 16))
    cases = [
        (rng.normal(size=(4, 768)).astype(np.float16), "gather_rows_b16"),
        (rng.normal(size=(4, 3)).astype(np.float32), "gather_rows_b4"),
        (rng.integers(0, 9, size=(4, 3)).astype(np.int16), "gather_rows_b2"),
        (odd_address, "gather_rows_b1"),
    ]
    for src, kernel in cases:
        check_gather(recording, src, rows, rows.size)
        assert launched[-1] == kernel


def test_compact(launchers: Launchers, rng: np.random.Generator) -> None:
    tensors = list(row_tensors(70, rng).values())
    for exit_mask in exit_masks(70, rng).values():
        check_compact(launchers, exit_mask, tensors)


def test_launchers_import_without_cupy() -> None:
    """offramp.kernels.cuda imports CuPy only on first use, so CPU-only machines can import it."""
    code = "import sys, offramp.kernels.cuda; assert 'cupy' not in sys.modules, 'cupy imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# The shim itself: it must model shuffles faithfully and refuse what a GPU would not do reliably.

PROBE_SOURCE = textwrap.dedent(
    """
    extern "C" __global__ void shuffle_probe(int* out) {  // out (blockDim.x, 4)
        const int lane = threadIdx.x % 32;
        const int value = 1000 * blockIdx.x + threadIdx.x;
        out[4 * threadIdx.x + 0] = __shfl_xor_sync(0xffffffffu, value, 5);
        out[4 * threadIdx.x + 1] = __shfl_up_sync(0xffffffffu, value, 3);
        out[4 * threadIdx.x + 2] = __shfl_down_sync(0xffffffffu, value, 7);
        out[4 * threadIdx.x + 3] = __shfl_sync(0xffffffffu, value, 31 - lane);
    }

    extern "C" __global__ void divergent_shuffle(int* out) {
        if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
    }

    extern "C" __global__ void barrier_after_exit(int* out) {
        if (threadIdx.x == 0) return;
        __syncthreads();
        out[threadIdx.x] = 1;
    }

    extern "C" __global__ void unsynchronised_shared_read(int* out) {
        __shared__ int flag;
        if (threadIdx.x == 0) flag = 1 + blockIdx.x;
        out[threadIdx.x] = flag;  // a __syncthreads() is missing before this read
    }
    """
)


@pytest.fixture(scope="module")
def probe_module(tmp_path_factory: pytest.TempPathFactory) -> ShimModule:
    build_dir = tmp_path_factory.mktemp("shim_probe")
    source = build_dir / "probe.cu"
    source.write_text(PROBE_SOURCE)
    entry_points = ["shuffle_probe", "divergent_shuffle", "barrier_after_exit", "unsynchronised_shared_read"]
    return build_shim_module(source, entry_points, build_dir)


@pytest.mark.parametrize("schedule, seed", list(SCHEDULES.values()), ids=list(SCHEDULES))
def test_shim_shuffles_read_the_source_lane(probe_module: ShimModule, schedule: Schedule, seed: int) -> None:
    out = np.full((64, 4), -1, np.int32)
    probe_module.launch("shuffle_probe", (1,), (64,), [out], schedule=schedule, seed=seed)
    thread = np.arange(64)
    lane, warp_base = thread % 32, thread - thread % 32
    up, down = lane - 3, lane + 7
    np.testing.assert_array_equal(out[:, 0], warp_base + (lane ^ 5))
    # A source lane outside the warp gives the lane its own value.
    np.testing.assert_array_equal(out[:, 1], np.where(up >= 0, warp_base + up, thread))
    np.testing.assert_array_equal(out[:, 2], np.where(down < 32, warp_base + down, thread))
    np.testing.assert_array_equal(out[:, 3], warp_base + 31 - lane)


@pytest.mark.parametrize("kernel", ["divergent_shuffle", "barrier_after_exit"])
@pytest.mark.parametrize("schedule, seed", list(SCHEDULES.values()), ids=list(SCHEDULES))
def test_shim_refuses_sync_with_missing_threads(
    probe_module: ShimModule, kernel: str, schedule: Schedule, seed: int
) -> None:
    with pytest.raises(ShimLaunchError, match="deadlock|exited"):
        probe_module.launch(kernel, (1,), (64,), [np.zeros(64, np.int32)], schedule=schedule, seed=seed)


def test_shim_schedules_expose_a_missing_barrier(probe_module: ShimModule) -> None:
    """Thread 0 writes before the others read in forward order, after them in reversed order."""
    results = {}
    for schedule in (Schedule.FORWARD, Schedule.REVERSE):
        out = np.zeros(64, np.int32)
        probe_module.launch("unsynchronised_shared_read", (2,), (64,), [out], schedule=schedule)
        results[schedule] = out
    assert not np.array_equal(results[Schedule.FORWARD], results[Schedule.REVERSE])
