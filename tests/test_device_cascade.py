"""The GPU path of the cascade, checked on the CPU.

What runs here, and what it stands in for:

- The cascade's kernel path (``run_cascade(..., kernels=...)``): the real ``.cu`` kernels, compiled
  with g++ against tests/cuda_shim and launched through the real ``Launchers`` over NumPy, in place of
  CuPy and a GPU. Its answers must be the NumPy path's: exits, labels, logits, flags and costs bit
  for bit, confidence to float32 rounding (the kernel sums in another order than NumPy).
- Device residency: ``StandInDevice``, an array module over NumPy whose arrays are marked as device
  arrays (a NumPy subclass with a ``get()`` that counts copies to the host), plays CuPy. Every tensor
  a segment receives must be such an array, and nothing but the final answers may be copied back.
- Device selection and the BLS adapter: fake ``triton_python_backend_utils`` and fake ``cupy``
  modules that record calls. They say which calls the adapter makes, not that Triton accepts them.

Not covered here (``make gpu-check`` and a Triton server with a GPU are needed): CuPy itself, stream
ordering between CuPy and Triton, DLPack hand-over in a real stub, speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from offramp.backend.cascade import (
    CascadeBatch,
    CascadeResult,
    IndexingRowMover,
    KernelRowMover,
    RowMover,
    row_mover,
    rule_sets,
    run_cascade,
)
from offramp.backend.device import (
    DeviceCascade,
    DeviceRequest,
    DeviceUnavailable,
    Placement,
    from_bls_tensor,
    gpu_unavailable_reason,
    select_cascade,
    to_bls_tensor,
)
from offramp.backend.exit_rules import LabelHistory
from offramp.backend.orchestrator import Orchestrator
from offramp.backend.policy import ExitRule, Policy
from offramp.kernels.cuda import COMPACT_SOURCE, CONFIDENCE_SOURCE, ENTRY_POINTS, Launchers
from offramp.kernels.testing import SentinelArrays, relative_error_bound
from tests.cuda_shim import Schedule, ShimModule, build_shim_module
from tests.fakes import FakeNetwork
from tests.test_orchestrator import SPEC, FakeRequest, good_rows

COSTS = (0.3, 0.6, 1.0)
needs_gxx = pytest.mark.skipif(
    __import__("shutil").which("g++") is None, reason="no g++ to build the CPU shim with"
)


# ----------------------------------------------------------------------------------------------
# A stand-in device: NumPy memory, marked as device memory


class DeviceArray(np.ndarray):
    """A NumPy array playing a CuPy one: it has the CUDA array interface and ``get()``, which counts."""

    host_copies = 0

    @property
    def __cuda_array_interface__(self) -> dict:
        interface = self.__array_interface__
        return {"shape": self.shape, "typestr": interface["typestr"], "data": interface["data"], "version": 3}

    def get(self) -> np.ndarray:
        DeviceArray.host_copies += 1
        return np.array(self.view(np.ndarray), copy=True)


class StandInDevice:
    """An array module over NumPy whose arrays are ``DeviceArray``s (what ``xp`` is on a GPU)."""

    __name__ = "stand_in_device"

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(np, name)
        if callable(attribute) and not isinstance(attribute, type):  # functions, not dtypes
            return lambda *args, **kwargs: _on_device(attribute(*args, **kwargs))
        return attribute


def _on_device(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_on_device(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------
# The real kernels on the CPU


@pytest.fixture(scope="module")
def shim_modules(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, ShimModule]:
    if __import__("shutil").which("g++") is None:
        pytest.skip("no g++ to build the CPU shim with")
    build_dir = tmp_path_factory.mktemp("cuda_shim_cascade")
    return {
        source: build_shim_module(source, [n for n, s in ENTRY_POINTS.items() if s == source], build_dir)
        for source in (CONFIDENCE_SOURCE, COMPACT_SOURCE)
    }


def shim_kernels(
    shim_modules: dict[Path, ShimModule], xp: Any = np, launched: Counter | None = None
) -> Launchers:
    """The real launchers over ``xp`` (sentinel-filled outputs), the kernels run by the CPU shim."""
    lookups = {source: module.kernels(Schedule.SHUFFLED, 20240607) for source, module in shim_modules.items()}

    def kernel(name: str) -> Any:
        if launched is not None:
            launched[name.rsplit("_b", 1)[0] if "_rows_b" in name else name] += 1
        return lookups[ENTRY_POINTS[name]](name)

    return Launchers(SentinelArrays(xp), kernel)


def policy(threshold: Any = 0.6, metric: str = "max_prob", route: str = "segments", **kwargs: Any) -> Policy:
    return Policy("test", "fp", (ExitRule(metric, threshold),) * 3, full_depth_route=route, **kwargs)


def scenario(name: str) -> tuple[FakeNetwork, CascadeBatch, Policy, dict[str, Any]]:
    """A network, a batch, a policy and run_cascade keywords that exercise one part of the cascade."""
    net = FakeNetwork(side_input="ATTENTION_MASK" if name.startswith("side input") else None)
    inputs = net.inputs(96)
    base = CascadeBatch.plain(inputs, 3)
    rows = np.arange(96)
    kwargs: dict[str, Any] = {"side_inputs": (net.side_input,) if net.side_input else ()}
    if name in ("plain", "side input"):
        return net, base, policy(0.6), kwargs
    if name == "entropy, per class":
        return net, base, policy((0.5, 0.9, 0.7, 0.8), "entropy"), kwargs
    if name == "margin":
        return net, base, policy(0.4, "margin"), kwargs
    if name == "cohorts":
        strict = (ExitRule("margin", 0.5, temperature=2.0),) * 3
        cohort_policy = policy(0.6, cohorts={"high_risk": strict})
        return (
            net,
            CascadeBatch(inputs, base.force_full, base.min_exit, base.max_exit, rule_set=rows % 2),
            cohort_policy,
            kwargs,
        )
    if name.endswith("to the full model"):
        kwargs["run_full"] = net.run_full
        forced = rows >= 0 if name.startswith("all rows") else rows % 5 == 0
        return (
            net,
            CascadeBatch(inputs, forced, base.min_exit, base.max_exit),
            policy(0.6, route="full_model"),
            kwargs,
        )
    if name == "min, max exit and deadlines":
        batch = CascadeBatch(
            inputs, rows % 7 == 0, np.where(rows < 20, 1, 0), np.where(rows >= 80, 0, 2),
            deadline=np.where(rows % 3 == 0, 0.0, np.inf),
        )  # fmt: skip
        kwargs["clock"] = lambda: 1.0
        return net, batch, policy(0.8), kwargs
    if name == "without compaction":
        kwargs["compact"] = False
        return net, base, policy(0.6), kwargs
    if name in RULES:
        return net, base, Policy("test", "fp", (RULES[name],) * 3, full_depth_route="segments"), kwargs
    if name == "a cohort per rule family":
        cohorts = {family: (rule,) * 3 for family, rule in RULES.items()}
        sets = rows % (len(RULES) + 1)  # the policy's own rules, then one cohort per family
        batch = CascadeBatch(inputs, base.force_full, base.min_exit, base.max_exit, rule_set=sets)
        return net, batch, policy(0.6, cohorts=cohorts), kwargs
    if name == "patience without compaction":
        kwargs["compact"] = False
        return net, base, Policy("test", "fp", (RULES["patience"],) * 3, full_depth_route="segments"), kwargs
    raise KeyError(name)


# One rule of each family that needs more than the kernel's figures, with settings that make the fake
# network's rows leave at every exit.
RULES = {
    "patience": ExitRule("max_prob", 0.9, patience=2, patience_discount=0.3),
    "learned score": ExitRule("score", 0.8, score_weights=(-1.0, 0.8, -0.5, 1.0, 1.5)),
    "novelty gate": ExitRule("max_prob", 0.6, energy_limit=-2.5),
    "novelty gates, energy and distance": ExitRule(
        "max_prob",
        0.6,
        energy_limit=-2.5,
        distance_limit=8.0,
        class_centres=tuple(tuple(6.0 if i == c else -2.0 for i in range(4)) for c in range(4)),
    ),
    "patience on entropy, per class": ExitRule(
        "entropy", (0.5, 0.9, 0.7, 0.8), temperature=1.5, patience=2, patience_discount=0.5
    ),
}


SCENARIOS = [
    "plain", "side input", "entropy, per class", "margin", "cohorts", "forced rows to the full model",
    "min, max exit and deadlines", "without compaction", "side input, forced rows to the full model",
    "all rows forced to the full model", *RULES, "a cohort per rule family", "patience without compaction",
]  # fmt: skip


def assert_same_answers(got: CascadeResult, want: CascadeResult) -> None:
    """Exits, labels, logits, flags, costs and row counts bit for bit; confidence to float32 rounding."""
    for name in ("exit", "label", "logits", "flags", "cost", "policy_exit"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), getattr(want, name), err_msg=name)
    assert got.rows_per_segment == want.rows_per_segment
    assert_confidence_close(np.asarray(got.confidence), want.confidence, np.asarray(got.logits).shape[1])


def assert_confidence_close(got: np.ndarray, want: np.ndarray, num_classes: int) -> None:
    """Two float32 computations of (B, 3) confidence: each is within the kernels' error bound of the
    float64 truth (offramp.kernels.testing), so they are within twice that of each other."""
    bound = 2 * relative_error_bound(num_classes) * (1 + np.log(num_classes))
    np.testing.assert_allclose(got, want, rtol=bound, atol=bound)


def run_numpy(name: str) -> tuple[CascadeResult, list[np.ndarray]]:
    net, batch, pol, kwargs = scenario(name)
    result = run_cascade(batch, net.run_segment, pol, COSTS, **kwargs)
    return result, net.calls


@pytest.mark.parametrize("name", SCENARIOS)
def test_kernel_path_answers_like_the_numpy_path(shim_modules, name: str) -> None:
    want, want_calls = run_numpy(name)
    net, batch, pol, kwargs = scenario(name)
    got = run_cascade(batch, net.run_segment, pol, COSTS, kernels=shim_kernels(shim_modules), **kwargs)
    assert_same_answers(got, want)
    assert len(net.calls) == len(want_calls)
    for seen, expected in zip(
        net.calls, want_calls, strict=True
    ):  # the same rows reached each segment, in order
        np.testing.assert_array_equal(seen, expected)


def test_the_kernels_make_the_decisions_and_move_the_rows(shim_modules, monkeypatch) -> None:
    """On the kernel path NumPy's confidence is never computed, and each segment launches its kernels."""
    import offramp.backend.cascade as cascade_module

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the kernel path computed confidence with NumPy")

    monkeypatch.setattr(cascade_module, "compute_confidence", refuse)
    monkeypatch.setattr(cascade_module, "rule_passes", refuse)  # a plain rule: the kernel alone decides
    launched: Counter = Counter()
    net, batch, pol, kwargs = scenario("side input")
    result = run_cascade(
        batch, net.run_segment, pol, COSTS, kernels=shim_kernels(shim_modules, launched=launched), **kwargs
    )
    segments = sum(1 for rows in result.rows_per_segment if rows)
    assert segments == 3
    assert launched["confidence_warp_f32"] == segments and launched["partition_rows"] == segments
    # Survivors of the first two segments: positions, hidden state and side input gathered; exited
    # rows: their positions gathered, then logits, labels and confidence scattered.
    assert launched["gather_rows"] >= 2 * 3 and launched["scatter_rows"] >= 3 * 2


