"""What a served model must answer: the in-process cascade over the same ONNX files, under a policy
that makes every exit answer some rows; and sample questions for the text model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from offramp.backend.cascade import CascadeBatch, CascadeResult, run_cascade
from offramp.backend.contract import HIDDEN_OUT, LOGITS_OUT
from offramp.backend.policy import ExitRule, Policy
from offramp.backend.segment_runner import OnnxRunner
from offramp.build.calibrate import exit_logits_from_onnx, simulate_exits
from offramp.kernels.confidence import compute_confidence

QUESTIONS = (
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "How many feet are in a mile?",
    "Why is the sky blue?",
    "When did the Berlin wall fall?",
    "What does CPU stand for?",
    "Name a famous Italian painter.",
    "Where is Mount Kilimanjaro?",
)


def spread_policy(
    artifacts: Any,
    directory: Any,
    inputs: Mapping[str, np.ndarray],
    version: str = "spread-1",
    drift_reference: bool = False,
) -> Policy:
    """Thresholds at quantiles of the briefly trained model's confidence on ``inputs``, so that every
    exit answers some rows and the batch is compacted at each one. With ``drift_reference`` the exit
    profile of ``inputs`` goes into the provenance, where the drift monitor takes its reference."""
    logits = exit_logits_from_onnx(artifacts, directory, dict(inputs))
    quantiles = [0.6] + [0.5] * (artifacts.num_exits - 2) + [0.0]
    rules = tuple(
        ExitRule("max_prob", float(np.quantile(compute_confidence(l).max_prob, q)))
        for l, q in zip(logits, quantiles)
    )
    provenance = {}
    if drift_reference:
        profile = np.bincount(simulate_exits(logits, rules), minlength=artifacts.num_exits)
        provenance["exit_rate_profile"] = profile.tolist()
    return Policy(version, artifacts.fingerprint, rules, provenance=provenance)


class Reference:
    """The in-process cascade over the same ONNX files: what the server must answer, row by row."""

    def __init__(self, artifacts: Any, directory: Any, policy: Policy) -> None:
        self.artifacts = artifacts
        self.policy = policy
        self.runners = [OnnxRunner(directory / s.onnx) for s in artifacts.segments]
        self.full = OnnxRunner(directory / artifacts.full_onnx)

    def __call__(
        self, inputs: Mapping[str, np.ndarray], force_full: np.ndarray | None = None
    ) -> CascadeResult:
        def run_segment(index: int, tensors: Mapping[str, np.ndarray], need_hidden: bool) -> tuple:
            out = self.runners[index].run(tensors)
            return (out[HIDDEN_OUT] if need_hidden else None), out[LOGITS_OUT]

        batch = CascadeBatch.plain(dict(inputs), self.artifacts.num_exits)
        if force_full is not None:
            batch = CascadeBatch(batch.inputs, force_full, batch.min_exit, batch.max_exit)
        return run_cascade(
            batch,
            run_segment,
            self.policy,
            self.artifacts.exit_costs,
            self.artifacts.side_inputs,
            lambda tensors: self.full.run(tensors)["LOGITS"],
        )
