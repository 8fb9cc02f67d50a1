"""Keep only some exits: merge the segments between kept exits into one ONNX model each.

Serving a model with K exits costs one BLS call (one Triton round trip, one ONNX Runtime session run)
per segment a request passes through. An exit that no policy ever takes, or one too close to the next to
be worth its check, still costs its hop and its head. :func:`merged_artifacts` writes a new artifacts
folder in which each run of segments up to a kept exit is one ONNX graph: the chain between kept exits
runs in one call, and the heads of the dropped exits are pruned away, so they cost nothing either.

Merged segment j covers the original segments ``keep[j-1] + 1 .. keep[j]`` (``0 .. keep[0]`` for j = 0):
it takes the inputs of its first original segment and answers ``HIDDEN_OUT`` and ``LOGITS_OUT`` of its
last, under the same tensor contract (``offramp.backend.contract``), so the repository writer and the
orchestrator serve it like any other build.
"""

from __future__ import annotations

import itertools
import numbers
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import onnx

from offramp.backend.contract import HIDDEN_IN, HIDDEN_OUT, LOGITS_OUT
from offramp.build.artifacts import ModelArtifacts, SegmentArtifact, fingerprint_files

# Lists in a manifest's build record with one entry per exit.
PER_EXIT_RECORDS = ("exit_layers", "exit_test_agreement")


def merge_onnx_chain(models: Sequence[onnx.ModelProto], side_inputs: Sequence[str]) -> onnx.ModelProto:
    """One ONNX model computing the chain ``models[0] -> models[1] -> ...``: model i's ``HIDDEN_OUT``
    feeds model i+1's ``HIDDEN_IN``, side inputs are shared by name.

    The graph takes the first model's inputs (plus any side input only a later model takes) and answers
    the last model's ``HIDDEN_OUT`` and ``LOGITS_OUT``; every node no output needs (the earlier exit
    heads) is pruned. Each model's own tensor and node names get a prefix so that they cannot collide.
    """
    if not models:
        raise ValueError("there is no model to merge")
    opsets = _merged_opsets(models)
    functions = _merged_functions(models)
    last = len(models) - 1
    inputs = list(models[0].graph.input)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    sparse: list[onnx.SparseTensorProto] = []
    value_info: list[onnx.ValueInfoProto] = []
    previous_hidden: onnx.ValueInfoProto | None = None  # the tensor the next model's HIDDEN_IN reads
    for index, model in enumerate(models):
        produced = {v.name for v in model.graph.output}
        wanted = [HIDDEN_OUT, LOGITS_OUT] if index == last else [HIDDEN_OUT]
        missing = [name for name in wanted if name not in produced]
        if missing:
            raise ValueError(f"model {index} of the chain has no output {missing}")
        rename = _renaming(index, model.graph, side_inputs, previous_hidden, index == last)
        if index > 0:
            inputs += _new_side_inputs(index, model.graph, inputs)
        graph = onnx.GraphProto()
        graph.CopyFrom(model.graph)
        _rename_graph(graph, rename, f"s{index}/")
        nodes += graph.node
        initializers += graph.initializer
        sparse += graph.sparse_initializer
        value_info += graph.value_info
        if index < last:
            # Its outputs become intermediate tensors: their shapes stay known as value infos.
            value_info += graph.output
            previous_hidden = next(v for v in graph.output if v.name == rename(HIDDEN_OUT))
    # The canonical names and the last model's own value infos: symbolic axes stay symbolic.
    final = {v.name: v for v in models[-1].graph.output}
    outputs = [final[HIDDEN_OUT], final[LOGITS_OUT]]
    nodes, needed = _needed_nodes(nodes, [v.name for v in outputs])
    merged_graph = onnx.helper.make_graph(
        nodes,
        f"{models[0].graph.name}_merged",
        inputs,
        outputs,
        [t for t in initializers if t.name in needed],
        # Once per name: a shared side input may be described by several models.
        value_info=list({v.name: v for v in value_info if v.name in needed}.values()),
        sparse_initializer=[t for t in sparse if t.values.name in needed],
    )
    merged = onnx.helper.make_model(
        merged_graph,
        opset_imports=[onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items()],
        functions=functions,
        ir_version=max(m.ir_version for m in models),
        producer_name=models[0].producer_name,
        producer_version=models[0].producer_version,
        doc_string=f"{len(models)} segments merged by offramp.build.merge_segments",
    )
    onnx.checker.check_model(merged)
    return merged


