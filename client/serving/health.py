"""Health that tells the truth: canary requests through every part of an offramp service.

Triton's own endpoints do not see a Python-backend stub that died (the model stays READY, see
``offramp.client.serving.supervisor``), so ``/v2/health/ready`` answers 200 for a replica whose
every request fails. The checks here ask the service itself, with one canary row per orchestrator:

- through every segment (``min_exit`` -1, the last exit: the row may not leave early), and
- forced to full depth (``force_full``: the ``<name>_full`` route, or the segments where the policy
  sends forced rows there).

Verdicts, per model and for the service:

- **live**: some canary was answered (whatever its flags): the service can answer at all;
- **ready**: every canary was answered at full quality: not at a shallower exit because a segment
  was missing (FLAG_DEGRADED). An answer from ``<name>_full`` standing in for a missing segment
  (FLAG_REROUTED) is full quality, so it counts as ready, reported as "ready, degraded": the answers
  are right, the compute early exit saves is not being saved.

``offramp serve`` publishes these on its health port (``HealthEndpoint``) for load balancers and
Kubernetes probes, with the supervisor's state as notes; ``offramp health`` runs them from a script.

A canary row is zeros of each input's shape (a variable axis one long), or the text "health check"
for a model that takes raw TEXT: these checks are about answering, not about what the answer is.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from offramp.backend.contract import FLAG_DEGRADED, FLAG_REROUTED, describe_flags
from offramp.backend.orchestrator import ServingOptions
from offramp.backend.text import TEXT_INPUT

CANARY_TEXT = "health check"
JSON = "application/json"
# Triton's data types to NumPy's, for the inputs a canary fills.
_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
           "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}  # fmt: skip


@dataclass(frozen=True)
class CanaryResult:
    name: str  # "segments" or "full depth"
    answered: bool
    flags: int = 0
    error: str = ""

    @property
    def full_quality(self) -> bool:
        return self.answered and not self.flags & FLAG_DEGRADED

    def describe(self) -> str:
        if not self.answered:
            return f"{self.name}: FAILED ({self.error})"
        names = describe_flags(self.flags)
        return f"{self.name}: answered" + (f" ({', '.join(names)})" if names else "")


@dataclass(frozen=True)
class ModelHealth:
    model: str
    canaries: tuple[CanaryResult, ...]

    @property
    def live(self) -> bool:
        return any(c.answered for c in self.canaries)

    @property
    def ready(self) -> bool:
        return all(c.full_quality for c in self.canaries)

    @property
    def rerouted(self) -> bool:
        return any(c.answered and c.flags & FLAG_REROUTED for c in self.canaries)


@dataclass(frozen=True)
class ServiceHealth:
    models: tuple[ModelHealth, ...]
    # What else is known and does not change the verdicts (the supervisor's restarts, a model given up
    # on while ``<name>_full`` stands in for it), or why there is no model to ask.
    notes: tuple[str, ...] = field(default=())

    @property
    def live(self) -> bool:
        return bool(self.models) and all(m.live for m in self.models)

    @property
    def ready(self) -> bool:
        return self.live and all(m.ready for m in self.models)

    @property
    def status(self) -> str:
        if self.ready:
            degraded = self.notes or any(m.rerouted for m in self.models)
            return "ready, degraded (answers at full quality, early exit impaired)" if degraded else "ready"
        return "live, not ready (some answers below full quality)" if self.live else "down"

    def with_notes(self, notes: tuple[str, ...]) -> ServiceHealth:
        return ServiceHealth(self.models, self.notes + notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "live": self.live,
            "ready": self.ready,
            "notes": list(self.notes),
            "models": {
                m.model: {"live": m.live, "ready": m.ready, "canaries": [c.describe() for c in m.canaries]}
                for m in self.models
            },
        }

    def describe(self) -> str:
        lines = [f"service: {self.status}"]
        for model in self.models:
            state = "ready" if model.ready else "live, degraded" if model.live else "down"
            lines.append(f"  {model.model}: {state}")
            lines += [f"    {c.describe()}" for c in model.canaries]
        lines += [f"  note: {n}" for n in self.notes]
        if not self.models:
            lines.append("  no offramp model is loaded")
        return "\n".join(lines)


def orchestrator_models(client: Any, headers: dict[str, str] | None = None) -> list[str]:
    """The READY models whose config carries offramp's serving options: the early-exit services."""
    names = []
    for entry in client.get_model_repository_index(headers=headers, as_json=True).get("models", []):
        if entry.get("state") != "READY" or entry["name"] in names:
            continue
        config = client.get_model_config(entry["name"], headers=headers, as_json=True)["config"]
        if ServingOptions.describes(config.get("parameters", {})):
            names.append(entry["name"])
    return sorted(names)


