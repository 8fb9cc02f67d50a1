"""Triton Python model of the orchestrator (copied into the repository as ``<name>/1/model.py``).

A thin adapter: Triton requests to ``RequestView``, BLS calls to ``run_segment`` and ``run_model``,
``pb_utils.MetricFamily`` to ``MetricsSink``, results to responses. The logic lives in
``offramp.backend.orchestrator`` and ``offramp.backend.cascade``.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from offramp.backend.contract import FULL_LOGITS_OUT, HIDDEN_OUT, LOGITS_OUT, SegmentUnavailable
from offramp.backend.device import (
    DeviceRequest,
    from_bls_tensor,
    is_device_array,
    select_cascade,
    to_bls_tensor,
)
from offramp.backend.orchestrator import (
    POLICY_FILE,
    Orchestrator,
    RequestError,
    ServiceDegraded,
    ServingOptions,
)
from offramp.backend.policy import Policy
from offramp.backend.recurring import Recurring
from offramp.backend.segment_runner import OnnxRunner
from offramp.backend.shared_state import PeriodicExchange
from offramp.backend.telemetry import ServingTelemetry


class SegmentError(RuntimeError):
    pass


# How tritonserver 2.51 words a BLS call to a model that cannot answer, whatever the request: its stub
# died ("Stub process '<instance>' is not healthy."), or it was unloaded ("... Model '<name>' is not
# ready.", with code INTERNAL) or never loaded, or the server is draining after a SIGTERM ("... Error
# when running inference: Server not ready", INTERNAL too): the client may try another replica.
_UNAVAILABLE_MESSAGES = ("is not healthy", "is not ready", "unknown model", "Server not ready")


def _segment_error(model_name, error):
    """A failed BLS call as the orchestrator's exception: an absent or unhealthy model is nobody's
    request's fault (rerunning requests alone would only multiply the wait for it)."""
    message = f"{model_name} failed: {error.message()}"
    absent = error.code() in (pb_utils.TritonError.UNAVAILABLE, pb_utils.TritonError.NOT_FOUND)
    if absent or any(words in message for words in _UNAVAILABLE_MESSAGES):
        return SegmentUnavailable(message)
    return SegmentError(message)


class _Request:
    def __init__(self, request):
        self._request = request

    def input(self, name):
        tensor = pb_utils.get_input_tensor_by_name(self._request, name)
        return None if tensor is None else tensor.as_numpy()

    def parameters(self):
        return json.loads(self._request.parameters() or "{}")


class _TritonMetrics:
    """MetricsSink over pb_utils.MetricFamily.

    Families are shared by name across stubs (two instances, or two policy versions during a swap),
    so one stub deleting a family at unload would delete it under the others: ``close`` releases only
    this stub's own metrics (their labels name the instance, version and process: no other stub holds
    them), and keeps the family handles alive until the process ends.
    """

    def __init__(self):
        # The stub attaches MetricFamily to pb_utils after the module is imported: look it up here.
        family = pb_utils.MetricFamily
        self.kinds = {"counter": family.COUNTER, "gauge": family.GAUGE}
        self.families = {}
        self.metrics = {}
        self.gauges = set()  # the families that are gauges

    def _metric(self, kind, name, description, labels):
        key = (name, tuple(sorted(labels.items())))
        if key not in self.metrics:
            if name not in self.families:
                self.families[name] = pb_utils.MetricFamily(
                    name=name, description=description, kind=self.kinds[kind]
                )
                if kind == "gauge":
                    self.gauges.add(name)
            self.metrics[key] = self.families[name].Metric(labels=dict(labels))
        return self.metrics[key]

    def increment(self, name, description, labels, value):
        self._metric("counter", name, description, labels).increment(float(value))

    def set(self, name, description, labels, value):
        self._metric("gauge", name, description, labels).set(float(value))

    def close(self):
        # This stub's series stay on the metrics page after it is gone (the families outlive it): its
        # gauges would go on saying that its policy serves and its drift alarm is up, long after a new
        # version took over. Set to 0 they say it serves no more; counters keep their totals.
        for (name, _), metric in self.metrics.items():
            if name in self.gauges:
                metric.set(0.0)
        self.metrics.clear()


def _log(message, error=False):
    logger = getattr(pb_utils, "Logger", None)  # attached by the stub after import, like MetricFamily
    if logger is None:
        print(message, file=sys.stderr, flush=True)
    else:
        (logger.log_error if error else logger.log_info)(message)


