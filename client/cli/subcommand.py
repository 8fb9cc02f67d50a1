"""What a subcommand of ``offramp`` is: a name, its own arguments, and what it runs.

Each subcommand lives in its own module of this package, beside the code it calls; ``main`` only
collects them. Modules import their heavy dependencies (torch, tritonclient) inside ``run``, so that
``offramp --help`` and every ``offramp X --help`` answer at once.
"""

from __future__ import annotations

import abc
import argparse
import sys
from pathlib import Path
from typing import ClassVar

DEFAULT_WORKDIR = Path(".cache/offramp")
DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_GRPC_URL = "127.0.0.1:8001"


class Subcommand(abc.ABC):
    """One ``offramp <name>``: ``add_arguments`` declares its options, ``run`` returns the exit status."""

    name: ClassVar[str]
    help: ClassVar[str]
    # Shown under --help when set; the help line otherwise.
    description: ClassVar[str | None] = None

    @abc.abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    @abc.abstractmethod
    def run(self, args: argparse.Namespace) -> int: ...


def lacks_artifacts(command: str, directory: Path, manifest: str, hint: str) -> bool:
    """Whether ``directory`` lacks its ``manifest``; if so, says so on stderr as ``offramp <command>``'s
    error, with ``hint`` (what to pass instead). The caller then returns 2."""
    if (Path(directory) / manifest).is_file():
        return False
    print(f"offramp {command}: error: {directory} holds no {manifest}: {hint}", file=sys.stderr)
    return True
