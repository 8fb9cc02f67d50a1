"""ONNX export of segments and of the full network, with symbolic batch (and sequence) axes."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from tqdm import tqdm

from offramp.backend.contract import (
    BATCH_AXIS,
    FULL_LOGITS_OUT,
    HIDDEN_OUT,
    LOGITS_OUT,
    SEQUENCE_AXIS,
    TensorSpec,
)
from offramp.build.artifacts import ModelArtifacts, SegmentArtifact, fingerprint_files
from offramp.build.segmented import SegmentedNetwork, count_macs

# The exporter logs one warning per torchvision operator it cannot register; none is used here.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def onnx_from_module(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    variable_axes: Sequence[dict[int, str]],
    path: Path,
) -> Path:
    """Exports ``module`` to one self-contained ONNX file and checks its variable axes stayed symbolic.

    ``variable_axes[i]`` names the variable axes of input i ({0: "batch"} at least). The example batch
    must have at least 2 rows: with one row the dynamo exporter silently fixes the batch at 1.
    """
    if example_inputs[0].shape[0] < 2:
        raise ValueError("export needs an example batch of at least 2 rows")
    dims = {name: torch.export.Dim(name) for axes in variable_axes for name in axes.values()}
    dynamic_shapes = tuple({axis: dims[name] for axis, name in axes.items()} for axes in variable_axes)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(example_inputs),
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    graph = onnx.load(str(path)).graph
    for value in list(graph.input) + list(graph.output):
        first = value.type.tensor_type.shape.dim[0]
        if not first.dim_param:
            raise RuntimeError(f"{path.name}: {value.name} has a fixed batch axis ({first.dim_value})")
    return path


def _variable_axes(spec_shape: Sequence[int]) -> dict[int, str]:
    axes = {0: BATCH_AXIS}
    axes.update({i + 1: SEQUENCE_AXIS for i, d in enumerate(spec_shape) if d < 0})
    return axes


def onnx_files_from_network(
    network: SegmentedNetwork, out_dir: Path, progress: bool = False
) -> tuple[list[Path], Path]:
    """Writes ``segment_<k>.onnx`` for every segment and ``full.onnx``; returns their paths."""
    bar = tqdm(total=len(network.segments) + 1, desc="export ONNX", unit="file", disable=not progress)
    example = network.example_inputs(batch=4)
    raw_axes = [_variable_axes(spec.shape) for spec in network.inputs]
    side_axes = {spec.name: axes for spec, axes in zip(network.inputs, raw_axes)}
    paths = []
    inputs, axes = list(example), raw_axes
    for index, segment in enumerate(network.segments):
        path = onnx_from_module(
            segment,
            inputs,
            network.segment_input_names(index),
            [HIDDEN_OUT, LOGITS_OUT],
            axes,
            out_dir / f"segment_{index}.onnx",
        )
        paths.append(path)
        bar.update()
        with torch.no_grad():
            hidden, _ = segment(*inputs)
        side = {spec.name: t for spec, t in zip(network.inputs, example)}
        inputs = [hidden, *(side[name] for name in network.side_inputs)]
        axes = [network.hidden_axes, *(side_axes[name] for name in network.side_inputs)]
    full = onnx_from_module(
        network.full,
        example,
        [spec.name for spec in network.inputs],
        [FULL_LOGITS_OUT],
        raw_axes,
        out_dir / "full.onnx",
    )
    bar.update()
    bar.close()
    return paths, full


def hidden_spec(path: Path) -> TensorSpec:
    """The ``hidden`` output of an exported segment, batch axis dropped, symbolic axes as -1."""
    for value in onnx.load(str(path)).graph.output:
        if value.name == HIDDEN_OUT:
            dims = [d.dim_value if not d.dim_param else -1 for d in value.type.tensor_type.shape.dim[1:]]
            return TensorSpec(HIDDEN_OUT, "float32", tuple(dims))
    raise ValueError(f"{path} has no {HIDDEN_OUT!r} output")


def segment_costs(network: SegmentedNetwork) -> tuple[list[int], int]:
    """MACs per row of each segment (with its head) and of the full network."""
    inputs = network.example_inputs(batch=2)
    side = {spec.name: t for spec, t in zip(network.inputs, inputs)}
    macs = []
    current = list(inputs)
    for segment in network.segments:
        macs.append(count_macs(segment, *current))
        with torch.no_grad():
            hidden, _ = segment(*current)
        current = [hidden, *(side[n] for n in network.side_inputs)]
    return macs, count_macs(network.full, *inputs)


def artifacts_from_network(
    name: str,
    network: SegmentedNetwork,
    class_names: tuple[str, ...],
    out_dir: Path,
    costs: tuple[list[int], int] | None = None,
    progress: bool = False,
    **extra: Any,
) -> ModelArtifacts:
    """Exports ``network`` into ``out_dir`` and returns (without saving) its manifest.

    ``costs`` (MACs per segment, MACs of the full network) replaces the layer count of
    :func:`segment_costs` for models whose cost it cannot see (attention's T x T matmuls).
    """
    segment_paths, full_path = onnx_files_from_network(network, out_dir, progress)
    macs, full_macs = costs if costs is not None else segment_costs(network)
    cumulative = 0
    segments = []
    for index, (path, segment_macs) in enumerate(zip(segment_paths, macs)):
        cumulative += segment_macs
        segments.append(
            SegmentArtifact(
                onnx=path.name,
                input_names=tuple(network.segment_input_names(index)),
                hidden=hidden_spec(path),
                macs=segment_macs,
                exit_cost=cumulative / full_macs,
            )
        )
    return ModelArtifacts(
        name=name,
        inputs=tuple(network.inputs),
        side_inputs=tuple(network.side_inputs),
        class_names=class_names,
        segments=tuple(segments),
        full_onnx=full_path.name,
        full_macs=full_macs,
        fingerprint=fingerprint_files([*segment_paths, full_path]),
        **extra,
    )
