"""Exit thresholds from held-out data, computed on the exported ONNX segments (the serving artifacts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offramp.backend.contract import HIDDEN_IN, HIDDEN_OUT, LOGITS_OUT
from offramp.backend.policy import ExitRule, Policy
from offramp.backend.segment_runner import OnnxRunner
from offramp.build.artifacts import ModelArtifacts
from offramp.kernels.confidence import compute_confidence, exits_by_threshold


def exit_logits_from_onnx(
    artifacts: ModelArtifacts, artifacts_dir: Path, inputs: dict[str, np.ndarray], batch_size: int = 512
) -> np.ndarray:
    """Logits of every exit for every row, chaining the ONNX segments: (exits, N, C)."""
    runners = [OnnxRunner(artifacts_dir / s.onnx, threads=0) for s in artifacts.segments]
    rows = len(next(iter(inputs.values())))
    out = np.empty((artifacts.num_exits, rows, artifacts.num_classes), dtype=np.float32)
    for start in range(0, rows, batch_size):
        raw = {n: a[start : start + batch_size] for n, a in inputs.items()}
        tensors = raw
        for index, runner in enumerate(runners):
            result = runner.run(tensors)
            out[index, start : start + batch_size] = result[LOGITS_OUT]
            tensors = {HIDDEN_IN: result[HIDDEN_OUT], **{n: raw[n] for n in artifacts.side_inputs}}
    return out


def simulate_exits(all_exit_logits: np.ndarray, rules: tuple[ExitRule, ...]) -> np.ndarray:
    """The exit each row takes under ``rules`` (the cascade's decision, offline): (N,) int."""
    num_exits, rows, _ = all_exit_logits.shape
    taken = np.full(rows, num_exits - 1)
    undecided = np.ones(rows, dtype=bool)
    for index, rule in enumerate(rules[:-1]):
        confidence = compute_confidence(all_exit_logits[index], rule.temperature)
        leaving = undecided & exits_by_threshold(confidence, rule.metric, rule.threshold)
        taken[leaving] = index
        undecided &= ~leaving
    return taken


def empirical_threshold_policy(
    artifacts: ModelArtifacts,
    calibration_logits: np.ndarray,
    min_agreement: float = 0.99,
    metric: str = "max_prob",
) -> Policy:
    """One shared max-prob threshold: the lowest whose cascade agrees with the last exit on at least
    ``min_agreement`` of the calibration rows.

    An empirical pick with NO statistical guarantee: NOTES.md saw such picks overshoot the allowed
    loss on fresh data. It is the simple rule of the walking skeleton.
    """
    if metric != "max_prob":
        raise ValueError("the empirical search sweeps max-prob thresholds only")
    final = calibration_logits[-1].argmax(axis=1)
    labels = calibration_logits.argmax(axis=2)  # (exits, N)
    chosen = 1.0
    for threshold in np.linspace(1.0, 0.5, 101):
        rules = (ExitRule(metric, float(threshold)),) * artifacts.num_exits
        taken = simulate_exits(calibration_logits, rules)
        agreement = float((labels[taken, np.arange(len(final))] == final).mean())
        if agreement < min_agreement:
            break
        chosen = float(threshold)
    rules = (ExitRule(metric, round(chosen, 4)),) * artifacts.num_exits
    taken = simulate_exits(calibration_logits, rules)
    return Policy(
        version="empirical-1",
        model_fingerprint=artifacts.fingerprint,
        exits=rules,
        provenance={
            "method": "empirical search (no guarantee)",
            "min_agreement": min_agreement,
            "calibration_rows": int(calibration_logits.shape[1]),
            "exit_rate_profile": np.bincount(taken, minlength=artifacts.num_exits).tolist(),
            "expected_cost": float(np.asarray(artifacts.exit_costs)[taken].mean()),
        },
    )
