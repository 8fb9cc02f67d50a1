"""The generation policy: how the decoding modes use a decoder's exits, apart from its weights.

``generation_policy.json`` holds the draft exit, draft length, draft vocabulary and draft stop of
``self_speculative`` (chosen from measured acceptance and cost), the max-prob threshold per early exit of
``confident`` (certified by Learn-then-Test) and the vocabulary its exits score first, the fingerprint
of the weights it was made for, and its provenance. ``offramp.build.generation_calibrate`` makes one;
:meth:`GenerationPolicy.uncalibrated` is the default until then (``confident`` never leaves early, so
it answers as ``full`` does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from offramp.backend.generation import NEVER, DecodingSettings

POLICY_FILE = "generation_policy.json"


@dataclass(frozen=True)
class GenerationPolicy:
    version: str
    model_fingerprint: str
    draft_exit: int  # index into the decoder's exits; an early one
    draft_length: int
    thresholds: tuple[float, ...]  # confident: max-prob threshold per early exit (2.0: never there)
    provenance: dict[str, Any] = field(default_factory=dict)
    draft_vocabulary: tuple[
        int, ...
    ] = ()  # the tokens drafts are chosen among (most frequent first); empty: all
    draft_stop: float = 0.0  # drafting ends once every row drafted a token under this max-prob; 0: never
    confident_vocabulary: tuple[int, ...] = ()  # the tokens a confident exit scores first; empty: all

    @classmethod
    def uncalibrated(cls, num_exits: int, fingerprint: str, draft_length: int = 4) -> GenerationPolicy:
        """Drafts from the middle early exit, ``draft_length`` of them; ``confident`` never leaves early."""
        content = cls("", fingerprint, (num_exits - 1) // 2, draft_length, (NEVER,) * (num_exits - 1),
                      {"method": "uncalibrated"})  # fmt: skip
        return content.with_content_version("uncalibrated")

    def with_content_version(self, prefix: str) -> GenerationPolicy:
        """This policy named after its content: ``<prefix>-<hash>``."""
        body = json.dumps({**asdict(self), "version": ""}, sort_keys=True, default=str)
        return replace(self, version=f"{prefix}-{hashlib.sha256(body.encode()).hexdigest()[:10]}")

    @property
    def settings(self) -> DecodingSettings:
        return DecodingSettings(
            self.draft_exit,
            self.draft_length,
            self.thresholds,
            self.draft_vocabulary,
            self.draft_stop,
            self.confident_vocabulary,
        )

    def validate(self, num_exits: int, fingerprint: str, vocabulary: int) -> None:
        if fingerprint and self.model_fingerprint != fingerprint:
            raise ValueError(
                f"generation policy {self.version} was made for weights {self.model_fingerprint[:12]}, "
                f"not {fingerprint[:12]}"
            )
        if not 0 <= self.draft_exit < num_exits - 1:
            raise ValueError(f"draft exit {self.draft_exit} is not an early exit of {num_exits}")
        if len(self.thresholds) != num_exits - 1:
            raise ValueError(f"{len(self.thresholds)} thresholds for {num_exits - 1} early exits")
        if self.draft_length < 1:
            raise ValueError("draft length must be at least 1")
        if not 0.0 <= self.draft_stop <= 1.0:
            raise ValueError(
                f"draft stop {self.draft_stop} is not a max-prob in [0, 1]; set the policy's draft_stop in "
                "[0, 1] (0: every pass drafts draft_length tokens)"
            )
        for name, tokens in (("draft", self.draft_vocabulary), ("confident", self.confident_vocabulary)):
            if tokens and not 0 <= min(tokens) <= max(tokens) < vocabulary:
                raise ValueError(f"the {name} vocabulary holds ids outside [0, {vocabulary})")

    def save(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> GenerationPolicy:
        data = json.loads(Path(path).read_text())
        return cls(**{**data, "thresholds": tuple(data["thresholds"]),
                      "draft_vocabulary": tuple(data.get("draft_vocabulary", ())),
                      "confident_vocabulary": tuple(data.get("confident_vocabulary", ()))})  # fmt: skip
