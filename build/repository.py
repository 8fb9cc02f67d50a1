"""Writes a Triton model repository from typed config objects.

Each model's ``config.pbtxt`` is a ``ModelConfig`` dataclass turned into Triton's own protobuf
schema (``model_config_pb2`` from tritonclient) and printed by protobuf's ``text_format``, so nothing
is formatted by hand. Layout, for a model ``<name>`` with K exits:

    <name>/            orchestrator (Python BLS): 1/model.py, 1/orchestrator.json, 1/policy.json
    <name>_segment_<k>/  segment k: 1/model.onnx (+ 1/model.py on the embedded target; 1/model.plan,
                       a TensorRT engine, on the triton-tensorrt target)
    <name>_full/       the network without early exits: 1/model.onnx (+ 1/model.py), or 1/model.plan

Targets: ``embedded`` (segments as Python models running ONNX Runtime on the CPU), ``triton-onnx``
(Triton's onnxruntime backend, optionally with its TensorRT accelerator: ``OnnxTensorRT``) and
``triton-tensorrt`` (``tensorrt_plan`` engines built by ``offramp.build.tensorrt``, on the GPU, with
the orchestrator on the GPU too: ``offramp_device: "gpu"``, see ``offramp.backend.device``).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

import offramp.backend
from offramp.backend.contract import FULL_LOGITS_OUT, HIDDEN_IN, LOGITS_OUT, TensorSpec, output_specs
from offramp.backend.device import DEVICES, DeviceRequest
from offramp.backend.image import IMAGE_BYTES_INPUT, ImageSpec
from offramp.backend.orchestrator import POLICY_FILE, SPEC_FILE, OrchestratorSpec, ServingOptions
from offramp.backend.policy import Policy
from offramp.backend.text import TEXT_INPUT, TextSpec
from offramp.build.artifacts import ModelArtifacts
from offramp.build.tensorrt import EngineSet, SegmentProfile, segment_profiles

TARGETS = ("embedded", "triton-onnx", "triton-tensorrt")
INSTANCE_KINDS = {"KIND_CPU": pb.ModelInstanceGroup.KIND_CPU, "KIND_GPU": pb.ModelInstanceGroup.KIND_GPU}
_BACKEND_DIR = Path(offramp.backend.__file__).parent
ORCHESTRATOR_ADAPTER = _BACKEND_DIR / "triton_orchestrator.py"
ONNX_ADAPTER = _BACKEND_DIR / "triton_segment.py"
_DTYPES = {"float32": pb.TYPE_FP32, "float16": pb.TYPE_FP16, "int64": pb.TYPE_INT64, "int32": pb.TYPE_INT32,
           "bool": pb.TYPE_BOOL, "object": pb.TYPE_STRING}  # fmt: skip


@dataclass(frozen=True)
class TensorConfig:
    """One input or output; ``dims`` leave out the batch axis. A scalar per row is served as [B]."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False  # an input a request may leave out (TEXT or token ids)

    @classmethod
    def of(cls, spec: TensorSpec, name: str | None = None) -> TensorConfig:
        return cls(name or spec.name, spec.dtype, spec.shape)

    def _fields(self) -> dict:
        # Triton needs at least one dim; a per-row scalar is dims [1] reshaped to [] for the model.
        if not self.dims:
            return {
                "name": self.name,
                "data_type": _DTYPES[self.dtype],
                "dims": [1],
                "reshape": pb.ModelTensorReshape(),
            }
        return {"name": self.name, "data_type": _DTYPES[self.dtype], "dims": list(self.dims)}

    def input_proto(self) -> pb.ModelInput:
        return pb.ModelInput(**self._fields(), optional=self.optional)

    def output_proto(self) -> pb.ModelOutput:
        return pb.ModelOutput(**self._fields())


@dataclass(frozen=True)
class ExecutionAccelerator:
    """One of ``optimization.execution_accelerators.gpu_execution_accelerator`` (onnxruntime backend)."""

    name: str
    parameters: dict[str, str] = field(default_factory=dict)

    def proto(self) -> pb.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator:
        accelerator = pb.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator
        return accelerator(name=self.name, parameters=self.parameters)


