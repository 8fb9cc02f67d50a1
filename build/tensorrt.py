"""TensorRT engines for the segments, each with an optimization profile sized for the rows that reach it.

Early exit shrinks the batch: where calibration saw 60% of the rows leave at the first exit, the
second segment runs on 40% of the first one's batch. Each segment's engine gets one optimization
profile (``segment_profiles``, a pure function):

- batch: min 1; opt = round(``opt_batch`` x the fraction of rows that reach the segment), from the
  exit-rate profile that calibration stores in the policy; max = the server's ``max_batch_size``
  (a burst of hard rows can still send a whole batch deep, and Triton's dynamic batcher merges the
  survivors of several orchestrator calls);
- sequence axes (text): min 1, opt ``opt_length`` (default the model's max length), max the max length.

``engines_from_artifacts`` builds the plans with TensorRT (``network_from_onnx_path`` ->
``serialized_engine_from_network`` -> ``save_engine``) and writes ``tensorrt.json`` beside them: the
plans, their profiles, the TensorRT version and the ONNX fingerprint they came from. The repository
writer's ``triton-tensorrt`` target reads that manifest (``EngineSet``) for the plans and for each
segment's preferred batch size; its ``triton-onnx`` target can hand the same shapes to ONNX Runtime's
TensorRT accelerator (``SegmentProfile.onnx_runtime_shapes``).

TensorRT is imported when an engine is built, never at import, so everything else here runs on any
machine. A plan runs only under the TensorRT version that built it, on GPUs of the architecture it was
built on: build on the serving GPU type, with the TensorRT of the Triton image that serves it (NVIDIA's
``nvcr.io/nvidia/tensorrt:<yy.mm>-py3`` has the TensorRT of ``tritonserver:<yy.mm>``). Where that
container's Python cannot run offramp (offramp needs 3.11; NGC images ship 3.10 or 3.12),
``--trtexec`` writes the manifest and prints one ``trtexec`` command per engine, with the same
profiles, to run in the container instead.

    python -m offramp.build.tensorrt ARTIFACTS_DIR --policy POLICY.json --max-batch 256 [--dry-run|--trtexec]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offramp.backend.contract import HIDDEN_IN, TensorSpec
from offramp.backend.policy import Policy

if TYPE_CHECKING:  # artifacts.py imports torch, which a TensorRT container need not have
    from offramp.build.artifacts import ModelArtifacts

ENGINE_MANIFEST = "tensorrt.json"
PRECISIONS = ("fp32", "fp16")
INSTALL_HINT = (
    "build engines where TensorRT is installed: in NVIDIA's TensorRT container of the serving Triton's "
    "version (nvcr.io/nvidia/tensorrt:<yy.mm>-py3 for nvcr.io/nvidia/tritonserver:<yy.mm>-py3; "
    "python -m offramp.build.tensorrt --trtexec prints the commands for its trtexec), "
    "or `pip install tensorrt-cu12` (tensorrt-cu13 for CUDA 13) on a machine with an NVIDIA GPU and driver"
)


class TensorRTUnavailable(RuntimeError):
    """``import tensorrt`` failed; the message says where engines can be built."""


class EngineBuildError(RuntimeError):
    """TensorRT refused a segment: its ONNX did not parse, its inputs do not match the profile, or the
    build failed."""


# ----------------------------------------------------------------------------------------------
# Profiles: pure sizing


@dataclass(frozen=True)
class AxisRange:
    """Sizes one axis may take in an optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(
                f"an axis range needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}"
            )


