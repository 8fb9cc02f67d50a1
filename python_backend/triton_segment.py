"""Triton Python model running one ONNX file on the CPU (the embedded target's segments and full model).

Copied into the repository as ``<model>/1/model.py`` beside ``model.onnx``; a stock Triton uses its
own ONNX Runtime backend for the same file instead (the ``triton-onnx`` target).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from offramp.backend.segment_runner import OnnxRunner


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = int(config.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value", "1"))
        self.runner = OnnxRunner(
            Path(args["model_repository"]) / args["model_version"] / "model.onnx", threads
        )

    def execute(self, requests):
        inputs = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.runner.input_names}
            for r in requests
        ]
        # Requests merged into one execute may ask for different outputs (the last segment's caller
        # skips `hidden`): compute all once, answer each with what it asked for.
        results = self.runner.run_merged(inputs)
        responses = []
        for request, result in zip(requests, results):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
                continue
            wanted = request.requested_output_names() or list(result)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(result[name])) for name in wanted]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