def canary_inputs(metadata: dict[str, Any]) -> dict[str, np.ndarray]:
    """One row per input the model needs: TEXT alone where it takes text, else zeros."""
    inputs = {i["name"]: i for i in metadata["inputs"]}
    if TEXT_INPUT in inputs:
        return {TEXT_INPUT: np.array([[CANARY_TEXT.encode()]], dtype=np.object_)}
    rows = {}
    for name, spec in inputs.items():
        shape = [1, *(1 if int(d) < 0 else int(d) for d in spec["shape"][1:])]
        rows[name] = np.zeros(shape, dtype=_DTYPES[spec["datatype"]])
    return rows


def _ask(
    client: Any, model: str, inputs: dict[str, np.ndarray], parameters: dict, timeout_s: float
) -> CanaryResult:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    name = "full depth" if parameters.get("force_full") else "segments"
    tensors = []
    for input_name, array in inputs.items():
        tensor = grpcclient.InferInput(input_name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    try:
        result = client.infer(model, tensors, parameters=parameters, client_timeout=timeout_s,
                              outputs=[grpcclient.InferRequestedOutput("FLAGS")])  # fmt: skip
    except InferenceServerException as error:
        return CanaryResult(name, False, error=str(error.message() or error).splitlines()[0][:200])
    return CanaryResult(name, True, int(np.bitwise_or.reduce(result.as_numpy("FLAGS").reshape(-1))))


def check_model(
    client: Any, model: str, timeout_s: float = 5.0, headers: dict[str, str] | None = None
) -> ModelHealth:
    """Both canaries of one orchestrator model."""
    inputs = canary_inputs(client.get_model_metadata(model, headers=headers, as_json=True))
    return ModelHealth(
        model,
        (
            _ask(client, model, inputs, {"min_exit": -1}, timeout_s),  # -1: the last exit
            _ask(client, model, inputs, {"force_full": True}, timeout_s),
        ),
    )


def check_service(
    grpc_url: str,
    models: list[str] | None = None,
    timeout_s: float = 5.0,
    headers: dict[str, str] | None = None,
) -> ServiceHealth:
    """Canaries through ``models`` (default: every offramp model the server has loaded)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(grpc_url) as client:
            names = models if models else orchestrator_models(client, headers)
            results = []
            for name in names:
                try:
                    results.append(check_model(client, name, timeout_s, headers))
                except InferenceServerException as error:
                    failed = CanaryResult("metadata", False, error=str(error.message() or error)[:200])
                    results.append(ModelHealth(name, (failed,)))
            return ServiceHealth(tuple(results))
    except InferenceServerException as error:
        return ServiceHealth((), (f"the server at {grpc_url} does not answer: {error.message() or error}",))


class HealthEndpoint:
    """``/health/live``, ``/health/ready`` (200, or 503), ``/health`` (the details, JSON) and ``/metrics``
    (the supervisor's counters) over HTTP, served from a thread; every probe runs the canaries afresh.

    ``supervisor`` (the stubs') may be replaced while it serves: ``offramp serve`` gives a restarted
    server a new one. ``server_restarts``: the restarts of the server itself, as notes and metrics."""

    def __init__(
        self,
        host: str,
        port: int,
        grpc_url: str,
        supervisor: Any = None,
        headers: dict[str, str] | None = None,
        server_restarts: Any = None,
    ) -> None:
        import http.server

        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                status, body, kind = endpoint.respond(self.path)
                payload = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:  # probes every few seconds: not worth a line each
                pass

        self.grpc_url, self.supervisor, self.headers = grpc_url, supervisor, headers
        self.server_restarts = server_restarts
        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="offramp-health", daemon=True)

    def health(self) -> ServiceHealth:
        health = check_service(self.grpc_url, headers=self.headers)
        notes = []
        restarts = self.server_restarts
        if restarts is not None and restarts.restarting:
            notes.append(f"tritonserver exited with code {restarts.exit_codes[-1]}; being restarted")
        supervisor = self.supervisor
        if supervisor is not None:
            notes += [f"{m}: a stub died; being restarted" for m in supervisor.broken_models()
                      if m not in supervisor.given_up_models()]  # fmt: skip
            notes += [
                f"{m}: given up after repeated crashes (unloaded)" for m in supervisor.given_up_models()
            ]
        return health.with_notes(tuple(notes)) if notes else health

    def respond(self, path: str) -> tuple[int, str, str]:
        if path == "/metrics":
            parts = (self.supervisor, self.server_restarts)
            text = "".join(part.metrics_text() for part in parts if part is not None)
            return 200, text, "text/plain; version=0.0.4"
        if path not in ("/health", "/health/live", "/health/ready"):
            return (
                404,
                json.dumps({"error": f"no {path}; try /health, /health/live, /health/ready, /metrics"}),
                JSON,
            )
        health = self.health()
        # While serve restarts a server that died, the replica is recovering, not dead: live (a liveness
        # probe that killed it would only restart it again, slower), not ready (no traffic yet). Serve's
        # own restart budget ends a replica that keeps dying.
        recovering = self.server_restarts is not None and self.server_restarts.restarting
        passed = {"/health": True, "/health/live": health.live or recovering, "/health/ready": health.ready}[
            path
        ]
        return (200 if passed else 503), json.dumps(health.to_dict(), indent=2) + "\n", JSON

    def __enter__(self) -> HealthEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
