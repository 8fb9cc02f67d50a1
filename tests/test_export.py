"""Exported ONNX segments, chained in ONNX Runtime, equal the PyTorch model at every exit."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch

from offramp.backend.segment_runner import OnnxRunner
from offramp.build.calibrate import exit_logits_from_onnx
from offramp.build.cnn import CNNConfig, MultiExitCNN
from offramp.build.recipes import CHECKPOINT

# float32 through different kernels (PyTorch's vs ONNX Runtime's convolutions): agreement to ~1e-6
# relative is what chained segments measured here (docs/embedded-server.md, 'ONNX export'); 1e-4
# absolute on logits of magnitude ~10 leaves headroom without hiding a wrong layer, which moves
# logits by whole units.
ATOL = 1e-4


@pytest.fixture(scope="module")
def torch_model(quick_cnn):
    artifacts, directory = quick_cnn
    model = MultiExitCNN(
        CNNConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in artifacts.build["cnn"].items()})
    )
    model.load_state_dict(torch.load(directory / CHECKPOINT))
    return model.eval()


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_chained_onnx_segments_equal_pytorch_per_exit(quick_cnn, torch_model, fashion_test, batch):
    artifacts, directory = quick_cnn
    images = fashion_test[0][:batch]
    onnx_logits = exit_logits_from_onnx(artifacts, directory, {"IMAGE": images})  # (exits, B, C)
    with torch.no_grad():
        torch_logits = torch.stack(torch_model(torch.from_numpy(images))).numpy()
    assert onnx_logits.shape == torch_logits.shape == (artifacts.num_exits, batch, artifacts.num_classes)
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=0, atol=ATOL)


def test_full_network_equals_the_last_exit(quick_cnn, fashion_test):
    artifacts, directory = quick_cnn
    images = fashion_test[0][:33]
    full = OnnxRunner(directory / artifacts.full_onnx).run({"IMAGE": images})["LOGITS"]
    chained = exit_logits_from_onnx(artifacts, directory, {"IMAGE": images})[-1]
    np.testing.assert_allclose(full, chained, rtol=0, atol=ATOL)


def test_every_exported_tensor_has_a_symbolic_batch_axis(quick_cnn):
    artifacts, directory = quick_cnn
    for name in [s.onnx for s in artifacts.segments] + [artifacts.full_onnx]:
        graph = onnx.load(str(directory / name)).graph
        for value in [*graph.input, *graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param, f"{name}:{value.name}"


def test_exit_costs_rise_to_the_full_network(quick_cnn):
    costs = quick_cnn[0].exit_costs
    assert all(a < b for a, b in itertools.pairwise(costs))
    # The last exit runs the whole network plus the early heads: their MLPs over a 4x4 grid are 0.4M
    # multiply-accumulates (32 and 64 channels x 16 positions x 256, + 256 x 10 each), 1.8% of the
    # two-block network's 22M; 3% leaves room for a wider stage, not for a head as large as a block.
    assert 1.0 <= costs[-1] < 1.03


def test_merged_segment_requests_fail_one_by_one(tmp_path):
    """A request whose ids break the embedding gather fails alone; merged neighbours get their rows."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(20, dtype=np.float32).reshape(10, 2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "INPUT_IDS"], ["hidden"])],
        "embedding",
        [helper.make_tensor_value_info("INPUT_IDS", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", 3, 2])],
        [numpy_helper.from_array(table, "table")],
    )
    path = tmp_path / "embedding.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    runner = OnnxRunner(path)
    good = [np.array([[1, 2, 3]]), np.array([[4, 5, 6], [7, 8, 9]])]
    requests = [{"INPUT_IDS": good[0]}, {"INPUT_IDS": np.array([[1, 99, 2]])}, {"INPUT_IDS": good[1]}]
    answers = runner.run_merged(requests)
    assert isinstance(answers[1], Exception) and "99" in str(answers[1])
    for ids, answer in zip(good, (answers[0], answers[2]), strict=True):
        np.testing.assert_array_equal(answer["hidden"], table[ids])
