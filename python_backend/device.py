"""Where the orchestrator's cascade runs: NumPy on the host, or CuPy and the CUDA kernels on a GPU.

The repository writer puts two parameters into the orchestrator's ``config.pbtxt``:

- ``offramp_device``: ``"cpu"`` (the default) or ``"gpu"``;
- ``offramp_device_fallback``: what a ``"gpu"`` orchestrator does where it cannot have one (CuPy
  missing from its environment, no CUDA device, an instance group of kind KIND_CPU, kernels that do
  not compile): ``"cpu"`` (the default) serves on the host and says why in the log; ``"none"``
  fails the model load with the same message.

Triton tells each instance its kind and device id (``args["model_instance_kind"]``,
``args["model_instance_device_id"]``); ``select_cascade`` turns all of it into the callable the
orchestrator runs the cascade with: ``run_cascade`` itself on the host, a ``DeviceCascade`` on a GPU.

On the GPU (docs/architecture.md, 'On the GPU') the rows of one ``execute`` call are copied to the
device once, after the requests were parsed on the host; the segments are called over BLS with CuPy
arrays handed over by DLPack and their outputs asked for in GPU memory (``to_bls_tensor`` /
``from_bls_tensor``); each exit's decision is the fused confidence kernel and the rows move through
the compaction kernels (``offramp.kernels.cuda``, driven by the cascade's ``KernelRowMover``); the
answers come back to the host once, for the responses, the audit and the metrics. Between segments
only counts reach the host (how many rows survive, which cohorts are present), never a tensor.

CuPy is imported when a GPU is asked for, never when this module is imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from offramp.backend.cascade import Cascade, CascadeBatch, CascadeResult, RunSegment, run_cascade

DEVICE_PARAMETER = "offramp_device"
FALLBACK_PARAMETER = "offramp_device_fallback"
DEVICES = ("cpu", "gpu")
FALLBACKS = ("cpu", "none")


class DeviceUnavailable(RuntimeError):
    """The GPU path was asked for and cannot run here; the message says why and what to install."""


@dataclass(frozen=True)
class DeviceRequest:
    """What the orchestrator's config asks for (the parameters above)."""

    device: str = "cpu"
    fallback: str = "cpu"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"{DEVICE_PARAMETER} must be one of {DEVICES}, not {self.device!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"{FALLBACK_PARAMETER} must be one of {FALLBACKS}, not {self.fallback!r}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> DeviceRequest:
        return cls(
            device=parameters.get(DEVICE_PARAMETER, "cpu").strip().lower(),
            fallback=parameters.get(FALLBACK_PARAMETER, "cpu").strip().lower(),
        )

    def to_parameters(self) -> dict[str, str]:
        return {DEVICE_PARAMETER: self.device, FALLBACK_PARAMETER: self.fallback}


@dataclass(frozen=True)
class Placement:
    """Where the cascade ended up, and a sentence saying why (logged at load)."""

    device: str  # "cpu" or "gpu"
    device_id: int | None
    reason: str
    fell_back: bool = False  # a GPU was asked for and the host serves instead


def to_host(array: Any) -> np.ndarray:
    """A NumPy array of a CuPy array (one device-to-host copy) or of anything NumPy takes as is."""
    return array.get() if hasattr(array, "__cuda_array_interface__") else np.asarray(array)


def batch_on(batch: CascadeBatch, xp: Any) -> CascadeBatch:
    """The batch with every array on ``xp``'s device (one host-to-device copy each)."""
    moved = {
        f.name: xp.asarray(getattr(batch, f.name))
        for f in fields(CascadeBatch)
        if f.name != "inputs" and getattr(batch, f.name) is not None
    }
    return replace(batch, inputs={name: xp.asarray(array) for name, array in batch.inputs.items()}, **moved)


def result_to_host(result: CascadeResult) -> CascadeResult:
    """Every array of ``result`` on the host (``unfinished`` only where an outage left one)."""
    return replace(
        result,
        **{
            f.name: to_host(getattr(result, f.name))
            for f in fields(CascadeResult)
            if f.name not in ("rows_per_segment", "outage") and getattr(result, f.name) is not None
        },
    )


@dataclass(frozen=True)
class DeviceCascade:
    """``run_cascade`` on a device: the batch goes there once, the result comes back once.

    ``xp`` is CuPy on a GPU; ``kernels`` the launchers over it (``offramp.kernels.cuda``). Tests bind
    NumPy and the kernels run by the CPU shim, which is the same code path without the copies.
    ``scope`` makes the instance's GPU current around each call.
    """

    xp: Any
    kernels: Any
    scope: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext

    def __call__(
        self, batch: CascadeBatch, run_segment: RunSegment, *args: Any, **kwargs: Any
    ) -> CascadeResult:
        """``run_cascade`` with the batch on the device, this device's array module and kernels; the
        result back on the host. Other arguments pass through unchanged."""
        with self.scope():
            result = run_cascade(
                batch_on(batch, self.xp), run_segment, *args, xp=self.xp, kernels=self.kernels, **kwargs
            )
            return result_to_host(result)


