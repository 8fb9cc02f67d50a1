"""Builds reused by key: a build saves the key of what it was made from in its manifest
(``build["key"]``), and a later build asked for the same key takes the saved one instead of training."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from offramp.build.artifacts import MANIFEST, ModelArtifacts


def build_key(**parts: object) -> str:
    """A short hash of what a build depends on (its settings, data, recipe version)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CachedBuild:
    """The key of the build asked for, and the build its folder holds (made with any key, or None)."""

    key: str
    saved: ModelArtifacts | None

    @classmethod
    def look_up(cls, out_dir: Path, **parts: object) -> CachedBuild:
        saved = ModelArtifacts.load(out_dir) if (Path(out_dir) / MANIFEST).exists() else None
        return cls(build_key(**parts), saved)

    @property
    def reusable(self) -> ModelArtifacts | None:
        """The saved build when it was made with this key: nothing is left to do."""
        return self.saved if self.saved is not None and self.saved.build.get("key") == self.key else None

    @property
    def previous(self) -> dict:
        """The saved build's record whatever its key (empty when there is none): a build may reuse
        stages of it whose own settings did not change."""
        return self.saved.build if self.saved is not None else {}
