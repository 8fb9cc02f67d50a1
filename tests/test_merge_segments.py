"""Keeping only some exits: merged segments answer the original logits at every kept exit, carry no
dropped head, share side inputs, and their manifest says what they cover."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from offramp.backend.contract import BATCH_AXIS, HIDDEN_IN, HIDDEN_OUT, LOGITS_OUT, SEQUENCE_AXIS, TensorSpec
from offramp.backend.segment_runner import OnnxRunner
from offramp.build.artifacts import ModelArtifacts, fingerprint_files
from offramp.build.calibrate import exit_logits_from_onnx
from offramp.build.export import artifacts_from_network
from offramp.build.merge_segments import merge_onnx_chain, merged_artifacts
from offramp.build.segmented import SegmentedNetwork

# The merged graph runs the same ops in the same order; the tolerance only covers ONNX Runtime picking
# other kernels for a fused graph (measured: bitwise equal here).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
FEATURES, WIDTH, CLASSES = 4, 8, 3
MASK = "MASK"


class MaskedSegment(nn.Module):
    """(x (B, T, F), mask (B, T) int64) -> hidden (B, T, W) zero at padding, logits (B, C) of the
    masked mean: every segment reads the mask again, as a transformer's blocks do."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.body = nn.Linear(features, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        hidden = torch.relu(self.body(x)) * keep
        pooled = hidden.sum(1) / keep.sum(1).clamp(min=1)  # (B, W)
        return hidden, self.head(pooled)


