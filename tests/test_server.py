"""The embedded Triton server: command line, start-up checks, and a real server serving a model."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from offramp.backend.environment import EXECUTION_ENV_PARAMETER, prepare_execution_env
from offramp.client.cli.serve import ServeCommand, serve
from offramp.client.serving.server import (
    EmbeddedTritonServer,
    ServerPorts,
    ServerStartError,
    python_backend_directory,
    tritonserver_libs_directory,
)
from tests.reliability_support import wait_for

# out = in + 1, plus a report of the environment the stub really runs in.
ADD_ONE_MODEL = textwrap.dedent(
    """
    import json, os, sys

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            environment = json.dumps({
                "prefix": sys.prefix,
                "version": sys.version.split()[0],
                "numpy": np.__version__,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            })
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()  # (N, 2)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUTPUT0", x + np.float32(1)),
                    pb_utils.Tensor("ENVIRONMENT", np.array([environment.encode()], dtype=np.object_)),
                ]))
            return responses
    """
)

BROKEN_MODEL = textwrap.dedent(
    """
    class TritonPythonModel:
        def initialize(self, args):
            raise RuntimeError("deliberately broken model")

        def execute(self, requests):
            return []
    """
)


def write_python_model(repository: Path, name: str, source: str, env: Path) -> Path:
    """Write a Python-backend model: FP32 INPUT0 (-1, 2) -> FP32 OUTPUT0 (-1, 2), BYTES ENVIRONMENT (1,)."""
    config = mc.ModelConfig(
        name=name,
        backend="python",
        max_batch_size=0,
        input=[mc.ModelInput(name="INPUT0", data_type=mc.TYPE_FP32, dims=[-1, 2])],
        output=[
            mc.ModelOutput(name="OUTPUT0", data_type=mc.TYPE_FP32, dims=[-1, 2]),
            mc.ModelOutput(name="ENVIRONMENT", data_type=mc.TYPE_STRING, dims=[1]),
        ],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
    )
    config.parameters[EXECUTION_ENV_PARAMETER].string_value = str(env)
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "1" / "model.py").write_text(source)
    (repository / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return repository / name


def processes_mentioning(text: str) -> list[int]:
    """Return the processes whose command line contains ``text`` (a /proc scan)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def http_get(url: str) -> str:
    """GET ``url`` directly (no proxy) and return the body; raises unless the status is 200."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def serve_command(repository: Path, ports: ServerPorts, log: Path) -> list[str]:
    """``offramp serve`` on ``repository`` at ``ports`` (the health endpoint on any free port) as a child."""
    return [
        sys.executable, "-m", "offramp.client.cli.main", "serve", "--repository", str(repository),
        "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
        "--health-port", "0", "--log", str(log),
    ]  # fmt: skip


def infer_add_one(grpc_url: str, x: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(grpc_url) as client:
        infer_input = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        infer_input.set_data_from_numpy(x)
        result = client.infer("add_one", [infer_input])
    return result.as_numpy("OUTPUT0"), json.loads(result.as_numpy("ENVIRONMENT")[0])


@pytest.fixture(scope="module")
def add_one_repository(tmp_path_factory: pytest.TempPathFactory, execution_env: Path) -> Path:
    repository = tmp_path_factory.mktemp("add-one-repository")
    write_python_model(repository, "add_one", ADD_ONE_MODEL, execution_env)
    return repository


@pytest.fixture(scope="module")
def add_one_server(running_server, add_one_repository: Path):
    with running_server(add_one_repository) as server:
        yield server


# --- No server needed ------------------------------------------------------------------------------


def test_prepare_execution_env_links_the_interpreter_library(tmp_path: Path) -> None:
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "activate").write_text("")
    library = Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("INSTSONAME")

    assert prepare_execution_env(env) == env.absolute()
    assert prepare_execution_env(env) == env.absolute()  # idempotent
    link = env / "lib" / library.name
    assert link.is_symlink() and link.resolve() == library.resolve()
    assert prepare_execution_env() == Path(sys.prefix).absolute()


def test_prepare_execution_env_refuses_a_directory_that_is_no_virtualenv(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not a virtualenv"):
        prepare_execution_env(tmp_path)


def test_python_backend_directory_joins_backend_and_stub(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OFFRAMP_CACHE", str(tmp_path / "cache"))
    backends = python_backend_directory()
    assert backends == tmp_path / "cache" / "backends"
    names = {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
    assert names <= {path.name for path in (backends / "python").iterdir()}
    assert all((backends / "python" / name).resolve().is_file() for name in names)
    assert python_backend_directory(tmp_path / "cache") == backends  # idempotent


def test_command_and_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    ports = ServerPorts(http=18000, grpc=18001, metrics=18002)
    server = EmbeddedTritonServer(
        Path("repo"),
        ports=ports,
        model_control="explicit",
        load_models=["a", "b"],
        extra_args=["--log-verbose=1"],
    )
    command = server.command()
    for flag in [
        f"--model-repository={tmp_path / 'repo'}",
        "--disable-auto-complete-config",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        "--exit-timeout-secs=10",
        "--grpc-address=127.0.0.1",
        "--http-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        "--http-port=18000",
        "--grpc-port=18001",
        "--metrics-port=18002",
        "--model-control-mode=explicit",
        "--load-model=a",
        "--load-model=b",
    ]:
        assert flag in command
    assert command[-1] == "--log-verbose=1"
    assert Path(command[0]).name == "tritonserver"
    env = server.environment()
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(tritonserver_libs_directory())
    assert env["OMP_NUM_THREADS"] == "1"
    assert (server.grpc_url, server.http_url) == ("127.0.0.1:18001", "http://127.0.0.1:18000")
    assert server.metrics_url == "http://127.0.0.1:18002/metrics"


def test_load_models_needs_explicit_model_control(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="explicit"):
        EmbeddedTritonServer(tmp_path, load_models=["a"])


def test_free_ports_are_distinct() -> None:
    ports = ServerPorts.free()
    assert len({ports.http, ports.grpc, ports.metrics}) == 3


@pytest.mark.parametrize(
    ("layout", "message"),
    [("missing", "does not exist"), ("empty", "has no model"), ("no-config", "has no model")],
)
def test_start_refuses_a_repository_without_models(tmp_path: Path, layout: str, message: str) -> None:
    repository = tmp_path / "repo"
    if layout != "missing":
        repository.mkdir()
    if layout == "no-config":
        (repository / "model" / "1").mkdir(parents=True)
    server = EmbeddedTritonServer(repository, ports=ServerPorts.free())
    with pytest.raises(ServerStartError, match=message) as raised:
        server.start()
    assert str(repository) in str(raised.value)
    assert server.pid is None


def test_start_refuses_an_unknown_model_to_load(add_one_repository: Path) -> None:
    server = EmbeddedTritonServer(add_one_repository, model_control="explicit", load_models=["nope"])
    with pytest.raises(ServerStartError, match=r"\['nope'\] not in"):
        server.start()


def test_start_names_a_port_that_is_taken(add_one_repository: Path) -> None:
    ports = ServerPorts.free()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.grpc))
        squatter.listen()
        server = EmbeddedTritonServer(add_one_repository, ports=ports)
        with pytest.raises(ServerStartError, match=f"grpc port {ports.grpc} on 127.0.0.1 is already in use"):
            server.start()
    assert server.pid is None


def test_serve_reports_a_taken_port_on_one_line(add_one_repository: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    ServeCommand().add_arguments(parser)
    ports = ServerPorts.free()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.http))
        squatter.listen()
        args = parser.parse_args(
            [
                "--repository",
                str(add_one_repository),
                "--http-port",
                str(ports.http),
                "--grpc-port",
                str(ports.grpc),
                "--metrics-port",
                str(ports.metrics),
            ]
        )
        assert serve(args) == 1
    error = capsys.readouterr().err.splitlines()
    assert error == [f"offramp serve: error: http port {ports.http} on 127.0.0.1 is already in use"]


# --- A real server ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_server_is_ready_and_infers(add_one_server: EmbeddedTritonServer) -> None:
    import tritonclient.grpc as grpcclient

    http_get(f"{add_one_server.http_url}/v2/health/ready")
    with grpcclient.InferenceServerClient(add_one_server.grpc_url) as client:
        assert client.is_server_ready()
        assert client.is_model_ready("add_one")
    x = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)
    out, _ = infer_add_one(add_one_server.grpc_url, x)
    assert out.dtype == np.float32 and out.shape == (3, 2)
    np.testing.assert_array_equal(out, x + np.float32(1))


@pytest.mark.integration
def test_stub_runs_inside_the_execution_env(
    add_one_server: EmbeddedTritonServer, execution_env: Path
) -> None:
    _, environment = infer_add_one(add_one_server.grpc_url, np.zeros((1, 2), np.float32))
    assert environment == {
        "prefix": str(execution_env),
        "version": sys.version.split()[0],
        "numpy": np.__version__,
        "omp_num_threads": "1",
    }


@pytest.mark.integration
def test_metrics_endpoint_serves(add_one_server: EmbeddedTritonServer) -> None:
    infer_add_one(add_one_server.grpc_url, np.zeros((1, 2), np.float32))
    assert 'nv_inference_request_success{model="add_one"' in http_get(add_one_server.metrics_url)


@pytest.mark.integration
def test_stop_leaves_no_shared_memory_and_no_processes(add_one_repository: Path, tmp_path: Path) -> None:
    server = EmbeddedTritonServer(
        add_one_repository,
        ports=ServerPorts.free(),
        log_path=tmp_path / "server.log",
        model_control="explicit",
        load_models=["add_one"],
    )
    with server:
        pid = server.pid
        # The server's command line and each stub's (its shm region name) carry the unique prefix.
        running = processes_mentioning(server.shm_region_prefix)
        assert pid in running and len(running) >= 2, running
        assert server.shm_regions()
        infer_add_one(server.grpc_url, np.ones((2, 2), np.float32))
    assert server.pid is None
    assert server.shm_regions() == []
    assert processes_mentioning(server.shm_region_prefix) == []
    assert not Path(f"/proc/{pid}").exists()
    assert "Non-graceful termination" not in server.log_text()


@pytest.mark.integration
def test_a_model_failing_to_initialize_fails_start_fast(tmp_path: Path, execution_env: Path) -> None:
    repository = tmp_path / "repo"
    write_python_model(repository, "add_one", ADD_ONE_MODEL, execution_env)
    write_python_model(repository, "broken", BROKEN_MODEL, execution_env)
    server = EmbeddedTritonServer(repository, ports=ServerPorts.free(), log_path=tmp_path / "server.log")
    started = time.monotonic()
    with pytest.raises(ServerStartError) as raised:
        server.start()
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"start-up failure took {elapsed:.1f} s (timeout {server.startup_timeout_s:.0f} s)"
    first_line, *tail = str(raised.value).splitlines()
    assert "failed to load 'broken'" in first_line and "deliberately broken model" in first_line
    assert any("deliberately broken model" in line for line in tail)
    assert server.pid is None
    assert server.shm_regions() == []
    assert processes_mentioning(server.shm_region_prefix) == []


@pytest.mark.integration
def test_serve_runs_until_sigterm_and_stops_cleanly(add_one_repository: Path, tmp_path: Path) -> None:
    ports = ServerPorts.free()
    log = tmp_path / "serve.log"
    command = serve_command(add_one_repository, ports, log)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Ready once `offramp serve` says so (the server's own health endpoint answers a moment before
        # serve has finished starting it; a SIGTERM then is an interrupted start, exit status 130).
        # (serve gives up by itself after its start-up timeout, so the loop ends.)
        printed = []
        for line in process.stdout:
            printed.append(line)
            if line.startswith("Ctrl-C to stop"):
                break
        else:
            raise AssertionError(f"offramp serve ended before it was ready: {process.communicate()}")
        out, _ = infer_add_one(f"127.0.0.1:{ports.grpc}", np.zeros((1, 2), np.float32))
        np.testing.assert_array_equal(out, np.ones((1, 2), np.float32))
        process.send_signal(signal.SIGTERM)
        rest, stderr = process.communicate(timeout=60)
        stdout = "".join(printed) + rest
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert f"gRPC     127.0.0.1:{ports.grpc}" in stdout
    assert f"HTTP     http://127.0.0.1:{ports.http}" in stdout
    assert f"metrics  http://127.0.0.1:{ports.metrics}/metrics" in stdout
    assert f"log      {log}" in stdout
    assert stdout.splitlines()[-1] == "stopped"
    assert processes_mentioning(f"--http-port={ports.http}") == []
    assert "successfully unloaded 'add_one'" in log.read_text()


@pytest.mark.integration
def test_a_server_dies_with_the_process_that_started_it(add_one_repository: Path, tmp_path: Path) -> None:
    """``offramp serve`` SIGKILLed (it cannot stop its server then): tritonserver gets SIGTERM from the
    kernel (PR_SET_PDEATHSIG, set by setpriv before the exec) and exits instead of holding its ports."""
    ports = ServerPorts.free()
    command = serve_command(add_one_repository, ports, tmp_path / "serve.log")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith("Ctrl-C to stop"):
                break
        else:
            raise AssertionError("offramp serve ended before it was ready")
        assert processes_mentioning(f"--http-port={ports.http}"), "no tritonserver to orphan"
        process.kill()
        process.wait()
        # The server's own shutdown gives requests its --exit-timeout-secs (10 s) at most, and an idle
        # one takes about a second; 30 s leaves the rest to a loaded machine.
        gone = wait_for(lambda: not processes_mentioning(f"--http-port={ports.http}"), timeout_s=30)
        assert gone, "tritonserver outlived its parent"
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.integration
def test_serve_restarts_a_server_that_died_and_serves_again(add_one_repository: Path, tmp_path: Path) -> None:
    """tritonserver SIGKILLed under ``offramp serve`` (as when 2.51 aborts on a stub's death, or the
    out-of-memory killer picks the server): serve restarts it on the same ports, keeps the dead server's
    log, answers again, and still stops cleanly."""
    import queue
    import threading

    ports = ServerPorts.free()
    log = tmp_path / "serve.log"
    command = serve_command(add_one_repository, ports, log)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    printed: list[str] = []

    def read_until(prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            printed.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} in {timeout_s} s: {printed}")

    try:
        first_pid = int(read_until("tritonserver pid", 180).split()[2])
        read_until("Ctrl-C to stop", 10)
        os.kill(first_pid, signal.SIGKILL)
        # Start-up of the add_one model takes a few seconds; 180 s is the start-up timeout serve waits.
        again = read_until("tritonserver pid", 180)
        assert "serving again (restart 1)" in again
        second_pid = int(again.split()[2].rstrip(":"))
        assert second_pid != first_pid
        out, _ = infer_add_one(f"127.0.0.1:{ports.grpc}", np.zeros((1, 2), np.float32))
        np.testing.assert_array_equal(out, np.ones((1, 2), np.float32))
        assert (tmp_path / "serve.log.exit-1").exists()  # the dead server's log, not overwritten
        assert any("exited with code -9" in line for line in printed)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        stderr = process.stderr.read()  # a few warnings: the pipe never fills
        reader.join(timeout=5)
        while not lines.empty():
            printed.append(lines.get())
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert printed[-1].strip() == "stopped"
    assert processes_mentioning(f"--http-port={ports.http}") == []


def test_model_control_is_restricted_off_loopback(tmp_path):
    """Bound to a non-loopback address, the model-control APIs need the admin key; on loopback they stay
    open."""
    exposed = EmbeddedTritonServer(tmp_path, host="0.0.0.0", ports=ServerPorts(18000, 18001, 18002))
    command = " ".join(exposed.command())
    assert exposed.admin_key and len(exposed.admin_key) >= 24
    for flag in ("--grpc-restricted-protocol=", "--http-restricted-api="):
        assert f"{flag}model-repository,model-config" in command
        assert f"offramp-admin-key={exposed.admin_key}" in command
    given = EmbeddedTritonServer(tmp_path, host="0.0.0.0", admin_key="k" * 30)
    assert "offramp-admin-key=" + "k" * 30 in " ".join(given.command())
    local = EmbeddedTritonServer(tmp_path, host="127.0.0.1")
    assert local.admin_key is None and "restricted" not in " ".join(local.command())
