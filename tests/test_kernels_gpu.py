"""The CUDA kernels on a GPU through the CuPy launchers, against the references.

The checks of the CPU-shim tests (offramp.kernels.testing), now with NVRTC-compiled kernels, the
GPU's math library and FMA contraction, real warps and concurrent blocks, and sizes the shim is
too slow for. Skipped, with the reason, where CuPy or a CUDA device is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from offramp.kernels.confidence import METRICS
from offramp.kernels.cuda import (
    Launchers,
    RowLayout,
    compact_cuda,
    confidence_cuda,
    cupy_kernel,
    gather_rows_cuda,
    partition_rows_cuda,
    scatter_rows_cuda,
)
from offramp.kernels.testing import (
    SentinelArrays,
    assert_confidence_equal,
    check_batch_invariance,
    check_compact,
    check_confidence,
    check_exit_rule,
    check_gather,
    check_partition,
    check_scatter,
    check_subnormal_thresholds,
    confidence_to_host,
    exit_masks,
    mixed_logits,
    row_tensors,
    run_confidence,
    to_host,
)


def _no_gpu_reason() -> str | None:
    try:
        import cupy
    except ImportError as error:
        return f"CuPy is not installed ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError without a driver or device
        return f"no usable CUDA device ({error})"
    return None if count > 0 else "no CUDA device"


NO_GPU_REASON = _no_gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_GPU_REASON is not None, reason=str(NO_GPU_REASON))]


@pytest.fixture
def launchers() -> Launchers:
    """The CuPy launchers with sentinel-filled, guarded outputs."""
    import cupy

    return Launchers(SentinelArrays(cupy), cupy_kernel)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


LAYOUTS = {
    "default": None,
    "warp, 8 rows a block": RowLayout(block_per_row=False, threads_per_block=256),
    "block of 3 warps": RowLayout(block_per_row=True, threads_per_block=96),
    "block of 1024": RowLayout(block_per_row=True, threads_per_block=1024),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("num_classes", [1, 2, 10, 33, 1000, 1025, 4099, 32000, 50257])
def test_confidence_matches_reference(
    launchers: Launchers, rng: np.random.Generator, num_classes: int, layout: RowLayout | None, dtype: type
) -> None:
    logits, kinds = mixed_logits(num_classes, rng)
    with np.errstate(over="ignore"):  # float16 turns the +-3e38 row into infinities: an invalid row
        logits = logits.astype(dtype)
    for temperature in (1.0, 0.37, 2.5):
        check_confidence(launchers, logits, kinds, temperature, layout)


def test_confidence_of_a_large_batch(launchers: Launchers, rng: np.random.Generator) -> None:
    logits = np.concatenate([mixed_logits(1000, rng)[0] for _ in range(256)])  # (4352, 1000)
    check_confidence(launchers, logits, ["mixed"] * logits.shape[0], 1.0)


def test_float16_every_bit_pattern(launchers: Launchers) -> None:
    """All 65536 float16 patterns, each row a pattern next to zero: label, validity and max_prob follow."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    logits = np.stack([bits, np.zeros_like(bits)], axis=1).view(np.float16)  # (65536, 2)
    check_confidence(launchers, logits, ["pattern"] * bits.size, 1.0)


@pytest.mark.parametrize("never_exit", [False, True], ids=["no flags", "never-exit flags"])
@pytest.mark.parametrize("per_class", [False, True], ids=["scalar", "per class"])
@pytest.mark.parametrize("metric", METRICS)
def test_exit_rule(
    launchers: Launchers, rng: np.random.Generator, metric: str, per_class: bool, never_exit: bool
) -> None:
    for num_classes in (33, 4099):
        logits, _ = mixed_logits(num_classes, rng)
        flags = (rng.random(logits.shape[0]) < 0.3).astype(np.uint8) if never_exit else None
        check_exit_rule(launchers, logits, metric, per_class, flags, rng)


def test_a_threshold_one_subnormal_step_from_zero_holds_back_a_figure_of_zero(launchers: Launchers) -> None:
    """Fails on kernels compiled by CuPy's RawModule, which adds -ftz=true (seen on an H200)."""
    check_subnormal_thresholds(launchers)


def test_batch_invariance(launchers: Launchers, rng: np.random.Generator) -> None:
    for num_classes in (40, 3000):
        check_batch_invariance(launchers, mixed_logits(num_classes, rng)[0], rng)


@pytest.mark.parametrize("mask_kind", list(exit_masks(0, np.random.default_rng())))
@pytest.mark.parametrize("num_rows", [0, 1, 31, 33, 1000, 3000, 100_003])
def test_partition_rows(
    launchers: Launchers, rng: np.random.Generator, num_rows: int, mask_kind: str
) -> None:
    check_partition(launchers, exit_masks(num_rows, rng)[mask_kind])


@pytest.mark.parametrize("tensor_kind", list(row_tensors(0, np.random.default_rng())))
def test_gather_and_scatter_rows(launchers: Launchers, rng: np.random.Generator, tensor_kind: str) -> None:
    src = row_tensors(4096, rng)[tensor_kind]
    survivors = check_partition(launchers, exit_masks(4096, rng)["random, nonzero means exit"])
    check_gather(launchers, src, to_host(survivors.survivor_rows), int(survivors.counts[0]))
    check_gather(launchers, src, rng.integers(0, 4096, size=999), 777)
    dst = row_tensors(5000, rng)[tensor_kind]
    check_scatter(launchers, src, dst, rng.permutation(5000)[:3000], 2999, rng.permutation(4096)[:3000])
    check_scatter(launchers, src, dst, rng.permutation(5000)[:3000], 2999, None)


def test_compact(launchers: Launchers, rng: np.random.Generator) -> None:
    tensors = list(row_tensors(2048, rng).values())
    for exit_mask in exit_masks(2048, rng).values():
        check_compact(launchers, exit_mask, tensors)


def test_public_functions_return_cupy_arrays_and_agree(
    launchers: Launchers, rng: np.random.Generator
) -> None:
    """The module-level *_cuda functions are the same launchers bound to CuPy."""
    import cupy

    logits, _ = mixed_logits(100, rng)
    thresholds = rng.random(100).astype(np.float32)
    confidence, exit_mask = confidence_cuda(cupy.asarray(logits), 0.5, "margin", cupy.asarray(thresholds))
    want, want_mask = run_confidence(launchers, logits, 0.5, "margin", thresholds)
    assert isinstance(exit_mask, cupy.ndarray) and isinstance(confidence.label, cupy.ndarray)
    assert_confidence_equal(confidence_to_host(confidence), want)
    np.testing.assert_array_equal(to_host(exit_mask), want_mask)

    hidden = cupy.asarray(rng.normal(size=(want_mask.size, 64)).astype(np.float32))
    partition = partition_rows_cuda(exit_mask)
    survivors = int(partition.counts[0])
    gathered = gather_rows_cuda(hidden, partition.survivor_rows[:survivors], partition.num_survivors)
    np.testing.assert_array_equal(to_host(gathered), to_host(hidden)[want_mask == 0])
    restored = cupy.zeros_like(hidden)
    scatter_rows_cuda(gathered, restored, partition.survivor_rows[:survivors], partition.num_survivors)
    np.testing.assert_array_equal(to_host(restored)[want_mask == 0], to_host(hidden)[want_mask == 0])
    _, (compacted,) = compact_cuda(exit_mask, [hidden])
    np.testing.assert_array_equal(to_host(compacted), to_host(gathered))
