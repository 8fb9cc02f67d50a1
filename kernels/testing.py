"""Checks of the CUDA kernels against their references, shared by the CPU-shim and the GPU tests.

Every check takes a ``Launchers`` (offramp.kernels.cuda) over NumPy and the CPU shim, or over CuPy
and the GPU, with a ``SentinelArrays`` array module; builds its inputs with NumPy; and compares the
outputs with the references in confidence.py and compact.py. One body, two array modules.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import numpy as np

from offramp.kernels.compact import (
    RowPartition,
    gather_rows_reference,
    partition_rows_reference,
    scatter_rows_reference,
)
from offramp.kernels.confidence import Confidence, confidence_reference, exits_by_threshold
from offramp.kernels.cuda import Launchers, RowLayout

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23
SENTINEL_BYTE = 0xAB  # fills outputs before a launch: as float32 -1.2e-12, as int64 negative, as uint8 171
GUARD_BYTES = 64  # sentinel bytes before and after every output; a multiple of 16 keeps 16-byte alignment


def to_host(array: Any) -> np.ndarray:
    """A NumPy copy or view of a CuPy or NumPy array."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


class SentinelArrays:
    """An array module (NumPy or CuPy) whose ``empty`` arrays are full of sentinels and guarded.

    Every ``empty`` array is filled with SENTINEL_BYTE and sits between GUARD_BYTES of sentinels: a
    kernel that skips an output element leaves a sentinel for the comparison to catch, and one that
    writes out of bounds changes a guard, which ``check_guards`` reports. Everything else is ``xp``'s.
    """

    def __init__(self, xp: Any) -> None:
        self._xp = xp
        self._storages: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xp, name)

    def empty(self, shape: Any, dtype: Any = float) -> Any:
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        storage = self._xp.full(GUARD_BYTES + nbytes + GUARD_BYTES, SENTINEL_BYTE, dtype=np.uint8)
        self._storages.append(storage)
        return storage[GUARD_BYTES : GUARD_BYTES + nbytes].view(dtype).reshape(shape)

    def check_guards(self) -> None:
        for storage in self._storages:
            storage = to_host(storage)
            guards = np.concatenate([storage[:GUARD_BYTES], storage[-GUARD_BYTES:]])
            assert (guards == SENTINEL_BYTE).all(), "a kernel wrote outside an output buffer"


def assert_untouched(array: Any, description: str) -> None:
    """Every byte of ``array`` (a slice of a SentinelArrays output) still holds the sentinel."""
    data = np.ascontiguousarray(to_host(array)).view(np.uint8)
    assert (data == SENTINEL_BYTE).all(), f"{description} was written"


# ----------------------------------------------------------------------------------------------
# Confidence


