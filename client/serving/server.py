"""Run the ``tritonserver`` that ships inside the ``nvidia-pytriton`` wheel as a child process.

No container and no system install: the wheel carries the server binary, its shared libraries and
the Python backend with a stub per Python version. :class:`EmbeddedTritonServer` assembles a backend
directory from those pieces, launches the server on loopback ports, waits until it is ready (failing
fast, with the log tail, when it dies during start-up) and stops it the way the Python backend needs:
SIGTERM first, so the stubs unlink their shared-memory regions.
"""

from __future__ import annotations

import errno
import functools
import http.client
import importlib.util
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from offramp.client.serving.processes import process_exists, processes_in_group, stub_shm_regions_in_use

LOGGER = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# The Python backend names each stub's region "<prefix><uuid>"; this is its default prefix.
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"
# EmbeddedTritonServer's own prefix: the default one, then "offramp<launcher pid>-<random hex>_".
_LAUNCHED_REGION = re.compile(rf"^{re.escape(SHM_REGION_PREFIX)}offramp(\d+)-[0-9a-f]+_")
MODEL_CONTROL_MODES = ("none", "explicit")
# APIs that change or reveal the served models; restricted to holders of the admin key off loopback.
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "trace", "logging")
ADMIN_KEY_HEADER = "offramp-admin-key"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


LOG_TAIL_LINES = 40
_TRITON_ERROR_LINE = re.compile(r"E\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")


class ServerStartError(RuntimeError):
    """The server could not be started, or died or hung before it became ready."""


# --- Where the wheel keeps the server --------------------------------------------------------------


def _pytriton_directory() -> Path:
    # find_spec locates the package without importing it: pytriton's own __init__ pulls in
    # dependencies that are not installed here (the wheel is installed with --no-deps).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError("the nvidia-pytriton wheel is not installed; it carries tritonserver")
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    """Return the ``tritonserver`` executable inside the installed ``pytriton`` package."""
    binary = _pytriton_directory() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerStartError(f"tritonserver not found at {binary}")
    return binary


def tritonserver_libs_directory() -> Path:
    """Return ``nvidia_pytriton.libs``, the server's shared libraries (for ``LD_LIBRARY_PATH``)."""
    return _pytriton_directory().parent / "nvidia_pytriton.libs"


def default_cache_dir() -> Path:
    """Return ``$OFFRAMP_CACHE`` or ``~/.cache/offramp``."""
    return Path(os.environ.get("OFFRAMP_CACHE") or Path.home() / ".cache" / "offramp")


def _link(target: Path, link: Path) -> None:
    """Point ``link`` at ``target``, atomically, so concurrent callers never see it missing."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    temporary = link.with_name(f".{link.name}.{os.getpid()}.{secrets.token_hex(4)}")
    os.symlink(target, temporary)
    os.replace(temporary, link)


def python_backend_directory(cache_dir: Path | None = None) -> Path:
    """Assemble a backend directory for ``--backend-directory`` and return it.

    Triton looks for ``<backend-directory>/python/libtriton_python.so`` and starts
    ``<backend-directory>/python/triton_python_backend_stub``. The wheel keeps the stubs apart, one
    per Python version, so ``<cache>/backends/python/`` links the backend files and this
    interpreter's stub together. Idempotent; safe to call from concurrent processes.
    """
    pytriton = _pytriton_directory() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = pytriton / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerStartError(f"no Python {version} backend stub in the pytriton wheel ({stub})")
    sources = [path for path in (pytriton / "backends" / "python").iterdir() if path.is_file()]
    backends = (cache_dir or default_cache_dir()).absolute() / "backends"
    (backends / "python").mkdir(parents=True, exist_ok=True)
    for source in [*sources, stub]:
        _link(source, backends / "python" / source.name)
    return backends


@functools.cache
def _tritonserver_help() -> str:
    result = subprocess.run(
        [str(tritonserver_binary()), "--help"],
        env=_library_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout + result.stderr


def _library_environment() -> dict[str, str]:
    env = dict(os.environ)
    libs = str(tritonserver_libs_directory())
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
    return env


# --- Ports -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerPorts:
    """The three ports a server listens on."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> ServerPorts:
        """Pick three distinct ports that are free on ``host`` right now.

        The sockets are held open together so the kernel cannot hand out the same port twice; the
        ports can still be taken by someone else before the server binds them, which
        :meth:`EmbeddedTritonServer.start` checks again.
        """
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
        try:
            for sock in sockets:
                sock.bind((host, 0))
            http, grpc, metrics = (sock.getsockname()[1] for sock in sockets)
        finally:
            for sock in sockets:
                sock.close()
        return cls(http=http, grpc=grpc, metrics=metrics)

    def named(self) -> dict[str, int]:
        """Return ``{"http": ..., "grpc": ..., "metrics": ...}``."""
        return {"http": self.http, "grpc": self.grpc, "metrics": self.metrics}


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR, as servers set it: a port left in TIME_WAIT by a server that just stopped is
        # free, one with a live listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


