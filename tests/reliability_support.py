"""Helpers of the reliability and fault tests: one request through gRPC or HTTP with nothing added by
a client library, and what the server left behind.

HTTP goes through ``http.client`` and Triton's binary-tensor extension rather than
``tritonclient.http``: the project pins ``tritonclient[grpc]`` only (its ``http`` extra pulls in
gevent), and a raw request can carry what a client library would refuse to build (NaN in a JSON body
is not JSON; a binary tensor is).
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from offramp.backend.cascade import CascadeResult
from offramp.client.grpc_client import OUTPUT_NAMES

PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True)
class Outcome:
    """What one request got back: its outputs, or the server's error message (exactly one of them)."""

    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    # The HTTP status (200, 400, ...) or the gRPC code ("OK", "INVALID_ARGUMENT").
    status: int | str | None = None

    @property
    def ok(self) -> bool:
        return self.outputs is not None


def infer_grpc(
    url: str,
    model: str,
    inputs: Mapping[str, np.ndarray],
    parameters: Mapping[str, Any] | None = None,
    timeout_s: float = 30.0,
    datatypes: Mapping[str, str] | None = None,
) -> Outcome:
    """One request with exactly these tensors and parameters; an error is returned, not raised.

    ``datatypes`` overrides the Triton datatype announced for an input (the bytes stay those of the
    array): a request that lies about its dtype.
    """
    with grpcclient.InferenceServerClient(url) as client:
        tensors = []
        for name, array in inputs.items():
            datatype = (datatypes or {}).get(name) or np_to_triton_dtype(array.dtype)
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            if datatype == np_to_triton_dtype(array.dtype):
                tensor.set_data_from_numpy(np.ascontiguousarray(array))
            else:
                tensor._raw_content = np.ascontiguousarray(array).tobytes()
            tensors.append(tensor)
        try:
            result = client.infer(
                model,
                tensors,
                outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUT_NAMES],
                parameters=dict(parameters) if parameters else None,
                client_timeout=timeout_s,
            )
        except InferenceServerException as error:
            return Outcome(error=str(error), status=str(error.status() or "").removeprefix("StatusCode."))
        return Outcome(outputs={n: result.as_numpy(n) for n in OUTPUT_NAMES}, status="OK")


