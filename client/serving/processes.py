"""The machine and the embedded server's processes, read through psutil.

Triton's Python backend runs each Python-model instance in a stub process of the server's own process
group, started as ``triton_python_backend_stub <repository>/<model>/<version>/model.py <shm region> ...``:
so the server's processes are those of its process group, and each stub's command line says which model
it serves. Processes come and go while they are read; one that ended in between is left out.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

SERVER_ROLE = "tritonserver"
NOT_A_STUB = "other"


def processes_in_group(pgid: int) -> list[int]:
    """The live processes (zombies left out) whose process group is ``pgid``, by pid."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (OSError, psutil.Error):
            continue  # It ended while we looked.
    return members


def stub_model(command_line: Sequence[str], repository: Path | None = None) -> str:
    """The model a Python-backend stub serves, from its command line (``other`` if it is not a stub):
    its folder in ``repository``, or without one the folder two levels above its ``model.py``."""
    for arg in command_line[1:]:
        if arg.endswith("/model.py"):
            path = Path(arg)
            if repository is not None:
                try:
                    return path.relative_to(Path(repository).absolute()).parts[0]
                except ValueError:
                    pass
            return path.parent.parent.name
    return NOT_A_STUB


def server_processes(pgid: int, repository: Path | None = None) -> dict[int, str]:
    """The live processes of the server whose pid (and process group) is ``pgid``, by pid, each with its
    role: ``tritonserver`` or the model a stub serves."""
    roles = {}
    for pid in processes_in_group(pgid):
        if pid == pgid:
            roles[pid] = SERVER_ROLE
            continue
        try:
            roles[pid] = stub_model(psutil.Process(pid).cmdline(), repository)
        except psutil.Error:
            continue  # It ended while we looked.
    return roles


@dataclass(frozen=True)
class PythonStub:
    """A live Python-backend stub: the model and version it serves, and its /dev/shm region's name."""

    pid: int
    model: str
    version: str
    region: str


def python_stubs(pgid: int) -> dict[int, PythonStub]:
    """The Python-backend stubs of the server whose pid (and process group) is ``pgid``, by pid."""
    stubs = {}
    for pid in processes_in_group(pgid):
        try:
            command_line = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue  # It ended while we looked.
        if len(command_line) > 2 and command_line[1].endswith("/model.py"):
            version_dir = Path(command_line[1]).parent
            stubs[pid] = PythonStub(pid, version_dir.parent.name, version_dir.name, command_line[2])
    return stubs


def stub_shm_region(pid: int) -> str | None:
    """The /dev/shm region a stub works in (its second argument), or None (not a stub, or gone)."""
    try:
        command_line = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    return command_line[2] if len(command_line) > 2 and command_line[1].endswith("/model.py") else None


def stub_shm_regions_in_use() -> set[str]:
    """The /dev/shm regions every live stub on this machine works in, whichever server started it."""
    return {region for pid in psutil.pids() if (region := stub_shm_region(pid))}


def process_exists(pid: int) -> bool:
    return psutil.pid_exists(pid)


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """User plus system CPU seconds each process has used, by pid."""
    seconds = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue  # It ended while we looked.
        seconds[pid] = times.user + times.system
    return seconds


@dataclass(frozen=True)
class ResidentMemory:
    """What of a process's memory is resident, in bytes."""

    rss: int  # all of it (VmRSS)
    anonymous: int  # heap and stacks: neither file-backed nor shared memory (RssAnon)


def resident_memory(pids: Iterable[int]) -> dict[int, ResidentMemory]:
    """Each process's resident memory, by pid."""
    memory = {}
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_info()
        except psutil.Error:
            continue  # It ended while we looked.
        # Linux counts file-backed and shared-memory pages as shared; the rest of the resident set is
        # anonymous.
        memory[pid] = ResidentMemory(rss=info.rss, anonymous=info.rss - info.shared)
    return memory


def machine_busy_cpu_seconds() -> float:
    """CPU seconds all the machine's cores together have spent busy since boot: all but idle and I/O
    wait. The difference of two readings over the wall time between them is the cores kept busy."""
    times = psutil.cpu_times()
    # Guest time is already counted in user and nice time.
    return times.user + times.nice + times.system + times.irq + times.softirq + times.steal


@dataclass(frozen=True)
class MachineDescription:
    cpu_model: str
    cores: int  # logical
    memory_bytes: int
    load_average: tuple[float, float, float]  # runnable processes over 1, 5 and 15 minutes


def machine_description() -> MachineDescription:
    """The machine: its processor, cores and memory, and how loaded it is now."""
    return MachineDescription(
        cpu_model=_cpu_model(),
        cores=psutil.cpu_count(),
        memory_bytes=psutil.virtual_memory().total,
        load_average=psutil.getloadavg(),
    )


def _cpu_model() -> str:
    # psutil does not name the processor; Linux does in /proc/cpuinfo.
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