# ----------------------------------------------------------------------------------------------
# The two row movers, step by step


def row_movers(shim_modules: dict[Path, ShimModule], pol: Policy) -> list[RowMover]:
    """Array indexing and the kernels (run by the CPU shim), both over NumPy."""
    sets = rule_sets(pol)
    return [IndexingRowMover(np, sets), KernelRowMover(np, shim_kernels(shim_modules), sets)]


@pytest.mark.parametrize(
    "leaving", [[0] * 7, [1] * 7, [1, 0, 0, 1, 1, 0, 1]], ids=["none leave", "all leave", "some leave"]
)
def test_both_row_movers_split_scatter_and_gather_alike(shim_modules, leaving: list[int]) -> None:
    leaving = np.array(leaving, dtype=bool)  # (n,)
    positions = np.array([9, 2, 7, 0, 4, 5, 8])  # (n,) original positions in a batch of 10
    rows = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)  # (n, 3)
    answered = np.full((10, 3), -1.0, dtype=np.float32)  # (B, 3)
    answered[positions[leaving]] = rows[leaving]
    for mover in row_movers(shim_modules, policy()):
        split = mover.split(leaving)
        assert (split.num_survivors, split.num_exited) == ((~leaving).sum(), leaving.sum())
        np.testing.assert_array_equal(split.survivors, np.flatnonzero(~leaving))
        np.testing.assert_array_equal(split.exited, np.flatnonzero(leaving))
        target = np.full((10, 3), -1.0, dtype=np.float32)  # (B, 3)
        np.testing.assert_array_equal(
            mover.scatter_exited(split, positions, [(rows, target)]), positions[leaving]
        )
        np.testing.assert_array_equal(target, answered)
        np.testing.assert_array_equal(mover.gather_survivors(split, rows), rows[~leaving])
        np.testing.assert_array_equal(mover.gather_survivors(split, positions), positions[~leaving])


