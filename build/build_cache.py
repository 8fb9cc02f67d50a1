"""Builds reused by key: a build saves the key of what it was made from in its manifest
(``build["key"]``), and a later build asked for the same key takes the saved one instead of training.

A build writes into a folder beside its output folder (:func:`staged_build`) that replaces the output
folder only once the build is done, so an error never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from offramp.build.artifacts import MANIFEST, ModelArtifacts


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of a folder's files (not its subfolders, not its location):
    a checkpoint as a build key sees it, so that the same weights key the same build wherever they are
    installed, and weights saved again differently key a new one."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


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


@contextlib.contextmanager
def staged_build(out_dir: Path) -> Iterator[Path]:
    """A folder to build into, beside ``out_dir``, holding a copy of what ``out_dir`` holds (a build reuses
    the stages of the one before it there): moved into place when the block ends, removed when it raises.

    The copy, not links: a build rewrites files of the earlier one (checkpoints, the tokenizer), which
    must stay whole until the new build is in place.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    if out_dir.exists():
        shutil.copytree(out_dir, work, symlinks=True)
    else:
        work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    replaced = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
    if out_dir.exists():
        os.rename(out_dir, replaced)
    os.rename(work, out_dir)
    shutil.rmtree(replaced, ignore_errors=True)
