"""Live policy versions: ``offramp policy list|show|diff|deploy|rollback``.

Each policy is a version folder of the orchestrator model (``<repository>/<name>/<v>/`` with the
adapter, the spec and ``policy.json``); the weights never change. Deploying writes version v+1 and
asks Triton (explicit model control) to serve it; rolling back asks it to serve an earlier one. The
load sends the model's whole config with ``version_policy: specific`` (an override replaces the whole
config: docs/embedded-server.md), and Triton finishes in-flight requests on the old version while
the new one loads.

Whatever a deploy or rollback serves is also written into the repository: ``config.pbtxt`` pins it
(``version_policy: specific``), so a server that restarts, or a new replica that starts on the same
repository, serves that version and not Triton's default, the newest folder (which would quietly undo a
rollback). Writing a new version folder into a repository that pins nothing first pins the version
served so far, for the same reason. A fleet of replicas rolls versions out one replica at a time
(``offramp.client.serving.fleet``) and pins once every replica serves the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as pb

from offramp.backend.orchestrator import POLICY_FILE, SPEC_FILE, Orchestrator, OrchestratorSpec
from offramp.backend.policy import Policy
from offramp.client.serving.server import ADMIN_KEY_HEADER


class PolicyControlError(RuntimeError):
    pass


@dataclass(frozen=True)
class PolicyVersion:
    number: int
    policy: Policy
    active: bool


def _version_dirs(model_dir: Path) -> dict[int, Path]:
    return {
        int(p.name): p
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / POLICY_FILE).exists()
    }


class PolicyControl:
    """The policy versions of one orchestrator model, on disk and on a running server."""

    def __init__(
        self, repository: Path, model: str, url: str | None = None, admin_key: str | None = None
    ) -> None:
        self.model_dir = Path(repository) / model
        if not (self.model_dir / "config.pbtxt").exists():
            raise PolicyControlError(f"{self.model_dir} is not a model of the repository (no config.pbtxt)")
        self.model = model
        self.url = url
        self.headers = {ADMIN_KEY_HEADER: admin_key} if admin_key else None

    def _client(self) -> grpcclient.InferenceServerClient:
        if self.url is None:
            raise PolicyControlError("this needs a running server: give --url")
        return grpcclient.InferenceServerClient(self.url)

    def active_versions(self) -> set[int]:
        """Versions the server reports READY for this model (empty without a server)."""
        if self.url is None:
            return set()
        with self._client() as client:
            index = client.get_model_repository_index(headers=self.headers, as_json=True).get("models", [])
        return {int(m["version"]) for m in index if m.get("name") == self.model and m.get("state") == "READY"}

    def versions(self) -> list[PolicyVersion]:
        active = self.active_versions()
        return [
            PolicyVersion(number, Policy.load(path / POLICY_FILE), number in active)
            for number, path in sorted(_version_dirs(self.model_dir).items())
        ]

    def policy(self, version: int) -> Policy:
        path = _version_dirs(self.model_dir).get(version)
        if path is None:
            raise PolicyControlError(f"{self.model} has no policy version {version}")
        return Policy.load(path / POLICY_FILE)

    def deploy(self, policy: Policy) -> int:
        """Writes ``policy`` as the next version, checked against the model, and serves it."""
        dirs = _version_dirs(self.model_dir)
        if not dirs:
            raise PolicyControlError(f"{self.model_dir} has no version to build on")
        latest = dirs[max(dirs)]
        spec = OrchestratorSpec.load(latest / SPEC_FILE)
        Orchestrator(spec, policy)  # validates it for this model before anything is written
        if self.pinned_version() is None:
            self.pin(max(dirs))  # what a fresh server serves now; the new folder must not change that
        number = max(dirs) + 1
        staging = self.model_dir / f".staging-{number}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(latest, staging, ignore=shutil.ignore_patterns(POLICY_FILE, "__pycache__"))
        policy.save(staging / POLICY_FILE)
        staging.rename(self.model_dir / str(number))  # appears whole, never half-written
        if self.url is not None:
            self.serve_version(number)
            self.pin(number)
        return number

    def rollback(self, to_version: int | None = None) -> int:
        """Serves ``to_version``, or the version before the one active now."""
        active = self.active_versions()
        if not active:
            raise PolicyControlError(f"{self.model} is not being served at {self.url}")
        numbers = sorted(_version_dirs(self.model_dir))
        target = (
            to_version
            if to_version is not None
            else max((n for n in numbers if n < min(active)), default=None)
        )
        if target is None or target not in numbers:
            raise PolicyControlError(
                f"no version to roll back to (versions {numbers}, active {sorted(active)})"
            )
        self.serve_version(target)
        self.pin(target)
        return target

    def version_numbers(self) -> list[int]:
        """The policy versions on disk."""
        return sorted(_version_dirs(self.model_dir))

    def config(self) -> pb.ModelConfig:
        """The model's ``config.pbtxt`` as Triton's protobuf."""
        return text_format.Parse((self.model_dir / "config.pbtxt").read_text(), pb.ModelConfig())

    def pinned_version(self) -> int | None:
        """The version ``config.pbtxt`` pins, or None where it leaves the choice to Triton (the newest)."""
        specific = self.config().version_policy.specific.versions
        return int(specific[0]) if len(specific) == 1 else None

    def pin(self, number: int) -> None:
        """Pins ``number`` in ``config.pbtxt``: what a server serves once it (re)loads the model from disk."""
        if number not in _version_dirs(self.model_dir):
            raise PolicyControlError(f"{self.model} has no policy version {number} to pin")
        path = self.model_dir / "config.pbtxt"
        temporary = path.with_name(f".config.pbtxt.{os.getpid()}")
        temporary.write_text(text_format.MessageToString(_pinned(self.config(), number)))
        os.replace(temporary, path)  # a server loading meanwhile reads the old file or the new, never half

    def serve_version(self, number: int) -> None:
        config = _pinned(self.config(), number)
        with self._client() as client:
            client.load_model(self.model, config=json_format.MessageToJson(config), headers=self.headers)
        if number not in self.active_versions():
            raise PolicyControlError(f"the server did not make version {number} of {self.model} ready")


def _pinned(config: pb.ModelConfig, number: int) -> pb.ModelConfig:
    specific = pb.ModelVersionPolicy.Specific(versions=[number])
    config.version_policy.CopyFrom(pb.ModelVersionPolicy(specific=specific))
    return config


def policy_diff(old: Policy, new: Policy) -> list[str]:
    """Field-by-field differences, one line each (exit rules, cohorts, abstention, routing)."""
    lines = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(f"{path}.{key}" if path else str(key), a.get(key), b.get(key))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for index, (x, y) in enumerate(zip(a, b)):
                walk(f"{path}[{index}]", x, y)
        elif a != b:
            lines.append(f"{path}: {json.dumps(a)} -> {json.dumps(b)}")

    walk("", json.loads(old.to_json()), json.loads(new.to_json()))
    return lines