def merged_artifacts(
    artifacts: ModelArtifacts, artifacts_dir: Path, keep: Sequence[int], out_dir: Path
) -> ModelArtifacts:
    """Writes into ``out_dir`` the build of ``artifacts`` with only the exits ``keep`` (sorted, unique,
    ending with the last exit) and returns its manifest, saved there too.

    Each merged segment's ``macs`` is the sum of the segments it covers and its ``exit_cost`` that of its
    last one (both include the pruned heads, as the cumulative costs did). The fingerprint is new, so
    policies calibrated for the original build do not validate against the merged one.
    """
    keep = _checked_keep(keep, artifacts.num_exits)
    artifacts_dir, out_dir = Path(artifacts_dir), Path(out_dir)
    if out_dir.resolve() == artifacts_dir.resolve():
        raise ValueError(f"out_dir must not be the artifacts folder {artifacts_dir}: it would overwrite it")
    out_dir.mkdir(parents=True, exist_ok=True)
    segments, paths = [], []
    for index, (first, last) in enumerate(_covered_ranges(keep)):
        covered = artifacts.segments[first : last + 1]
        path = out_dir / f"segment_{index}.onnx"
        if len(covered) == 1:
            shutil.copyfile(artifacts_dir / covered[0].onnx, path)
        else:
            chain = [onnx.load(str(artifacts_dir / s.onnx)) for s in covered]
            onnx.save(merge_onnx_chain(chain, artifacts.side_inputs), str(path))
        paths.append(path)
        segments.append(
            SegmentArtifact(
                onnx=path.name,
                input_names=covered[0].input_names,
                hidden=covered[-1].hidden,
                macs=sum(s.macs for s in covered),
                exit_cost=covered[-1].exit_cost,
            )
        )
    full = out_dir / artifacts.full_onnx
    shutil.copyfile(artifacts_dir / artifacts.full_onnx, full)
    # The tokenizer folder is recorded relative to the artifacts folder (calibrate's text_inputs and the
    # repository writer read it from there); the build's data files are recorded as absolute paths.
    tokenizer = artifacts.build.get("tokenizer_dir")
    if tokenizer and not Path(tokenizer).is_absolute():
        shutil.copytree(artifacts_dir / tokenizer, out_dir / tokenizer, dirs_exist_ok=True)
    accuracy = artifacts.exit_test_accuracy
    # The build's per-exit records follow the kept exits; its cache key goes, so a later build with the
    # same settings into this folder cannot take the merged model for its own finished build.
    build = {
        k: [v[i] for i in keep] if k in PER_EXIT_RECORDS and len(v) == artifacts.num_exits else v
        for k, v in artifacts.build.items()
        if k != "key"
    }
    merged = replace(
        artifacts,
        segments=tuple(segments),
        fingerprint=fingerprint_files([*paths, full]),
        exit_test_accuracy=tuple(accuracy[k] for k in keep) if accuracy else (),
        build={**build, "kept_exits": list(keep), "merged_from": artifacts.fingerprint},
    )
    merged.save(out_dir)
    return merged


def _checked_keep(keep: Sequence[int], num_exits: int) -> tuple[int, ...]:
    keep = tuple(keep)
    last = num_exits - 1
    if not keep:
        raise ValueError(f"keep is empty: it must name at least the last exit ({last})")
    if not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in keep):
        raise ValueError(f"keep must hold exit indices (integers), not {keep!r}")
    keep = tuple(int(k) for k in keep)
    outside = [k for k in keep if not 0 <= k <= last]
    if outside:
        raise ValueError(f"keep holds exits {outside} outside 0..{last} (the model has {num_exits} exits)")
    if any(a >= b for a, b in itertools.pairwise(keep)):
        raise ValueError(f"keep must be sorted and without repeats, not {keep}")
    if keep[-1] != last:
        raise ValueError(f"keep must include the last exit ({last}), which every request can reach: {keep}")
    return keep


def _covered_ranges(keep: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first, last) original segment of each merged one, both inclusive."""
    return zip((0, *(k + 1 for k in keep[:-1])), keep, strict=True)


def _merged_opsets(models: Sequence[onnx.ModelProto]) -> dict[str, int]:
    opsets: dict[str, int] = {}
    for index, model in enumerate(models):
        for opset in model.opset_import:
            seen = opsets.setdefault(opset.domain, opset.version)
            if seen != opset.version:
                raise ValueError(
                    f"model {index} of the chain imports opset {opset.version} of domain "
                    f"{opset.domain or 'ai.onnx'!r}, an earlier one {seen}: export them with one opset"
                )
    return opsets


def _merged_functions(models: Sequence[onnx.ModelProto]) -> list[onnx.FunctionProto]:
    """The models' local functions, each once; functions are called by name, so not renamed."""
    functions: dict[tuple[str, str, str], onnx.FunctionProto] = {}
    for index, model in enumerate(models):
        for function in model.functions:
            key = (function.domain, function.name, function.overload)
            seen = functions.setdefault(key, function)
            if seen.SerializeToString(deterministic=True) != function.SerializeToString(deterministic=True):
                raise ValueError(
                    f"model {index} of the chain defines local function {function.domain}:{function.name} "
                    "differently from an earlier one"
                )
    return list(functions.values())


