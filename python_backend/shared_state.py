"""State the orchestrator instances of one model share: a small file per process in one directory.

Each instance of a Triton Python model is its own process, so a drift window or a risk test kept in one
instance sees only the rows Triton happened to give it (the drift score of two instances of 2,000 rows
each mixed old and new traffic for a whole switch, and stayed under its alarm). Conservative mode is an
action each instance takes on its own rows, so summing per-instance metrics in an alert rule would not
do: every instance must decide on the same evidence. Each process therefore writes what it saw (its
recent exits, its risk tests' log-growth) to ``<pid>.json`` in a directory named after the model, the
server process and the policy version (a new version is a new test), by an atomic rename, and reads the
others' files, every ``interval_s()`` seconds (shorter while an alarm may be coming: the leader adds the
others' evidence and the others take its decision at that pace). In ``/dev/shm`` this is memory, not
disk. A file whose process is gone is skipped (its last rows stay out of the window) and removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from offramp.backend.recurring import Recurring

DIRECTORY_PREFIX = "offramp-shared-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shared_directory(root: Path, model: str, policy_version: str, server_pid: int | None = None) -> Path:
    """Where the instances of ``model`` under ``policy_version`` in one server process meet; directories
    left by servers that are gone are removed on the way."""
    server_pid = os.getppid() if server_pid is None else server_pid

    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", text)

    for stale in Path(root).glob(f"{DIRECTORY_PREFIX}*"):
        match = re.search(r"-(\d+)$", stale.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(root) / f"{DIRECTORY_PREFIX}{safe(model)}-{server_pid}" / safe(policy_version)


class SharedState:
    """This process's file in a shared directory, and the other live processes' latest files."""

    def __init__(self, directory: Path, pid: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid() if pid is None else pid
        self.path = self.directory / f"{self.pid}.json"

    def publish(self, state: Mapping[str, Any]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps(state, separators=(",", ":")))
        os.replace(temporary, self.path)

    def peers(self) -> dict[int, dict[str, Any]]:
        """pid -> the latest state of every other live process (a file being replaced is read whole)."""
        found = {}
        for path in self.directory.glob("*.json"):
            pid = int(path.stem) if path.stem.isdigit() else None
            if pid is None or pid == self.pid:
                continue
            if not _alive(pid):
                path.unlink(missing_ok=True)
                continue
            try:
                found[pid] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):  # gone between the listing and the read
                continue
        return found

    def close(self) -> None:
        """Removes this process's file, and the directories the last process leaves empty."""
        self.path.unlink(missing_ok=True)
        for directory in (self.directory, self.directory.parent):
            try:
                directory.rmdir()
            except OSError:  # another instance's file is still there (or another version's directory)
                break


class PeriodicExchange:
    """A daemon thread that publishes ``state()`` and hands the peers' states to ``absorb`` once
    ``interval_s()`` seconds have passed since the last exchange, looking every ``poll_s``: an interval
    that shortens takes effect within a poll, not after the long one (in the served risk test the first
    exchange after an alarm's evidence began came 0.2 s late, about 250 rows). Errors go to ``on_error``
    and the thread goes on."""

    def __init__(
        self,
        shared: SharedState,
        state: Callable[[], Mapping[str, Any]],
        absorb: Callable[[dict[int, dict[str, Any]]], None],
        on_error: Callable[[Exception], None],
        interval_s: Callable[[], float],
        poll_s: float = 0.05,
    ) -> None:
        self.shared, self.state, self.absorb, self.interval_s = shared, state, absorb, interval_s
        self._exchanged_at = -math.inf
        self._thread = Recurring("offramp-shared-state", lambda: poll_s, self._exchange_if_due, on_error)

    def _exchange_if_due(self) -> None:
        if time.monotonic() - self._exchanged_at >= self.interval_s():
            self.exchange()

    def exchange(self) -> None:
        self._exchanged_at = time.monotonic()
        self.shared.publish(self.state())
        self.absorb(self.shared.peers())

    def close(self) -> None:
        self._thread.close()
        self.shared.close()
