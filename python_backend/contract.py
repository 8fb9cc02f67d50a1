"""Names and shapes shared by the build, the repository writer, the orchestrator and the client.

Kept free of torch so that the orchestrator's Triton stub imports only NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Between segments: segment k > 0 takes HIDDEN_IN (plus side inputs), every segment returns both outputs.
HIDDEN_IN = "hidden_in"
HIDDEN_OUT = "hidden"
LOGITS_OUT = "logits"
# The full network (no early exits) answers with one tensor.
FULL_LOGITS_OUT = "LOGITS"

BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor without its batch axis; -1 marks a variable axis (a sequence length)."""

    name: str
    dtype: str  # NumPy dtype name: "float32", "int64"
    shape: tuple[int, ...]
    # Limits of a raw input that the network cannot enforce itself: a token id past the vocabulary
    # fails the embedding gather for the whole batch, and a mask value other than 0/1 silently
    # changes the answer. Inclusive value bounds, and the longest a variable axis may be.
    low: int | None = None
    high: int | None = None
    max_length: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(
            data["name"],
            data["dtype"],
            tuple(data["shape"]),
            data.get("low"),
            data.get("high"),
            data.get("max_length"),
        )

    def violation(self, array: np.ndarray) -> str | None:
        """What is wrong with ``array`` (n, ...) against the bounds, or None: dtype and shape are checked apart."""
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return "holds NaN or infinite values"
        if self.max_length is not None:
            lengths = [a for a, e in zip(array.shape[1:], self.shape) if e == -1]
            if any(n > self.max_length for n in lengths):
                return f"is {max(lengths)} long; the model takes at most {self.max_length}"
        if array.size and (self.low is not None or self.high is not None):
            smallest, largest = array.min(), array.max()
            if (self.low is not None and smallest < self.low) or (
                self.high is not None and largest > self.high
            ):
                return f"holds values in [{smallest}, {largest}]; allowed: [{self.low}, {self.high}]"
        return None


# Why a row answered where it did: bits of the FLAGS output.
FLAG_FORCED_FULL = 1  # the request asked for full depth
FLAG_DEPTH_CAP = 2  # max_exit reached: answered whatever its confidence
FLAG_DEADLINE = 4  # the request's deadline passed: answered at the next exit whatever its confidence
FLAG_ABSTAINED = 8  # below the policy's abstention band at its last allowed exit: flagged for review
FLAG_FALLBACK = 16  # answered by the policy's fallback model instead
FLAG_FALLBACK_FAILED = 32  # the fallback model failed; the row keeps its own answer, flagged for review
FLAG_CONSERVATIVE = 64  # served at full depth because the drift monitor's conservative mode is on
# A model the row needed was unavailable (its stub died, it was unloaded): answered at the deepest exit
# it had reached instead of where its policy would have let it leave (the policy allows it).
FLAG_DEGRADED = 128
FLAG_REROUTED = 256  # a segment was unavailable: answered by `<name>_full` instead (full quality)
FLAG_SHED = 512  # load shedding past the ladder's top rung capped its depth: answered at the cap
FLAG_NAMES = {
    FLAG_FORCED_FULL: "forced_full",
    FLAG_DEPTH_CAP: "depth_cap",
    FLAG_DEADLINE: "deadline",
    FLAG_ABSTAINED: "abstained",
    FLAG_FALLBACK: "fallback",
    FLAG_FALLBACK_FAILED: "fallback_failed",
    FLAG_CONSERVATIVE: "conservative",
    FLAG_DEGRADED: "degraded",
    FLAG_REROUTED: "rerouted",
    FLAG_SHED: "shed",
}


class SegmentUnavailable(RuntimeError):
    """A model the cascade calls is missing or unhealthy (a BLS call answered UNAVAILABLE, NOT_FOUND or
    "is not healthy"): no request is to blame, so its requests are not retried one by one; the
    orchestrator answers their rows another way where it can (``<name>_full``, a shallower exit)."""


def describe_flags(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES.items() if flags & bit]


# What the early-exit service answers per row (docs/tensor-contract.md, 'Outputs').
OUTPUTS = (
    TensorSpec("LOGITS", "float32", (-1,)),  # (B, C); C is filled in per model
    TensorSpec("LABEL", "int64", ()),
    TensorSpec("EXIT", "int32", ()),
    TensorSpec("CONFIDENCE", "float32", (3,)),  # max-prob, entropy, margin
    TensorSpec("COST", "float32", ()),
    TensorSpec("FLAGS", "int32", ()),  # why the row answered where it did: FLAG_* bits
    TensorSpec("LABEL_NAME", "object", ()),  # BYTES: the class name of LABEL (UTF-8), empty where LABEL is -1
)


def label_names(labels: np.ndarray, class_names: tuple[str, ...]) -> np.ndarray:
    """The LABEL_NAME output: each row's class name as UTF-8 bytes (object (n,)), empty where the label
    is -1 (the logits were not all finite)."""
    encoded = np.array([name.encode("utf-8") for name in class_names] + [b""], dtype=np.object_)
    return encoded[np.where(labels >= 0, labels, len(class_names))]


def output_specs(num_classes: int) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s.name, s.dtype, (num_classes,)) if s.name == "LOGITS" else s for s in OUTPUTS)


def numpy_dtype(spec: TensorSpec) -> np.dtype:
    return np.dtype(spec.dtype)
