"""The machine and a server's processes through psutil, read from real processes: this test process
and a stand-in server (a process group) with a stand-in stub (a ``model.py`` with a region argument)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from offramp.client.serving.processes import (
    cpu_seconds,
    machine_busy_cpu_seconds,
    machine_description,
    processes_in_group,
    resident_memory,
    server_processes,
    stub_model,
    stub_shm_region,
)


def _status_bytes(key: str) -> int:
    """A figure of /proc/self/status, read by hand to check psutil's against."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _burn_cpu(seconds: float) -> None:
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


@pytest.fixture
def server_group(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, subprocess.Popen, Path]]:
    """A group leader (the server) and a member started as a stub is:
    ``python <repository>/<model>/1/model.py <region>``."""
    repository = tmp_path / "repository"
    model_py = repository / "segment_0" / "1" / "model.py"
    model_py.parent.mkdir(parents=True)
    model_py.write_text("import time\ntime.sleep(60)\n")
    leader = subprocess.Popen(["sleep", "60"], process_group=0)
    stub = subprocess.Popen([sys.executable, str(model_py), "offramp_test_region"], process_group=leader.pid)
    try:
        # A process just started may show an empty command line for a moment.
        _wait_until(lambda: stub_shm_region(stub.pid) is not None)
        yield leader, stub, repository
    finally:
        for process in (stub, leader):
            process.kill()
            process.wait()


def test_a_servers_processes_and_the_models_its_stubs_serve(server_group):
    leader, stub, repository = server_group
    assert sorted(processes_in_group(leader.pid)) == sorted([leader.pid, stub.pid])
    assert server_processes(leader.pid, repository) == {leader.pid: "tritonserver", stub.pid: "segment_0"}
    assert server_processes(leader.pid) == {leader.pid: "tritonserver", stub.pid: "segment_0"}
    assert stub_shm_region(stub.pid) == "offramp_test_region" and stub_shm_region(leader.pid) is None
    assert os.getpid() not in processes_in_group(leader.pid)

    stub.kill()
    _wait_until(lambda: stub.pid not in processes_in_group(leader.pid))
    assert processes_in_group(leader.pid) == [leader.pid], "a zombie stub (not reaped yet) is no process"
    stub.wait()
    assert stub_shm_region(stub.pid) is None and cpu_seconds([stub.pid]) == {}


def test_the_model_a_stub_serves_from_its_command_line(tmp_path: Path):
    repository = tmp_path / "repo"
    command_line = ["triton_python_backend_stub", f"{repository}/m_full/1/model.py", "region", "1024"]
    assert stub_model(command_line, repository) == "m_full" and stub_model(command_line) == "m_full"
    assert stub_model(["tritonserver", "--model-repository=/x"]) == "other"


def test_cpu_seconds_and_resident_memory_of_this_process():
    before = cpu_seconds([os.getpid()])[os.getpid()]
    _burn_cpu(0.3)
    after = cpu_seconds([os.getpid()])[os.getpid()]
    assert 0.25 <= after - before < 5.0
    times = os.times()
    assert after == pytest.approx(times.user + times.system, abs=0.1)

    block = bytearray(64 << 20)  # written through, so resident and anonymous
    memory = resident_memory([os.getpid()])[os.getpid()]
    assert memory.rss == pytest.approx(_status_bytes("VmRSS"), abs=4 << 20)
    assert memory.anonymous == pytest.approx(_status_bytes("RssAnon"), abs=4 << 20)
    assert memory.anonymous >= len(block) and memory.rss >= memory.anonymous


def test_the_machines_busy_cpu_seconds_count_this_process():
    wall, busy = time.monotonic(), machine_busy_cpu_seconds()
    _burn_cpu(0.3)
    busy_cores = (machine_busy_cpu_seconds() - busy) / (time.monotonic() - wall)
    assert 0.5 <= busy_cores <= os.cpu_count() + 0.5


def test_the_machine_description():
    machine = machine_description()
    assert machine.cores == os.cpu_count() and machine.cpu_model
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory_total = next(line for line in meminfo if line.startswith("MemTotal:"))
    assert machine.memory_bytes == int(memory_total.split()[1]) * 1024
    assert machine.load_average == pytest.approx(os.getloadavg(), abs=0.5)