def infer_http(
    url: str,
    model: str,
    inputs: Mapping[str, np.ndarray],
    parameters: Mapping[str, Any] | None = None,
    timeout_s: float = 30.0,
    datatypes: Mapping[str, str] | None = None,
    shapes: Mapping[str, list[int]] | None = None,
) -> Outcome:
    """The same request over HTTP/REST, tensors as binary data; ``shapes`` may lie about a shape."""
    header: dict[str, Any] = {
        "inputs": [],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in OUTPUT_NAMES],
    }
    blobs = []
    for name, array in inputs.items():
        if array.dtype == np.object_:
            blob = b"".join(len(v).to_bytes(4, "little") + v for v in array.reshape(-1).tolist())
        else:
            blob = np.ascontiguousarray(array).tobytes()
        header["inputs"].append(
            {
                "name": name,
                "shape": list((shapes or {}).get(name, array.shape)),
                "datatype": (datatypes or {}).get(name) or np_to_triton_dtype(array.dtype),
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    if parameters:
        header["parameters"] = dict(parameters)
    head = json.dumps(header).encode()
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout_s)
    try:
        connection.request(
            "POST",
            f"/v2/models/{model}/infer",
            body=head + b"".join(blobs),
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(head)),
            },
        )
        response = connection.getresponse()
        body = response.read()
        length = response.getheader("Inference-Header-Content-Length")
    finally:
        connection.close()
    if response.status != 200:
        try:
            message = json.loads(body).get("error", body.decode(errors="replace"))
        except ValueError:
            message = body.decode(errors="replace")
        return Outcome(error=message, status=response.status)
    json_length = int(length) if length is not None else len(body)
    answer = json.loads(body[:json_length])
    offset = json_length
    outputs = {}
    for output in answer["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        dtype = triton_to_np_dtype(output["datatype"])
        if size is None:
            outputs[output["name"]] = np.asarray(output["data"], dtype=dtype).reshape(output["shape"])
            continue
        outputs[output["name"]] = np.frombuffer(body[offset : offset + size], dtype=dtype).reshape(
            output["shape"]
        )
        offset += size
    return Outcome(outputs=outputs, status=200)


CLIENT_ERROR = {"grpc": "INVALID_ARGUMENT", "http": 400}


def infer(protocol: str, server: Any, model: str, inputs: Mapping[str, np.ndarray], **kwargs: Any) -> Outcome:
    """:func:`infer_grpc` or :func:`infer_http` against ``server`` (an EmbeddedTritonServer)."""
    if protocol == "grpc":
        return infer_grpc(server.grpc_url, model, inputs, **kwargs)
    return infer_http(server.http_url, model, inputs, **kwargs)


def assert_rows_match(
    outputs: Mapping[str, np.ndarray], expected: CascadeResult, rows: Any = slice(None)
) -> None:
    """A served answer equals the reference for ``rows``: exits, labels and cost exactly, floats to ORT's noise."""
    n = len(expected.label[rows])
    np.testing.assert_array_equal(outputs["EXIT"].reshape(n), expected.exit[rows])
    np.testing.assert_array_equal(outputs["LABEL"].reshape(n), expected.label[rows])
    np.testing.assert_array_equal(outputs["COST"].reshape(n), expected.cost[rows])
    np.testing.assert_allclose(outputs["LOGITS"], expected.logits[rows], rtol=0, atol=1e-4)
    np.testing.assert_allclose(outputs["CONFIDENCE"], expected.confidence[rows], rtol=0, atol=1e-4)


def metric_values(server: Any, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric family on the server's metrics page."""
    import re
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(server.metrics_url, timeout=10).read().decode()
    return {
        labels: float(value) for labels, value in re.findall(rf"^{name}\{{(.*)\}} (\S+)$", text, re.MULTILINE)
    }


def model_stats(server: Any, model: str) -> dict[str, float]:
    """Triton's cumulative success and failure counts of one model."""
    from offramp.client.serving.statistics import model_statistics

    return model_statistics(server.grpc_url).get(model, {"success": 0, "fail": 0, "inference_count": 0})


@dataclass(frozen=True)
class Sent:
    """One request of :class:`Traffic`: when it started and ended (time.monotonic()), its rows, what it got."""

    started: float
    ended: float
    rows: slice
    outcome: Outcome

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Traffic:
    """Threads sending well-formed requests of ``rows`` consecutive rows of ``images`` until stopped.

    Each thread cycles through its own slices; every request is recorded with its outcome, so a test
    can say which requests failed when, how long each took, and compare the answered ones with the
    reference. Use as a context manager; leaving it stops and joins the threads.
    """

    def __init__(
        self,
        server: Any,
        model: str,
        images: np.ndarray,
        *,
        threads: int = 4,
        rows: int = 8,
        timeout_s: float = 10.0,
        protocols: tuple[str, ...] = ("grpc",),
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        import threading

        self.server, self.model, self.images, self.parameters = server, model, images, parameters
        self.threads, self.rows, self.timeout_s, self.protocols = threads, rows, timeout_s, protocols
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _loop(self, index: int) -> None:
        import time

        slots = len(self.images) // self.rows
        turn = 0
        while not self._stop.is_set():
            slot = (index + turn * self.threads) % slots
            rows = slice(slot * self.rows, (slot + 1) * self.rows)
            protocol = self.protocols[turn % len(self.protocols)]
            started = time.monotonic()
            try:
                outcome = infer(
                    protocol,
                    self.server,
                    self.model,
                    {"IMAGE": self.images[rows]},
                    parameters=self.parameters,
                    timeout_s=self.timeout_s,
                )
            except Exception as error:  # noqa: BLE001 - a refused connection is an outcome too
                outcome = Outcome(error=f"{type(error).__name__}: {error}")
            self.sent.append(Sent(started, time.monotonic(), rows, outcome))
            turn += 1

    def __enter__(self) -> Self:
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> list[Sent]:
        self._stop.set()
        for worker in self._workers:
            worker.join(self.timeout_s + 10)
        hung = [w.name for w in self._workers if w.is_alive()]
        assert not hung, f"request threads still waiting {self.timeout_s + 10:.0f} s after the stop: {hung}"
        return self.sent

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def between(self, start: float, end: float) -> list[Sent]:
        """Requests that started and ended inside [start, end]."""
        return [s for s in self.sent if start <= s.started and s.ended <= end]


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.1) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())
