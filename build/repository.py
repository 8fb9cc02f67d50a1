"""Writes a Triton model repository from typed config objects.

Each model's ``config.pbtxt`` is a ``ModelConfig`` dataclass turned into Triton's own protobuf
schema (``model_config_pb2`` from tritonclient) and printed by protobuf's ``text_format``, so nothing
is formatted by hand. Layout, for a model ``<name>`` with K exits:

    <name>/            orchestrator (Python BLS): 1/model.py, 1/orchestrator.json, 1/policy.json
    <name>_segment_<k>/  segment k: 1/model.onnx (+ 1/model.py on the embedded target)
    <name>_full/       the network without early exits: 1/model.onnx (+ 1/model.py)
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

import offramp.backend
from offramp.backend.contract import FULL_LOGITS_OUT, HIDDEN_IN, HIDDEN_OUT, LOGITS_OUT, TensorSpec, output_specs
from offramp.backend.orchestrator import POLICY_FILE, SPEC_FILE, OrchestratorSpec, ServingOptions
from offramp.backend.policy import Policy
from offramp.backend.text import TEXT_INPUT, TextSpec
from offramp.build.artifacts import ModelArtifacts

TARGETS = ("embedded", "triton-onnx")
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
            return {"name": self.name, "data_type": _DTYPES[self.dtype], "dims": [1], "reshape": pb.ModelTensorReshape()}
        return {"name": self.name, "data_type": _DTYPES[self.dtype], "dims": list(self.dims)}

    def input_proto(self) -> pb.ModelInput:
        return pb.ModelInput(**self._fields(), optional=self.optional)

    def output_proto(self) -> pb.ModelOutput:
        return pb.ModelOutput(**self._fields())


@dataclass(frozen=True)
class ModelConfig:
    """The parts of Triton's model configuration that offramp writes."""

    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    backend: str | None = None  # "python", "onnxruntime"
    platform: str | None = None  # "onnxruntime_onnx"
    max_batch_size: int = 256
    instances: int = 1
    dynamic_batching: bool = True
    max_queue_delay_us: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    default_model_filename: str | None = None

    def to_proto(self) -> pb.ModelConfig:
        config = pb.ModelConfig(
            name=self.name,
            max_batch_size=self.max_batch_size,
            input=[t.input_proto() for t in self.inputs],
            output=[t.output_proto() for t in self.outputs],
            instance_group=[pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_CPU, count=self.instances)],
        )
        if self.backend:
            config.backend = self.backend
        if self.platform:
            config.platform = self.platform
        if self.default_model_filename:
            config.default_model_filename = self.default_model_filename
        if self.dynamic_batching:
            config.dynamic_batching.CopyFrom(
                pb.ModelDynamicBatching(max_queue_delay_microseconds=self.max_queue_delay_us)
            )
        for key, value in self.parameters.items():
            config.parameters[key].string_value = value
        return config

    def to_pbtxt(self) -> str:
        return text_format.MessageToString(self.to_proto())


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

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {self.target!r}")


def _onnx_model_config(
    name: str, inputs: Sequence[TensorConfig], outputs: Sequence[TensorConfig], options: RepositoryOptions
) -> ModelConfig:
    threads = {"intra_op_thread_count": str(options.threads_per_instance), "inter_op_thread_count": "1"}
    common = dict(
        name=name,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        max_batch_size=options.max_batch_size,
        instances=options.segment_instances,
        max_queue_delay_us=options.max_queue_delay_us,
    )
    if options.target == "triton-onnx":
        return ModelConfig(platform="onnxruntime_onnx", parameters=threads, **common)
    return ModelConfig(backend="python", parameters={**threads, **_env_parameters(options)}, **common)


def _env_parameters(options: RepositoryOptions) -> dict[str, str]:
    return {"EXECUTION_ENV_PATH": str(options.execution_env)} if options.execution_env else {}


def segment_model_configs(artifacts: ModelArtifacts, options: RepositoryOptions) -> list[ModelConfig]:
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
        outputs = [TensorConfig.of(segment.hidden), TensorConfig(LOGITS_OUT, "float32", (artifacts.num_classes,))]
        configs.append(_onnx_model_config(segment_model_name(artifacts.name, index), inputs, outputs, options))
        previous_hidden = segment.hidden
    return configs


def full_model_config(artifacts: ModelArtifacts, options: RepositoryOptions) -> ModelConfig:
    return _onnx_model_config(
        full_model_name(artifacts.name),
        [TensorConfig.of(s) for s in artifacts.inputs],
        [TensorConfig(FULL_LOGITS_OUT, "float32", (artifacts.num_classes,))],
        options,
    )


def orchestrator_inputs(artifacts: ModelArtifacts) -> tuple[TensorConfig, ...]:
    """The model's own inputs; a text model also takes raw TEXT, and then each input is optional."""
    if not _tokenizer_dir(artifacts):
        return tuple(TensorConfig.of(s) for s in artifacts.inputs)
    own = (TensorConfig(s.name, s.dtype, s.shape, optional=True) for s in artifacts.inputs)
    return (TensorConfig(TEXT_INPUT, "object", (), optional=True), *own)


def _tokenizer_dir(artifacts: ModelArtifacts) -> str | None:
    return artifacts.build.get("tokenizer_dir")


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
        max_queue_delay_us=options.max_queue_delay_us,
        parameters={**_env_parameters(options), **options.serving.to_parameters()},
    )


def segment_model_name(name: str, index: int) -> str:
    return f"{name}_segment_{index}"


def full_model_name(name: str) -> str:
    return f"{name}_full"


def orchestrator_spec(artifacts: ModelArtifacts, name: str | None = None, compact: bool = True) -> OrchestratorSpec:
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
    """Writes the orchestrator, its segments and the full model into ``repository``; returns the model dirs."""
    policy.validate(artifacts.num_exits, artifacts.num_classes, artifacts.fingerprint)
    repository.mkdir(parents=True, exist_ok=True)
    runner = {"model.py": ONNX_ADAPTER} if options.target == "embedded" else {}
    written = []
    for config, segment in zip(segment_model_configs(artifacts, options), artifacts.segments):
        written.append(_write_model(repository, config, {"model.onnx": artifacts_dir / segment.onnx, **runner}))
    written.append(
        _write_model(
            repository, full_model_config(artifacts, options), {"model.onnx": artifacts_dir / artifacts.full_onnx, **runner}
        )
    )
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