def _renaming(
    index: int,
    graph: onnx.GraphProto,
    side_inputs: Sequence[str],
    previous_hidden: onnx.ValueInfoProto | None,
    is_last: bool,
) -> Callable[[str], str]:
    """The merged graph's name of each tensor name of model ``index``: the shared inputs and the final
    outputs keep theirs, ``HIDDEN_IN`` reads the previous model's hidden state, the rest get a prefix."""
    if index == 0:
        kept = {v.name: v.name for v in graph.input}
    else:
        kept = {}
        for value in graph.input:
            if value.name == HIDDEN_IN:
                assert previous_hidden is not None  # set for every model after the first
                _check_same_kind(index, value, previous_hidden)
                kept[HIDDEN_IN] = previous_hidden.name
            elif value.name in side_inputs:
                kept[value.name] = value.name
            else:
                raise ValueError(
                    f"model {index} of the chain takes {value.name!r}, neither {HIDDEN_IN!r} nor a side "
                    f"input {list(side_inputs)}"
                )
    if is_last:
        kept.update({HIDDEN_OUT: HIDDEN_OUT, LOGITS_OUT: LOGITS_OUT})
    prefix = f"s{index}/"
    return lambda name: kept.get(name, prefix + name) if name else name  # "": an omitted optional input


def _check_same_kind(index: int, taken: onnx.ValueInfoProto, given: onnx.ValueInfoProto) -> None:
    taken_type, given_type = taken.type.tensor_type, given.type.tensor_type
    if (taken_type.elem_type, len(taken_type.shape.dim)) != (given_type.elem_type, len(given_type.shape.dim)):
        raise ValueError(
            f"model {index} of the chain takes {taken.name!r} as element type {taken_type.elem_type} of rank "
            f"{len(taken_type.shape.dim)}; the model before hands on type {given_type.elem_type} of rank "
            f"{len(given_type.shape.dim)}"
        )


def _new_side_inputs(
    index: int, graph: onnx.GraphProto, inputs: Sequence[onnx.ValueInfoProto]
) -> list[onnx.ValueInfoProto]:
    """The side inputs model ``index`` takes that the merged graph does not take yet."""
    have = {v.name: v for v in inputs}
    new = []
    for value in graph.input:
        if value.name == HIDDEN_IN:
            continue
        if value.name in have:
            _check_same_kind(index, value, have[value.name])
        else:
            new.append(value)
    return new


def _rename_graph(graph: onnx.GraphProto, rename: Callable[[str], str], node_prefix: str) -> None:
    """Renames every tensor of ``graph`` in place, down into the subgraphs of control-flow nodes (whose
    references to outer tensors follow the same renaming)."""
    for value in itertools.chain(graph.input, graph.output, graph.value_info):
        value.name = rename(value.name)
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for tensor in graph.sparse_initializer:
        tensor.values.name = rename(tensor.values.name)
        tensor.indices.name = rename(tensor.indices.name)
    for node in graph.node:
        if node.name:
            node.name = node_prefix + node.name
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        for subgraph in _subgraphs(node):
            _rename_graph(subgraph, rename, node_prefix)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _names_read(node: onnx.NodeProto) -> Iterator[str]:
    """The tensors ``node`` reads, its subgraphs' reads included (some of those are their own tensors:
    keeping a name too many only keeps it needed, never drops a node). A subgraph may answer an outer
    tensor as it is, so its outputs count as reads."""
    yield from node.input
    for subgraph in _subgraphs(node):
        yield from (v.name for v in subgraph.output)
        for inner in subgraph.node:
            yield from _names_read(inner)


def _needed_nodes(
    nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]
) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes that the graph outputs ``outputs`` need, in their order, and the tensors they read
    (with the outputs): walking back from the outputs, so the dropped exit heads fall away."""
    needed = set(outputs)
    kept = []
    # Nodes are in topological order: walking back, a node's consumers were all seen before it.
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(_names_read(node))
    return kept[::-1], needed
