"""Triton Python model of the orchestrator (copied into the repository as ``<name>/1/model.py``).

A thin adapter: Triton requests to ``RequestView``, BLS calls to ``run_segment``, results to
responses. The logic lives in ``offramp.backend.orchestrator`` and ``offramp.backend.cascade``.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from offramp.backend.contract import HIDDEN_OUT, LOGITS_OUT, FULL_LOGITS_OUT
from offramp.backend.orchestrator import Orchestrator


class SegmentError(RuntimeError):
    pass


class _Request:
    def __init__(self, request):
        self._request = request

    def input(self, name):
        tensor = pb_utils.get_input_tensor_by_name(self._request, name)
        return None if tensor is None else tensor.as_numpy()

    def parameters(self):
        return json.loads(self._request.parameters() or "{}")


def _bls(model_name, tensors, output_names):
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        inputs=[pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in tensors.items()],
        requested_output_names=list(output_names),
    )
    response = request.exec()
    if response.has_error():
        raise SegmentError(f"{model_name} failed: {response.error().message()}")
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in output_names]


class TritonPythonModel:
    def initialize(self, args):
        self.orchestrator = Orchestrator.from_directory(Path(args["model_repository"]) / args["model_version"])
        self.spec = self.orchestrator.spec

    def _run_segment(self, index, tensors, need_hidden):
        if need_hidden:
            return tuple(_bls(self.spec.segment_models[index], tensors, [HIDDEN_OUT, LOGITS_OUT]))
        return None, _bls(self.spec.segment_models[index], tensors, [LOGITS_OUT])[0]

    def _run_full(self, tensors):
        return _bls(self.spec.full_model, tensors, [FULL_LOGITS_OUT])[0]

    def execute(self, requests):
        answers = self.orchestrator.execute([_Request(r) for r in requests], self._run_segment, self._run_full)
        responses = []
        for answer in answers:
            if isinstance(answer, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(answer))))
            else:
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(a)) for name, a in answer.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