def mixed_logits(num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Logits (B, C) float32, one row of each kind that breaks a softmax kernel, and the kinds."""
    size = num_classes

    def noise() -> np.ndarray:
        return rng.normal(size=size)

    def with_value_at_random_index(value: float) -> np.ndarray:
        row = noise()
        row[rng.integers(size)] = value
        return row

    def tied_top(indices: Any) -> np.ndarray:
        row = noise()
        row[indices] = row.max() + 1.0
        return row

    rows = {
        "normal": noise(),
        "peaked": with_value_at_random_index(20.0),
        "saturated": with_value_at_random_index(120.0),  # the others' exp underflows in float32
        "flat": np.full(size, 3.0),  # every class ties: label 0, margin 0, entropy log C
        "near-flat": 1e-3 * noise(),
        "outliers": np.clip(5.0 * rng.standard_cauchy(size), -1e4, 1e4),
        "tied top, random places": tied_top(rng.choice(size, min(size, 2), replace=False)),
        "tied top, first and last": tied_top([0, size - 1]),
        "large offset": 1e4 + noise(),
        "very negative": noise() - 1e4,
        "ascending": np.linspace(-5.0, 5.0, size),  # each logit a new maximum: a rescale at every step
        "descending": np.linspace(5.0, -5.0, size),
        "extreme range": rng.choice([-3e38, 3e38], size),  # z - max overflows to -inf in float32
        "nan": with_value_at_random_index(np.nan),
        "+inf": with_value_at_random_index(np.inf),
        "-inf": with_value_at_random_index(-np.inf),
        "normal, again": noise(),  # an odd batch size leaves the last block of rows partly empty
    }
    return np.stack(list(rows.values())).astype(np.float32), list(rows)


def scaled_logits(logits: np.ndarray, temperature: float) -> np.ndarray:
    """z = logits / temperature in float32, as the contract says, for the float64 reference."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow and NaN rows are part of the test data
        return logits.astype(np.float32) / np.float32(temperature)


def relative_error_bound(num_classes: int) -> float:
    """Bound on the kernel's relative error in s = sum exp(z - max), from which all figures follow.

    A thread folds ceil(C / 32) logits (fewer with a block per row), then at most 10 merges follow
    (5 across a warp, 5 across warps). Each step rounds an exp (within 2 ulp on the GPU), a product
    and a sum, each relative to the running sum: at most 3 eps per step, the constant 32 covering
    the merges, logf and the final division. The reference sees the same float32 z, so the bound
    covers arithmetic only, worst case; on the CPU shim the errors stay below 4% of it.
    """
    return (3 * math.ceil(num_classes / 32) + 32) * FLOAT32_EPS


def confidence_to_host(confidence: Confidence) -> Confidence:
    """Host copies of every field."""
    return Confidence(*(to_host(getattr(confidence, field.name)) for field in fields(Confidence)))


def assert_confidence_close(
    got: Confidence, logits: np.ndarray, temperature: float, kinds: list[str]
) -> None:
    """Kernel figures (host arrays) against the float64 reference on the same float32 z."""
    want = confidence_reference(scaled_logits(logits, temperature).astype(np.float64))
    np.testing.assert_array_equal(got.label, want.label, err_msg=f"labels of rows {kinds}")
    valid = want.valid
    for figure in ("max_prob", "entropy", "margin"):
        values = getattr(got, figure)
        assert values.dtype == np.float32, figure
        assert np.isnan(values[~valid]).all(), f"{figure} of invalid rows must be NaN"
    rel = relative_error_bound(logits.shape[1])
    gap = want.entropy + np.log(want.max_prob)  # E[max - z] = -t / s, which scales the entropy's error
    tolerances = {
        "max_prob": rel * want.max_prob,
        "margin": rel * want.max_prob,  # (1 - exp(z2 - max)) / s: both parts' errors scale with 1 / s
        "entropy": rel * (1 + np.log(logits.shape[1]) + 2 * gap),  # log(s) - t / s
    }
    for figure, tolerance in tolerances.items():
        error = np.abs(getattr(got, figure)[valid].astype(np.float64) - getattr(want, figure)[valid])
        excess = error - tolerance[valid]
        worst = int(np.argmax(excess))
        assert excess[worst] <= 0, (
            f"{figure} of row {np.flatnonzero(valid)[worst]} ({np.array(kinds)[valid][worst]}) is off by "
            f"{error[worst]:.3g}, tolerance {tolerance[valid][worst]:.3g}"
        )


def run_confidence(
    launchers: Launchers,
    logits: np.ndarray,
    temperature: float = 1.0,
    metric: str = "max_prob",
    threshold: Any = 0.5,
    never_exit: np.ndarray | None = None,
    layout: RowLayout | None = None,
) -> tuple[Confidence, np.ndarray]:
    """Runs the confidence launcher on device copies of the inputs; returns host copies of its outputs.

    Also checks what holds for every launch: the logits are unchanged, no output was written out of
    bounds, and the exit mask is 0 or 1 and follows ``exits_by_threshold`` on the kernel's own figures
    (so the decision is checked exactly, boundary included, without float32-vs-float64 flips).
    """
    xp = launchers.xp
    device_logits = xp.asarray(logits)
    device_never_exit = None if never_exit is None else xp.asarray(never_exit)
    device_threshold = threshold if np.ndim(threshold) == 0 else xp.asarray(threshold)
    confidence, exit_mask = launchers.confidence(
        device_logits, temperature, metric, device_threshold, device_never_exit, layout=layout
    )
    np.testing.assert_array_equal(to_host(device_logits), logits, err_msg="the kernel changed its input")
    xp.check_guards()
    got = confidence_to_host(confidence)
    exit_mask = to_host(exit_mask)
    assert exit_mask.dtype == np.uint8 and set(np.unique(exit_mask)) <= {0, 1}
    expected = exits_by_threshold(got, metric, threshold)
    if never_exit is not None:
        expected &= never_exit == 0
    np.testing.assert_array_equal(exit_mask.astype(bool), expected, err_msg=f"exit mask on {metric}")
    return got, exit_mask


def check_confidence(
    launchers: Launchers,
    logits: np.ndarray,
    kinds: list[str],
    temperature: float,
    layout: RowLayout | None = None,
) -> None:
    got, _ = run_confidence(launchers, logits, temperature, layout=layout)
    assert_confidence_close(got, logits, temperature, kinds)


def boundary_thresholds(
    confidence: Confidence, metric: str, num_classes: int, per_class: bool, rng: np.random.Generator
) -> Any:
    """Thresholds at some rows' own figures, so that the >= / <= boundary is hit exactly.

    Scalar: the figure of a middle row. Per class (C,): for each label some row has, the figure of one
    such row, moved one float32 step to the failing side for odd labels so that rows fail as well as
    pass; for the other classes, a random row's figure.
    """
    values = getattr(confidence, metric)
    valid_values = values[confidence.valid]
    if not per_class:
        return np.sort(valid_values)[valid_values.size // 2]
    failing_side = np.float32(-np.inf if metric == "entropy" else np.inf)
    thresholds = rng.choice(valid_values, size=num_classes).astype(np.float32)
    for label in np.unique(confidence.label[confidence.valid]):
        thresholds[label] = rng.choice(values[confidence.label == label])
        if label % 2:
            thresholds[label] = np.nextafter(thresholds[label], failing_side)
    return thresholds


def check_exit_rule(
    launchers: Launchers,
    logits: np.ndarray,
    metric: str,
    per_class: bool,
    flags: np.ndarray | None,
    rng: np.random.Generator,
) -> None:
    """Scalar or per-class thresholds at the rows' own figures, with or without never-exit flags."""
    first, _ = run_confidence(launchers, logits, metric=metric, threshold=0.0)
    threshold = boundary_thresholds(first, metric, logits.shape[1], per_class, rng)
    got, exit_mask = run_confidence(launchers, logits, metric=metric, threshold=threshold, never_exit=flags)
    assert 0 < exit_mask.sum() < got.valid.sum(), "thresholds should split the valid rows"
    assert not exit_mask[~got.valid].any(), "an invalid row exited"


def check_subnormal_thresholds(launchers: Launchers) -> None:
    """Thresholds one float32 step from 0 on the failing side, scalar and per class, against rows whose
    figure is exactly 0: an entropy of 0 (one class takes all of the mass) and a margin of 0 (two tied
    top classes). Those rows must not exit. A kernel built with flush-to-zero reads such a threshold as 0
    and exits them, which ``run_confidence`` catches as a mask that breaks the rule on its own figures."""
    logits = np.array([[120.0, 0.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0]], np.float32)  # (2, 4)
    step = np.nextafter(np.float32(0), np.float32(1))  # 1.4e-45, the smallest subnormal
    for metric, threshold, zero_row in (("entropy", -step, 0), ("margin", step, 1)):
        for thresholds in (threshold, np.full(logits.shape[1], threshold, np.float32)):
            got, exit_mask = run_confidence(launchers, logits, metric=metric, threshold=thresholds)
            assert getattr(got, metric)[zero_row] == 0, f"{metric} of row {zero_row} should be exactly 0"
            assert not exit_mask[zero_row], f"a {metric} of 0 exited under a threshold of {threshold}"


def assert_confidence_equal(got: Confidence, want: Confidence) -> None:
    """Bit for bit, NaNs included."""
    for field in fields(Confidence):
        np.testing.assert_array_equal(getattr(got, field.name), getattr(want, field.name), err_msg=field.name)


def check_batch_invariance(launchers: Launchers, logits: np.ndarray, rng: np.random.Generator) -> None:
    """A row's figures are bit for bit the same alone, in the batch, or in a compacted sub-batch."""
    whole, _ = run_confidence(launchers, logits)
    subset = np.sort(rng.choice(logits.shape[0], logits.shape[0] // 2, replace=False))
    parts = [(subset, run_confidence(launchers, logits[subset])[0])]
    for row in (0, logits.shape[0] - 1):
        parts.append(([row], run_confidence(launchers, logits[row : row + 1])[0]))
    for rows, part in parts:
        assert_confidence_equal(part, Confidence(*(getattr(whole, f.name)[rows] for f in fields(Confidence))))


# ----------------------------------------------------------------------------------------------
# Compaction


def exit_masks(num_rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Exit masks (B,) uint8 of every shape a partition must handle."""
    alternating = np.arange(num_rows) % 2
    return {
        "all exit": np.ones(num_rows, np.uint8),
        "none exit": np.zeros(num_rows, np.uint8),
        "alternating": alternating.astype(np.uint8),
        "alternating, shifted": (1 - alternating).astype(np.uint8),
        "random, nonzero means exit": rng.choice(np.array([0, 1, 7, 255], np.uint8), num_rows),
    }


def check_partition(launchers: Launchers, exit_mask: np.ndarray) -> RowPartition:
    partition = launchers.partition_rows(launchers.xp.asarray(exit_mask))
    launchers.xp.check_guards()
    want = partition_rows_reference(exit_mask)
    counts = to_host(partition.counts)
    np.testing.assert_array_equal(counts, want.counts)
    survivors, exited = counts
    survivor_rows, exited_rows = to_host(partition.survivor_rows), to_host(partition.exited_rows)
    np.testing.assert_array_equal(survivor_rows[:survivors], want.survivor_rows)
    np.testing.assert_array_equal(exited_rows[:exited], want.exited_rows)
    assert_untouched(survivor_rows[survivors:], "survivor_rows past the survivor count")
    assert_untouched(exited_rows[exited:], "exited_rows past the exited count")
    return partition


def row_tensors(num_rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Tensors (B, ...) of assorted dtypes and row widths (bytes per row in the name)."""
    return {
        "float16 hidden state, 1536 B": rng.normal(size=(num_rows, 768)).astype(np.float16),
        "float32 (2, 3, 4), 96 B": rng.normal(size=(num_rows, 2, 3, 4)).astype(np.float32),
        "int64 labels, 8 B": rng.integers(-5, 5, size=num_rows),
        "float32 pair, 8 B": rng.normal(size=(num_rows, 2)).astype(np.float32),
        "uint8 triple, 3 B": rng.integers(0, 256, size=(num_rows, 3), dtype=np.uint8),
        "float16 (5,), 10 B": rng.normal(size=(num_rows, 5)).astype(np.float16),
        "bool, 1 B": rng.random(num_rows) < 0.5,
    }


def device_count(launchers: Launchers, count: int) -> Any:
    """A device-resident (1,) int32 row count, as the copy kernels read it."""
    return launchers.xp.asarray(np.array([count], dtype=np.int32))


def check_gather(launchers: Launchers, src: np.ndarray, rows: np.ndarray, count: int) -> None:
    """The first ``count`` of ``rows`` are gathered; the buffer's later rows keep their sentinels."""
    xp = launchers.xp
    out = launchers.gather_rows(xp.asarray(src), xp.asarray(rows), device_count(launchers, count))
    xp.check_guards()
    out = to_host(out)
    assert out.shape == (rows.size, *src.shape[1:]) and out.dtype == src.dtype
    np.testing.assert_array_equal(out[:count], gather_rows_reference(src, rows[:count]))
    assert_untouched(out[count:], "gathered rows past the count")


def check_scatter(
    launchers: Launchers,
    src: np.ndarray,
    dst: np.ndarray,
    dst_rows: np.ndarray,
    count: int,
    src_rows: np.ndarray | None,
) -> None:
    """The first ``count`` pairs are scattered into ``dst``; its other rows keep their values."""
    xp = launchers.xp
    device_dst = xp.asarray(dst.copy())
    launchers.scatter_rows(
        xp.asarray(src),
        device_dst,
        xp.asarray(dst_rows),
        device_count(launchers, count),
        None if src_rows is None else xp.asarray(src_rows),
    )
    if src_rows is None:  # a dense source: its first `count` rows move
        want = scatter_rows_reference(src[:count], dst, dst_rows[:count])
    else:
        want = scatter_rows_reference(src, dst, dst_rows[:count], src_rows[:count])
    np.testing.assert_array_equal(to_host(device_dst), want)


def check_compact(launchers: Launchers, exit_mask: np.ndarray, tensors: list[np.ndarray]) -> None:
    xp = launchers.xp
    device_tensors = [xp.asarray(tensor) for tensor in tensors]
    partition, survivors = launchers.compact(xp.asarray(exit_mask), device_tensors)
    want = partition_rows_reference(exit_mask)
    np.testing.assert_array_equal(to_host(partition.counts), want.counts)
    for tensor, survivor in zip(tensors, survivors, strict=True):
        np.testing.assert_array_equal(to_host(survivor), gather_rows_reference(tensor, want.survivor_rows))
    xp.check_guards()
