"""Build artifacts of one multi-exit model: ONNX files plus a manifest that the later steps read.

The manifest (``manifest.json``) is the contract between the build, the repository writer and the
orchestrator: segment files and their tensors, per-exit compute costs, classes, test accuracy, and a
fingerprint of the exported weights that policies are bound to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from offramp.backend.contract import TensorSpec

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SegmentArtifact:
    onnx: str  # file name inside the artifacts folder
    input_names: tuple[str, ...]
    hidden: TensorSpec  # the hidden state it hands on, batch axis dropped
    macs: int  # per row, segment body and its exit head
    exit_cost: float  # compute fraction of leaving at this exit: all segments up to it / full network


@dataclass(frozen=True)
class ModelArtifacts:
    name: str
    inputs: tuple[TensorSpec, ...]
    side_inputs: tuple[str, ...]
    class_names: tuple[str, ...]
    segments: tuple[SegmentArtifact, ...]
    full_onnx: str
    full_macs: int
    fingerprint: str  # sha256 over the ONNX files, in order
    exit_test_accuracy: tuple[float, ...] = ()
    full_test_accuracy: float | None = None
    build: dict[str, Any] = field(default_factory=dict)  # what made it: configs, seed, data, timings

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def exit_costs(self) -> tuple[float, ...]:
        return tuple(s.exit_cost for s in self.segments)

    def save(self, directory: Path) -> Path:
        path = directory / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> ModelArtifacts:
        data = json.loads((Path(directory) / MANIFEST).read_text())
        spec = TensorSpec.from_dict
        return cls(
            name=data["name"],
            inputs=tuple(spec(d) for d in data["inputs"]),
            side_inputs=tuple(data["side_inputs"]),
            class_names=tuple(data["class_names"]),
            segments=tuple(
                SegmentArtifact(
                    s["onnx"], tuple(s["input_names"]), spec(s["hidden"]), s["macs"], s["exit_cost"]
                )
                for s in data["segments"]
            ),
            full_onnx=data["full_onnx"],
            full_macs=data["full_macs"],
            fingerprint=data["fingerprint"],
            exit_test_accuracy=tuple(data.get("exit_test_accuracy", ())),
            full_test_accuracy=data.get("full_test_accuracy"),
            build=data.get("build", {}),
        )


def fingerprint_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()