def _bls(model_name, tensors, output_names, device_id=None):
    """Outputs of ``model_name`` as NumPy arrays; as CuPy arrays on GPU ``device_id`` when the inputs are
    CuPy arrays (handed over by DLPack, outputs asked for in that GPU's memory: no host copy)."""
    on_device = device_id is not None and any(is_device_array(a) for a in tensors.values())
    placement = {}
    if on_device:
        import cupy

        # The segment reads our arrays on its own stream: what the kernels wrote must be done.
        cupy.cuda.get_current_stream().synchronize()
        placement["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device_id)
    elif hasattr(pb_utils, "PreferredMemory"):  # as_numpy() needs host memory, whatever the segment ran on
        placement["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        inputs=[to_bls_tensor(pb_utils, name, array) for name, array in tensors.items()],
        requested_output_names=list(output_names),
        **placement,
    )
    response = request.exec()
    if response.has_error():
        raise _segment_error(model_name, response.error())
    outputs = [pb_utils.get_output_tensor_by_name(response, name) for name in output_names]
    return [from_bls_tensor(t, cupy) for t in outputs] if on_device else [t.as_numpy() for t in outputs]


def _instance_count(config):
    """The model's instances in all, from its config: ``count`` per group, per GPU for a GPU group."""
    return (
        sum(
            int(group.get("count", 1)) * max(1, len(group.get("gpus", [])))
            for group in config.get("instance_group", [])
        )
        or 1
    )


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ServingOptions.from_parameters(parameters)
        self.metrics = _TritonMetrics()
        instance = f"{args.get('model_instance_name', '')}-v{args['model_version']}"
        hooks = options.hooks(
            Policy.load(version_dir / POLICY_FILE), instance, args["model_name"], _instance_count(config)
        )
        shared = hooks.pop("shared", None)
        label = f"{args['model_name']} ({instance})"
        # The metrics' instance label names this stub's process too: a reload of the same version starts
        # new stubs beside the old ones, whose close() zeroes their gauges, which must not be the new ones'.
        telemetry = ServingTelemetry(self.metrics, args["model_name"], f"{instance}-{os.getpid()}")
        cascade, placement = select_cascade(
            DeviceRequest.from_parameters(parameters),
            args.get("model_instance_kind", "CPU"),
            args.get("model_instance_device_id", 0),
        )
        _log(f"{label}: {placement.reason}", error=placement.fell_back)
        self.device_id = placement.device_id  # None: NumPy on the host
        if placement.device == "gpu":
            if options.segments_in_process:
                raise ValueError(
                    "offramp_segments_in_process runs ONNX Runtime on the CPU: not with offramp_device gpu"
                )
            hooks["cascade"] = cascade
        self.orchestrator = Orchestrator.from_directory(version_dir, telemetry=telemetry, **hooks)
        self.spec = self.orchestrator.spec
        self.local = {}  # model name -> OnnxRunner, when the segments run in this process
        if options.segments_in_process:
            repository = Path(args["model_repository"]).parent
            for name in [*self.spec.segment_models, self.spec.full_model]:
                self.local[name] = OnnxRunner(repository / name / "1" / "model.onnx", threads=1)
        self.publisher = telemetry.publishing_thread(
            lambda e: _log(f"{label}: metrics not published: {e}", error=True)
        )
        self.slo_windows = None
        if self.orchestrator.slo is not None:  # windows close while idle too (they count as quiet)
            self.slo_windows = Recurring(
                "offramp-slo",
                self.orchestrator.slo.due_in,
                self.orchestrator.close_slo_window,
                lambda e: _log(f"{label}: SLO window not closed: {e}", error=True),
            )
        self.exchange = None
        if shared is not None:  # the model's instances decide drift and risk alarms on the same evidence
            self.exchange = PeriodicExchange(
                shared,
                self.orchestrator.shared_state,
                self.orchestrator.absorb_shared,
                lambda e: _log(f"{label}: state not shared with the other instances: {e}", error=True),
                self.orchestrator.shared_state_interval_s,
            )

    def _call(self, model_name, tensors, output_names):
        runner = self.local.get(model_name)
        if runner is None:
            return _bls(model_name, tensors, output_names, self.device_id)
        outputs = runner.run({n: np.ascontiguousarray(t) for n, t in tensors.items()}, output_names)
        return [outputs[name] for name in output_names]

    def _run_segment(self, index, tensors, need_hidden):
        if need_hidden:
            return tuple(self._call(self.spec.segment_models[index], tensors, [HIDDEN_OUT, LOGITS_OUT]))
        return None, self._call(self.spec.segment_models[index], tensors, [LOGITS_OUT])[0]

    def _run_model(self, model_name, tensors):
        return self._call(model_name, tensors, [FULL_LOGITS_OUT])[0]

    def execute(self, requests):
        answers = self.orchestrator.execute(
            [_Request(r) for r in requests], self._run_segment, self._run_model
        )
        started = time.perf_counter()
        responses = []
        for request, answer in zip(requests, answers, strict=True):
            if isinstance(answer, Exception):
                # A request's own fault is the client's error (gRPC INVALID_ARGUMENT, HTTP 400); an
                # outage is UNAVAILABLE, which a client may retry on another replica.
                code = pb_utils.TritonError.INTERNAL
                if isinstance(answer, RequestError):
                    code = pb_utils.TritonError.INVALID_ARG
                elif isinstance(answer, (ServiceDegraded, SegmentUnavailable)):
                    code = pb_utils.TritonError.UNAVAILABLE
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(answer), code)))
            else:
                # The outputs the client asked for (all, where it named none): each output tensor costs
                # the stub and the server a copy and a serialization.
                wanted = request.requested_output_names() or answer
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(answer[name])) for name in wanted]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        self.orchestrator.telemetry.execute_times({"respond": time.perf_counter() - started}, 0)
        return responses

    def finalize(self):
        if self.exchange is not None:
            self.exchange.close()
        if self.slo_windows is not None:  # it publishes its windows' figures
            self.slo_windows.close()
        self.orchestrator.close()  # queued shadow checks settle (their BLS calls still work here)
        self.publisher.close()  # before the metrics it publishes to are released
        self.metrics.close()