def test_both_row_movers_decide_alike(shim_modules) -> None:
    """Each row by its own rule set (a cohort with its own metric, per-class thresholds and
    temperature); a row with a NaN logit never passes."""
    cohort = (ExitRule("entropy", (0.5, 0.9, 0.7, 0.8), temperature=2.0),) * 3
    logits = np.random.default_rng(3).normal(0, 3, (40, 4)).astype(np.float32)  # (n, C)
    logits[3, 1] = np.nan
    groups = np.arange(40) % 2  # (n,)
    by_indexing, by_kernels = (
        mover.decide(logits, 1, groups, LabelHistory.fresh(40))
        for mover in row_movers(shim_modules, policy(0.6, cohorts={"high_risk": cohort}))
    )
    np.testing.assert_array_equal(by_kernels.logits, by_indexing.logits)
    assert by_kernels.passes.dtype == by_indexing.passes.dtype == bool
    np.testing.assert_array_equal(by_kernels.passes, by_indexing.passes)
    assert 0 < by_indexing.passes.sum() < 40 and not by_indexing.passes[3]
    np.testing.assert_array_equal(by_kernels.confidence.label, by_indexing.confidence.label)
    assert_confidence_close(by_kernels.confidence.stacked(), by_indexing.confidence.stacked(), 4)