# --- Shared memory left by servers that were killed --------------------------------------------------


def orphaned_shm_regions(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Regions named by an :class:`EmbeddedTritonServer` whose launcher process is gone and that no live
    stub works in.

    A tritonserver killed together with its launcher (SIGKILL of both, a crashed container or machine)
    leaves its stubs' regions behind, and ``stop``, which would have removed them, never runs. Nothing
    else will: they stay until reboot. The launcher's pid in the prefix tells them apart from the
    regions of servers still running, and the stubs' command lines name the regions in use, which
    covers a server still draining after its launcher died (it gets SIGTERM then, see
    ``_dying_with_parent``). A pid reused by another process since keeps its regions: a leak, never a
    region taken from a live server.
    """
    in_use = stub_shm_regions_in_use()
    orphans = []
    for path in shm_dir.glob(f"{SHM_REGION_PREFIX}offramp*"):
        launched = _LAUNCHED_REGION.match(path.name)
        if launched and not process_exists(int(launched.group(1))) and path.name not in in_use:
            orphans.append(path)
    return sorted(orphans)


# --- Processes -------------------------------------------------------------------------------------


def _dying_with_parent(command: list[str]) -> list[str]:
    """``command`` run so that a crashed or SIGKILLed parent does not leave an orphan server holding
    ports and shared memory: util-linux's ``setpriv`` sets PR_SET_PDEATHSIG (SIGTERM, so that even then
    the stubs clean up) and execs it. (The signal follows the *thread* that started the server: start it
    from the main thread or one that outlives it.)

    Not a ``preexec_fn``: with one, Python forks with fork(), which runs the pthread_atfork handlers
    of every library loaded here, and gRPC's (a process that has used tritonclient's gRPC client)
    waited forever inside fork() for its threads (seen in the test suite, grpcio 1.85). Without one it
    uses vfork(), which runs none. Where setpriv is missing the server starts without the guard."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        LOGGER.warning(
            "setpriv (util-linux) not found: tritonserver will outlive this process if it is killed"
        )
        return command
    return [setpriv, "--pdeathsig", "TERM", *command]


