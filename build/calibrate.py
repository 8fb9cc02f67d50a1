"""Exit thresholds from held-out data, computed on the exported ONNX segments (the serving artifacts)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from offramp.backend.contract import HIDDEN_IN, HIDDEN_OUT, LOGITS_OUT
from offramp.backend.exit_rules import rule_passes
from offramp.backend.policy import RULE_FAMILIES, ExitRule, Policy, Rung
from offramp.backend.segment_runner import OnnxRunner
from offramp.build.artifacts import ModelArtifacts
from offramp.build.risk_control import (
    CalibratedExitPolicy,
    EmpiricalSearch,
    LearnThenTest,
    calibrate_best_rule,
    calibrate_exit_policy,
    check_accuracy_bound,
    exit_loss,
)
from offramp.build.rule_families import scaled_exits
from offramp.build.tabular import read_columns


def exit_logits_from_onnx(
    artifacts: ModelArtifacts,
    artifacts_dir: Path,
    inputs: dict[str, np.ndarray],
    batch_size: int = 512,
    progress: bool = False,
) -> np.ndarray:
    """Logits of every exit for every row, chaining the ONNX segments: (exits, N, C)."""
    runners = [OnnxRunner(artifacts_dir / s.onnx, threads=0) for s in artifacts.segments]
    rows = len(next(iter(inputs.values())))
    out = np.empty((artifacts.num_exits, rows, artifacts.num_classes), dtype=np.float32)
    batches = range(0, rows, batch_size)
    for start in tqdm(batches, desc="exit logits (ONNX)", unit="batch", disable=not progress):
        raw = {n: a[start : start + batch_size] for n, a in inputs.items()}
        tensors = raw
        for index, runner in enumerate(runners):
            result = runner.run(tensors)
            out[index, start : start + batch_size] = result[LOGITS_OUT]
            tensors = {HIDDEN_IN: result[HIDDEN_OUT], **{n: raw[n] for n in artifacts.side_inputs}}
    return out


def simulate_exits(all_exit_logits: np.ndarray, rules: tuple[ExitRule, ...]) -> np.ndarray:
    """The exit each row takes under ``rules`` (the cascade's decision, offline, by the same
    ``exit_rules`` functions): (N,) int."""
    num_exits, rows, _ = all_exit_logits.shape
    taken = np.full(rows, num_exits - 1)
    undecided = np.ones(rows, dtype=bool)
    exits = scaled_exits(all_exit_logits, [rule.temperature for rule in rules])
    # Not strict: the last exit has no rule to pass (every row still undecided answers there).
    for index, (rule, (scaled, confidence, history)) in enumerate(zip(rules[:-1], exits, strict=False)):
        leaving = undecided & rule_passes(rule, scaled, confidence, history)
        taken[leaving] = index
        undecided &= ~leaving
    return taken


# "ltt": Learn-then-Test, a stated guarantee; "empirical": a plain search on the same rows, none.
METHODS = ("ltt", "empirical")
# --rule: one family, or "all" of them (each at delta / 4, the least certified compute kept).
RULE_CHOICES = (*RULE_FAMILIES, "all")
# --temperature: fitted per exit on a fit split, or 1 (nothing fitted: with a data-free rule and path,
# every calibration row certifies).
TEMPERATURES = ("fit", "one")
PATHS = ("shared", "per_exit")  # --path (per-class thresholds follow from --per-class)


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


def held_out_data(
    artifacts: ModelArtifacts, artifacts_dir: Path, split: str = "calibration"
) -> CalibrationData:
    """A held-out split of the build's own data: ``calibration`` (never trained on, where thresholds are
    chosen) or ``test`` (never seen by training or calibration, where they are judged). The data is read
    again from what the manifest records (its files, unchanged, or the packaged set, and the split) and
    made into the model's inputs as the build made them."""
    if split not in ("calibration", "test"):
        raise ValueError(f"split must be 'calibration' or 'test', not {split!r}")
    build = artifacts.build
    if build.get("recipe") == "fashion_mnist_cnn":
        from offramp.build.fashion_mnist import load_fashion_mnist
        from offramp.build.recipes import fashion_mnist_train_and_calibration

        if split == "test":
            images, labels = load_fashion_mnist("test", build["data"])
        else:
            _, (images, labels) = fashion_mnist_train_and_calibration(
                build["data"], build["calibration_rows"]
            )
        return CalibrationData({"IMAGE": images}, labels)
    if build.get("tokenizer_dir"):
        from offramp.build.text_recipes import text_splits_of

        rows = getattr(text_splits_of(artifacts), split)
        return CalibrationData(text_inputs(artifacts, artifacts_dir, rows.texts), rows.labels)
    if build.get("data", {}).get("kind") == "images":
        from offramp.backend.image import ImageSpec
        from offramp.build.image_data import load_image_splits

        data = build["data"]
        paths = {
            part: Path(data[part]) if data.get(part) else None for part in ("train", "calibration", "test")
        }
        splits = load_image_splits(
            paths["train"], paths["calibration"], paths["test"], tuple(data["fractions"]), data["seed"], None,
            preprocess=ImageSpec.from_dict(build["image"]),
        )  # fmt: skip
        rows = getattr(splits, split)
        labels = model_class_indices(splits.class_names, rows.labels, artifacts.class_names, paths["train"])
        return CalibrationData({artifacts.inputs[0].name: rows.images}, labels)
    raise ValueError(f"{artifacts_dir}: its manifest records no data to hold out; pass the rows with --data")