def test_the_kernels_move_the_rows_where_given_or_on_cupy() -> None:
    sets = rule_sets(policy())
    assert isinstance(row_mover(np, sets), IndexingRowMover)
    assert isinstance(row_mover(np, sets, kernels=Launchers(np, lambda name: None)), KernelRowMover)
    cupy = pytest.importorskip("cupy")
    mover = row_mover(cupy, sets)
    assert isinstance(mover, KernelRowMover) and mover.kernels.xp is cupy


# ----------------------------------------------------------------------------------------------
# The device cascade: on the device end to end


def test_device_cascade_keeps_tensors_on_the_device(shim_modules) -> None:
    device = StandInDevice()
    want, _ = run_numpy("side input")
    net, batch, pol, kwargs = scenario("side input")
    received = []

    def run_segment(index: int, tensors: dict, need_hidden: bool) -> tuple:
        received.extend((index, name, type(t)) for name, t in tensors.items())
        return net.run_segment(index, tensors, need_hidden)

    DeviceArray.host_copies = 0
    got = DeviceCascade(device, shim_kernels(shim_modules, device))(batch, run_segment, pol, COSTS, **kwargs)
    assert_same_answers(got, want)
    assert not [r for r in received if r[2] is not DeviceArray], "a segment received a host array"
    for name in ("logits", "label", "exit", "confidence", "cost", "flags", "policy_exit"):
        assert type(getattr(got, name)) is np.ndarray, f"{name} was not brought back to the host"
    # The answers come back once, one copy per output array; nothing else crossed to the host.
    arrays = [
        f.name for f in fields(CascadeResult) if f.name not in ("rows_per_segment", "outage", "unfinished")
    ]
    assert DeviceArray.host_copies == len(arrays)  # one copy each; no outage, so no `unfinished`


def test_device_cascade_runs_the_forced_rows_on_the_device_too(shim_modules) -> None:
    device = StandInDevice()
    want, _ = run_numpy("forced rows to the full model")
    net, batch, pol, kwargs = scenario("forced rows to the full model")
    seen = []

    def run_full(tensors: dict) -> Any:
        seen.extend(type(t) for t in tensors.values())
        return net.run_full(tensors)

    kwargs["run_full"] = run_full
    got = DeviceCascade(device, shim_kernels(shim_modules, device))(
        batch, net.run_segment, pol, COSTS, **kwargs
    )
    assert_same_answers(got, want)
    assert seen and all(t is DeviceArray for t in seen)