@dataclass(frozen=True)
class ModelConfig:
    """The parts of Triton's model configuration that offramp writes."""

    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    backend: str | None = None  # "python", "onnxruntime"
    platform: str | None = None  # "onnxruntime_onnx", "tensorrt_plan"
    max_batch_size: int = 256
    instances: int = 1
    instance_kind: str = "KIND_CPU"  # or "KIND_GPU": `instances` per GPU
    dynamic_batching: bool = True
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[
        int, ...
    ] = ()  # for the dynamic batcher: what a TensorRT engine is tuned for
    parameters: dict[str, str] = field(default_factory=dict)
    default_model_filename: str | None = None
    gpu_accelerators: tuple[ExecutionAccelerator, ...] = ()
    decoupled: bool = False  # any number of responses per request (model_transaction_policy)

    def to_proto(self) -> pb.ModelConfig:
        config = pb.ModelConfig(
            name=self.name,
            max_batch_size=self.max_batch_size,
            input=[t.input_proto() for t in self.inputs],
            output=[t.output_proto() for t in self.outputs],
            instance_group=[
                pb.ModelInstanceGroup(kind=INSTANCE_KINDS[self.instance_kind], count=self.instances)
            ],
        )
        if self.backend:
            config.backend = self.backend
        if self.platform:
            config.platform = self.platform
        if self.default_model_filename:
            config.default_model_filename = self.default_model_filename
        if self.dynamic_batching:
            config.dynamic_batching.CopyFrom(
                pb.ModelDynamicBatching(
                    max_queue_delay_microseconds=self.max_queue_delay_us,
                    preferred_batch_size=list(self.preferred_batch_sizes),
                )
            )
        if self.decoupled:
            config.model_transaction_policy.decoupled = True
        for accelerator in self.gpu_accelerators:
            config.optimization.execution_accelerators.gpu_execution_accelerator.append(accelerator.proto())
        for key, value in self.parameters.items():
            config.parameters[key].string_value = value
        return config

    def to_pbtxt(self) -> str:
        return text_format.MessageToString(self.to_proto())


@dataclass(frozen=True)
class OnnxTensorRT:
    """ONNX Runtime's TensorRT execution provider, asked of Triton's onnxruntime backend (triton-onnx).

    ONNX Runtime builds the engines itself when the model loads (minutes; cache them with
    ``engine_cache_path``). ``profile_shapes`` hands it the same profiles as the triton-tensorrt target
    (``offramp.build.tensorrt.segment_profiles``), so it does not rebuild as the batch grows.
    """

    precision: str = "FP16"  # "FP32" or "FP16"
    max_workspace_size_bytes: int = 1 << 30
    engine_cache_path: str | None = None  # a folder the server can write, kept across restarts
    profile_shapes: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("FP32", "FP16"):
            raise ValueError(f"precision must be FP32 or FP16, not {self.precision!r}")

    def accelerator(self, profile: SegmentProfile | None) -> ExecutionAccelerator:
        parameters = {
            "precision_mode": self.precision,
            "max_workspace_size_bytes": str(self.max_workspace_size_bytes),
        }
        if self.engine_cache_path:
            parameters |= {"trt_engine_cache_enable": "1", "trt_engine_cache_path": self.engine_cache_path}
        if self.profile_shapes and profile is not None:
            parameters |= profile.onnx_runtime_shapes()
        return ExecutionAccelerator("tensorrt", parameters)