def text_inputs(
    artifacts: ModelArtifacts, artifacts_dir: Path, texts: Sequence[str]
) -> dict[str, np.ndarray]:
    """Token ids and mask of ``texts``, by the build's own tokenizer (as the orchestrator tokenizes)."""
    from offramp.build.transformer import encode_texts, load_tokenizer

    ids, mask = encode_texts(load_tokenizer(artifacts_dir / artifacts.build["tokenizer_dir"]), texts)
    return dict(zip((spec.name for spec in artifacts.inputs), (ids, mask), strict=True))


def model_class_indices(
    names: Sequence[str], labels: np.ndarray, class_names: Sequence[str], source: Path
) -> np.ndarray:
    """``labels`` (indices into ``names``, the classes a data source has) as indices into the model's
    ``class_names``; a class the model does not have is an error naming it."""
    unknown = [name for name in names if name not in class_names]
    if unknown:
        raise ValueError(f"{source}: classes {unknown} are not the model's; it has {list(class_names)}")
    mapping = np.array([list(class_names).index(name) for name in names], dtype=np.int64)
    return mapping[labels] if len(mapping) else labels


def data_file_rows(
    artifacts: ModelArtifacts,
    artifacts_dir: Path,
    path: Path,
    text_column: str | None = None,
    label_column: str | None = None,
) -> CalibrationData:
    """Labelled rows from a file of the kinds the build takes, made into the model's inputs by the build's
    own preprocessing: for text, CSV/TSV/JSON Lines/Parquet with the build's text and label columns (or
    those given) and an optional ``cohort`` column; for images, a class-per-folder tree or an .npz of
    images. An .npz holding the model's own input arrays, ``labels`` and optional ``cohorts`` is taken
    as it is. Labels are the model's class names (or indices); any other is an error naming its row."""
    path = Path(path)
    names = [spec.name for spec in artifacts.inputs]
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as held:
            if all(name in held for name in names):
                return CalibrationData.from_npz(path, names)
    build = artifacts.build
    if build.get("tokenizer_dir"):
        from offramp.build.text_data import label_indices, read_text_file

        recorded = build.get("data", {})
        text_column = text_column or recorded.get("text_column", "text")
        label_column = label_column or recorded.get("label_column", "label")
        texts, keys, table = read_text_file(path, text_column, label_column, unlabelled_ok=False)
        labels = label_indices(keys, artifacts.class_names, table, "is not one of the model's labels")
        cohorts = read_columns(path, [], ["cohort"]).columns.get("cohort")
        cohort_array = None if cohorts is None else np.array([str(c) for c in cohorts])
        return CalibrationData(text_inputs(artifacts, artifacts_dir, texts), labels, cohort_array)
    if "image" in build:
        from offramp.backend.image import ImageSpec
        from offramp.build.image_data import load_image_splits

        # The file is each split at once: every row goes to calibration, nothing is carved out of it.
        splits = load_image_splits(
            path, path, path, (1.0, 0.0, 0.0), 0, None, preprocess=ImageSpec.from_dict(build["image"])
        )
        labels = model_class_indices(
            splits.class_names, splits.calibration.labels, artifacts.class_names, path
        )
        return CalibrationData({names[0]: splits.calibration.images}, labels)
    return CalibrationData.from_npz(path, names)