def test_orchestrator_answers_the_same_on_the_device(shim_modules) -> None:
    net = FakeNetwork()
    pol = Policy("p1", "fp", (ExitRule("max_prob", 0.6),) * 3)
    requests = [
        FakeRequest({"X": good_rows(net, 0, 5)}),
        FakeRequest({"X": good_rows(net, 5, 7)}, {"force_full": True}),
        FakeRequest({"X": np.zeros((2, 5), np.float32)}),  # a bad request: answered with its error alone
        FakeRequest({"X": good_rows(net, 12, 9)}, {"max_exit": 1}),
    ]
    device = StandInDevice()
    host = Orchestrator(SPEC, pol).execute(requests, FakeNetwork().run_segment, net.run_model)
    on_device = Orchestrator(
        SPEC, pol, cascade=DeviceCascade(device, shim_kernels(shim_modules, device))
    ).execute(requests, FakeNetwork().run_segment, net.run_model)
    assert isinstance(on_device[2], Exception) and str(on_device[2]) == str(host[2])
    for got, want in zip(on_device, host, strict=True):
        if isinstance(want, Exception):
            continue
        for name in ("LOGITS", "LABEL", "EXIT", "COST", "FLAGS"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert_confidence_close(got["CONFIDENCE"], want["CONFIDENCE"], len(SPEC.class_names))


# ----------------------------------------------------------------------------------------------
# Selection


def fake_gpu_cascade(made: list[int]) -> Any:
    def make(device_id: int) -> Any:
        made.append(device_id)
        return "the GPU cascade"

    return make


def test_the_host_is_the_default() -> None:
    cascade, placement = select_cascade(DeviceRequest.from_parameters({}), "GPU", "0", fake_gpu_cascade([]))
    assert cascade is run_cascade and placement.device == "cpu" and not placement.fell_back


def test_a_gpu_instance_gets_its_own_device() -> None:
    made: list[int] = []
    request = DeviceRequest.from_parameters({"offramp_device": "gpu"})
    cascade, placement = select_cascade(request, "GPU", "1", fake_gpu_cascade(made))
    assert cascade == "the GPU cascade" and made == [1]
    assert placement == Placement("gpu", 1, "CuPy and the CUDA kernels on GPU 1")


def test_a_kind_cpu_instance_falls_back_or_refuses_with_the_reason() -> None:
    made: list[int] = []
    cascade, placement = select_cascade(DeviceRequest("gpu"), "CPU", "0", fake_gpu_cascade(made))
    assert cascade is run_cascade and placement.fell_back and not made
    assert "KIND_GPU" in placement.reason and "serving on the CPU" in placement.reason
    with pytest.raises(DeviceUnavailable, match="KIND_CPU.*use KIND_GPU"):
        select_cascade(DeviceRequest("gpu", "none"), "KIND_CPU", "0", fake_gpu_cascade(made))


def test_without_cupy_or_a_gpu_here_the_reason_names_what_is_missing() -> None:
    """The real probe: on this machine (CuPy installed, no GPU) or on one without CuPy at all."""
    reason = gpu_unavailable_reason(0)
    if reason is None:
        pytest.skip("a CUDA device is visible here: the GPU path is taken (make gpu-check covers it)")
    cascade, placement = select_cascade(DeviceRequest("gpu"), "GPU", "0")
    assert cascade is run_cascade and placement.fell_back and reason in placement.reason
    assert "CuPy" in reason
    with pytest.raises(DeviceUnavailable, match="offramp_device_fallback is none"):
        select_cascade(DeviceRequest("gpu", "none"), "GPU", "0")


@pytest.mark.parametrize("parameters", [{"offramp_device": "tpu"}, {"offramp_device_fallback": "maybe"}])
def test_unknown_values_are_refused(parameters: dict) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        DeviceRequest.from_parameters(parameters)


def test_request_round_trips_through_parameters() -> None:
    request = DeviceRequest("gpu", "none")
    assert DeviceRequest.from_parameters(request.to_parameters()) == request


def test_imports_stay_lazy() -> None:
    """Everything imports on a machine without CuPy, a GPU or TensorRT; nothing imports them eagerly."""
    modules = [
        "offramp.backend.cascade", "offramp.backend.device", "offramp.kernels.cuda",
        "offramp.client.tools.gpu_check", "offramp.build.tensorrt", "offramp.build.execution_env",
        "offramp.build.repository",
    ]  # fmt: skip
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        "eager = [m for m in ('cupy', 'tensorrt') if m in sys.modules]\nassert not eager, eager"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# The BLS adapter, with fake Triton and CuPy modules that record what they are asked


class FakeCudaArray:
    """A device array as the adapter sees one: the CUDA array interface, C order, DLPack export."""

    def __init__(self, data: np.ndarray, c_contiguous: bool = True) -> None:
        self.data = data
        self.flags = types.SimpleNamespace(c_contiguous=c_contiguous)
        self.__cuda_array_interface__ = {"shape": data.shape}

    def copy(self) -> FakeCudaArray:
        return FakeCudaArray(self.data.copy())

    def __dlpack__(self) -> tuple:
        return ("capsule", self)


class FakeTensor:
    def __init__(self, name: str, data: Any, on_gpu: bool = False) -> None:
        self.name, self.data, self.on_gpu = name, data, on_gpu

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> FakeTensor:
        return cls(name, capsule, on_gpu=True)

    def is_cpu(self) -> bool:
        return not self.on_gpu

    def as_numpy(self) -> np.ndarray:
        assert not self.on_gpu, "as_numpy() of a GPU tensor"
        return self.data

    def to_dlpack(self) -> tuple:
        return ("capsule", self.data)


def fake_cupy() -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.calls = []
    cupy.asarray = lambda a: cupy.calls.append(("asarray", a)) or ("device copy of", a)
    cupy.from_dlpack = lambda capsule: cupy.calls.append(("from_dlpack", capsule)) or ("shared", capsule)
    stream = types.SimpleNamespace(synchronize=lambda: cupy.calls.append(("synchronize",)))
    cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: stream)
    return cupy


