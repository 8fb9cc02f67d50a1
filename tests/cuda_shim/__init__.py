"""Run the CUDA kernels of a .cu source on the CPU through ``cuda_shim.h``.

The header says what the shim models and what it does not. ``build_shim_module`` compiles the .cu
file with g++ into a shared library with one launcher per entry point. ``ShimModule.kernels`` gives
a kernel lookup with ``cupy.RawKernel``'s calling convention (``kernel(grid, block, args)``, with
NumPy arrays, NumPy scalars and ``NULL_POINTER`` as arguments), so ``offramp.kernels.cuda.Launchers``
runs unchanged on NumPy memory.

Each launch runs in a forked child that sends back the allocations behind its array arguments, so a
broken kernel (a fault, a write far out of bounds, an endless loop) fails its test with
``ShimLaunchError`` instead of ending the test process. It costs a few milliseconds per launch.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
import pickle
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SHIM_HEADER = Path(__file__).with_name("cuda_shim.h")
COMPILER = "g++"
# -Werror: host warnings on the .cu (sign mixing, unused values) are worth fixing for the GPU too.
COMPILE_FLAGS = ("-std=c++20", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror")
LAUNCH_TIMEOUT_S = 120.0  # a kernel that never ends fails its launch instead of hanging the tests


class Schedule(enum.IntEnum):
    """Order in which the shim runs blocks, and threads within a block between sync points."""

    FORWARD = 0
    REVERSE = 1
    SHUFFLED = 2  # a seeded shuffle, redrawn at every scheduling round


class ShimLaunchError(RuntimeError):
    """A launch the shim refused, a kernel that broke a synchronisation rule (deadlock, divergence),
    crashed, or ran past LAUNCH_TIMEOUT_S."""


class _Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


class _LaunchConfig(ctypes.Structure):  # cuda_shim::LaunchConfig
    _fields_ = [("grid", _Dim3), ("block", _Dim3), ("schedule", ctypes.c_int), ("seed", ctypes.c_uint)]


_SCALAR_TYPES = {
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.float32): ctypes.c_float,
}


def _dim3(dims: Sequence[int]) -> _Dim3:
    x, y, z = (*dims, 1, 1)[:3]
    return _Dim3(x, y, z)


def _as_ctypes(argument: Any) -> ctypes._SimpleCData:
    if isinstance(argument, np.ndarray):
        if not argument.flags.c_contiguous:
            raise ValueError("kernel arrays must be C-contiguous")
        return ctypes.c_void_p(argument.ctypes.data)
    if isinstance(argument, np.generic) and argument.dtype in _SCALAR_TYPES:
        return _SCALAR_TYPES[argument.dtype](argument.item())
    raise TypeError(f"cannot pass {type(argument).__name__} to a kernel; use a NumPy array or scalar")


class ShimModule:
    """The entry points of one .cu source, compiled for the CPU shim."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self._library.shim_last_error.restype = ctypes.c_char_p
        self._parameter_sizes: dict[str, list[int]] = {}

    def kernels(self, schedule: Schedule = Schedule.FORWARD, seed: int = 0) -> Callable[[str], Callable]:
        """Kernel lookup for ``Launchers``: every launch through it runs in ``schedule``."""
        return lambda name: functools.partial(self.launch, name, schedule=schedule, seed=seed)

    def launch(
        self,
        name: str,
        grid: Sequence[int],
        block: Sequence[int],
        args: Sequence[Any],
        *,
        schedule: Schedule = Schedule.FORWARD,
        seed: int = 0,
    ) -> None:
        """Runs kernel ``name`` in a forked child, then copies back every allocation its arrays live in."""
        arguments = [_as_ctypes(argument) for argument in args]
        expected_sizes = self._sizes_of_parameters(name)
        given_sizes = [ctypes.sizeof(argument) for argument in arguments]
        if given_sizes != expected_sizes:
            raise TypeError(f"{name} takes parameters of {expected_sizes} bytes, got {given_sizes}")
        params = (ctypes.c_void_p * len(arguments))(*(ctypes.addressof(argument) for argument in arguments))
        config = _LaunchConfig(_dim3(grid), _dim3(block), int(schedule), seed)

        def run() -> str | None:
            if getattr(self._library, f"shim_launch_{name}")(ctypes.byref(config), params) != 0:
                return self._library.shim_last_error().decode()
            return None

        error = _run_isolated(run, _allocations(args))
        if error is not None:
            raise ShimLaunchError(f"{name}: {error}")

    def _sizes_of_parameters(self, name: str) -> list[int]:
        if name not in self._parameter_sizes:
            sizes = (ctypes.c_int * 64)()
            count = getattr(self._library, f"shim_parameter_sizes_{name}")(sizes)
            self._parameter_sizes[name] = list(sizes[:count])
        return self._parameter_sizes[name]


def _allocations(args: Sequence[Any]) -> list[np.ndarray]:
    """The whole writable allocations behind the array arguments, guard bytes around views included."""
    roots: dict[int, np.ndarray] = {}
    for argument in args:
        if isinstance(argument, np.ndarray):
            root = argument
            while isinstance(root.base, np.ndarray):
                root = root.base
            if root.flags.writeable and root.flags.c_contiguous:
                roots[root.ctypes.data] = root
    return list(roots.values())


def _run_isolated(launch: Callable[[], str | None], allocations: list[np.ndarray]) -> str | None:
    """Runs ``launch`` in a forked child and copies ``allocations`` back from it; returns its error.

    A kernel that faults, writes far outside its buffers or never ends then fails its own launch
    instead of taking the test process down: the child's memory is its own until copied back.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: launch, send the error and the allocations' bytes, leave without cleanup
        os.close(read_end)
        try:
            payload = pickle.dumps((launch(), [allocation.tobytes() for allocation in allocations]))
        except BaseException as error:  # reported by the parent, like a kernel error
            payload = pickle.dumps((f"{type(error).__name__}: {error}", []))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + LAUNCH_TIMEOUT_S
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = pipe.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        if time.monotonic() >= deadline:
            return f"still running after {LAUNCH_TIMEOUT_S:.0f} s, killed"
        return f"the kernel crashed the process ({signal.Signals(os.WTERMSIG(status)).name})"
    error, contents = pickle.loads(b"".join(chunks))
    for allocation, content in zip(allocations, contents):
        ctypes.memmove(allocation.ctypes.data, content, allocation.nbytes)
    return error


def build_shim_module(source: Path, entry_points: Sequence[str], build_dir: Path) -> ShimModule:
    """Compiles ``source`` with g++ against the shim, exporting ``entry_points``, into ``build_dir``."""
    if shutil.which(COMPILER) is None:
        raise FileNotFoundError(f"{COMPILER} is not on PATH")
    driver = build_dir / f"{source.stem}_shim.cpp"
    driver.write_text(
        f'#include "{source.resolve()}"\n' + "".join(f"SHIM_EXPORT_KERNEL({name})\n" for name in entry_points)
    )
    library = build_dir / f"lib{source.stem}_shim.so"
    command = [COMPILER, *COMPILE_FLAGS, "-include", str(SHIM_HEADER), "-o", str(library), str(driver)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"shim build of {source.name} failed:\n{result.stderr}")
    return ShimModule(ctypes.CDLL(str(library)))
