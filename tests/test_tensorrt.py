"""TensorRT segments, on a machine without TensorRT.

Verified here: the profile sizing (a pure function), the manifest, the repository writer's
``triton-tensorrt`` target and the ``triton-onnx`` target's TensorRT accelerator (configs round-trip
through Triton's own protobuf schema and ``text_format``), the lazy import and its message.

``FakeTensorRT`` records the calls the builder makes and returns placeholder bytes: it checks the
call sequence against TensorRT's Python API as documented, nothing more. No engine is built here;
whether TensorRT accepts these calls and the exported ONNX is only known where TensorRT runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from offramp.backend.contract import TensorSpec
from offramp.backend.orchestrator import Orchestrator
from offramp.backend.policy import Policy
from offramp.build import execution_env, tensorrt
from offramp.build.artifacts import ModelArtifacts, SegmentArtifact
from offramp.build.repository import (
    OnnxTensorRT,
    RepositoryOptions,
    engine_profiles,
    full_model_config,
    orchestrator_model_config,
    segment_model_configs,
    write_repository,
)
from offramp.build.tensorrt import (
    AxisRange,
    EngineBuildError,
    EngineSet,
    EngineSettings,
    TensorRTUnavailable,
    batch_range,
    engines_from_artifacts,
    segment_profiles,
    survival_fractions,
)
from tests.test_repository import ARTIFACTS

TEXT_ARTIFACTS = ModelArtifacts(
    name="text",
    inputs=(TensorSpec("INPUT_IDS", "int64", (-1,)), TensorSpec("ATTENTION_MASK", "int64", (-1,))),
    side_inputs=("ATTENTION_MASK",),
    class_names=("a", "b"),
    segments=(
        SegmentArtifact(
            "segment_0.onnx",
            ("INPUT_IDS", "ATTENTION_MASK"),
            TensorSpec("hidden", "float32", (-1, 32)),
            1,
            0.5,
        ),
        SegmentArtifact(
            "segment_1.onnx",
            ("hidden_in", "ATTENTION_MASK"),
            TensorSpec("hidden", "float32", (-1, 32)),
            1,
            1.0,
        ),
    ),
    full_onnx="full.onnx",
    full_macs=2,
    fingerprint="t" * 64,
    build={"max_length": 64},
)


def calibrated_policy(artifacts: ModelArtifacts, exit_rates: tuple[float, ...]) -> Policy:
    policy = Policy.fixed(artifacts.fingerprint, artifacts.num_exits)
    return replace(policy, provenance={"exit_rate_profile": list(exit_rates)})


# ----------------------------------------------------------------------------------------------
# Sizing


def test_survival_is_what_earlier_exits_left() -> None:
    assert survival_fractions((0.5, 0.3, 0.2), 3) == pytest.approx((1.0, 0.5, 0.2))
    assert survival_fractions((500, 300, 200), 3) == pytest.approx((1.0, 0.5, 0.2))  # counts work as well
    assert survival_fractions((1.0, 0.0, 0.0), 3) == pytest.approx((1.0, 0.0, 0.0))
    assert survival_fractions(None, 3) == (1.0, 1.0, 1.0)  # uncalibrated: sized for the whole batch


@pytest.mark.parametrize("rates", [(0.5, 0.5), (0.5, -0.1, 0.6), (0.0, 0.0, 0.0), (float("nan"), 1, 1)])
def test_bad_exit_rates_are_refused(rates: tuple) -> None:
    with pytest.raises(ValueError, match="exit rates"):
        survival_fractions(rates, 3)


@pytest.mark.parametrize(
    "survival, opt_batch, max_batch, opt",
    [
        (1.0, 64, 256, 64),
        (0.5, 64, 256, 32),
        (0.5, 5, 8, 3),  # 2.5 rounds half up
        (0.3, 5, 8, 2),  # 1.5 too
        (0.001, 64, 256, 1),  # never below 1
        (0.0, 64, 256, 1),
        (1.0, 256, 256, 256),
    ],
)
def test_batch_range(survival: float, opt_batch: int, max_batch: int, opt: int) -> None:
    assert batch_range(survival, opt_batch, max_batch) == AxisRange(1, opt, max_batch)


@pytest.mark.parametrize(
    "survival, opt_batch, max_batch", [(1.5, 8, 8), (-0.1, 8, 8), (1.0, 9, 8), (1.0, 0, 8)]
)
def test_batch_range_refuses_nonsense(survival: float, opt_batch: int, max_batch: int) -> None:
    with pytest.raises(ValueError):
        batch_range(survival, opt_batch, max_batch)


def test_image_profiles_shrink_with_depth_and_chain_the_hidden_shapes() -> None:
    first, second, full = segment_profiles(ARTIFACTS, (0.75, 0.25), opt_batch=128, max_batch=256)
    assert (first.segment, first.onnx, first.survival) == (0, "segment_0.onnx", 1.0)
    assert first.batch == AxisRange(1, 128, 256) and second.batch == AxisRange(1, 32, 256)
    assert [(s.name, s.min, s.opt, s.max) for s in first.inputs] == [
        ("IMAGE", (1, 1, 8, 8), (128, 1, 8, 8), (256, 1, 8, 8))
    ]
    assert [(s.name, s.opt) for s in second.inputs] == [("hidden_in", (32, 4, 4, 4))]
    assert (full.segment, full.onnx, full.batch.opt) == (None, "full.onnx", 128)
    assert second.preferred_batch_sizes == (32,)


def test_text_profiles_take_the_sequence_axes_from_the_max_length() -> None:
    first, second, _ = segment_profiles(
        TEXT_ARTIFACTS, (0.6, 0.4), opt_batch=100, max_batch=200, opt_length=48
    )
    assert [(s.name, s.min, s.opt, s.max) for s in first.inputs] == [
        ("INPUT_IDS", (1, 1), (100, 48), (200, 64)),
        ("ATTENTION_MASK", (1, 1), (100, 48), (200, 64)),
    ]
    assert [(s.name, s.min, s.opt, s.max) for s in second.inputs] == [
        ("hidden_in", (1, 1, 32), (40, 48, 32), (200, 64, 32)),
        ("ATTENTION_MASK", (1, 1), (40, 48), (200, 64)),
    ]
    assert second.onnx_runtime_shapes() == {
        "trt_profile_min_shapes": "hidden_in:1x1x32,ATTENTION_MASK:1x1",
        "trt_profile_opt_shapes": "hidden_in:40x48x32,ATTENTION_MASK:40x48",
        "trt_profile_max_shapes": "hidden_in:200x64x32,ATTENTION_MASK:200x64",
    }


def test_a_variable_axis_without_a_max_length_is_refused() -> None:
    with pytest.raises(ValueError, match="INPUT_IDS has a variable axis"):
        segment_profiles(replace(TEXT_ARTIFACTS, build={}), None, 8, 8)


def test_engine_set_round_trips_and_checks_its_onnx(tmp_path: Path) -> None:
    profiles = segment_profiles(ARTIFACTS, (0.5, 0.5), 64, 256)
    engines = EngineSet(
        ARTIFACTS.fingerprint,
        "10.9.0",
        "fp16",
        tuple(tensorrt.Engine(f"p{i}", p) for i, p in enumerate(profiles)),
    )
    engines.save(tmp_path)
    loaded = EngineSet.load(tmp_path)
    assert loaded == engines and loaded.check_against(ARTIFACTS) is loaded
    assert loaded.engine_for(None).plan == "p2"
    with pytest.raises(ValueError, match="rebuild them"):
        loaded.check_against(replace(ARTIFACTS, fingerprint="0" * 64))
    with pytest.raises(FileNotFoundError, match="offramp.build.tensorrt"):
        EngineSet.load(tmp_path / "elsewhere")


# ----------------------------------------------------------------------------------------------
# The builder, against a fake TensorRT module (call sequence only)


class FakeTensorRT(types.ModuleType):
    """Stands in for ``tensorrt``: records every call, parses nothing, builds nothing.

    Its networks take their inputs from ``network_inputs`` (file name -> [(name, shape)]); its plans
    are placeholder bytes naming the file, so tests can see which plan came from which ONNX file.
    """

    def __init__(
        self, network_inputs: dict[str, list[tuple[str, tuple[int, ...]]]], version: str = "10.9.0"
    ) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: list[tuple] = []
        self.fail_parse: set[str] = set()
        self.fail_build = False
        record, fake = self.calls.append, self

        class Logger:
            WARNING = "warning"

            def __init__(self, severity: str) -> None:
                record(("Logger", severity))

        class Network:
            def __init__(self) -> None:
                self.inputs: list[tuple[str, tuple[int, ...]]] = []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, index: int) -> Any:
                name, shape = self.inputs[index]
                return types.SimpleNamespace(name=name, shape=shape)

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path: str) -> bool:
                record(("parse_from_file", Path(path).name))
                if Path(path).name in fake.fail_parse:
                    self.num_errors = 1
                    return False
                self.network.inputs = network_inputs[Path(path).name]
                self.network.file = Path(path).name
                return True

            def get_error(self, index: int) -> str:
                return "fake parse error"

        class Profile:
            def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
                record(("set_shape", name, tuple(low), tuple(opt), tuple(high)))

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                record(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag: str) -> None:
                record(("set_flag", flag))

            def add_optimization_profile(self, profile: Profile) -> None:
                record(("add_optimization_profile",))

        class Builder:
            def __init__(self, logger: Logger) -> None:
                record(("Builder",))

            def create_network(self, flags: int) -> Network:
                record(("create_network", flags))
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
                record(("build_serialized_network",))
                return None if fake.fail_build else f"FAKE PLAN of {network.file}".encode()

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(FP16="fp16")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)


NETWORK_INPUTS = {
    "segment_0.onnx": [("IMAGE", (-1, 1, 8, 8))],
    "segment_1.onnx": [("hidden_in", (-1, 4, 4, 4))],
    "full.onnx": [("IMAGE", (-1, 1, 8, 8))],
}


def test_builder_call_sequence_with_a_fake_tensorrt(tmp_path: Path) -> None:
    fake = FakeTensorRT(NETWORK_INPUTS)
    profiles = segment_profiles(ARTIFACTS, (0.75, 0.25), 128, 256)
    engines = engines_from_artifacts(ARTIFACTS, tmp_path, profiles, EngineSettings("fp16", 1 << 28), trt=fake)
    assert fake.calls[:2] == [("Logger", "warning"), ("Builder",)]
    first_engine = fake.calls[2:10]
    assert first_engine == [
        ("create_network", 0),  # TensorRT 10: explicit batch is the only kind, the flag is gone
        ("parse_from_file", "segment_0.onnx"),
        ("set_memory_pool_limit", "workspace", 1 << 28),
        ("set_flag", "fp16"),
        ("set_shape", "IMAGE", (1, 1, 8, 8), (128, 1, 8, 8), (256, 1, 8, 8)),
        ("add_optimization_profile",),
        ("build_serialized_network",),
        ("create_network", 0),
    ]
    assert ("set_shape", "hidden_in", (1, 4, 4, 4), (32, 4, 4, 4), (256, 4, 4, 4)) in fake.calls
    # What was written: the fake's placeholder bytes under each engine's name, and the manifest.
    assert (tmp_path / "segment_1.plan").read_bytes() == b"FAKE PLAN of segment_1.onnx"
    assert (tmp_path / "full.plan").read_bytes() == b"FAKE PLAN of full.onnx"
    assert EngineSet.load(tmp_path) == engines and engines.tensorrt_version == "10.9.0"
    assert [e.profile for e in engines.engines] == list(profiles)


def test_builder_asks_tensorrt_8_for_an_explicit_batch_network(tmp_path: Path) -> None:
    fake = FakeTensorRT(NETWORK_INPUTS, version="8.6.1")
    profiles = segment_profiles(ARTIFACTS, None, 8, 8)[:1]
    engines_from_artifacts(ARTIFACTS, tmp_path, profiles, EngineSettings("fp32"), trt=fake)
    assert ("create_network", 1) in fake.calls and not [c for c in fake.calls if c[0] == "set_flag"]


def test_builder_reports_what_tensorrt_refused(tmp_path: Path) -> None:
    profiles = segment_profiles(ARTIFACTS, None, 8, 8)
    fake = FakeTensorRT(NETWORK_INPUTS)
    fake.fail_parse = {"segment_1.onnx"}
    with pytest.raises(EngineBuildError, match="could not parse segment_1.onnx: fake parse error"):
        engines_from_artifacts(ARTIFACTS, tmp_path, profiles, trt=fake)
    fake = FakeTensorRT({**NETWORK_INPUTS, "segment_0.onnx": [("IMAGE", (4, 1, 8, 8))]})
    with pytest.raises(EngineBuildError, match="axis 0 of IMAGE is fixed at 4.*symbolic batch"):
        engines_from_artifacts(ARTIFACTS, tmp_path, profiles, trt=fake)
    fake = FakeTensorRT({**NETWORK_INPUTS, "segment_0.onnx": [("PIXELS", (-1, 1, 8, 8))]})
    with pytest.raises(EngineBuildError, match=r"has inputs \['PIXELS'\]"):
        engines_from_artifacts(ARTIFACTS, tmp_path, profiles, trt=fake)
    fake = FakeTensorRT(NETWORK_INPUTS)
    fake.fail_build = True
    with pytest.raises(EngineBuildError, match="could not build an engine of segment_0.onnx"):
        engines_from_artifacts(ARTIFACTS, tmp_path, profiles, trt=fake)


def test_without_tensorrt_the_error_says_where_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, as it does here
    with pytest.raises(TensorRTUnavailable, match="nvcr.io/nvidia/tritonserver.*pip install tensorrt-cu12"):
        tensorrt.import_tensorrt()


def test_command_line_dry_run_and_missing_tensorrt(tmp_path: Path, capsys, monkeypatch) -> None:
    ARTIFACTS.save(tmp_path)
    calibrated_policy(ARTIFACTS, (0.75, 0.25)).save(tmp_path / "policy.json")
    common = [
        str(tmp_path),
        "--policy",
        str(tmp_path / "policy.json"),
        "--max-batch",
        "256",
        "--opt-batch",
        "128",
    ]
    assert tensorrt.main([*common, "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "segment 1" in table and "1/32/256" in table and "hidden_in 32x4x4x4" in table
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert tensorrt.main(common) == 2
    assert "TensorRT is not installed here" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.plan"))


# ----------------------------------------------------------------------------------------------
# The repository writer's targets


def parse(text: str) -> pb.ModelConfig:
    return text_format.Parse(text, pb.ModelConfig())


def fake_engines(tmp_path: Path, artifacts: ModelArtifacts = ARTIFACTS) -> Path:
    """An artifacts folder with ONNX placeholders and engines 'built' by FakeTensorRT."""
    artifacts_dir = tmp_path / "artifacts"
    artifacts_dir.mkdir()
    for name in ["segment_0.onnx", "segment_1.onnx", "full.onnx"]:
        (artifacts_dir / name).write_bytes(b"onnx")
    profiles = segment_profiles(artifacts, (0.75, 0.25), 128, 256)
    engines_from_artifacts(artifacts, artifacts_dir, profiles, trt=FakeTensorRT(NETWORK_INPUTS))
    return artifacts_dir


def test_triton_tensorrt_target_serves_the_plans_on_the_gpu(tmp_path: Path) -> None:
    artifacts_dir = fake_engines(tmp_path)
    policy = calibrated_policy(ARTIFACTS, (0.75, 0.25))
    written = write_repository(
        ARTIFACTS, artifacts_dir, policy, tmp_path / "repo", RepositoryOptions(target="triton-tensorrt")
    )
    configs = {path.name: parse((path / "config.pbtxt").read_text()) for path in written}
    for name, preferred in [("toy_segment_0", 128), ("toy_segment_1", 32), ("toy_full", 128)]:
        config = configs[name]
        assert config.platform == "tensorrt_plan" and not config.backend and not config.parameters
        assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        assert list(config.dynamic_batching.preferred_batch_size) == [preferred]
        assert not (tmp_path / "repo" / name / "1" / "model.onnx").exists()
    assert (tmp_path / "repo/toy_segment_1/1/model.plan").read_bytes() == b"FAKE PLAN of segment_1.onnx"
    orchestrator = configs["toy"]
    assert (
        orchestrator.backend == "python"
        and orchestrator.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    )
    assert orchestrator.parameters["offramp_device"].string_value == "gpu"
    assert orchestrator.parameters["offramp_device_fallback"].string_value == "cpu"
    assert Orchestrator.from_directory(tmp_path / "repo/toy/1").spec.segment_models == (
        "toy_segment_0",
        "toy_segment_1",
    )


def test_triton_tensorrt_target_needs_engines_of_these_onnx_files(tmp_path: Path) -> None:
    options = RepositoryOptions(target="triton-tensorrt", device_fallback="none")
    policy = Policy.fixed(ARTIFACTS.fingerprint, 2)
    with pytest.raises(FileNotFoundError, match="needs TensorRT engines"):
        write_repository(ARTIFACTS, tmp_path, policy, tmp_path / "repo", options)
    artifacts_dir = fake_engines(tmp_path)
    other = replace(ARTIFACTS, fingerprint="e" * 64)
    with pytest.raises(ValueError, match="rebuild them"):
        write_repository(other, artifacts_dir, Policy.fixed(other.fingerprint, 2), tmp_path / "repo", options)
    with pytest.raises(ValueError, match="needs the profile"):
        segment_model_configs(ARTIFACTS, options)


def test_tensorrt_configs_round_trip_through_text_format(tmp_path: Path) -> None:
    options = RepositoryOptions(target="triton-tensorrt")
    profiles = engine_profiles(ARTIFACTS, fake_engines(tmp_path), None, options)
    for config in [
        *segment_model_configs(ARTIFACTS, options, profiles),
        full_model_config(ARTIFACTS, options, profiles[None]),
    ]:
        assert parse(config.to_pbtxt()) == config.to_proto()


def test_triton_onnx_target_can_ask_for_the_tensorrt_accelerator() -> None:
    accelerator = OnnxTensorRT(precision="FP16", engine_cache_path="/cache/trt")
    options = RepositoryOptions(target="triton-onnx", onnx_tensorrt=accelerator, opt_batch_size=64)
    policy = calibrated_policy(ARTIFACTS, (0.5, 0.5))
    profiles = engine_profiles(ARTIFACTS, None, policy, options)
    second = segment_model_configs(ARTIFACTS, options, profiles)[1]
    text = second.to_pbtxt()
    proto = parse(text)
    assert proto == second.to_proto() and "gpu_execution_accelerator" in text
    assert (
        proto.platform == "onnxruntime_onnx"
        and proto.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    )
    (trt,) = proto.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert dict(trt.parameters) == {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": str(1 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": "/cache/trt",
        "trt_profile_min_shapes": "hidden_in:1x4x4x4",
        "trt_profile_opt_shapes": "hidden_in:32x4x4x4",
        "trt_profile_max_shapes": "hidden_in:256x4x4x4",
    }
    # The orchestrator stays on the host unless asked: the accelerator is the segments' business.
    orchestrator = orchestrator_model_config(ARTIFACTS, options).to_proto()
    assert "offramp_device" not in orchestrator.parameters
    assert orchestrator.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU


def test_the_accelerator_and_devices_are_checked() -> None:
    with pytest.raises(ValueError, match="option of the triton-onnx target"):
        RepositoryOptions(target="embedded", onnx_tensorrt=OnnxTensorRT())
    with pytest.raises(ValueError, match="precision"):
        OnnxTensorRT(precision="INT4")
    with pytest.raises(ValueError, match="orchestrator_device"):
        RepositoryOptions(orchestrator_device="tpu")
    with pytest.raises(ValueError, match="offramp_device_fallback"):
        RepositoryOptions(target="triton-tensorrt", device_fallback="maybe")


def test_the_default_targets_are_unchanged() -> None:
    for options in (RepositoryOptions(), RepositoryOptions(target="triton-onnx")):
        configs = [*segment_model_configs(ARTIFACTS, options), orchestrator_model_config(ARTIFACTS, options)]
        for config in configs:
            proto = config.to_proto()
            assert proto.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
            assert not proto.HasField("optimization") and not list(
                proto.dynamic_batching.preferred_batch_size
            )
            assert "offramp_device" not in proto.parameters


# ----------------------------------------------------------------------------------------------
# Drop-in on a stock Triton: the orchestrator's execution environment


def test_server_requirements() -> None:
    assert execution_env.server_requirements() == ["numpy==1.26.4"]
    gpu_text = execution_env.server_requirements(gpu=True, text=True, cupy="cupy-cuda13x==13.6.0")
    assert gpu_text == ["numpy==1.26.4", execution_env.TOKENIZERS, "cupy-cuda13x==13.6.0"]


def bash(command: str) -> str:
    return subprocess.run(["bash", "-c", command], check=True, capture_output=True, text=True).stdout.strip()


def test_execution_env_is_a_relocatable_venv_with_offramp_inside(tmp_path: Path) -> None:
    """A real venv (no requirements: nothing is downloaded), moved and unpacked as Triton would."""
    pip_commands = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        if "pip" in command:  # recorded, not run: this machine may not reach a package index
            pip_commands.append(command)
            return subprocess.CompletedProcess(command, 0)
        return subprocess.run(command, **kwargs)  # noqa: PLW1510 (the caller's check=)

    archive = execution_env.create_execution_env(tmp_path / "env", ["numpy==1.26.4"], archive=True, run=run)
    assert archive == tmp_path / "env.tar.gz"
    (command,) = pip_commands
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and command[-1] == "numpy==1.26.4"
    site_packages = Path(command[command.index("--target") + 1])
    assert site_packages.is_relative_to(tmp_path / "env")
    assert (site_packages / "offramp/kernels/confidence.cu").exists()
    assert (site_packages / "offramp/backend/cascade.py").exists() and not (
        site_packages / "offramp/build"
    ).exists()

    moved = tmp_path / "elsewhere" / "env"
    moved.parent.mkdir()
    shutil.move(tmp_path / "env", moved)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="tar")
    for env in (moved, tmp_path / "unpacked"):
        # What the stub does: source bin/activate, then find python3 on PATH.
        assert bash(f"source {env}/bin/activate && echo $VIRTUAL_ENV && command -v python3") == (
            f"{env}\n{env}/bin/python3"
        )
        found = bash(
            f"source {env}/bin/activate && python3 -c 'import offramp.kernels as k; print(k.__path__[0])'"
        )
        assert Path(found).is_relative_to(env)


def test_server_flags_and_shared_memory() -> None:
    flags = execution_env.triton_server_flags(1 << 20, 1 << 20, cuda_pool_bytes=256 << 20)
    assert flags == [
        "--backend-config=python,shm-default-byte-size=1048576",
        "--backend-config=python,shm-growth-byte-size=1048576",
        "--cuda-memory-pool-byte-size=0:268435456",
    ]
    # 2 orchestrator instances, 256 rows of a 384-float hidden state: a few MB each beyond the default.
    size = execution_env.shared_memory_bytes(2, 256, 384 * 4, 64 << 20)
    assert size == int(2 * ((64 << 20) + 2 * 256 * 384 * 4) * 1.25)


def test_trtexec_commands_build_the_same_profiles(tmp_path: Path, capsys) -> None:
    """For a TensorRT container whose Python cannot run offramp: the same engines through trtexec."""
    profiles = segment_profiles(TEXT_ARTIFACTS, (0.6, 0.4), opt_batch=100, max_batch=200, opt_length=48)
    commands = tensorrt.trtexec_commands(profiles, EngineSettings("fp16", 512 << 20))
    assert commands[1] == (
        "trtexec --onnx=segment_1.onnx --saveEngine=segment_1.plan"
        " --minShapes=hidden_in:1x1x32,ATTENTION_MASK:1x1"
        " --optShapes=hidden_in:40x48x32,ATTENTION_MASK:40x48"
        " --maxShapes=hidden_in:200x64x32,ATTENTION_MASK:200x64"
        " --memPoolSize=workspace:512M --fp16"
    )
    assert commands[2].startswith("trtexec --onnx=full.onnx --saveEngine=full.plan")
    ARTIFACTS.save(tmp_path)
    assert tensorrt.main([str(tmp_path), "--max-batch", "64", "--precision", "fp32", "--trtexec"]) == 0
    out = capsys.readouterr().out
    assert "trtexec --onnx=segment_0.onnx --saveEngine=segment_0.plan" in out and "--fp16" not in out
    engines = EngineSet.load(tmp_path).check_against(ARTIFACTS)  # what the writer reads once the plans exist
    assert [e.plan for e in engines.engines] == ["segment_0.plan", "segment_1.plan", "full.plan"]
