"""gRPC client of an offramp service: per-row label, exit, confidence and cost.

A client may be given several replicas of one service (``"host:8001,host2:8001"``, or a sequence). It
spreads its requests over them, round robin from a random start so that many clients spread too, and
sends a request that failed with UNAVAILABLE or NOT_FOUND to the next replica: that replica ran nothing
for it (it is down; or draining after a SIGTERM, when Triton answers NOT_FOUND, "has no available
versions"; or the orchestrator found models it needs unavailable), and a classification is idempotent.
Any other failure, a timeout included (the replica may still be working on it), is the caller's: such
a request is never sent twice.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from offramp.backend.contract import describe_flags

OUTPUT_NAMES = ("LOGITS", "LABEL", "EXIT", "CONFIDENCE", "COST", "FLAGS", "LABEL_NAME")


@dataclass(frozen=True)
class Predictions:
    """The answers for n rows, in the order sent."""

    logits: np.ndarray  # (n, C) float32, temperature-scaled
    label: np.ndarray  # (n,) int64
    exit: np.ndarray  # (n,) int32, 0-based exit index
    confidence: np.ndarray  # (n, 3) float32: max-prob, entropy, margin
    cost: np.ndarray  # (n,) float32: fraction of the full network's compute used
    flags: np.ndarray  # (n,) int32: why each row answered where it did (offramp.backend.contract.FLAG_*)
    label_name: np.ndarray  # (n,) str: the class name of each label ("" where the label is -1)

    def __len__(self) -> int:
        return len(self.label)

    @staticmethod
    def concatenate(parts: list[Predictions]) -> Predictions:
        return Predictions(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in Predictions.__dataclass_fields__)
        )


# The statuses of a request a replica did not run: another replica may take it (module docstring).
RETRIED_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND")


def replica_addresses(url: str | Sequence[str]) -> tuple[str, ...]:
    """``"a:8001,b:8001"`` or a sequence of addresses, as a tuple of addresses."""
    addresses = tuple(a.strip() for a in (url.split(",") if isinstance(url, str) else url) if a.strip())
    if not addresses:
        raise ValueError(f"no server address in {url!r}")
    return addresses


class ReplicaRotation:
    """The order in which one client tries its replicas for each request.

    Round robin from a random start; a replica that failed is put last for ``cooldown_s``, so that a
    replica that is down costs one failed attempt a second, not one per request. It is still tried last
    rather than skipped: when every replica failed lately, asking again is better than failing unasked.
    """

    def __init__(self, count: int, cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 start: int | None = None) -> None:  # fmt: skip
        self.count, self.cooldown_s, self.clock = count, cooldown_s, clock
        self._next = random.randrange(count) if start is None else start % count
        self._failed_at: dict[int, float] = {}

    def order(self) -> list[int]:
        """Every replica once: the next in turn first, those that failed within ``cooldown_s`` last."""
        first, self._next = self._next, (self._next + 1) % self.count
        turn = [(first + k) % self.count for k in range(self.count)]
        now = self.clock()
        cooling = {i for i, at in self._failed_at.items() if now - at < self.cooldown_s}
        return [i for i in turn if i not in cooling] + [i for i in turn if i in cooling]

    def failed(self, index: int) -> None:
        self._failed_at[index] = self.clock()

    def answered(self, index: int) -> None:
        self._failed_at.pop(index, None)


class OfframpClient:
    """A synchronous gRPC client; one per thread (gRPC channels are not shared across threads here).

    ``url`` names one server or several replicas of one service (module docstring).
    """

    def __init__(self, url: str | Sequence[str], timeout_s: float = 60.0) -> None:
        self.addresses = replica_addresses(url)
        self.url = ",".join(self.addresses)
        self.timeout_s = timeout_s
        self.rotation = ReplicaRotation(len(self.addresses))
        # Made when first needed, and again after a failure: a fresh channel connects at once, where
        # gRPC's own reconnection to a replica that was down backs off for up to two minutes.
        self._clients: list[grpcclient.InferenceServerClient | None] = [None] * len(self.addresses)
        self._input_names: dict[str, list[str]] = {}
        self.last_address: str | None = None  # the replica that answered the last call
        self.retried = 0  # calls another replica answered after one refused them

    def close(self) -> None:
        for client in self._clients:
            if client is not None:
                client.close()
        self._clients = [None] * len(self.addresses)

    def _call(self, call: Callable[[grpcclient.InferenceServerClient], Any]) -> Any:
        """``call`` on the replicas in the rotation's order until one runs it (module docstring)."""
        error: InferenceServerException | None = None
        for attempt, index in enumerate(self.rotation.order()):
            client = self._clients[index]
            if client is None:
                client = self._clients[index] = grpcclient.InferenceServerClient(self.addresses[index])
            try:
                result = call(client)
            except InferenceServerException as failure:
                if failure.status() not in RETRIED_STATUSES:
                    raise
                error = failure
                self.rotation.failed(index)
                client.close()
                self._clients[index] = None
                continue
            self.rotation.answered(index)
            self.last_address = self.addresses[index]
            self.retried += attempt > 0
            return result
        assert error is not None
        raise error

    def __enter__(self) -> OfframpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def input_names(self, model: str) -> list[str]:
        """The model's input names, from the server's metadata (asked once per model)."""
        if model not in self._input_names:
            metadata = self._call(lambda client: client.get_model_metadata(model, as_json=True))
            self._input_names[model] = [i["name"] for i in metadata["inputs"]]
        return self._input_names[model]

    def _infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: tuple[str, ...],
        parameters: Mapping[str, Any],
    ) -> grpcclient.InferResult:
        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            tensors.append(tensor)
        return self._call(
            lambda client: client.infer(
                model,
                tensors,
                outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                parameters=dict(parameters) or None,
                client_timeout=self.timeout_s,
            )
        )

    def classify(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray] | np.ndarray,
        *,
        force_full: bool | None = None,
        min_exit: int | None = None,
        max_exit: int | None = None,
        cohort: str | None = None,
        deadline_ms: int | None = None,
        request_id: str | None = None,
    ) -> Predictions:
        """Sends one request (all rows of ``inputs``) to the early-exit model ``model``.

        A bare array is taken as the model's only input. Request policies travel as parameters.
        """
        if isinstance(inputs, np.ndarray):
            inputs = {self.input_names(model)[0]: inputs}
        parameters = {
            k: v
            for k, v in dict(
                force_full=force_full,
                min_exit=min_exit,
                max_exit=max_exit,
                cohort=cohort,
                deadline_ms=deadline_ms,
                request_id=request_id,
            ).items()
            if v is not None
        }
        result = self._infer(model, inputs, OUTPUT_NAMES, parameters)
        rows = len(next(iter(inputs.values())))
        return Predictions(
            logits=result.as_numpy("LOGITS"),
            # Triton serves a per-row scalar as (n, 1): the config needs one dim besides the batch.
            label=result.as_numpy("LABEL").reshape(rows),
            exit=result.as_numpy("EXIT").reshape(rows),
            confidence=result.as_numpy("CONFIDENCE"),
            cost=result.as_numpy("COST").reshape(rows),
            flags=result.as_numpy("FLAGS").reshape(rows),
            label_name=np.array([n.decode() for n in result.as_numpy("LABEL_NAME").reshape(rows)], dtype=str),
        )

    def classify_text(self, model: str, texts: list[str | bytes], **policy: Any) -> Predictions:
        """Sends raw text (tokenized by the server with the model's own tokenizer); ``policy`` as in classify."""
        rows = np.array([t.encode("utf-8") if isinstance(t, str) else t for t in texts], dtype=np.object_)
        # Triton wants one dim besides the batch: TEXT travels as (n, 1) and reaches the model as (n,).
        return self.classify(model, {"TEXT": rows.reshape(-1, 1)}, **policy)

    def classify_images(self, model: str, images: list[bytes], **policy: Any) -> Predictions:
        """Sends encoded JPEG or PNG images (decoded and preprocessed by the server as the build recorded);
        ``policy`` as in classify."""
        rows = np.array(images, dtype=np.object_)
        return self.classify(model, {"IMAGE_BYTES": rows.reshape(-1, 1)}, **policy)

    def full_logits(self, model: str, inputs: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
        """Logits (n, C) of the network without early exits (``<name>_full``)."""
        if isinstance(inputs, np.ndarray):
            inputs = {self.input_names(model)[0]: inputs}
        return self._infer(model, inputs, ("LOGITS",), {}).as_numpy("LOGITS")


def predictions_to_json(predictions: Predictions) -> str:
    """One JSON object per row, for the command line."""
    lines = []
    for row in range(len(predictions)):
        item = {
            "label": int(predictions.label[row]),
            "label_name": str(predictions.label_name[row]),
            "exit": int(predictions.exit[row]),
            "max_prob": round(float(predictions.confidence[row, 0]), 6),
            "entropy": round(float(predictions.confidence[row, 1]), 6),
            "margin": round(float(predictions.confidence[row, 2]), 6),
            "cost": round(float(predictions.cost[row]), 6),
            "flags": describe_flags(int(predictions.flags[row])),
        }
        lines.append(json.dumps(item))
    return "\n".join(lines)