@dataclass(frozen=True)
class RepositoryOptions:
    target: str = "embedded"
    # The virtualenv the Python stubs run in (EXECUTION_ENV_PATH); None leaves the server's default.
    execution_env: Path | None = None
    max_batch_size: int = 256
    orchestrator_instances: int = 2
    segment_instances: int = 1
    threads_per_instance: int = 1
    max_queue_delay_us: int = 0
    serving: ServingOptions = ServingOptions()  # audit and drift settings of the orchestrator
    # Where the orchestrator runs its cascade ("cpu", "gpu"); None: "gpu" on triton-tensorrt, else "cpu".
    orchestrator_device: str | None = None
    device_fallback: str = "cpu"  # a "gpu" orchestrator that cannot have one: serve on the "cpu", or "none"
    onnx_tensorrt: OnnxTensorRT | None = None  # triton-onnx: ask ONNX Runtime for its TensorRT accelerator
    opt_batch_size: int | None = None  # the first segment's typical batch, for profiles; None: max_batch_size

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {self.target!r}")
        if self.orchestrator_device not in (None, *DEVICES):
            raise ValueError(
                f"orchestrator_device must be one of {DEVICES}, not {self.orchestrator_device!r}"
            )
        if self.onnx_tensorrt is not None and self.target != "triton-onnx":
            raise ValueError("onnx_tensorrt is an option of the triton-onnx target")
        DeviceRequest(self.device, self.device_fallback)  # refuses unknown values

    @property
    def device(self) -> str:
        if self.orchestrator_device is not None:
            return self.orchestrator_device
        return "gpu" if self.target == "triton-tensorrt" else "cpu"

    @property
    def segments_on_gpu(self) -> bool:
        return self.target == "triton-tensorrt" or self.onnx_tensorrt is not None


def _onnx_model_config(
    name: str,
    inputs: Sequence[TensorConfig],
    outputs: Sequence[TensorConfig],
    options: RepositoryOptions,
    profile: SegmentProfile | None = None,
) -> ModelConfig:
    """A segment or the full network on the options' target; ``profile`` sizes its TensorRT engine."""
    threads = {"intra_op_thread_count": str(options.threads_per_instance), "inter_op_thread_count": "1"}
    common = dict(
        name=name,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        max_batch_size=options.max_batch_size,
        instances=options.segment_instances,
        instance_kind="KIND_GPU" if options.segments_on_gpu else "KIND_CPU",
        max_queue_delay_us=options.max_queue_delay_us,
    )
    if options.target == "triton-tensorrt":
        if profile is None:
            raise ValueError(f"{name}: the triton-tensorrt target needs the profile of its TensorRT engine")
        return ModelConfig(
            platform="tensorrt_plan", preferred_batch_sizes=profile.preferred_batch_sizes, **common
        )
    if options.target == "triton-onnx":
        accelerators = (options.onnx_tensorrt.accelerator(profile),) if options.onnx_tensorrt else ()
        return ModelConfig(
            platform="onnxruntime_onnx", parameters=threads, gpu_accelerators=accelerators, **common
        )
    return ModelConfig(backend="python", parameters={**threads, **_env_parameters(options)}, **common)


def _env_parameters(options: RepositoryOptions) -> dict[str, str]:
    return {"EXECUTION_ENV_PATH": str(options.execution_env)} if options.execution_env else {}


def engine_profiles(
    artifacts: ModelArtifacts, artifacts_dir: Path | None, policy: Policy | None, options: RepositoryOptions
) -> dict[int | None, SegmentProfile]:
    """The engines' profiles by segment (None: the full network), where the target has engines.

    triton-tensorrt: those the plans were built with (``tensorrt.json`` in ``artifacts_dir``).
    triton-onnx with the TensorRT accelerator: sized here, from the policy's calibration exit rates.
    """
    if options.target == "triton-tensorrt":
        if artifacts_dir is None:
            raise ValueError("the triton-tensorrt target reads its engines from the artifacts folder")
        engines = EngineSet.load(artifacts_dir).check_against(artifacts)
        return {engine.profile.segment: engine.profile for engine in engines.engines}
    if options.onnx_tensorrt is not None and options.onnx_tensorrt.profile_shapes:
        exit_rates = policy.exit_rate_profile if policy is not None else None
        opt_batch = options.opt_batch_size or options.max_batch_size
        profiles = segment_profiles(artifacts, exit_rates, opt_batch, options.max_batch_size)
        return {profile.segment: profile for profile in profiles}
    return {}