class Chain(nn.Module):
    def __init__(self, segments: list[nn.Module]) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for segment in self.segments:
            x, logits = segment(x, mask)
        return logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[ModelArtifacts, Path]:
    """4 exits with a side input (the mask) and symbolic batch and sequence axes, exported as a build is."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on 2 busy cores more made small exports slower
    torch.manual_seed(0)
    segments = [MaskedSegment(FEATURES), *(MaskedSegment(WIDTH) for _ in range(3))]
    network = SegmentedNetwork(
        segments,
        Chain(segments),
        [TensorSpec("X", "float32", (-1, FEATURES)), TensorSpec(MASK, "int64", (-1,))],
        [MASK],
        {0: BATCH_AXIS, 1: SEQUENCE_AXIS},
    )
    directory = tmp_path_factory.mktemp("four_exits")
    try:
        return artifacts_from_network("tiny", network, tuple("abc"), directory), directory
    finally:
        torch.set_num_threads(before)


def raw_inputs(batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random features (B, T, F) float32 and a right-padded mask (B, T) int64, row 0 full length."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return {"X": rng.standard_normal((batch, length, FEATURES), dtype=np.float32), MASK: mask}


def originals(artifacts: ModelArtifacts, directory: Path) -> list[onnx.ModelProto]:
    return [onnx.load(str(directory / s.onnx)) for s in artifacts.segments]


@pytest.mark.parametrize("keep", [(0, 1, 2, 3), (3,), (1, 3), (0, 2, 3)])
def test_merged_chain_answers_the_original_logits_at_every_kept_exit(exported, tmp_path, keep):
    artifacts, directory = exported
    merged = merged_artifacts(artifacts, directory, keep, tmp_path)
    assert merged.num_exits == len(keep)
    for batch, length in [(1, 5), (6, 3)]:  # two batch sizes and lengths: both axes stay symbolic
        inputs = raw_inputs(batch, length, seed=batch)
        original = exit_logits_from_onnx(artifacts, directory, inputs)  # (4, B, C)
        answered = exit_logits_from_onnx(merged, tmp_path, inputs)  # (len(keep), B, C)
        assert answered.shape == (len(keep), batch, CLASSES)
        np.testing.assert_allclose(answered, original[list(keep)], **TOLERANCE)


def test_merged_graph_drops_the_heads_of_dropped_exits(exported):
    artifacts, directory = exported
    models = originals(artifacts, directory)
    merged = merge_onnx_chain(models, artifacts.side_inputs)
    onnx.checker.check_model(merged, full_check=True)
    graph = merged.graph
    assert [v.name for v in graph.output] == [HIDDEN_OUT, LOGITS_OUT]
    assert len(graph.node) < sum(len(m.graph.node) for m in models)

    def head_weights(g: onnx.GraphProto) -> list[str]:
        return [t.name for t in g.initializer if "head." in t.name]

    # Each original carries its head's weight and bias; the merged graph only the last one's.
    assert all(len(head_weights(m.graph)) == 2 for m in models)
    assert len(head_weights(graph)) == 2
    # Only the last exit's head computes logits: one Gemm (a head's Linear on (B, W)) per original.
    assert [n.op_type for n in graph.node].count("Gemm") == 1
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == BATCH_AXIS, value.name


def test_side_input_is_taken_once(exported):
    artifacts, directory = exported
    models = originals(artifacts, directory)
    from_start = merge_onnx_chain(models, artifacts.side_inputs)
    assert [v.name for v in from_start.graph.input] == ["X", MASK]
    later = merge_onnx_chain(models[1:], artifacts.side_inputs)
    assert [v.name for v in later.graph.input] == [HIDDEN_IN, MASK]


def test_keeping_every_exit_copies_the_build(exported, tmp_path):
    """Single-segment ranges are copied as they are: the same files, so the same fingerprint."""
    artifacts, directory = exported
    merged = merged_artifacts(artifacts, directory, range(artifacts.num_exits), tmp_path)
    assert merged.segments == artifacts.segments
    assert merged.fingerprint == artifacts.fingerprint


@pytest.mark.parametrize(
    "keep, message",
    [
        ((), "keep is empty"),
        ((1, 0, 3), "sorted and without repeats"),
        ((1, 1, 3), "sorted and without repeats"),
        ((0, 4), r"outside 0\.\.3"),
        ((-1, 3), r"outside 0\.\.3"),
        ((0, 1), r"include the last exit \(3\)"),
        ((0.5, 3), "integers"),
    ],
)
def test_bad_keep_is_refused(exported, tmp_path, keep, message):
    artifacts, directory = exported
    with pytest.raises(ValueError, match=message):
        merged_artifacts(artifacts, directory, keep, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merging_into_the_artifacts_folder_is_refused(exported):
    artifacts, directory = exported
    with pytest.raises(ValueError, match="must not be the artifacts folder"):
        merged_artifacts(artifacts, directory, (3,), directory)


def test_manifest_round_trips_with_costs_of_the_covered_segments(exported, tmp_path):
    artifacts, directory = exported
    # A text build's tokenizer lies inside its artifacts folder, recorded relative to it.
    (directory / "tokenizer").mkdir(exist_ok=True)
    (directory / "tokenizer" / "tokenizer.json").write_text("{}")
    built = replace(
        artifacts,
        exit_test_accuracy=(0.5, 0.6, 0.7, 0.8),
        full_test_accuracy=0.81,
        build={
            "tokenizer_dir": "tokenizer", "max_length": 8, "seed": 3, "key": "abc",
            "exit_layers": [1, 2, 3, 4], "exit_test_agreement": [0.7, 0.8, 0.9, 1.0],
        },
    )  # fmt: skip
    out = tmp_path / "merged"
    merged = merged_artifacts(built, directory, (1, 3), out)
    assert ModelArtifacts.load(out) == merged
    old = artifacts.segments
    assert [s.onnx for s in merged.segments] == ["segment_0.onnx", "segment_1.onnx"]
    assert [s.input_names for s in merged.segments] == [old[0].input_names, old[2].input_names]
    assert [s.hidden for s in merged.segments] == [old[1].hidden, old[3].hidden]
    assert [s.macs for s in merged.segments] == [old[0].macs + old[1].macs, old[2].macs + old[3].macs]
    assert merged.exit_costs == (old[1].exit_cost, old[3].exit_cost)
    assert merged.exit_test_accuracy == (0.6, 0.8)
    # Per-exit records follow the kept exits; the cache key goes (a build must not take this folder
    # for its own finished work).
    assert merged.build == {
        "tokenizer_dir": "tokenizer", "max_length": 8, "seed": 3, "exit_layers": [2, 4],
        "exit_test_agreement": [0.8, 1.0], "kept_exits": [1, 3], "merged_from": artifacts.fingerprint,
    }  # fmt: skip
    assert (merged.name, merged.full_macs, merged.full_test_accuracy) == ("tiny", built.full_macs, 0.81)
    assert (out / merged.full_onnx).read_bytes() == (directory / artifacts.full_onnx).read_bytes()
    files = [out / "segment_0.onnx", out / "segment_1.onnx", out / merged.full_onnx]
    assert merged.fingerprint == fingerprint_files(files) != artifacts.fingerprint
    assert (out / merged.build["tokenizer_dir"] / "tokenizer.json").read_text() == "{}"


# --- merge_onnx_chain on hand-written graphs: functions, opsets, inputs ----------------------------


def double(op: str = "Add") -> onnx.FunctionProto:
    """local:Double, y = x + x (or x * x with op="Mul", a different function of the same name)."""
    body = [helper.make_node(op, ["x", "x"], ["y"])]
    return helper.make_function("local", "Double", ["x"], ["y"], body, [helper.make_opsetid("", 20)])


def segment(
    first: str, side: str | None = None, function: onnx.FunctionProto | None = None, opset: int = 20
) -> onnx.ModelProto:
    """hidden = 2 * (first * side), through ``function`` if given; logits = -hidden; all (batch, 2)."""
    nodes, x = [], first
    if side:
        nodes.append(helper.make_node("Mul", [first, side], ["masked"]))
        x = "masked"
    if function is not None:
        nodes.append(helper.make_node(function.name, [x], [HIDDEN_OUT], domain=function.domain))
    else:
        nodes.append(helper.make_node("Add", [x, x], [HIDDEN_OUT]))
    nodes.append(helper.make_node("Neg", [HIDDEN_OUT], [LOGITS_OUT]))

    def value(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_AXIS, 2])

    inputs = [value(first), *([value(side)] if side else [])]
    graph = helper.make_graph(nodes, "handmade", inputs, [value(HIDDEN_OUT), value(LOGITS_OUT)])
    opsets = [helper.make_opsetid("", opset), *([helper.make_opsetid("local", 1)] if function else [])]
    functions = [function] if function else []
    return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=10)


def branching_segment() -> onnx.ModelProto:
    """hidden = If(true): hidden_in + hidden_in, else -hidden_in; its branches read the outer hidden_in."""

    def value(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_AXIS, 2])

    def branch(op: str, inputs: list[str]) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, inputs, ["y"])], op, [], [value("y")])

    condition = helper.make_tensor("condition", TensorProto.BOOL, [], [True])
    choose = helper.make_node(
        "If",
        ["condition"],
        [HIDDEN_OUT],
        then_branch=branch("Add", [HIDDEN_IN, HIDDEN_IN]),
        else_branch=branch("Neg", [HIDDEN_IN]),
    )
    graph = helper.make_graph(
        [choose, helper.make_node("Neg", [HIDDEN_OUT], [LOGITS_OUT])],
        "branching",
        [value(HIDDEN_IN)],
        [value(HIDDEN_OUT), value(LOGITS_OUT)],
        [condition],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def run(model: onnx.ModelProto, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    onnx.save(model, str(path))
    return OnnxRunner(path).run(inputs)


def test_a_side_input_only_later_segments_take_is_added_once(tmp_path):
    merged = merge_onnx_chain([segment("X"), segment(HIDDEN_IN, MASK), segment(HIDDEN_IN, MASK)], [MASK])
    assert [v.name for v in merged.graph.input] == ["X", MASK]
    x = np.arange(6, dtype=np.float32).reshape(3, 2)  # (B, 2)
    mask = np.array([[1, 0], [1, 1], [0, 1]], dtype=np.float32)  # (B, 2)
    answer = run(merged, tmp_path / "m.onnx", {"X": x, MASK: mask})
    hidden = 2 * (2 * (2 * x) * mask) * mask
    np.testing.assert_array_equal(answer[HIDDEN_OUT], hidden)
    np.testing.assert_array_equal(answer[LOGITS_OUT], -hidden)


def test_local_functions_are_carried_once(tmp_path):
    merged = merge_onnx_chain([segment("X", function=double()), segment(HIDDEN_IN, function=double())], [])
    onnx.checker.check_model(merged, full_check=True)
    assert [f.name for f in merged.functions] == ["Double"]
    x = np.arange(4, dtype=np.float32).reshape(2, 2)  # (B, 2)
    np.testing.assert_array_equal(run(merged, tmp_path / "m.onnx", {"X": x})[LOGITS_OUT], -4 * x)


def test_subgraphs_of_control_flow_are_renamed_with_their_graph(tmp_path):
    """Two segments with the same names inside their If branches, each branch reading its outer input."""
    merged = merge_onnx_chain([segment("X"), branching_segment(), branching_segment()], [])
    onnx.checker.check_model(merged, full_check=True)
    x = np.arange(4, dtype=np.float32).reshape(2, 2)  # (B, 2)
    np.testing.assert_array_equal(run(merged, tmp_path / "m.onnx", {"X": x})[HIDDEN_OUT], 8 * x)


@pytest.mark.parametrize(
    "chain, message",
    [
        ([segment("X", function=double()), segment(HIDDEN_IN, function=double("Mul"))], "local function"),
        ([segment("X", opset=20), segment(HIDDEN_IN, opset=18)], "imports opset 18"),
        ([segment("X"), segment(HIDDEN_IN, "OTHER")], "nor a side input"),
        ([], "no model to merge"),
    ],
)
def test_chains_that_cannot_merge_are_refused(chain, message):
    with pytest.raises(ValueError, match=message):
        merge_onnx_chain(chain, [MASK])