def shadow_rows(artifacts: ModelArtifacts, directory: Path, since: float | None = None) -> CalibrationData:
    """The live rows a served policy's shadow checks kept (``offramp_shadow_store_path``): a uniform
    sample of the rows the policy decided, with the model's inputs as the segments take them, the
    cohorts, and for labels the full network's answers (the risk they can certify is disagreement with
    it: no true labels are kept). ``since`` (a Unix time) keeps only the rows written from then on."""
    from offramp.backend.shadow_store import read_store

    inputs, meta = read_store(Path(directory), since)
    names = [spec.name for spec in artifacts.inputs]
    missing = [name for name in names if name not in inputs]
    if missing:
        raise ValueError(
            f"{directory}: the kept rows lack the model's inputs {missing}; they hold {sorted(inputs)}"
        )
    cohorts = meta["cohort"].astype(str)
    return CalibrationData(
        {name: inputs[name] for name in names},
        meta["full_label"].astype(np.int64),
        cohorts if (cohorts != "").any() else None,
    )


@dataclass(frozen=True)
class RungFigures:
    """One rung of a policy on labelled rows."""

    disagreement: float  # with the full model
    accuracy: float
    full_accuracy: float
    accuracy_loss: float  # the share of rows the rung gets wrong and the full model right
    compute: float  # mean compute fraction per row
    risk: float  # under the ``risk`` rung_figures was given (``--risk``)


def rung_figures(
    policy: Policy,
    logits: np.ndarray,
    exit_costs: Sequence[float],
    labels: np.ndarray,
    risk: str = "disagreement",
) -> list[RungFigures]:
    """Each rung of ``policy``, rung 0 first, on recorded exit logits (E, N, C) with ``labels`` (N,);
    ``risk``: the kind of risk (``--risk``) each figure's ``risk`` measures."""
    full = logits[-1].argmax(axis=1)  # (N,)
    rows = np.arange(logits.shape[1])
    costs = np.asarray(exit_costs, dtype=np.float64)
    figures = []
    for rules in policy.rung_rules:
        taken = simulate_exits(logits, rules)  # (N,)
        answer = logits[taken, rows].argmax(axis=1)
        figures.append(
            RungFigures(
                disagreement=float(exit_loss(answer, full, labels, "disagreement").mean()),
                accuracy=float((answer == labels).mean()),
                full_accuracy=float((full == labels).mean()),
                accuracy_loss=float(exit_loss(answer, full, labels, "error_increase").mean()),
                compute=float(costs[taken].mean()),
                risk=float(exit_loss(answer, full, labels, risk).mean()),
            )
        )
    return figures


def policy_version(method: str, rules: Sequence[ExitRule], cohorts: dict, rungs: Sequence[Rung] = ()) -> str:
    """A version that names the policy's content: the same calibration gives the same version (a
    ladder's rungs are content too: the same rung 0 with and without a ladder are two versions)."""
    content = [rules, cohorts, *([rungs] if rungs else [])]  # without rungs, the digest of before ladders
    digest = hashlib.sha256(json.dumps(content, default=str, sort_keys=True).encode()).hexdigest()
    return f"{method}-{digest[:10]}"


