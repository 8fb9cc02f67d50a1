"""The repository writer: typed configs to config.pbtxt through Triton's own protobuf schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from offramp.backend.contract import TensorSpec
from offramp.backend.orchestrator import Orchestrator
from offramp.backend.policy import Policy, PolicyError
from offramp.build.artifacts import ModelArtifacts, SegmentArtifact
from offramp.build.repository import (
    ModelConfig,
    RepositoryOptions,
    TensorConfig,
    full_model_config,
    orchestrator_model_config,
    segment_model_configs,
    write_repository,
)

ARTIFACTS = ModelArtifacts(
    name="toy",
    inputs=(TensorSpec("IMAGE", "float32", (1, 8, 8)),),
    side_inputs=(),
    class_names=("a", "b", "c"),
    segments=(
        SegmentArtifact("segment_0.onnx", ("IMAGE",), TensorSpec("hidden", "float32", (4, 4, 4)), 100, 0.4),
        SegmentArtifact(
            "segment_1.onnx", ("hidden_in",), TensorSpec("hidden", "float32", (8, 2, 2)), 150, 1.0
        ),
    ),
    full_onnx="full.onnx",
    full_macs=250,
    fingerprint="f" * 64,
)


def parse(text: str) -> pb.ModelConfig:
    return text_format.Parse(text, pb.ModelConfig())


def test_tensor_config_scalars_become_dims_1_reshaped_to_nothing():
    proto = TensorConfig("LABEL", "int64", ()).output_proto()
    assert list(proto.dims) == [1] and proto.HasField("reshape") and list(proto.reshape.shape) == []
    proto = TensorConfig("LOGITS", "float32", (3,)).output_proto()
    assert list(proto.dims) == [3] and not proto.HasField("reshape") and proto.data_type == pb.TYPE_FP32


def test_model_config_round_trips_through_text_format():
    config = ModelConfig(
        name="m",
        inputs=(TensorConfig("X", "float32", (2,)),),
        outputs=(TensorConfig("Y", "int64", ()),),
        backend="python",
        max_batch_size=64,
        instances=3,
        max_queue_delay_us=100,
        parameters={"EXECUTION_ENV_PATH": "/env"},
    )
    proto = parse(config.to_pbtxt())
    assert proto == config.to_proto()
    assert proto.backend == "python" and proto.max_batch_size == 64
    assert (
        proto.instance_group[0].count == 3 and proto.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    )
    assert proto.dynamic_batching.max_queue_delay_microseconds == 100
    assert proto.parameters["EXECUTION_ENV_PATH"].string_value == "/env"


def test_segments_chain_their_hidden_shapes():
    first, second = segment_model_configs(ARTIFACTS, RepositoryOptions())
    assert [i.name for i in first.inputs] == ["IMAGE"] and first.inputs[0].dims == (1, 8, 8)
    assert [i.name for i in second.inputs] == ["hidden_in"] and second.inputs[0].dims == (4, 4, 4)
    assert [o.name for o in second.outputs] == ["hidden", "logits"] and second.outputs[1].dims == (3,)
    assert first.name == "toy_segment_0" and first.backend == "python" and first.dynamic_batching


def test_triton_onnx_target_uses_the_onnxruntime_platform_with_one_thread():
    options = RepositoryOptions(target="triton-onnx", execution_env=Path("/env"))
    for config in [*segment_model_configs(ARTIFACTS, options), full_model_config(ARTIFACTS, options)]:
        proto = config.to_proto()
        assert proto.platform == "onnxruntime_onnx" and not proto.backend
        assert proto.parameters["intra_op_thread_count"].string_value == "1"
        assert "EXECUTION_ENV_PATH" not in proto.parameters
    # The orchestrator stays a Python model, in the environment it was given.
    orchestrator = orchestrator_model_config(ARTIFACTS, options).to_proto()
    assert (
        orchestrator.backend == "python"
        and orchestrator.parameters["EXECUTION_ENV_PATH"].string_value == "/env"
    )


def test_orchestrator_serves_the_tensor_contract():
    proto = orchestrator_model_config(ARTIFACTS, RepositoryOptions()).to_proto()
    outputs = {o.name: o for o in proto.output}
    assert list(outputs) == ["LOGITS", "LABEL", "EXIT", "CONFIDENCE", "COST", "FLAGS", "LABEL_NAME"]
    assert list(outputs["LOGITS"].dims) == [3] and list(outputs["CONFIDENCE"].dims) == [3]
    assert outputs["EXIT"].data_type == pb.TYPE_INT32 and outputs["LABEL"].data_type == pb.TYPE_INT64
    # The class name travels as BYTES, [-1, 1] on the wire like the other per-row scalars.
    assert outputs["LABEL_NAME"].data_type == pb.TYPE_STRING and list(outputs["LABEL_NAME"].dims) == [1]


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="target"):
        RepositoryOptions(target="tensorrt-someday")


def test_written_repository_has_every_model_and_a_loadable_orchestrator(tmp_path):
    artifacts_dir = tmp_path / "artifacts"
    artifacts_dir.mkdir()
    for name in ["segment_0.onnx", "segment_1.onnx", "full.onnx"]:
        (artifacts_dir / name).write_bytes(b"onnx")
    policy = Policy.fixed(ARTIFACTS.fingerprint, 2)
    written = write_repository(ARTIFACTS, artifacts_dir, policy, tmp_path / "repo")
    assert sorted(p.name for p in written) == ["toy", "toy_full", "toy_segment_0", "toy_segment_1"]
    for model_dir in written:
        assert parse((model_dir / "config.pbtxt").read_text()).name == model_dir.name
    assert (tmp_path / "repo/toy_segment_1/1/model.onnx").exists()
    assert (tmp_path / "repo/toy_segment_1/1/model.py").exists()  # the embedded target's ONNX runner
    orchestrator = Orchestrator.from_directory(tmp_path / "repo/toy/1")
    assert orchestrator.spec.segment_models == ("toy_segment_0", "toy_segment_1")
    assert orchestrator.spec.exit_costs == (0.4, 1.0)


def test_a_policy_for_another_model_is_refused(tmp_path):
    policy = Policy.fixed("0" * 64, 2)
    with pytest.raises(PolicyError, match="not for the served model"):
        write_repository(ARTIFACTS, tmp_path, policy, tmp_path / "repo")


def test_the_command_line_sets_serving_options_and_refuses_unknown_ones(tmp_path, capsys):
    """`offramp repository --serving NAME=VALUE` reaches the orchestrator's config; a name that is no
    option, a value of the wrong type, or an SLO setting the controller refuses, is an error before
    anything is written (not a model that fails to load)."""
    from offramp.backend.orchestrator import ServingOptions
    from offramp.client.cli.main import main

    artifacts_dir = tmp_path / "artifacts"
    artifacts_dir.mkdir()
    ARTIFACTS.save(artifacts_dir)
    for name in ["segment_0.onnx", "segment_1.onnx", "full.onnx"]:
        (artifacts_dir / name).write_bytes(b"onnx")
    repo = tmp_path / "repo"
    common = [
        "repository",
        "--artifacts",
        str(artifacts_dir),
        "--repository",
        str(repo),
        "--no-execution-env",
    ]
    for bad, message in [
        ("slo_p99_ms=fast", "slo_p99_ms: 'fast' is not a float"),
        ("drift_conservative=yes", "'yes' is not a bool"),
        ("latency=5", "not NAME=VALUE"),
        ("slo_fixed_cost=-1", "fixed_cost must be a finite compute fraction >= 0"),
        ("slo_rung_capacity=29,x", "slo_rung_capacity must be requests/s per rung"),
        ("slo_headroom=0.5", "headroom must be a load multiple >= 1"),
        (
            "slo_rung_capacity=29,33",
            "slo_rung_capacity gives 2 figures for a ladder of 1 rungs (rung 0 first)",
        ),
    ]:
        assert main([*common, "--serving", "slo_p99_ms=40", "--serving", bad]) == 2
        assert message in capsys.readouterr().err
    assert not repo.exists()
    given = ["slo_p99_ms=40", "drift_conservative=true", "shadow_rate=0.02", "slo_headroom=2"]
    assert main([*common, *(f"--serving={assignment}" for assignment in given)]) == 0
    config = parse((repo / "toy" / "config.pbtxt").read_text())
    options = ServingOptions.from_parameters({k: v.string_value for k, v in config.parameters.items()})
    assert options.slo_p99_ms == 40.0 and options.drift_conservative and options.shadow.rate == 0.02
    assert options.slo_config().headroom == 2.0
    assert options.drift_window == ServingOptions().drift_window  # what was not given keeps its default


@pytest.mark.parametrize("command", [["repository"], ["input-data"], ["calibrate"]])
def test_classifier_steps_on_a_folder_without_a_build_say_what_to_pass(command, tmp_path, capsys):
    from offramp.client.cli.main import main

    assert main([*command, "--artifacts", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"offramp {command[0]}: error: {tmp_path} holds no manifest.json: pass a build's folder "
        "(offramp build prints it)\n"
    )