def gpu_unavailable_reason(device_id: int) -> str | None:
    """Why CuPy cannot run on CUDA device ``device_id`` here, or None where it can."""
    try:
        import cupy
    except ImportError as error:
        return (
            f"CuPy is not installed in the orchestrator's Python environment ({error}); install "
            "cupy-cuda12x (CUDA 12 drivers) or cupy-cuda13x (CUDA 13) into the environment that "
            "EXECUTION_ENV_PATH names (build/execution_env.py --gpu makes one)"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError without a driver or a device
        return f"CuPy finds no usable CUDA device ({type(error).__name__}: {error})"
    if not 0 <= device_id < count:
        return f"CUDA device {device_id} is not visible to this process ({count} visible)"
    return None


def gpu_cascade(device_id: int) -> DeviceCascade:
    """The cascade on CUDA device ``device_id``, its kernels compiled now rather than at the first request.

    Raises DeviceUnavailable, saying why, where CuPy, the device or NVRTC is missing.
    """
    reason = gpu_unavailable_reason(device_id)
    if reason is not None:
        raise DeviceUnavailable(reason)
    import cupy

    from offramp.kernels.cuda import ENTRY_POINTS, cupy_kernel, cupy_launchers

    def scope() -> AbstractContextManager[Any]:
        return cupy.cuda.Device(device_id)

    try:
        with scope():
            for name in ENTRY_POINTS:
                cupy_kernel(name)
    except Exception as error:
        raise DeviceUnavailable(
            f"the CUDA kernels did not compile for device {device_id} ({type(error).__name__}: {error}); "
            "they are compiled with NVRTC through CuPy's bindings: install nvidia-cuda-nvrtc-cu12 (or "
            "-cu13, matching CuPy) into the orchestrator's environment"
        ) from error
    return DeviceCascade(cupy, cupy_launchers(), scope)


def select_cascade(
    request: DeviceRequest,
    instance_kind: str = "CPU",
    instance_device_id: str | int = 0,
    make_gpu_cascade: Callable[[int], Cascade] = gpu_cascade,
) -> tuple[Cascade, Placement]:
    """The cascade for this orchestrator instance, and where it runs.

    ``instance_kind`` and ``instance_device_id`` are Triton's (``args["model_instance_kind"]``:
    "CPU", "GPU" or "MODEL"). A GPU request on a KIND_CPU instance, or one that ``make_gpu_cascade``
    refuses, falls back to the host or raises DeviceUnavailable, as ``request.fallback`` says.
    """
    if request.device == "cpu":
        return run_cascade, Placement("cpu", None, f"{DEVICE_PARAMETER} is cpu: NumPy on the host")
    kind = str(instance_kind).upper().removeprefix("KIND_")
    device_id = int(instance_device_id or 0)
    try:
        if kind == "CPU":
            raise DeviceUnavailable(
                "the orchestrator's instance_group is KIND_CPU, so Triton assigns it no GPU; use KIND_GPU"
            )
        cascade = make_gpu_cascade(device_id)
    except DeviceUnavailable as error:
        if request.fallback == "none":
            raise DeviceUnavailable(
                f"{DEVICE_PARAMETER} is gpu, {FALLBACK_PARAMETER} is none, and {error}"
            ) from error
        reason = (
            f"{DEVICE_PARAMETER} is gpu but {error}; serving on the CPU (NumPy) instead, "
            "with every segment's tensors copied through the host"
        )
        return run_cascade, Placement("cpu", None, reason, fell_back=True)
    return cascade, Placement("gpu", device_id, f"CuPy and the CUDA kernels on GPU {device_id}")


# ----------------------------------------------------------------------------------------------
# BLS tensors on the device


def is_device_array(array: Any) -> bool:
    """A CUDA array (CuPy, or anything with the CUDA array interface)."""
    return hasattr(array, "__cuda_array_interface__")


def to_bls_tensor(pb_utils: Any, name: str, array: Any) -> Any:
    """A BLS input tensor: a device array handed over by DLPack (no copy), a host array through NumPy.

    DLPack wants C order, so a strided device array is copied on the device first. The caller
    synchronises the array's stream before the request runs (the segment reads on its own stream).
    """
    if is_device_array(array):
        contiguous = array if array.flags.c_contiguous else array.copy()
        return pb_utils.Tensor.from_dlpack(name, contiguous.__dlpack__())
    return pb_utils.Tensor(name, np.ascontiguousarray(array))


def from_bls_tensor(tensor: Any, cupy: Any) -> Any:
    """A BLS output as a CuPy array: shared by DLPack where Triton left it in GPU memory (as asked
    with ``preferred_memory``); copied to the device where it came back in host memory."""
    if tensor.is_cpu():
        return cupy.asarray(tensor.as_numpy())
    return cupy.from_dlpack(tensor.to_dlpack())