class EmbeddedTritonServer:
    """A ``tritonserver`` child process serving one model repository.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with EmbeddedTritonServer(repo, ports=ServerPorts.free()) as server:
            client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

    Args:
        repository: the model repository; every model needs a complete ``config.pbtxt``
            (auto-completion is off), Python models an ``EXECUTION_ENV_PATH`` parameter.
        host: address for all three endpoints.
        ports: defaults to Triton's own 8000 (HTTP), 8001 (gRPC), 8002 (metrics).
        log_path: server and stub output; defaults to a new temporary file (kept after stop).
        model_control: ``"none"`` loads every model at start; ``"explicit"`` loads
            ``load_models`` and lets clients load and unload.
        extra_args: appended to the command line as they are.
        startup_timeout_s: how long :meth:`start` waits for readiness (all models loaded).
    """

    def __init__(
        self,
        repository: Path,
        *,
        host: str = "127.0.0.1",
        ports: ServerPorts | None = None,
        log_path: Path | None = None,
        model_control: str = "none",
        load_models: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 180.0,
        admin_key: str | None = None,
    ) -> None:
        if model_control not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control must be one of {MODEL_CONTROL_MODES}, not {model_control!r}")
        if load_models and model_control != "explicit":
            raise ValueError("load_models needs model_control='explicit' (Triton ignores it otherwise)")
        self.repository = Path(repository).absolute()
        self.host = host
        # Bound beyond loopback, anyone who reaches the port could load, unload or reconfigure
        # models: those APIs then demand the admin key header. On loopback they stay open.
        self.admin_key = admin_key or (None if _is_loopback(host) else secrets.token_urlsafe(24))
        self.ports = ports or ServerPorts()
        self.log_path = Path(log_path).absolute() if log_path is not None else None
        self.model_control = model_control
        self.load_models = tuple(load_models)
        self.extra_args = tuple(extra_args)
        self.startup_timeout_s = startup_timeout_s
        # A prefix of our own for the stubs' shared-memory regions: they still match the default
        # pattern, but leftovers can be told apart from those of other servers on this machine.
        self.shm_region_prefix = f"{SHM_REGION_PREFIX}offramp{os.getpid()}-{secrets.token_hex(4)}_"
        # What start() removed of the regions killed servers left (orphaned_shm_regions).
        self.removed_orphans: list[Path] = []
        self._process: subprocess.Popen[bytes] | None = None

    # --- Addresses ---

    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc.InferenceServerClient``."""
        return f"{self._connect_host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the HTTP/REST endpoint."""
        return f"http://{self._connect_host}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics page."""
        return f"http://{self._connect_host}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (it is also its process-group id)."""
        return self._process.pid if self._process is not None else None

    # --- Command line and environment ---

    def command(self) -> list[str]:
        """Return the exact ``tritonserver`` command line."""
        backend_directory = python_backend_directory()
        command = [
            str(tritonserver_binary()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory}",
            # Without it the Python backend starts every stub twice (once to auto-complete the
            # config, once to serve): loading is about 4x slower. Our configs are complete.
            "--disable-auto-complete-config",
            # No GPU assumed: these two keep a CPU-only server from probing for one and warning.
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            # Bounds Triton's own drain-and-unload on SIGTERM, well inside stop()'s patience.
            "--exit-timeout-secs=10",
            f"--grpc-address={self.host}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_region_prefix}",
            f"--model-control-mode={self.model_control}",
        ]
        if "--metrics-address" in _tritonserver_help():
            command.append(f"--metrics-address={self.host}")
        command += [f"--load-model={name}" for name in self.load_models]
        if self.admin_key:
            restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}"
            command += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
        return command + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """Return the server's environment: ours, plus its libraries and one thread per stub."""
        env = _library_environment()
        # Every stub is a process; with default thread pools each one (torch, OpenBLAS) spawns a
        # thread per core and they fight: a model ran 8x slower on 2 cores. Scale with the
        # instance_group count instead. (ONNX Runtime ignores this; set its intra_op_num_threads.)
        env["OMP_NUM_THREADS"] = "1"
        return env

    # --- Life cycle ---

    def _check_repository(self) -> None:
        if not self.repository.is_dir():
            raise ServerStartError(f"model repository {self.repository} does not exist")
        models = sorted(path.parent.name for path in self.repository.glob("*/config.pbtxt"))
        if not models:
            raise ServerStartError(
                f"model repository {self.repository} has no model (no <model>/config.pbtxt)"
            )
        missing = [name for name in self.load_models if name != "*" and name not in models]
        if missing:
            raise ServerStartError(f"models {missing} not in {self.repository} (it has {models})")

    def _check_ports(self) -> None:
        if len(set(self.ports.named().values())) < 3:
            raise ServerStartError(f"the three ports must differ: {self.ports}")
        for name, port in self.ports.named().items():
            if _port_in_use(self.host or "0.0.0.0", port):
                raise ServerStartError(f"{name} port {port} on {self.host} is already in use")

    def start(self) -> EmbeddedTritonServer:
        """Launch the server and return once it reports ready (all models loaded).

        Raises:
            ServerStartError: bad repository, a port in use, the server exited during start-up
                (the message carries the end of its log), or it was not ready in time.
        """
        if self._process is not None:
            raise ServerStartError(f"server already started (pid {self._process.pid})")
        self._check_repository()
        self._check_ports()
        self._remove_orphaned_regions()
        command, env = self.command(), self.environment()
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                _dying_with_parent(command),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches only us: we stop it in order
            )
        LOGGER.info("tritonserver pid %d, log %s", self._process.pid, self.log_path)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _remove_orphaned_regions(self) -> None:
        self.removed_orphans = orphaned_shm_regions()
        if self.removed_orphans:
            LOGGER.warning("removing shared-memory regions of killed servers: %s", self.removed_orphans)
        for region in self.removed_orphans:
            region.unlink(missing_ok=True)

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        ready_url = f"{self.http_url}/v2/health/ready"
        # No proxy: an http_proxy in the environment must not intercept a loopback health check.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            code = self._process.poll()
            if code is not None:
                raise ServerStartError(
                    f"tritonserver exited with code {code} during start-up: {self.log_error()}\n"
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with opener.open(ready_url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (OSError, http.client.HTTPException):
                pass  # Not listening yet, or listening but models still loading (HTTP 400).
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"tritonserver not ready after {self.startup_timeout_s:.0f} s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def poll(self) -> int | None:
        """Return the server's exit code, or None while it runs (or was never started)."""
        return self._process.poll() if self._process is not None else None

    def stop(self, timeout_s: float = 30.0) -> list[Path]:
        """Stop the server and return the shared-memory regions it left behind (normally none; removed).

        SIGTERM lets Triton drain requests, unload models and have each stub unlink its
        ``/dev/shm`` region; SIGKILL would leak those regions (they live until reboot), so it is
        only the last resort, after ``timeout_s``. Idempotent.
        """
        process, self._process = self._process, None
        if process is None:
            return []
        if (code := process.poll()) is not None:
            # It went away on its own (a crash): say so where a failing test or an operator looks.
            LOGGER.warning(
                "tritonserver %d had already exited with code %d; its log ends:\n%s",
                process.pid, code, self.log_tail(),
            )  # fmt: skip
        else:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                LOGGER.warning(
                    "tritonserver %d ignored SIGTERM for %.0f s; killing it", process.pid, timeout_s
                )
                self._kill_group(process.pid)
                process.wait()
        # The stubs share the server's process group and leave once it is gone; give them a moment.
        deadline = time.monotonic() + 5.0
        while processes_in_group(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if processes_in_group(process.pid):
            LOGGER.warning("stub processes outlived tritonserver %d; killing them", process.pid)
            self._kill_group(process.pid)
        # Every process of the server is gone, so no region with this server's prefix is in use: a stub
        # that was killed could not unlink its own, and Triton leaves it. Remove them; report them.
        left = self.shm_regions()
        if left:
            LOGGER.warning(
                "tritonserver %d left shared-memory regions behind (removed): %s", process.pid, left
            )
            for region in left:
                region.unlink(missing_ok=True)
        return left

    def shm_regions(self) -> list[Path]:
        """Return this server's stubs' shared-memory regions that exist now."""
        return sorted(SHM_DIR.glob(f"{self.shm_region_prefix}*"))

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> EmbeddedTritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- Log ---

    def log_text(self) -> str:
        """Return the server's log so far (stdout and stderr of the server and its stubs)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_error(self) -> str:
        """Return the gist of the last error the log reports, on one line ("" if none).

        Triton's error lines look like ``E1130 09:03:49.780624 4407 file.cc:642] "message\\n..."``;
        the tail alone is mostly status tables, so start-up errors lead with this line.
        """
        errors = [
            line.partition("] ")[2].strip().strip('"').split("\\n")[0].strip()
            for line in self.log_text().splitlines()
            if _TRITON_ERROR_LINE.match(line) and "CudaDriverHelper" not in line  # No GPU: noise.
        ]
        return errors[-1] if errors else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])
