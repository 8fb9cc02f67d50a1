"""Exit thresholds from held-out data, computed on the exported ONNX segments (the serving artifacts)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offramp.backend.contract import HIDDEN_IN, HIDDEN_OUT, LOGITS_OUT
from offramp.backend.policy import ExitRule, Policy
from offramp.backend.segment_runner import OnnxRunner
from offramp.build.artifacts import ModelArtifacts
from offramp.build.risk_control import CalibratedExitPolicy, EmpiricalSearch, LearnThenTest, calibrate_exit_policy
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


# "ltt": Learn-then-Test, a stated guarantee; "empirical": a plain search on the same rows, none.
METHODS = ("ltt", "empirical")


@dataclass(frozen=True)
class CalibrationData:
    """A held-out labelled split: the model's raw inputs, labels (N,) and optional cohorts (N,) str."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    cohorts: np.ndarray | None = None

    @classmethod
    def from_npz(cls, path: Path, input_names: Sequence[str]) -> CalibrationData:
        """An ``.npz`` with one array per model input, ``labels`` and optionally ``cohorts``."""
        with np.load(path, allow_pickle=False) as data:
            missing = [n for n in [*input_names, "labels"] if n not in data]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing}; it holds {sorted(data.files)}")
            cohorts = data["cohorts"].astype(str) if "cohorts" in data else None
            return cls({n: data[n] for n in input_names}, data["labels"].astype(np.int64), cohorts)


def recipe_calibration_data(artifacts: ModelArtifacts, artifacts_dir: Path, split: str = "calibration") -> CalibrationData:
    """A held-out split the model's own recipe set aside: ``calibration`` (never trained on, where
    thresholds are chosen) or ``test`` (never seen by training or calibration, where they are judged)."""
    if split not in ("calibration", "test"):
        raise ValueError(f"split must be 'calibration' or 'test', not {split!r}")
    recipe = artifacts.build.get("recipe")
    if recipe == "fashion_mnist_cnn":
        from offramp.build.fashion_mnist import load_fashion_mnist
        from offramp.build.recipes import fashion_mnist_train_and_calibration

        if split == "test":
            images, labels = load_fashion_mnist("test", artifacts.build["data"])
        else:
            _, (images, labels) = fashion_mnist_train_and_calibration(
                artifacts.build["data"], artifacts.build["calibration_rows"]
            )
        return CalibrationData({"IMAGE": images}, labels)
    if recipe == "text_classifier":
        from offramp.build.text_recipes import text_splits_of
        from offramp.build.transformer import encode_texts, load_tokenizer

        rows = getattr(text_splits_of(artifacts), split)
        ids, mask = encode_texts(load_tokenizer(artifacts_dir), rows.texts)
        return CalibrationData({"INPUT_IDS": ids, "ATTENTION_MASK": mask}, rows.labels)
    raise ValueError(f"no {split} split known for recipe {recipe!r}; pass --data FILE.npz")


def evaluate_policy(
    artifacts: ModelArtifacts, artifacts_dir: Path, policy: Policy, data: CalibrationData
) -> dict[str, float]:
    """The policy on other held-out rows, through the exported segments: accuracy, disagreement with
    the full model, mean compute fraction."""
    logits = exit_logits_from_onnx(artifacts, artifacts_dir, data.inputs)
    taken = simulate_exits(logits, policy.exits)
    rows = np.arange(len(taken))
    answer = logits[taken, rows].argmax(axis=1)
    full = logits[-1].argmax(axis=1)
    return {
        "rows": len(taken),
        "accuracy": float((answer == data.labels).mean()),
        "full_accuracy": float((full == data.labels).mean()),
        "disagreement": float((answer != full).mean()),
        "compute": float(np.asarray(artifacts.exit_costs)[taken].mean()),
    }


def policy_version(method: str, rules: Sequence[ExitRule], cohorts: dict) -> str:
    """A version that names the policy's content: the same calibration gives the same version."""
    digest = hashlib.sha256(json.dumps([rules, cohorts], default=str, sort_keys=True).encode()).hexdigest()
    return f"{method}-{digest[:10]}"


def calibrate_artifacts(
    artifacts: ModelArtifacts,
    artifacts_dir: Path,
    data: CalibrationData,
    *,
    epsilon: float = 0.01,
    delta: float = 0.05,
    method: str = "ltt",
    risk: str = "disagreement",
    metric: str = "max_prob",
    p_value: str = "binomial",
    per_class: str | None = None,
    bonferroni: bool = False,
    min_group_rows: int = 50,
    seed: int = 0,
) -> tuple[Policy, CalibratedExitPolicy, np.ndarray]:
    """Runs ``data`` through the exported segments and calibrates a policy on the recorded logits.

    ``method``: "ltt" (Learn-then-Test, the stated guarantee) or "empirical" (no guarantee).
    Returns the served policy, the full calibration result and the logits (exits, N, C).
    """
    logits = exit_logits_from_onnx(artifacts, artifacts_dir, data.inputs)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    procedure = LearnThenTest(epsilon, delta, p_value) if method == "ltt" else EmpiricalSearch(epsilon)
    calibrated = calibrate_exit_policy(
        logits,
        artifacts.exit_costs,
        procedure,
        labels=data.labels,
        risk=risk,
        metric=metric,
        path="per_class" if per_class else "shared",
        per_class=per_class,
        cohorts=data.cohorts,
        bonferroni=bonferroni,
        min_group_rows=min_group_rows,
        seed=seed,
    )
    rules = calibrated.rules()
    cohorts = {name: calibrated.rules(name) for name, c in calibrated.cohorts.items() if not c.fell_back}
    policy = calibrated.to_policy(policy_version(method, rules, cohorts), artifacts.fingerprint)
    return policy, calibrated, logits