def segment_model_configs(
    artifacts: ModelArtifacts,
    options: RepositoryOptions,
    profiles: Mapping[int | None, SegmentProfile] | None = None,
) -> list[ModelConfig]:
    """Segment k's config; ``profiles`` (by segment, from ``engine_profiles``) size TensorRT engines."""
    profiles = profiles or {}
    configs = []
    previous_hidden = None
    for index, segment in enumerate(artifacts.segments):
        inputs = (
            [TensorConfig.of(s) for s in artifacts.inputs]
            if index == 0
            else [
                TensorConfig.of(previous_hidden, HIDDEN_IN),
                *(TensorConfig.of(s) for s in artifacts.inputs if s.name in artifacts.side_inputs),
            ]
        )
        outputs = [
            TensorConfig.of(segment.hidden),
            TensorConfig(LOGITS_OUT, "float32", (artifacts.num_classes,)),
        ]
        name = segment_model_name(artifacts.name, index)
        configs.append(_onnx_model_config(name, inputs, outputs, options, profiles.get(index)))
        previous_hidden = segment.hidden
    return configs


def full_model_config(
    artifacts: ModelArtifacts, options: RepositoryOptions, profile: SegmentProfile | None = None
) -> ModelConfig:
    return _onnx_model_config(
        full_model_name(artifacts.name),
        [TensorConfig.of(s) for s in artifacts.inputs],
        [TensorConfig(FULL_LOGITS_OUT, "float32", (artifacts.num_classes,))],
        options,
        profile,
    )


def orchestrator_inputs(artifacts: ModelArtifacts) -> tuple[TensorConfig, ...]:
    """The model's own inputs; a text model also takes raw TEXT, an image model encoded IMAGE_BYTES, and
    then each input is optional."""
    own = tuple(TensorConfig(s.name, s.dtype, s.shape, optional=True) for s in artifacts.inputs)
    if _tokenizer_dir(artifacts):
        return (TensorConfig(TEXT_INPUT, "object", (), optional=True), *own)
    if image_spec(artifacts):
        # The tensor first: a client that sends one bare array (OfframpClient.classify) sends the tensor.
        return (*own, TensorConfig(IMAGE_BYTES_INPUT, "object", (), optional=True))
    return tuple(TensorConfig.of(s) for s in artifacts.inputs)


def _tokenizer_dir(artifacts: ModelArtifacts) -> str | None:
    return artifacts.build.get("tokenizer_dir")


def image_spec(artifacts: ModelArtifacts) -> ImageSpec | None:
    """The preprocessing an image build recorded (``offramp.build.vision``), or None."""
    recorded = artifacts.build.get("image")
    return ImageSpec.from_dict(recorded) if recorded else None


def orchestrator_model_config(
    artifacts: ModelArtifacts, options: RepositoryOptions, name: str | None = None
) -> ModelConfig:
    return ModelConfig(
        name=name or artifacts.name,
        backend="python",
        inputs=orchestrator_inputs(artifacts),
        outputs=tuple(TensorConfig.of(s) for s in output_specs(artifacts.num_classes)),
        max_batch_size=options.max_batch_size,
        instances=options.orchestrator_instances,
        # On the GPU Triton starts `instances` per GPU and tells each its device.
        instance_kind="KIND_GPU" if options.device == "gpu" else "KIND_CPU",
        max_queue_delay_us=options.max_queue_delay_us,
        parameters={
            **_env_parameters(options),
            **options.serving.to_parameters(),
            **_device_parameters(options),
        },
    )


def _device_parameters(options: RepositoryOptions) -> dict[str, str]:
    """offramp_device and its fallback (offramp.backend.device); nothing where the host is meant."""
    if options.device != "gpu":
        return {}
    return DeviceRequest(options.device, options.device_fallback).to_parameters()


def segment_model_name(name: str, index: int) -> str:
    return f"{name}_segment_{index}"


def full_model_name(name: str) -> str:
    return f"{name}_full"


