"""Triton Python model of the streaming generator (copied into the repository as ``<name>/1/model.py``).

A thin adapter over ``offramp.backend.generation_service``: the model is decoupled
(``model_transaction_policy { decoupled: true }``), so ``execute`` hands each request, with its
response sender, to the service and returns None at once; the service's own thread runs the running
batch and answers through the senders (one response per step that produced tokens, the last flagged
final), which a ``BackgroundSender`` thread calls so that a step does not wait on its responses.
Metrics go to ``pb_utils.MetricFamily``, as the orchestrator's do.
"""

import json
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from offramp.backend.audit import AuditConfig, AuditLog
from offramp.backend.exit_decoder import DECODER_MANIFEST, TOKENIZER_FILE, ExitDecoder, reproducible_gemm
from offramp.backend.generation_contract import ERROR_ID_PREFIX
from offramp.backend.generation_policy import POLICY_FILE, GenerationPolicy
from offramp.backend.generation_service import (
    BackgroundSender,
    GenerationService,
    GenerationTelemetry,
    ServiceOptions,
)
from offramp.backend.triton_orchestrator import _TritonMetrics


def _log(message, error=False):
    logger = getattr(pb_utils, "Logger", None)  # attached by the stub after import
    if logger is None:
        print(message, file=sys.stderr, flush=True)
    else:
        (logger.log_error if error else logger.log_info)(message)


class _Stream:
    """ResponseStream over a decoupled request's response sender."""

    def __init__(self, sender, request_id):
        self.sender = sender
        # An error on a gRPC stream reaches the client without its request's id: the message carries it.
        self.error_prefix = f"{ERROR_ID_PREFIX}{request_id}] " if request_id else ""

    def send(self, outputs, final):
        response = pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(a)) for name, a in outputs.items()]
        )
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(response, flags=flags)

    def fail(self, message, request_error):
        code = pb_utils.TritonError.INVALID_ARG if request_error else pb_utils.TritonError.INTERNAL
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(self.error_prefix + message, code))
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class TritonPythonModel:
    def initialize(self, args):
        reproducible_gemm()  # before this stub's first matrix product: MKL fixes its rounding mode there
        torch.set_num_threads(1)  # one thread per stub: stubs are processes, and the cores are shared
        torch.set_grad_enabled(False)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        parameters = {
            k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()
        }
        options = ServiceOptions.from_parameters(parameters)
        from tokenizers import Tokenizer

        manifest = json.loads((version_dir / DECODER_MANIFEST).read_text())
        decoder = ExitDecoder.load(version_dir)
        policy = GenerationPolicy.load(version_dir / POLICY_FILE)
        policy.validate(len(decoder.spec.exit_layers), manifest["fingerprint"], decoder.spec.vocab)
        instance = f"{args.get('model_instance_name', '')}-v{args['model_version']}"
        self.metrics = _TritonMetrics()
        telemetry = GenerationTelemetry(self.metrics, args["model_name"], instance)
        self.audit = None
        if options.audit_path:
            self.audit = AuditLog(
                AuditConfig(Path(options.audit_path), sample_rate=options.audit_sample_rate)
            )
        self.service = GenerationService(
            decoder,
            Tokenizer.from_file(str(version_dir / TOKENIZER_FILE)),
            policy,
            manifest["end_of_text"],
            options,
            telemetry,
            self.audit,
            manifest["fingerprint"],
        )
        self.sender = BackgroundSender(capacity=options.max_running)  # a full batch's step of responses
        self.label = label = f"{args['model_name']} ({instance})"
        self.publisher = telemetry.publishing_thread(
            lambda e: _log(f"{label}: metrics not published: {e}", error=True)
        )
        self.thread = threading.Thread(target=self._serve, name="offramp-generation", daemon=True)
        self.thread.start()
        _log(f"{label}: policy {policy.version}, exits after layers {decoder.spec.exit_layers}")

    def _serve(self):
        with torch.inference_mode():
            self.service.serve(
                lambda error: _log(f"{self.label}: a generation round failed: {error!r}", error=True)
            )

    def execute(self, requests):
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT")
            self.service.submit(
                None if prompt is None else prompt.as_numpy(),
                json.loads(request.parameters() or "{}"),
                self.sender.stream(_Stream(request.get_response_sender(), request.request_id())),
            )
        return None

    def finalize(self):
        self.service.close()
        self.thread.join(timeout=10)
        self.service.fail_all("the generator is unloading")
        self.sender.close()
        self.publisher.close()
        if self.audit is not None:
            self.audit.close()
        self.metrics.close()
