"""CuPy launchers for ``confidence.cu`` and ``compact.cu``.

``Launchers`` holds each launcher once, written against an array module ``xp`` and a kernel lookup
(name -> callable ``kernel(grid, block, args)``, the calling convention of ``cupy.RawKernel``). The
module-level ``*_cuda`` functions bind it to CuPy and to one module per source and device, compiled
here with NVRTC on first use (``compile_kernels``) rather than by CuPy's ``RawModule``, which forces
flush-to-zero (see ``NVRTC_OPTIONS``). The CPU shim tests bind the same class to NumPy and to the
kernels compiled with g++, so validation, argument order and launch geometry here run without a GPU too.

CuPy is imported on first use only, so this module imports on a machine without CuPy or a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .compact import RowPartition
from .confidence import METRICS, Confidence

CONFIDENCE_SOURCE = Path(__file__).with_name("confidence.cu")
COMPACT_SOURCE = Path(__file__).with_name("compact.cu")

# Every compile of the sources, on a device or offline. No fast-math: the contract wants IEEE division
# and accurate expf/logf. No flush-to-zero either: a kernel that flushes subnormals compares a figure
# with a flushed threshold, so its exit mask breaks the rule it documents on its own figures (on an H200,
# a row of entropy 0 exited under a per-class threshold of -1.4e-45, one float32 step below 0). CuPy's
# RawModule appends -ftz=true after the caller's options and NVRTC obeys the last, hence compile_kernels.
NVRTC_OPTIONS = ("--std=c++17", "-ftz=false")

# Input dtypes of the confidence kernels and their entry-point suffixes.
CONFIDENCE_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}
# Bytes per thread step of the row-copy kernels, widest first.
ROW_COPY_UNITS = (16, 8, 4, 2, 1)

# Every kernel entry point and the source that defines it.
ENTRY_POINTS: dict[str, Path] = {
    **{
        f"confidence_{layout}_{suffix}": CONFIDENCE_SOURCE
        for layout in ("warp", "block")
        for suffix in CONFIDENCE_DTYPES.values()
    },
    "partition_rows": COMPACT_SOURCE,
    **{f"{copy}_rows_b{unit}": COMPACT_SOURCE for copy in ("gather", "scatter") for unit in ROW_COPY_UNITS},
}

WARP_SIZE = 32
MAX_THREADS_PER_BLOCK = 1024  # the kernels' __launch_bounds__
BLOCK_PER_ROW_ABOVE = 1024  # classes; longer rows get a block each, shorter ones a warp
PARTITION_THREADS = 1024
COPY_THREADS = 256
MAX_COPY_BLOCKS = 65535  # the copy kernels stride over rows a grid this size does not cover

# A null device pointer as a kernel argument: a pointer parameter is 8 raw bytes, which is how both
# CuPy and the CPU shim pass a NumPy uint64.
NULL_POINTER = np.uint64(0)

Kernel = Callable[[tuple[int, ...], tuple[int, ...], tuple[Any, ...]], None]
KernelLookup = Callable[[str], Kernel]


@dataclass(frozen=True)
class RowLayout:
    """How the confidence kernels map rows to threads: a warp per row, or a whole block per row."""

    block_per_row: bool
    threads_per_block: int

    def __post_init__(self) -> None:
        if self.threads_per_block % WARP_SIZE or not 0 < self.threads_per_block <= MAX_THREADS_PER_BLOCK:
            raise ValueError(
                f"threads_per_block must be a multiple of {WARP_SIZE} up to {MAX_THREADS_PER_BLOCK}, "
                f"got {self.threads_per_block}"
            )

    @property
    def rows_per_block(self) -> int:
        return 1 if self.block_per_row else self.threads_per_block // WARP_SIZE

    @property
    def name(self) -> str:
        return "block" if self.block_per_row else "warp"


def row_layout_for(num_classes: int) -> RowLayout:
    """A warp per row up to BLOCK_PER_ROW_ABOVE classes (8 rows per block), a 512-thread block beyond."""
    if num_classes > BLOCK_PER_ROW_ABOVE:
        return RowLayout(block_per_row=True, threads_per_block=512)
    return RowLayout(block_per_row=False, threads_per_block=256)


class Launchers:
    """The kernels' launchers over array module ``xp`` (CuPy, or NumPy under the CPU shim)."""

    def __init__(self, xp: Any, kernels: KernelLookup) -> None:
        self.xp = xp
        self.kernels = kernels

    def confidence(
        self,
        logits: Any,
        temperature: float,
        metric: str,
        threshold: Any,
        never_exit: Any = None,
        layout: RowLayout | None = None,
    ) -> tuple[Confidence, Any]:
        """Confidence of logits (B, C) float32/float16 and the exit mask (B,) uint8, in one kernel.

        ``threshold`` is a scalar or a per-class vector (C,) indexed by each row's label;
        ``never_exit`` (B,) flags rows that may not exit here. ``layout`` overrides
        ``row_layout_for(C)``.
        """
        xp = self.xp
        logits = xp.ascontiguousarray(logits)
        if logits.ndim != 2:
            raise ValueError(f"logits must be (B, C), got shape {logits.shape}")
        if logits.dtype not in CONFIDENCE_DTYPES:
            raise TypeError(f"logits must be float32 or float16, got {logits.dtype}")
        num_rows, num_classes = logits.shape
        if num_classes == 0:
            raise ValueError("logits need at least one class")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        if metric not in METRICS:
            raise ValueError(f"unknown exit metric {metric!r}; expected one of {METRICS}")
        if np.ndim(threshold) == 0:
            scalar_threshold, class_thresholds = np.float32(threshold), NULL_POINTER
        else:
            scalar_threshold = np.float32(np.nan)  # unused: the kernel reads class_thresholds
            class_thresholds = xp.ascontiguousarray(xp.asarray(threshold, dtype=xp.float32))
            if class_thresholds.shape != (num_classes,):
                shape = class_thresholds.shape
                raise ValueError(f"per-class threshold must be ({num_classes},), got {shape}")
        never_exit = NULL_POINTER if never_exit is None else self._row_flags(never_exit, num_rows)

        outputs = (
            xp.empty(num_rows, dtype=xp.float32),  # max_prob
            xp.empty(num_rows, dtype=xp.float32),  # entropy
            xp.empty(num_rows, dtype=xp.float32),  # margin
            xp.empty(num_rows, dtype=xp.int64),  # label
            xp.empty(num_rows, dtype=xp.uint8),  # exit mask
        )
        if num_rows:
            layout = layout or row_layout_for(num_classes)
            kernel = self.kernels(f"confidence_{layout.name}_{CONFIDENCE_DTYPES[logits.dtype]}")
            grid = (-(-num_rows // layout.rows_per_block),)
            arguments = (
                logits,
                np.int32(num_rows),
                np.int32(num_classes),
                np.float32(temperature),
                np.int32(METRICS.index(metric)),
                scalar_threshold,
                class_thresholds,
                never_exit,
                *outputs,
            )
            kernel(grid, (layout.threads_per_block,), arguments)
        max_prob, entropy, margin, label, exit_mask = outputs
        return Confidence(max_prob=max_prob, entropy=entropy, margin=margin, label=label), exit_mask

    def partition_rows(self, exit_mask: Any) -> RowPartition:
        """Survivors (exit_mask == 0) and exited rows of a batch, each ascending, and their counts."""
        xp = self.xp
        exit_mask = self._row_flags(exit_mask)
        num_rows = exit_mask.shape[0]
        if num_rows >= 2**31:
            raise ValueError(f"partition_rows takes fewer than 2^31 rows, got {num_rows}")
        partition = RowPartition(
            survivor_rows=xp.empty(num_rows, dtype=xp.int64),
            exited_rows=xp.empty(num_rows, dtype=xp.int64),
            counts=xp.empty(2, dtype=xp.int32),
        )
        # One block for the whole batch (see compact.cu); it also writes the counts when B is 0.
        self.kernels("partition_rows")(
            (1,),
            (PARTITION_THREADS,),
            (exit_mask, np.int32(num_rows), partition.survivor_rows, partition.exited_rows, partition.counts),
        )
        return partition

    def gather_rows(self, src: Any, rows: Any, count: Any, out: Any = None) -> Any:
        """``out[j] = src[rows[j]]`` for j < count[0]; later rows of ``out`` are left as they were.

        ``rows`` (n,) int64 and ``count`` (int32, device-resident, e.g. ``RowPartition.num_survivors``)
        stay on the device, so nothing waits for the host. ``out`` defaults to a new (n, ...) buffer.
        """
        xp = self.xp
        src = xp.ascontiguousarray(src)
        rows = self._row_indices(rows)
        if out is None:
            out = xp.empty((rows.shape[0], *src.shape[1:]), dtype=src.dtype)
        self._check_row_buffer(out, src, rows.shape[0])
        self._copy_rows("gather", src, (rows,), count, out, rows.shape[0])
        return out

    def scatter_rows(self, src: Any, dst: Any, dst_rows: Any, count: Any, src_rows: Any = None) -> None:
        """``dst[dst_rows[j]] = src[src_rows[j]]`` (``src[j]`` without ``src_rows``) for j < count[0].

        In place; ``dst`` must be C-contiguous and must not overlap ``src``.
        """
        src = self.xp.ascontiguousarray(src)
        dst_rows = self._row_indices(dst_rows)
        src_rows = NULL_POINTER if src_rows is None else self._row_indices(src_rows)
        self._check_row_buffer(dst, src, None)
        self._copy_rows("scatter", src, (src_rows, dst_rows), count, dst, dst_rows.shape[0])

    def compact(self, exit_mask: Any, tensors: Sequence[Any]) -> tuple[RowPartition, list[Any]]:
        """Partition by ``exit_mask`` and gather the survivors' rows of each tensor (B, ...) densely.

        Returns the partition and each tensor's survivors, shape (S, ...). Reads S on the host once,
        since the next segment needs its batch size there.
        """
        partition = self.partition_rows(exit_mask)
        num_survivors = int(partition.counts[0])
        survivor_rows = partition.survivor_rows[:num_survivors]
        survivors = [self.gather_rows(tensor, survivor_rows, partition.num_survivors) for tensor in tensors]
        return partition, survivors

    def _row_flags(self, flags: Any, num_rows: int | None = None) -> Any:
        """A (B,) flag vector as contiguous uint8 (nonzero = set); bool and uint8 are viewed, not copied."""
        xp = self.xp
        flags = xp.asarray(flags)
        if flags.ndim != 1 or (num_rows is not None and flags.shape[0] != num_rows):
            raise ValueError(f"row flags must be ({num_rows or 'B'},), got {flags.shape}")
        if flags.dtype not in (xp.bool_, xp.uint8):
            flags = flags != 0
        return xp.ascontiguousarray(flags).view(xp.uint8)

    def _row_indices(self, rows: Any) -> Any:
        rows = self.xp.ascontiguousarray(rows, dtype=self.xp.int64)
        if rows.ndim != 1:
            raise ValueError(f"row indices must be (n,), got {rows.shape}")
        return rows

    @staticmethod
    def _check_row_buffer(buffer: Any, src: Any, num_rows: int | None) -> None:
        if not buffer.flags.c_contiguous:
            raise ValueError("the destination buffer must be C-contiguous")
        if buffer.dtype != src.dtype or buffer.shape[1:] != src.shape[1:]:
            raise ValueError(f"rows {buffer.dtype}{buffer.shape[1:]} differ from {src.dtype}{src.shape[1:]}")
        if num_rows is not None and buffer.shape[0] < num_rows:
            raise ValueError(f"the destination holds {buffer.shape[0]} rows, fewer than {num_rows}")

    def _copy_rows(
        self, copy: str, src: Any, row_indices: tuple[Any, ...], count: Any, dst: Any, max_rows: int
    ) -> None:
        """Launches ``{copy}_rows_b{unit}`` sized for ``max_rows``; the kernel moves ``count[0]`` rows."""
        if count.dtype != np.int32 or count.size < 1:
            raise ValueError("count must be a device int32 array whose first element is the row count")
        row_bytes = src.dtype.itemsize * math.prod(src.shape[1:])
        if max_rows == 0 or row_bytes == 0:
            return
        unit = next(
            unit
            for unit in ROW_COPY_UNITS
            if row_bytes % unit == 0 and _address(src) % unit == 0 and _address(dst) % unit == 0
        )
        units_per_row = row_bytes // unit
        blocks = min(-(-max_rows // (COPY_THREADS // WARP_SIZE)), MAX_COPY_BLOCKS)  # a warp per row
        self.kernels(f"{copy}_rows_b{unit}")(
            (blocks,), (COPY_THREADS,), (src, *row_indices, count, np.int64(units_per_row), dst)
        )


def _address(array: Any) -> int:
    """Base address of a CuPy or NumPy array."""
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    return interface["data"][0]


def load_pip_nvrtc() -> bool:
    """Load NVRTC from the pip package ``nvidia-cuda-nvrtc`` (13.x), if installed, for CuPy to find.

    CuPy 13.6 looks for ``libnvrtc.so.13`` on the loader path only, while the wheel puts it under
    ``nvidia/cu13/lib``. Loaded here first and globally, CuPy's later dlopen by soname finds it; NVRTC
    itself dlopens its builtins library by name at compile time, hence that one first. Returns whether
    the wheel was found; without it CuPy searches the system as usual.
    """
    try:
        import nvidia
    except ImportError:
        return False
    for package_dir in nvidia.__path__:
        library_dir = Path(package_dir) / "cu13" / "lib"
        builtins = sorted(library_dir.glob("libnvrtc-builtins.so.13.*"))
        if builtins and (library_dir / "libnvrtc.so.13").exists():
            ctypes.CDLL(str(builtins[0]), mode=ctypes.RTLD_GLOBAL)
            ctypes.CDLL(str(library_dir / "libnvrtc.so.13"), mode=ctypes.RTLD_GLOBAL)
            return True
    return False


@dataclass(frozen=True)
class CompiledKernels:
    """What NVRTC made of one source for one architecture."""

    source: Path
    architecture: str  # sm_90
    ptx: bytes
    cubin: bytes
    log: str  # NVRTC's log; with -Xptxas=-v among the options, ptxas' register and spill report


def compile_kernels(source: Path, architecture: str, extra_options: Sequence[str] = ()) -> CompiledKernels:
    """``source`` compiled by NVRTC with ``NVRTC_OPTIONS`` for ``architecture``; needs no GPU or driver."""
    from cupy_backends.cuda.libs import nvrtc

    load_pip_nvrtc()
    program = nvrtc.createProgram(source.read_text(), source.name, [], [])
    try:
        try:
            nvrtc.compileProgram(
                program, [*NVRTC_OPTIONS, f"--gpu-architecture={architecture}", *extra_options]
            )
        except nvrtc.NVRTCError as error:
            log = nvrtc.getProgramLog(program)
            raise RuntimeError(f"NVRTC could not compile {source.name} for {architecture}:\n{log}") from error
        log = nvrtc.getProgramLog(program).replace("\0", "")
        return CompiledKernels(source, architecture, nvrtc.getPTX(program), nvrtc.getCUBIN(program), log)
    finally:
        nvrtc.destroyProgram(program)


@functools.cache
def _device_module(source: Path, device_id: int) -> Any:
    """``source`` compiled to machine code for device ``device_id`` and loaded into its context, once per
    process (an NVRTC older than the device fails here, naming the architecture)."""
    import cupy

    device = cupy.cuda.Device(device_id)
    with device:
        compiled = compile_kernels(source, f"sm_{device.compute_capability}")
        module = cupy.cuda.function.Module()
        module.load(compiled.cubin)
    return module


@functools.cache
def _device_kernel(name: str, device_id: int) -> Kernel:
    return _device_module(ENTRY_POINTS[name], device_id).get_function(name)


def cupy_kernel(name: str) -> Kernel:
    """An entry point on the current CUDA device (``cupy.cuda.Function``, called as a ``RawKernel``
    is); its source is compiled for that device on first use."""
    import cupy

    return _device_kernel(name, cupy.cuda.runtime.getDevice())


@functools.cache
def cupy_launchers() -> Launchers:
    """The launchers bound to CuPy and the GPU."""
    import cupy

    return Launchers(cupy, cupy_kernel)


def confidence_cuda(
    logits: Any, temperature: float, metric: str, threshold: Any, never_exit: Any = None
) -> tuple[Confidence, Any]:
    """Confidence (CuPy arrays, see confidence.py) of logits (B, C) float32/float16 on the GPU, and the exit
    mask (B,) uint8 against a scalar or per-class (C,) ``threshold``; ``never_exit`` (B,) holds rows back."""
    return cupy_launchers().confidence(logits, temperature, metric, threshold, never_exit)


def partition_rows_cuda(exit_mask: Any) -> RowPartition:
    """Survivors and exited rows of an exit mask (B,) on the GPU; see ``Launchers.partition_rows``."""
    return cupy_launchers().partition_rows(exit_mask)


def gather_rows_cuda(src: Any, rows: Any, count: Any, out: Any = None) -> Any:
    """``out[j] = src[rows[j]]`` for j < count[0] on the GPU; see ``Launchers.gather_rows``."""
    return cupy_launchers().gather_rows(src, rows, count, out)


def scatter_rows_cuda(src: Any, dst: Any, dst_rows: Any, count: Any, src_rows: Any = None) -> None:
    """``dst[dst_rows[j]] = src[src_rows[j]]`` for j < count[0] on the GPU; see ``Launchers.scatter_rows``."""
    cupy_launchers().scatter_rows(src, dst, dst_rows, count, src_rows)


def compact_cuda(exit_mask: Any, tensors: Sequence[Any]) -> tuple[RowPartition, list[Any]]:
    """Partition by ``exit_mask`` and gather each tensor's survivors on the GPU; see ``Launchers.compact``."""
    return cupy_launchers().compact(exit_mask, tensors)
