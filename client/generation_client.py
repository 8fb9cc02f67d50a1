"""gRPC streaming client of an offramp generator: completions, token by token, with their timing.

One bidirectional gRPC stream carries every request of a :meth:`GenerationClient.stream` call, with
up to ``concurrency`` in flight at once (a new one is sent as soon as one finishes); each response is
stamped on arrival, so a :class:`Completion` knows its time to first token and time per token. A
request is finished by the response Triton marks ``triton_final_response``; an error response
finishes it too (``Completion.error``), and the others go on.

When a check fails at a shallow depth the generator starts the completion over at full depth:
responses then carry ``ATTEMPT`` 1, and the completion's text is that attempt's alone.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from offramp.backend.generation_contract import ERROR_ID_PREFIX, OUTPUTS


class StreamFailed(RuntimeError):
    """The stream itself broke (the server unreachable, or gone mid-stream): no request on it can finish."""

    def __init__(self, url: str, why: Any) -> None:
        text = why.message() if hasattr(why, "message") else str(why)
        super().__init__(f"the stream to {url} failed: {text}")


@dataclass
class Completion:
    """One request's answer, as it streamed in."""

    request_id: str
    prompt: str
    parameters: Mapping[str, Any]
    sent_at: float
    text: str = ""  # the last attempt's
    tokens: list[int] = field(default_factory=list)  # the last attempt's
    exits: list[int] = field(default_factory=list)
    attempts: int = 1
    flags: int = 0
    finish_reason: str = ""
    error: str | None = None
    arrivals: list[float] = field(default_factory=list)  # each response's arrival
    arrival_tokens: list[int] = field(default_factory=list)  # tokens each response brought
    done_at: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        firsts = [t for t, n in zip(self.arrivals, self.arrival_tokens, strict=True) if n]
        return firsts[0] - self.sent_at if firsts else None

    @property
    def time_per_token(self) -> float | None:
        """Seconds per token after the first: from the first token's arrival to the last's, over the
        tokens between (responses may arrive in bursts; their spread over the whole completion does not)."""
        arrived = [t for t, n in zip(self.arrivals, self.arrival_tokens, strict=True) if n]
        later = sum(self.arrival_tokens) - next((n for n in self.arrival_tokens if n), 0)
        return (arrived[-1] - arrived[0]) / later if later else None

    def _take(self, outputs: Mapping[str, np.ndarray], final: bool, arrived: float) -> None:
        attempt = int(outputs["ATTEMPT"][0]) + 1
        if attempt > self.attempts:  # the check failed: the completion starts over at full depth
            self.attempts, self.text, self.tokens, self.exits = attempt, "", [], []
        self.text += outputs["TEXT"][0].decode("utf-8")
        self.tokens += [int(t) for t in outputs["TOKEN_IDS"]]
        self.exits += [int(e) for e in outputs["TOKEN_EXITS"]]
        self.arrivals.append(arrived)
        self.arrival_tokens.append(len(outputs["TOKEN_IDS"]))
        if final:
            self.flags = int(outputs["FLAGS"][0])
            self.finish_reason = outputs["FINISH_REASON"][0].decode()


class GenerationClient:
    """Completions from the generator ``model`` at ``url`` (gRPC ``host:port``)."""

    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self._ids = itertools.count()

    def complete(self, prompt: str, **parameters: Any) -> Completion:
        """One completion (parameters: ``max_tokens``, ``stop`` (a JSON array), ``mode``, ``deadline_ms``,
        ``check``, ``check_schema``, ``check_pattern``, ``request_id``)."""
        return self.stream([(prompt, parameters)], concurrency=1)[0]

    def stream(
        self, requests: Iterable[tuple[str, Mapping[str, Any]]], concurrency: int, timeout_s: float = 600.0
    ) -> list[Completion]:
        """Every request through one stream, ``concurrency`` in flight; completions in request order."""
        pending = list(requests)
        completions: dict[str, Completion] = {}
        finished: queue.Queue[str | Exception] = queue.Queue()  # request ids, or what broke the stream
        lock = threading.Lock()

        def on_response(result: Any, error: Any) -> None:
            arrived = time.perf_counter()
            if error is not None:
                request_id = _request_id_of(error)
                with lock:
                    completion = completions.get(request_id)
                    if completion is None:  # the stream itself failed, or an error named no request
                        finished.put(error)
                        return
                    completion.error, completion.done_at = error.message(), arrived
                finished.put(request_id)
                return
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            outputs = {name: result.as_numpy(name) for name in OUTPUTS}
            with lock:
                completion = completions[response.id]
                if outputs["ATTEMPT"] is not None:
                    completion._take(outputs, final, arrived)
                if final:
                    completion.done_at = arrived
            if final:
                finished.put(response.id)

        order = []
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=on_response)
        try:
            in_flight = 0
            deadline = time.monotonic() + timeout_s
            while pending or in_flight:
                while pending and in_flight < concurrency:
                    prompt, parameters = pending.pop(0)
                    request_id = str(parameters.get("request_id") or f"r{next(self._ids)}")
                    prompt_input = grpcclient.InferInput("PROMPT", [1], "BYTES")
                    prompt_input.set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=object))
                    with lock:
                        completions[request_id] = Completion(
                            request_id, prompt, dict(parameters), time.perf_counter()
                        )
                    order.append(request_id)
                    try:
                        client.async_stream_infer(
                            self.model,
                            [prompt_input],
                            request_id=request_id,
                            enable_empty_final_response=True,
                            parameters={k: v for k, v in parameters.items() if k != "request_id"}
                            | {"request_id": request_id},
                        )
                    except InferenceServerException as error:
                        # The stream broke before this request went out; tritonclient then only says
                        # that it is "no longer in valid state": why is what the callback received.
                        raise StreamFailed(self.url, _stream_error(finished) or error) from None
                    in_flight += 1
                try:
                    done = finished.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(
                        f"{in_flight} completions unfinished after {timeout_s:.0f} s"
                    ) from None
                if not isinstance(done, str):
                    raise StreamFailed(self.url, done)
                in_flight -= 1
        finally:
            client.stop_stream()
            client.close()
        return [completions[r] for r in order]


def _stream_error(finished: queue.Queue) -> Any:
    """What broke the stream, as its callback received it (waiting briefly: the callback runs on
    tritonclient's own thread); None if it does not come."""
    deadline = time.monotonic() + 1.0
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = finished.get(timeout=left)
        except queue.Empty:
            return None
        if not isinstance(item, str):
            return item
    return None


def _request_id_of(error: Any) -> str | None:
    """The request id an error response names: the generator puts it first in the message
    (``ERROR_ID_PREFIX``), since an error on a gRPC stream carries no id of its own."""
    text = error.message() if hasattr(error, "message") else str(error)
    if not text.startswith(ERROR_ID_PREFIX):
        return None
    return text[len(ERROR_ID_PREFIX) :].split("] ", 1)[0]