@dataclass(frozen=True)
class InputShapes:
    """One input's min, opt and max shapes in a profile, batch axis included."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class SegmentProfile:
    """The optimization profile of one engine: segment ``segment`` (None: the full network)."""

    segment: int | None
    onnx: str  # the ONNX file in the artifacts folder the engine is built from
    survival: float  # fraction of the rows that reach it
    batch: AxisRange
    inputs: tuple[InputShapes, ...]

    @property
    def label(self) -> str:
        return "full" if self.segment is None else f"segment {self.segment}"

    @property
    def preferred_batch_sizes(self) -> tuple[int, ...]:
        """For Triton's dynamic batcher: the batch the engine is tuned for."""
        return (self.batch.opt,)

    def onnx_runtime_shapes(self) -> dict[str, str]:
        """The profile as ONNX Runtime's TensorRT provider options (``name:1x3x28x28,...``)."""
        return {
            f"trt_profile_{which}_shapes": ",".join(
                f"{shapes.name}:{'x'.join(str(d) for d in getattr(shapes, which))}" for shapes in self.inputs
            )
            for which in ("min", "opt", "max")
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentProfile:
        return cls(
            segment=data["segment"],
            onnx=data["onnx"],
            survival=float(data["survival"]),
            batch=AxisRange(**data["batch"]),
            inputs=tuple(
                InputShapes(i["name"], tuple(i["min"]), tuple(i["opt"]), tuple(i["max"]))
                for i in data["inputs"]
            ),
        )


def survival_fractions(exit_rates: Sequence[float] | None, num_exits: int) -> tuple[float, ...]:
    """Fraction of the rows that reach each segment: 1 for the first, then what earlier exits left.

    ``exit_rates[k]`` is the share (or count) of calibration rows answered at exit k, as the policy's
    ``exit_rate_profile`` holds it. Without one (an uncalibrated policy) every segment is sized for
    the whole batch.
    """
    if exit_rates is None:
        return (1.0,) * num_exits
    rates = [float(r) for r in exit_rates]
    if len(rates) != num_exits or any(not math.isfinite(r) or r < 0 for r in rates) or sum(rates) <= 0:
        raise ValueError(
            f"exit rates must be {num_exits} non-negative numbers with a positive sum, got {exit_rates}"
        )
    total, left, fractions = sum(rates), 0.0, []
    for rate in rates:
        fractions.append(max(0.0, 1.0 - left / total))
        left += rate
    return tuple(fractions)


def batch_range(survival: float, opt_batch: int, max_batch: int) -> AxisRange:
    """min 1, opt = round(opt_batch x survival) (halves up) kept within [1, max_batch], max = max_batch."""
    if not 0.0 <= survival <= 1.0:
        raise ValueError(f"survival must lie in [0, 1], got {survival}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got {opt_batch} and {max_batch}")
    return AxisRange(1, min(max_batch, max(1, math.floor(opt_batch * survival + 0.5))), max_batch)


def input_shapes(
    spec: TensorSpec, batch: AxisRange, sequence: AxisRange | None, name: str | None = None
) -> InputShapes:
    """Shapes of one input: the batch range first, then its own axes, variable ones (-1) over ``sequence``."""
    name = name or spec.name
    if any(d < 0 for d in spec.shape) and sequence is None:
        raise ValueError(f"{name} has a variable axis {spec.shape}: the profile needs the model's max length")

    def shape(which: str) -> tuple[int, ...]:
        return (getattr(batch, which), *(getattr(sequence, which) if d < 0 else d for d in spec.shape))

    return InputShapes(name, shape("min"), shape("opt"), shape("max"))


def segment_profiles(
    artifacts: ModelArtifacts,
    exit_rates: Sequence[float] | None,
    opt_batch: int,
    max_batch: int,
    opt_length: int | None = None,
) -> tuple[SegmentProfile, ...]:
    """One profile per segment, then one for the full network (every row that is forced to full depth).

    Segment k takes the model's inputs (k = 0) or the previous segment's hidden state plus the side
    inputs, as the repository writer wires them. Sequence axes run from 1 to the model's max length
    (``artifacts.build["max_length"]``), tuned for ``opt_length`` (default: the max length).
    """
    max_length = artifacts.build.get("max_length")
    sequence = None
    if max_length is not None:
        sequence = AxisRange(1, int(opt_length or max_length), int(max_length))
    survival = survival_fractions(exit_rates, artifacts.num_exits)
    side = [s for s in artifacts.inputs if s.name in artifacts.side_inputs]
    profiles = []
    previous_hidden = None
    for index, (segment, fraction) in enumerate(zip(artifacts.segments, survival, strict=True)):
        batch = batch_range(fraction, opt_batch, max_batch)
        if index == 0:
            shapes = [input_shapes(s, batch, sequence) for s in artifacts.inputs]
        else:
            shapes = [
                input_shapes(previous_hidden, batch, sequence, HIDDEN_IN),
                *(input_shapes(s, batch, sequence) for s in side),
            ]
        profiles.append(SegmentProfile(index, segment.onnx, fraction, batch, tuple(shapes)))
        previous_hidden = segment.hidden
    full_batch = batch_range(1.0, opt_batch, max_batch)
    full_shapes = tuple(input_shapes(s, full_batch, sequence) for s in artifacts.inputs)
    profiles.append(SegmentProfile(None, artifacts.full_onnx, 1.0, full_batch, full_shapes))
    return tuple(profiles)


def profiles_table(profiles: Sequence[SegmentProfile]) -> str:
    lines = [f"{'engine':<10} {'reach':>6} {'batch min/opt/max':>18}  inputs (opt shape)"]
    for p in profiles:
        batch = f"{p.batch.min}/{p.batch.opt}/{p.batch.max}"
        shapes = ", ".join(f"{i.name} {'x'.join(map(str, i.opt))}" for i in p.inputs)
        lines.append(f"{p.label:<10} {p.survival:>6.1%} {batch:>18}  {shapes}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The manifest the repository writer reads


@dataclass(frozen=True)
class Engine:
    plan: str  # file name in the artifacts folder
    profile: SegmentProfile


@dataclass(frozen=True)
class EngineSet:
    """The engines built for one model (``tensorrt.json`` in its artifacts folder)."""

    onnx_fingerprint: str  # ModelArtifacts.fingerprint of the ONNX files they were built from
    tensorrt_version: str
    precision: str
    engines: tuple[Engine, ...]
    built_at: str = ""

    def engine_for(self, segment: int | None) -> Engine:
        for engine in self.engines:
            if engine.profile.segment == segment:
                return engine
        raise KeyError(f"no engine for {'the full network' if segment is None else f'segment {segment}'}")

    def check_against(self, artifacts: ModelArtifacts) -> EngineSet:
        if self.onnx_fingerprint != artifacts.fingerprint:
            raise ValueError(
                f"the TensorRT engines were built from ONNX files {self.onnx_fingerprint[:12]}, not from "
                f"{artifacts.name}'s {artifacts.fingerprint[:12]}: rebuild them "
                "(python -m offramp.build.tensorrt)"
            )
        for segment in [*range(artifacts.num_exits), None]:
            self.engine_for(segment)
        return self

    def save(self, directory: Path) -> Path:
        path = Path(directory) / ENGINE_MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> EngineSet:
        path = Path(directory) / ENGINE_MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the triton-tensorrt target needs TensorRT engines; build them first "
                f"(python -m offramp.build.tensorrt {directory} --policy POLICY.json); {INSTALL_HINT}"
            )
        data = json.loads(path.read_text())
        return cls(
            onnx_fingerprint=data["onnx_fingerprint"],
            tensorrt_version=data["tensorrt_version"],
            precision=data["precision"],
            engines=tuple(Engine(e["plan"], SegmentProfile.from_dict(e["profile"])) for e in data["engines"]),
            built_at=data.get("built_at", ""),
        )


# ----------------------------------------------------------------------------------------------
# Building, with TensorRT


@dataclass(frozen=True)
class EngineSettings:
    precision: str = (
        "fp16"  # "fp32", or "fp16" (TensorRT may pick FP16 kernels; inputs and outputs stay as exported)
    )
    workspace_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")


def import_tensorrt() -> Any:
    """The ``tensorrt`` module; TensorRTUnavailable, saying where to build, where it is not installed."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailable(f"TensorRT is not installed here ({error}); {INSTALL_HINT}") from error
    return tensorrt


def _major_version(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def network_from_onnx_path(trt: Any, builder: Any, logger: Any, path: Path) -> tuple[Any, Any]:
    """TensorRT's network of one ONNX file (and the parser, which must outlive the network)."""
    # TensorRT 10 builds explicit-batch networks only and deprecates the flag; 8.x needs it.
    flags = 0 if _major_version(trt) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {path.name}: {errors}")
    return network, parser


def _check_inputs(network: Any, profile: SegmentProfile) -> None:
    """The network's inputs are the profile's, with every profiled axis variable or fixed at its size."""
    network_inputs = {(t := network.get_input(i)).name: tuple(t.shape) for i in range(network.num_inputs)}
    if set(network_inputs) != {s.name for s in profile.inputs}:
        raise EngineBuildError(
            f"{profile.onnx} has inputs {sorted(network_inputs)}, "
            f"the profile {sorted(s.name for s in profile.inputs)}"
        )
    for shapes in profile.inputs:
        dims = network_inputs[shapes.name]
        if len(dims) != len(shapes.min):
            raise EngineBuildError(
                f"{profile.onnx}: {shapes.name} has {len(dims)} axes, the profile {len(shapes.min)}"
            )
        for axis, (dim, low, high) in enumerate(zip(dims, shapes.min, shapes.max, strict=True)):
            if dim >= 0 and not low == high == dim:
                raise EngineBuildError(
                    f"{profile.onnx}: axis {axis} of {shapes.name} is fixed at {dim}, "
                    f"the profile asks for {low}..{high}"
                    + (" (export with a symbolic batch axis)" if axis == 0 else "")
                )


def serialized_engine_from_network(
    trt: Any, builder: Any, network: Any, profile: SegmentProfile, settings: EngineSettings
) -> Any:
    """The plan (TensorRT's serialized engine, a buffer) of a parsed network under one profile."""
    _check_inputs(network, profile)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    optimization_profile = builder.create_optimization_profile()
    for shapes in profile.inputs:
        optimization_profile.set_shape(shapes.name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(optimization_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine of {profile.onnx} ({profile.label}); see its log"
        )
    return plan


def save_engine(plan: Any, path: Path) -> Path:
    path.write_bytes(memoryview(plan))
    return path


def plan_name(profile: SegmentProfile) -> str:
    return "full.plan" if profile.segment is None else f"segment_{profile.segment}.plan"


def trtexec_commands(profiles: Sequence[SegmentProfile], settings: EngineSettings) -> list[str]:
    """``trtexec`` command lines that build the same engines as ``engines_from_artifacts``, to run in the
    artifacts folder (``trtexec`` ships with TensorRT: /usr/src/tensorrt/bin in NVIDIA's containers)."""

    def shapes(profile: SegmentProfile, which: str) -> str:
        return ",".join(f"{i.name}:{'x'.join(str(d) for d in getattr(i, which))}" for i in profile.inputs)

    commands = []
    for profile in profiles:
        flags = [
            f"--onnx={profile.onnx}",
            f"--saveEngine={plan_name(profile)}",
            *(f"--{which}Shapes={shapes(profile, which)}" for which in ("min", "opt", "max")),
            f"--memPoolSize=workspace:{max(1, settings.workspace_bytes >> 20)}M",
            *(["--fp16"] if settings.precision == "fp16" else []),
        ]
        commands.append(" ".join(["trtexec", *flags]))
    return commands


def engine_set_for_trtexec(
    artifacts: ModelArtifacts, profiles: Sequence[SegmentProfile], settings: EngineSettings
) -> EngineSet:
    """The manifest of the engines ``trtexec_commands`` builds (their TensorRT is the container's)."""
    return EngineSet(
        onnx_fingerprint=artifacts.fingerprint,
        tensorrt_version="trtexec: the TensorRT of the container that ran the commands",
        precision=settings.precision,
        engines=tuple(Engine(plan_name(profile), profile) for profile in profiles),
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def engines_from_artifacts(
    artifacts: ModelArtifacts,
    artifacts_dir: Path,
    profiles: Sequence[SegmentProfile],
    settings: EngineSettings = EngineSettings(),
    trt: Any = None,
) -> EngineSet:
    """Builds one plan per profile from the ONNX files in ``artifacts_dir``, writes them and ``tensorrt.json``
    there, and returns the manifest. ``trt`` defaults to ``import_tensorrt()``."""
    trt = trt if trt is not None else import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    engines = []
    for profile in profiles:
        network, _parser = network_from_onnx_path(trt, builder, logger, Path(artifacts_dir) / profile.onnx)
        plan = serialized_engine_from_network(trt, builder, network, profile, settings)
        engines.append(Engine(save_engine(plan, Path(artifacts_dir) / plan_name(profile)).name, profile))
    engine_set = EngineSet(
        onnx_fingerprint=artifacts.fingerprint,
        tensorrt_version=str(trt.__version__),
        precision=settings.precision,
        engines=tuple(engines),
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    engine_set.save(artifacts_dir)
    return engine_set


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "artifacts_dir", type=Path, help="the model's artifacts folder (manifest.json, ONNX files)"
    )
    parser.add_argument(
        "--policy", type=Path, help="policy.json whose calibration exit-rate profile sizes the profiles"
    )
    parser.add_argument(
        "--max-batch", type=int, default=256, help="the server's max_batch_size (default 256)"
    )
    parser.add_argument(
        "--opt-batch", type=int, help="the first segment's typical batch (default: --max-batch)"
    )
    parser.add_argument(
        "--opt-length", type=int, help="text: the sequence length to tune for (default: max length)"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--workspace-mib", type=int, default=1024)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", action="store_true", help="print the profiles, build nothing (no TensorRT here)"
    )
    mode.add_argument(
        "--trtexec", action="store_true", help="write tensorrt.json, print trtexec commands for the plans"
    )
    args = parser.parse_args(argv)
    from offramp.build.artifacts import ModelArtifacts

    artifacts = ModelArtifacts.load(args.artifacts_dir)
    policy = Policy.load(args.policy) if args.policy else None
    exit_rates = policy.exit_rate_profile if policy is not None else None
    if exit_rates is None:
        print("no calibration exit-rate profile: every segment is sized for the whole batch")
    profiles = segment_profiles(
        artifacts, exit_rates, args.opt_batch or args.max_batch, args.max_batch, args.opt_length
    )
    print(profiles_table(profiles))
    if args.dry_run:
        return 0
    settings = EngineSettings(args.precision, args.workspace_mib << 20)
    if args.trtexec:
        engine_set_for_trtexec(artifacts, profiles, settings).save(args.artifacts_dir)
        print(f"wrote {args.artifacts_dir / ENGINE_MANIFEST}; build the plans in {args.artifacts_dir} with:")
        print("\n".join(trtexec_commands(profiles, settings)))
        return 0
    try:
        engine_set = engines_from_artifacts(artifacts, args.artifacts_dir, profiles, settings)
    except TensorRTUnavailable as error:
        print(f"error: {error}")
        return 2
    print(
        f"TensorRT {engine_set.tensorrt_version}: wrote {len(engine_set.engines)} plans and {ENGINE_MANIFEST}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
