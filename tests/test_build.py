"""The build: Fashion-MNIST loading, determinism, caching, and the demo end to end (slow)."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest

from offramp.build.fashion_mnist import load_fashion_mnist
from offramp.build.recipes import build_fashion_mnist_cnn, quick_train_config


def test_fashion_mnist_has_its_documented_shape(fashion_test):
    images, labels = fashion_test
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.bincount(labels).tolist() == [1000] * 10


def test_loader_takes_a_folder_and_names_what_is_missing(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 2, 28, 28) + images.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 8, 1, 2) + bytes([3, 7]))
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [3, 7]
    np.testing.assert_allclose(x[0, 0], images[0] / 255.0, rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_the_same_seed_builds_the_same_model_and_a_cached_build_is_reused(tmp_path):
    config = quick_train_config(rows=1000)
    first = build_fashion_mnist_cnn(tmp_path / "a", train=config, progress=False)
    second = build_fashion_mnist_cnn(tmp_path / "b", train=config, progress=False)
    assert first.fingerprint == second.fingerprint
    assert first.exit_test_accuracy == second.exit_test_accuracy
    mtime = (tmp_path / "a" / "segment_0.onnx").stat().st_mtime_ns
    reused = build_fashion_mnist_cnn(tmp_path / "a", train=config, progress=False)
    assert reused.fingerprint == first.fingerprint and reused.build["key"] == first.build["key"]
    assert (tmp_path / "a" / "segment_0.onnx").stat().st_mtime_ns == mtime
    other = build_fashion_mnist_cnn(
        tmp_path / "c", train=quick_train_config(rows=1000, seed=1), progress=False
    )
    assert other.fingerprint != first.fingerprint


@pytest.mark.slow
@pytest.mark.integration
def test_demo_runs_end_to_end(tmp_path):
    """`offramp demo` as `make demo` runs it (full training: minutes)."""
    result = subprocess.run(
        [sys.executable, "-m", "offramp.client.cli.main", "demo", "--workdir", str(tmp_path / "work"),
         "--repository", str(tmp_path / "repo")],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for figure in [
        "accuracy",
        "throughput (rows/s)",
        "agreement with full",
        "mean compute fraction",
        "exit 0:",
        "orchestrator per request",
    ]:
        assert figure in result.stdout