def fake_pb_utils(outputs: dict[str, FakeTensor]) -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.requests = []
    pb.logged = []
    pb.Tensor = FakeTensor
    pb.TRITONSERVER_MEMORY_CPU, pb.TRITONSERVER_MEMORY_GPU = "CPU", "GPU"
    pb.PreferredMemory = lambda kind, device_id=0: ("preferred", kind, device_id)
    pb.TritonError = RuntimeError

    class InferenceRequest:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs
            pb.requests.append(kwargs)

        def exec(self) -> Any:
            return types.SimpleNamespace(has_error=lambda: False)

    pb.InferenceRequest = InferenceRequest
    pb.get_output_tensor_by_name = lambda response, name: outputs[name]
    pb.Logger = types.SimpleNamespace(
        log_info=lambda m: pb.logged.append(("info", m)), log_error=lambda m: pb.logged.append(("error", m))
    )
    pb.MetricFamily = FakeMetricFamily
    return pb


class FakeMetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2

    def __init__(self, **kwargs: Any) -> None:
        pass

    def Metric(self, **kwargs: Any) -> Any:
        return types.SimpleNamespace(increment=lambda v: None, set=lambda v: None, observe=lambda v: None)


def test_bls_tensors_go_by_dlpack_on_the_device() -> None:
    pb = fake_pb_utils({})
    strided = FakeCudaArray(np.zeros((2, 3)), c_contiguous=False)
    tensor = to_bls_tensor(pb, "hidden_in", strided)
    assert (
        tensor.on_gpu and tensor.data[0] == "capsule" and tensor.data[1] is not strided
    )  # copied to C order
    host = to_bls_tensor(pb, "IMAGE", np.zeros((2, 3), np.float32)[:, ::2])
    assert not host.on_gpu and host.data.flags.c_contiguous
    cupy = fake_cupy()
    assert from_bls_tensor(FakeTensor("logits", "gpu memory", on_gpu=True), cupy) == (
        "shared",
        ("capsule", "gpu memory"),
    )
    assert from_bls_tensor(FakeTensor("logits", np.ones(2)), cupy)[0] == "device copy of"
    assert [c[0] for c in cupy.calls] == ["from_dlpack", "asarray"]


@pytest.fixture
def adapter(monkeypatch: pytest.MonkeyPatch):
    """offramp.backend.triton_orchestrator imported against fake Triton and CuPy modules."""
    outputs = {
        "hidden": FakeTensor("hidden", "gpu hidden", on_gpu=True),
        "logits": FakeTensor("logits", "gpu logits", on_gpu=True),
    }
    pb, cupy = fake_pb_utils(outputs), fake_cupy()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.delitem(sys.modules, "offramp.backend.triton_orchestrator", raising=False)
    import offramp.backend.triton_orchestrator as module

    yield module, pb, cupy
    sys.modules.pop("offramp.backend.triton_orchestrator", None)