def orchestrator_spec(
    artifacts: ModelArtifacts, name: str | None = None, compact: bool = True
) -> OrchestratorSpec:
    tokenizer = _tokenizer_dir(artifacts)
    return OrchestratorSpec(
        model_name=name or artifacts.name,
        segment_models=tuple(segment_model_name(artifacts.name, k) for k in range(artifacts.num_exits)),
        full_model=full_model_name(artifacts.name),
        inputs=artifacts.inputs,
        side_inputs=artifacts.side_inputs,
        exit_costs=artifacts.exit_costs,
        class_names=artifacts.class_names,
        fingerprint=artifacts.fingerprint,
        compact=compact,
        text=TextSpec(tokenizer, int(artifacts.build["max_length"])) if tokenizer else None,
        image=image_spec(artifacts),
    )


def _write_model(repository: Path, config: ModelConfig, files: dict[str, Path]) -> Path:
    """``<repository>/<name>/config.pbtxt`` and the version-1 files, replacing what was there."""
    model_dir = repository / config.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config.to_pbtxt())
    for target_name, source in files.items():
        shutil.copyfile(source, model_dir / "1" / target_name)
    return model_dir


def write_repository(
    artifacts: ModelArtifacts,
    artifacts_dir: Path,
    policy: Policy,
    repository: Path,
    options: RepositoryOptions = RepositoryOptions(),
) -> list[Path]:
    """Writes the orchestrator, its segments and the full model into ``repository``; returns the model
    dirs."""
    policy.validate(artifacts.num_exits, artifacts.num_classes, artifacts.fingerprint)
    profiles = engine_profiles(artifacts, artifacts_dir, policy, options)
    repository.mkdir(parents=True, exist_ok=True)
    runner = {"model.py": ONNX_ADAPTER} if options.target == "embedded" else {}

    engines = EngineSet.load(artifacts_dir) if options.target == "triton-tensorrt" else None

    def model_files(onnx: str, segment: int | None) -> dict[str, Path]:
        if engines is not None:
            return {"model.plan": artifacts_dir / engines.engine_for(segment).plan}
        return {"model.onnx": artifacts_dir / onnx, **runner}

    written = []
    configs = segment_model_configs(artifacts, options, profiles)
    for index, (config, segment) in enumerate(zip(configs, artifacts.segments, strict=True)):
        written.append(_write_model(repository, config, model_files(segment.onnx, index)))
    full = full_model_config(artifacts, options, profiles.get(None))
    written.append(_write_model(repository, full, model_files(artifacts.full_onnx, None)))
    written.append(write_orchestrator(artifacts, policy, repository, options, artifacts_dir=artifacts_dir))
    return written


def write_orchestrator(
    artifacts: ModelArtifacts,
    policy: Policy,
    repository: Path,
    options: RepositoryOptions = RepositoryOptions(),
    name: str | None = None,
    compact: bool = True,
    artifacts_dir: Path | None = None,
) -> Path:
    """The orchestrator model alone, under ``name`` (default: the model's public name).

    A text model's tokenizer is copied from ``artifacts_dir`` beside it.

    Another name serves a variant beside the main one over the same segments, e.g. ``compact=False``
    for batch-level early exit in benchmarks.
    """
    policy.validate(artifacts.num_exits, artifacts.num_classes, artifacts.fingerprint)
    options.serving.check_against(policy)
    model_dir = _write_model(
        repository, orchestrator_model_config(artifacts, options, name), {"model.py": ORCHESTRATOR_ADAPTER}
    )
    spec = orchestrator_spec(artifacts, name, compact)
    if spec.text is not None:
        if artifacts_dir is None:
            raise ValueError(f"{artifacts.name} takes text: its artifacts folder is needed for the tokenizer")
        shutil.copytree(artifacts_dir / spec.text.tokenizer_dir, model_dir / "1" / spec.text.tokenizer_dir)
    spec.save(model_dir / "1" / SPEC_FILE)
    policy.save(model_dir / "1" / POLICY_FILE)
    return model_dir
