"""Runs one exported segment (or the full network) in ONNX Runtime over several requests at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


class OnnxRunner:
    """An ONNX Runtime session on the CPU with a fixed thread count.

    One intra-op thread per instance: default thread counts made a model 8x slower on 2 cores
    when several stubs compete (docs/embedded-server.md, 'Threads'); scale with instance_group count instead.
    """

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else self.output_names
        return dict(zip(names, self.session.run(names, {n: inputs[n] for n in self.input_names})))

    def run_merged(
        self, requests: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[str] | None = None
    ) -> list[dict[str, np.ndarray] | Exception]:
        """Runs all requests as one batch and hands each its own rows back, or its own error.

        Triton's dynamic batcher only groups requests whose non-batch shapes agree, so the inputs
        concatenate along the batch axis. When the merged run fails, each request runs alone, so
        the one whose inputs broke it fails alone.
        """
        try:
            if len(requests) == 1:
                return [self.run(requests[0], outputs)]
            rows = [len(r[self.input_names[0]]) for r in requests]
            merged = {n: np.concatenate([r[n] for r in requests]) for n in self.input_names}
            results = self.run(merged, outputs)
        except Exception as error:
            if len(requests) == 1:
                return [error]
            return [answer for request in requests for answer in self.run_merged([request], outputs)]
        bounds = np.cumsum([0, *rows])
        return [{n: a[bounds[i] : bounds[i + 1]] for n, a in results.items()} for i in range(len(requests))]