def test_adapter_asks_for_gpu_outputs_when_its_inputs_are_on_the_device(adapter) -> None:
    module, pb, cupy = adapter
    hidden, logits = module._bls(
        "toy_segment_1", {"hidden_in": FakeCudaArray(np.zeros(2))}, ["hidden", "logits"], 0
    )
    request = pb.requests[-1]
    assert request["preferred_memory"] == ("preferred", "GPU", 0)
    assert request["inputs"][0].on_gpu  # handed over by DLPack, not through NumPy
    assert cupy.calls[0] == ("synchronize",)  # before the segment reads what the kernels wrote
    assert hidden == ("shared", ("capsule", "gpu hidden")) and logits[0] == "shared"


def test_adapter_asks_for_host_outputs_on_the_host_path(adapter) -> None:
    module, pb, cupy = adapter
    pb_outputs = {"LOGITS": FakeTensor("LOGITS", np.ones((1, 3), np.float32))}
    pb.get_output_tensor_by_name = lambda response, name: pb_outputs[name]
    (logits,) = module._bls(
        "toy_full", {"IMAGE": np.zeros((1, 1, 8, 8), np.float32)}, ["LOGITS"], device_id=0
    )
    assert pb.requests[-1]["preferred_memory"] == ("preferred", "CPU", 0) and not cupy.calls
    np.testing.assert_array_equal(logits, np.ones((1, 3), np.float32))


def write_toy_orchestrator(tmp_path: Path, parameters: dict[str, str]) -> dict[str, str]:
    """A version folder of the toy model's orchestrator, and the ``args`` Triton would pass."""
    from offramp.build.repository import RepositoryOptions, write_orchestrator
    from tests.test_repository import ARTIFACTS

    model_dir = write_orchestrator(
        ARTIFACTS, Policy.fixed(ARTIFACTS.fingerprint, 2), tmp_path, RepositoryOptions()
    )
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    return {
        "model_repository": str(model_dir),
        "model_version": "1",
        "model_name": "toy",
        "model_instance_name": "toy_0",
        "model_config": json.dumps(config),
    }


