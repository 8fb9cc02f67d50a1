"""The exit policy: versioned apart from the weights, read by the orchestrator at load.

``policy.json`` holds one rule per exit (metric, threshold, temperature, and what the rule family adds:
patience, novelty gates, a learned score's weights; ``exit_rules.py`` says what each computes), the
family's name, cohort overrides and provenance. The last exit always answers, so its threshold is
never consulted.

The file's ``format`` is 2 since rule families other than confidence thresholds exist, 3 since the
novelty family's distance gate (code of format 2 would drop the gate and serve another rule than the
certified one); a file without one is format 1, whose rules read as confidence thresholds (every new
field at its default). A file of a later format than this code knows is refused, not half read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from offramp.backend.exit_rules import RULE_METRICS, SCORE, SCORE_SIGNS
from offramp.kernels.confidence import METRICS

FULL_DEPTH_ROUTES = ("full_model", "segments")
ABSTENTION_ACTIONS = ("flag", "fallback")
POLICY_FORMAT = 3
# Rule families (how calibration shaped the rules; the rules themselves say what is computed):
# a confidence threshold, patience, a learned exit score, a confidence threshold with a novelty gate.
RULE_FAMILIES = ("confidence", "patience", "score", "novelty")


class PolicyError(ValueError):
    """A policy file that cannot be served; the message says which field is wrong."""


@dataclass(frozen=True)
class ExitRule:
    """One exit's rule (``exit_rules.rule_passes`` computes it): the row's value (``metric``, of its logits
    divided by ``temperature``) against ``threshold``, with the family's additions."""

    metric: str = "max_prob"  # max_prob, entropy, margin, or score (the learned exit score)
    threshold: float | tuple[float, ...] = 1.0  # scalar, or one per class (by the row's label)
    temperature: float = 1.0
    # Patience: where the label has held at the last `patience` exits (this one included; 0: never), the
    # row's uncertainty counts `patience_discount` times (0: the streak alone lets it leave).
    patience: int = 0
    patience_discount: float = 1.0
    # Novelty gate: the row leaves only where its energy score -logsumexp(logits / T) is at most this.
    energy_limit: float | None = None
    # Distance gate: the row leaves only where its logits / T lie within this Euclidean distance of
    # class_centres[its label] (C rows of C: each label's centre, its median logits / T on the fit rows).
    distance_limit: float | None = None
    class_centres: tuple[tuple[float, ...], ...] = ()
    # The learned score's weights: bias, then one per exit_rules.SCORE_FEATURES (metric "score" only).
    score_weights: tuple[float, ...] = ()

    def validate(self, where: str, num_classes: int) -> None:
        if self.metric not in RULE_METRICS:
            raise PolicyError(f"{where}: metric {self.metric!r} is not one of {RULE_METRICS}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise PolicyError(f"{where}: temperature must be a positive number, not {self.temperature!r}")
        values = self.threshold if isinstance(self.threshold, tuple) else (self.threshold,)
        if isinstance(self.threshold, tuple) and len(values) != num_classes:
            raise PolicyError(f"{where}: {len(values)} per-class thresholds for {num_classes} classes")
        if not all(isinstance(v, int | float) and not math.isnan(v) for v in values):
            raise PolicyError(f"{where}: thresholds must be numbers, not {self.threshold!r}")
        if not (isinstance(self.patience, int) and self.patience >= 0):
            raise PolicyError(f"{where}: patience must be a whole number of exits, not {self.patience!r}")
        if not 0.0 <= self.patience_discount <= 1.0:
            raise PolicyError(f"{where}: patience_discount lies in [0, 1], not {self.patience_discount!r}")
        if self.energy_limit is not None and not math.isfinite(self.energy_limit):
            raise PolicyError(f"{where}: energy_limit must be a finite number, not {self.energy_limit!r}")
        if (self.distance_limit is None) != (not self.class_centres):
            raise PolicyError(f"{where}: distance_limit and class_centres go together")
        if self.distance_limit is not None:
            if not (math.isfinite(self.distance_limit) and self.distance_limit >= 0):
                raise PolicyError(
                    f"{where}: distance_limit must be a number >= 0, not {self.distance_limit!r}"
                )
            shape_ok = len(self.class_centres) == num_classes and all(
                len(row) == num_classes for row in self.class_centres
            )
            if not shape_ok or not all(math.isfinite(v) for row in self.class_centres for v in row):
                raise PolicyError(
                    f"{where}: class_centres must be {num_classes} rows of {num_classes} finite numbers"
                )
        if (self.metric == SCORE) != bool(self.score_weights):
            raise PolicyError(f"{where}: score_weights go with metric {SCORE!r} and only with it")
        if self.score_weights:
            if len(self.score_weights) != len(SCORE_SIGNS) or not all(map(math.isfinite, self.score_weights)):
                raise PolicyError(f"{where}: score_weights must be {len(SCORE_SIGNS)} finite numbers")
            if any(w * sign < 0 for w, sign in zip(self.score_weights, SCORE_SIGNS, strict=True)):
                raise PolicyError(f"{where}: score_weights {self.score_weights} are not monotone")


@dataclass(frozen=True)
class Abstention:
    """Rows whose answer is still unsure at their last allowed exit: flag them, or ask another model."""

    metric: str = "max_prob"
    threshold: float = 0.5  # a row abstains when its confidence fails this (as an exit threshold would)
    action: str = "flag"  # "flag": answer with FLAG_ABSTAINED; "fallback": answer with fallback_model's
    fallback_model: str | None = None  # None: the model's own `<name>_full`
    fallback_cost: float = 1.0  # compute fraction the fallback adds, for COST

    def validate(self) -> None:
        if self.metric not in METRICS:
            raise PolicyError(f"policy abstention: metric {self.metric!r} is not one of {METRICS}")
        if self.action not in ABSTENTION_ACTIONS:
            raise PolicyError(f"policy abstention: action must be one of {ABSTENTION_ACTIONS}")
        if (
            not math.isfinite(self.threshold)
            or not math.isfinite(self.fallback_cost)
            or self.fallback_cost < 0
        ):
            raise PolicyError("policy abstention: threshold and fallback_cost must be finite numbers")


@dataclass(frozen=True)
class Rung:
    """One higher rung of a ladder: exit rules certified at a higher risk level, on the same rows and
    with the same guarantee as the policy's own (rung 0: ``Policy.exits``); a service under load may
    serve it to stay within its latency target."""

    epsilon: float
    exits: tuple[ExitRule, ...]
    expected_cost: float  # mean compute fraction on the calibration rows
    exit_rate_profile: tuple[float, ...] = ()


@dataclass(frozen=True)
class Policy:
    version: str
    model_fingerprint: str
    exits: tuple[ExitRule, ...]
    rule: str = "confidence"  # the family calibration shaped the rules by (RULE_FAMILIES)
    format: int = POLICY_FORMAT
    # Where rows forced to full depth run: the `<name>_full` model, or on through every segment.
    full_depth_route: str = "full_model"
    cohorts: dict[str, tuple[ExitRule, ...]] = field(default_factory=dict)
    abstention: Abstention | None = None
    # While a segment is unavailable and `<name>_full` too: answer the rows that need it at the deepest
    # exit they reached (flagged degraded: below the policy's certified quality), or fail them.
    degraded_answers: bool = False
    # The ladder above rung 0, ascending in risk (and descending in compute); empty: one rung.
    rungs: tuple[Rung, ...] = ()
    # Cohorts always served at rung 0, whatever the load (high-risk traffic).
    pinned_cohorts: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_rate_profile(self) -> tuple[float, ...] | None:
        """Fraction of calibration rows per exit, the drift monitor's reference, if calibration stored it."""
        profile = self.provenance.get("exit_rate_profile")
        if not profile:
            return None
        total = float(sum(profile))
        return tuple(float(p) / total for p in profile) if total > 0 else None

    @property
    def certified_bounds(self) -> str:
        """What the calibration certified, in words (:func:`certified_bounds`)."""
        return certified_bounds(self.provenance)

    @classmethod
    def fixed(
        cls, fingerprint: str, num_exits: int, metric: str = "max_prob", threshold: float = 0.9
    ) -> Policy:
        """One uncalibrated threshold for every exit: a starting point, with no guarantee."""
        return cls(
            version="fixed-1",
            model_fingerprint=fingerprint,
            exits=(ExitRule(metric, threshold),) * num_exits,
            provenance={"method": f"fixed {metric} threshold {threshold}, not calibrated"},
        )

    @property
    def rung_rules(self) -> tuple[tuple[ExitRule, ...], ...]:
        """Each rung's exit rules, rung 0 (the policy's own) first."""
        return (self.exits, *(r.exits for r in self.rungs))

    def rules_for(self, cohort: str | None) -> tuple[ExitRule, ...]:
        """The exit rules of ``cohort``, or the global ones where it has no override."""
        return self.cohorts.get(cohort, self.exits) if cohort else self.exits

    def validate(self, num_exits: int, num_classes: int, fingerprint: str | None = None) -> Policy:
        if not self.version:
            raise PolicyError("policy: version is empty")
        if not 1 <= self.format <= POLICY_FORMAT:
            raise PolicyError(f"policy format {self.format}: this offramp reads formats 1 to {POLICY_FORMAT}")
        if self.rule not in RULE_FAMILIES:
            raise PolicyError(f"policy: rule {self.rule!r} is not one of {RULE_FAMILIES}")
        if fingerprint is not None and self.model_fingerprint != fingerprint:
            raise PolicyError(
                f"policy {self.version} was made for model {self.model_fingerprint[:12]}, "
                f"not for the served model {fingerprint[:12]}"
            )
        if self.full_depth_route not in FULL_DEPTH_ROUTES:
            raise PolicyError(f"policy: full_depth_route must be one of {FULL_DEPTH_ROUTES}")
        named_rules = {
            "exits": self.exits,
            **{f"cohort {c}": r for c, r in self.cohorts.items()},
            **{f"rung {i + 1}": rung.exits for i, rung in enumerate(self.rungs)},
        }
        epsilons = [rung.epsilon for rung in self.rungs]
        if epsilons != sorted(set(epsilons)):
            raise PolicyError(f"policy rungs: epsilons must ascend, not {epsilons}")
        for name, rules in named_rules.items():
            if len(rules) != num_exits:
                raise PolicyError(f"policy {name}: {len(rules)} rules for a model with {num_exits} exits")
            for index, rule in enumerate(rules):
                rule.validate(f"policy {name}[{index}]", num_classes)
        if self.abstention is not None:
            self.abstention.validate()
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def save(self, path: Path) -> Path:
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        written = data.get("format", 1)
        if not (isinstance(written, int) and 1 <= written <= POLICY_FORMAT):
            # A later format may mean something this code would misread: refuse before reading a field.
            raise PolicyError(f"policy format {written!r}: this offramp reads formats 1 to {POLICY_FORMAT}")
        try:
            return cls(
                version=str(data["version"]),
                model_fingerprint=str(data["model_fingerprint"]),
                exits=_rules(data["exits"]),
                rule=str(data.get("rule", "confidence")),
                format=written,
                full_depth_route=data.get("full_depth_route", "full_model"),
                cohorts={str(k): _rules(v) for k, v in data.get("cohorts", {}).items()},
                abstention=Abstention(**data["abstention"]) if data.get("abstention") else None,
                degraded_answers=bool(data.get("degraded_answers", False)),
                rungs=tuple(
                    Rung(
                        epsilon=float(r["epsilon"]),
                        exits=_rules(r["exits"]),
                        expected_cost=float(r["expected_cost"]),
                        exit_rate_profile=tuple(r.get("exit_rate_profile", ())),
                    )
                    for r in data.get("rungs", [])
                ),
                pinned_cohorts=tuple(str(c) for c in data.get("pinned_cohorts", [])),
                provenance=dict(data.get("provenance", {})),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise PolicyError(f"policy: malformed ({type(error).__name__}: {error})") from error

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PolicyError(f"policy {path}: {error}") from error
        return cls.from_dict(data)


def certified_bounds(provenance: Mapping[str, Any]) -> str:
    """What a policy's calibration certified, from its provenance, in words ("disagreement <= 0.01 and
    accuracy loss <= 0.5 points"); "no certified bound" without one (a fixed policy, an empirical search)."""
    if provenance.get("method") != "learn_then_test" or provenance.get("epsilon") is None:
        return "no certified bound"
    text = f"{provenance.get('risk', 'disagreement')} <= {provenance['epsilon']:g}"
    if provenance.get("max_accuracy_loss") is not None:
        text += f" and accuracy loss <= {provenance['max_accuracy_loss'] * 100:g} points"
    return text


def _rules(items: list[dict[str, Any]]) -> tuple[ExitRule, ...]:
    rules = []
    for item in items:
        threshold = item.get("threshold", 1.0)
        rules.append(
            ExitRule(
                metric=item.get("metric", "max_prob"),
                threshold=tuple(threshold) if isinstance(threshold, list) else threshold,
                temperature=item.get("temperature", 1.0),
                patience=item.get("patience", 0),
                patience_discount=item.get("patience_discount", 1.0),
                energy_limit=item.get("energy_limit"),
                distance_limit=item.get("distance_limit"),
                class_centres=tuple(tuple(row) for row in item.get("class_centres", ())),
                score_weights=tuple(item.get("score_weights", ())),
            )
        )
    return tuple(rules)