@dataclass(frozen=True)
class CalibrationSettings:
    """What a policy is calibrated by: ``offramp calibrate``'s options, with its defaults (what each rule
    family certifies on the benchmark models: ``benchmarks/exit_rules.md``)."""

    epsilon: float = 0.01
    delta: float = 0.05
    method: str = "ltt"  # METHODS
    risk: str = "disagreement"
    # Also certified, jointly: the accuracy lost against the full model is at most this (needs labels).
    max_accuracy_loss: float | None = None
    rule: str = "confidence"  # RULE_CHOICES
    metric: str = "max_prob"  # of the confidence family
    path: str = "shared"  # shared, per_exit (per_class follows from per_class)
    temperature: str = "fit"  # TEMPERATURES
    p_value: str = "binomial"
    per_class: str | None = None
    bonferroni: bool = False
    min_group_rows: int = 50
    fit_fraction: float = 0.25
    ladder: tuple[float, ...] = ()  # further risk levels, each certified as a rung (the SLO ladder)
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"method": METHODS, "rule": RULE_CHOICES, "temperature": TEMPERATURES, "path": PATHS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        check_accuracy_bound(self.max_accuracy_loss)  # here, before the rows run through the segments
        if self.ladder and self.rule == "all":
            raise ValueError("a ladder is certified for one rule family: name it with rule, not 'all'")
        if self.metric != "max_prob" and self.rule not in ("confidence", "all"):
            raise ValueError(
                f"metric {self.metric!r} is the confidence rule's; the {self.rule} rule has its own"
            )


def calibrate_logits(
    logits: np.ndarray,
    exit_costs: Sequence[float],
    fingerprint: str,
    labels: np.ndarray | None,
    cohorts: np.ndarray | None = None,
    settings: CalibrationSettings = CalibrationSettings(),
) -> tuple[Policy, CalibratedExitPolicy]:
    """The served policy and the full calibration result, from recorded exit logits (E, N, C)."""
    s = settings
    if s.method == "ltt":
        procedure: LearnThenTest | EmpiricalSearch = LearnThenTest(s.epsilon, s.delta, s.p_value)
    else:
        procedure = EmpiricalSearch(s.epsilon)
    options = dict(
        labels=labels, risk=s.risk, metric=s.metric, path="per_class" if s.per_class else s.path,
        per_class=s.per_class, cohorts=cohorts, bonferroni=s.bonferroni, min_group_rows=s.min_group_rows,
        max_accuracy_loss=s.max_accuracy_loss,
        fit_fraction=s.fit_fraction, seed=s.seed,
        temperatures=(1.0,) * logits.shape[0] if s.temperature == "one" else None,
    )  # fmt: skip
    if s.rule == "all":
        calibrated = calibrate_best_rule(logits, exit_costs, procedure, **options)
    else:
        calibrated = calibrate_exit_policy(
            logits, exit_costs, procedure, rule=s.rule, ladder=s.ladder, **options
        )
    rules = calibrated.rules()
    overrides = {name: calibrated.rules(name) for name, c in calibrated.cohorts.items() if not c.fell_back}
    version = policy_version(s.method, rules, overrides, calibrated.ladder())
    return calibrated.to_policy(version, fingerprint), calibrated


def calibrate_artifacts(
    artifacts: ModelArtifacts,
    artifacts_dir: Path,
    data: CalibrationData,
    *,
    progress: bool = False,
    **settings: object,
) -> tuple[Policy, CalibratedExitPolicy, np.ndarray]:
    """Runs ``data`` through the exported segments and calibrates a policy on the recorded logits.

    ``settings``: the fields of :class:`CalibrationSettings` (``method``: "ltt", Learn-then-Test, the
    stated guarantee, or "empirical", none). Returns the served policy, the full calibration result
    and the logits (exits, N, C).
    """
    chosen = CalibrationSettings(**settings)
    logits = exit_logits_from_onnx(artifacts, artifacts_dir, data.inputs, progress=progress)
    policy, calibrated = calibrate_logits(
        logits, artifacts.exit_costs, artifacts.fingerprint, data.labels, data.cohorts, chosen
    )
    return policy, calibrated, logits