def test_adapter_falls_back_to_the_host_and_logs_why(adapter, tmp_path: Path) -> None:
    module, pb, _ = adapter
    args = write_toy_orchestrator(tmp_path, {"offramp_device": "gpu"})
    model = module.TritonPythonModel()
    model.initialize({**args, "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    assert model.device_id is None
    level, message = pb.logged[-1]
    assert level == "error" and "KIND_GPU" in message and "serving on the CPU" in message


def test_adapter_refuses_to_load_when_told_not_to_fall_back(adapter, tmp_path: Path) -> None:
    module, _, _ = adapter
    args = write_toy_orchestrator(tmp_path, {"offramp_device": "gpu", "offramp_device_fallback": "none"})
    with pytest.raises(DeviceUnavailable, match="KIND_CPU"):
        module.TritonPythonModel().initialize(
            {**args, "model_instance_kind": "CPU", "model_instance_device_id": "0"}
        )


def test_adapter_hands_a_gpu_cascade_to_the_orchestrator(adapter, tmp_path: Path, monkeypatch) -> None:
    module, pb, _ = adapter
    device_cascade = DeviceCascade(StandInDevice(), kernels=None)
    real_select = module.select_cascade
    monkeypatch.setattr(
        module,
        "select_cascade",
        lambda request, kind, device_id: real_select(request, kind, device_id, lambda i: device_cascade),
    )
    args = write_toy_orchestrator(tmp_path, {"offramp_device": "gpu"})
    model = module.TritonPythonModel()
    model.initialize({**args, "model_instance_kind": "GPU", "model_instance_device_id": "1"})
    assert model.device_id == 1 and model.orchestrator.cascade is device_cascade
    assert pb.logged[-1] == ("info", "toy (toy_0-v1): CuPy and the CUDA kernels on GPU 1")


# ----------------------------------------------------------------------------------------------
# make gpu-check, on a machine without a GPU


@pytest.mark.parametrize(
    "how",
    [["client/tools/gpu_check.py"], ["-m", "offramp.client.cli.main", "gpu-check"]],
    ids=["script", "subcommand"],
)
def test_gpu_check_without_a_device_says_so_and_fails(how: list[str]) -> None:
    from offramp.client.tools.gpu_check import NO_DEVICE_STATUS, no_device_reason

    if no_device_reason() is None:
        pytest.skip("a CUDA device is visible here: gpu-check would run for real")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, *how, "--quick"], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == NO_DEVICE_STATUS
    assert "gpu-check: no CUDA device" in result.stderr and "nothing was checked" in result.stderr


@pytest.mark.parametrize("num_classes, rows", [(10, 128), (1000, 48)])
def test_gpu_check_cascade_comparison_on_the_cpu(shim_modules, num_classes: int, rows: int) -> None:
    """gpu-check's own cascade check, with NumPy and the CPU shim's kernels in place of CuPy and the GPU."""
    from offramp.client.tools.gpu_check import compare_cascades

    summary = compare_cascades(np, shim_kernels(shim_modules), rows, num_classes)
    max_prob_exits = [int(n) for n in summary.split("max-prob: exits ")[1].split(";")[0].split("/")]
    assert sum(max_prob_exits) == rows and sum(n > 0 for n in max_prob_exits) >= 3, summary


# ----------------------------------------------------------------------------------------------
# A real tritonserver (CPU): an orchestrator asked for a GPU it cannot have serves on the host


@pytest.mark.integration
def test_served_gpu_orchestrator_without_a_gpu_falls_back_and_says_why(
    quick_cnn, fashion_test, tmp_path: Path, running_server, execution_env
) -> None:
    """The real stub imports the device path, logs the reason at error level and answers as the cascade.

    The orchestrator's instance group is turned to KIND_CPU by hand: this server has no GPU to give
    a KIND_GPU instance, so that is the case a CPU machine can reach (CuPy without a GPU is the other).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from offramp.build.repository import RepositoryOptions, write_repository
    from offramp.client.grpc_client import OfframpClient
    from tests.served_reference import Reference, spread_policy
    from tests.test_served_cnn import assert_matches

    artifacts, directory = quick_cnn
    images = fashion_test[0][:64]
    policy = spread_policy(artifacts, directory, {"IMAGE": images})
    options = RepositoryOptions(execution_env=execution_env, orchestrator_device="gpu")
    write_repository(artifacts, directory, policy, tmp_path / "repo", options)
    config_path = tmp_path / "repo" / artifacts.name / "config.pbtxt"
    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    assert config.parameters["offramp_device"].string_value == "gpu"
    config.instance_group[0].kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
    config_path.write_text(text_format.MessageToString(config))
    with running_server(tmp_path / "repo") as server, OfframpClient(server.grpc_url) as client:
        assert_matches(
            client.classify(artifacts.name, images),
            Reference(artifacts, directory, policy)({"IMAGE": images}),
        )
        log = server.log_path.read_text(errors="replace")
    assert "offramp_device is gpu but the orchestrator's instance_group is KIND_CPU" in log
    assert "serving on the CPU (NumPy) instead" in log


@pytest.mark.slow
def test_gpu_check_kernel_section_on_the_cpu(shim_modules) -> None:
    """gpu-check's kernel checks at smoke sizes, NumPy and the CPU shim in place of CuPy and the GPU:
    the script's own code (names, arguments, sizes) runs; the checks themselves pass as in the shim tests."""
    from offramp.client.tools.gpu_check import SIZES, Report, kernel_checks

    lookups = {source: module.kernels(Schedule.SHUFFLED, 7) for source, module in shim_modules.items()}
    report = Report()
    kernel_checks(report, SIZES["smoke"], np, lambda name: lookups[ENTRY_POINTS[name]](name))
    assert report.failed == 0, report.table()
    assert len(report.rows) == len(SIZES["smoke"].classes) + 8  # the compile check is the GPU's alone


def test_gpu_check_finds_offramp_in_the_checkout_when_it_is_not_installed(tmp_path: Path) -> None:
    """The GPU machine has CuPy and NumPy but not offramp: the script maps the checkout's folders."""
    root = Path(__file__).resolve().parent.parent
    script = root / "client" / "tools" / "gpu_check.py"
    code = f"""
import importlib.util, sys
# Without the editable install's finder, offramp is not importable, as on a machine that never installed it.
sys.meta_path = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "").lower()]
try:
    import offramp.kernels.cuda
    raise SystemExit("offramp is still importable: the test cannot hide it")
except ImportError:
    pass
spec = importlib.util.spec_from_file_location("gpu_check", {str(script)!r})
module = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = module
spec.loader.exec_module(module)
module._import_offramp()
import offramp.backend.device, offramp.kernels.cuda, offramp.kernels.testing
print(offramp.kernels.cuda.__file__, offramp.backend.device.__file__)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == [
        str(root / "kernels" / "cuda.py"),
        str(root / "python_backend" / "device.py"),
    ]
