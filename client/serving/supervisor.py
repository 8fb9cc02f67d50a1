"""Self-healing: notice a Python-backend stub that died and bring its model back, with backoff.

Why a supervisor outside Triton, watching processes: tritonserver 2.51's Python backend does not
restart a stub that was killed (an out-of-memory kill, a segfault in a native library). The model
stays READY, every request that reaches the dead instance fails after about a second with "Stub
process '<instance>' is not healthy", and neither Triton's health endpoints nor a plain ``load`` of
the model notice (a load with an unchanged config is a no-op). An orchestrator cannot restart itself,
and several orchestrator instances noticing the same dead segment would race each other; one watcher
beside the server sees every stub (orchestrators, segments, ``_full``, the fallback) within a poll.

How it tells a crash from a normal exit: a stub that is unloaded unlinks its ``/dev/shm`` region
before it exits, while a killed one cannot, so a stub process that is gone while its region is still
there died. Only models Triton still reports READY are restarted (an operator's unload is left alone).

How it restarts: it reloads the model with its current config (so a pinned policy version stays
pinned) plus a changed parameter ``offramp_restart_generation``: a changed config makes Triton load
new instances and retire the old ones while requests go on, where an unload would refuse requests in
between. The dead stub's region, which nothing else will remove, is unlinked once the model is back.

Give-up: after ``max_restarts`` restarts of one model within ``window_s`` the next crash is not
repaired: the model is unloaded (so Triton's own ready endpoint for it says so, and the orchestrator's
calls fail at once instead of after a second), and the service stays degraded until an operator acts.
The ``offramp_supervisor_gave_up`` gauge raises an alert (python_backend/monitoring).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from offramp.client.serving.processes import PythonStub, python_stubs
from offramp.client.serving.server import ADMIN_KEY_HEADER, SHM_DIR, EmbeddedTritonServer

LOGGER = logging.getLogger(__name__)

RESTART_PARAMETER = "offramp_restart_generation"


class ServerView(Protocol):
    """What the supervisor needs of a server: its stubs, its models' states, and model control."""

    def stubs(self) -> Mapping[int, PythonStub]: ...
    def region_exists(self, region: str) -> bool: ...
    def remove_region(self, region: str) -> None: ...
    def model_ready(self, model: str) -> bool: ...
    def restart(self, model: str) -> None: ...
    def unload(self, model: str) -> None: ...


@dataclass(frozen=True)
class RestartPolicy:
    """How often a model is restarted before the supervisor gives up on it."""

    max_restarts: int = 4  # within window_s; the crash after that is not repaired
    window_s: float = 600.0
    # The wait, after the last restart, before the next one when the window already holds k restarts
    # (backoff_s[k], the last value beyond): a model that dies on start-up is not reloaded in a tight loop.
    backoff_s: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    poll_s: float = 0.25

    def backoff(self, restarts_in_window: int) -> float:
        return self.backoff_s[min(restarts_in_window, len(self.backoff_s) - 1)]

    def in_window(self, restart_times: list[float], now: float) -> list[float]:
        """The restarts of ``restart_times`` still inside the window before ``now``: once they number
        ``max_restarts`` the budget is spent."""
        return [t for t in restart_times if now - t < self.window_s]


@dataclass
class ServerRestarts:
    """``offramp serve``'s record of the tritonserver it restarted after the server itself exited.

    The stubs' supervisor cannot repair a server that is gone: tritonserver 2.51 aborts as a whole when a
    stub dies holding the lock of its shared-memory queue (``boost::interprocess::lock_exception`` from
    libtriton_python.so; upstream triton-inference-server/server#8882), and an out-of-memory kill may
    pick the server rather than a stub. The same budget as a model's restarts applies: after
    ``max_restarts`` within ``window_s`` serve gives up and exits non-zero, so that what runs serve (a
    container runtime, systemd) sees a replica that keeps failing instead of a restart loop.
    """

    policy: RestartPolicy = RestartPolicy(max_restarts=3, window_s=600.0, backoff_s=(0.0, 2.0, 10.0))
    clock: Callable[[], float] = time.monotonic
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)  # every exit seen, in order
    restarting: bool = False  # between an exit and the restarted server's readiness
    _times: list[float] = field(default_factory=list)

    def exited(self, code: int) -> float | None:
        """The server exited with ``code``: seconds to wait before restarting it, or None to give up."""
        now = self.clock()
        self.exit_codes.append(code)
        self._times = self.policy.in_window(self._times, now)
        if len(self._times) >= self.policy.max_restarts:
            self.restarting = False
            return None
        self.restarting = True
        return self.policy.backoff(len(self._times))

    def restarted(self) -> None:
        """The restarted server is ready."""
        self._times.append(self.clock())
        self.restarts += 1
        self.restarting = False

    def metrics_text(self) -> str:
        """Prometheus text: the restarts, and 1 while a restart is under way."""
        return (
            "# HELP offramp_server_restarts_total tritonserver restarted after it exited on its own\n"
            "# TYPE offramp_server_restarts_total counter\n"
            f"offramp_server_restarts_total {self.restarts}\n"
            "# HELP offramp_server_restarting 1 while tritonserver is down and being restarted\n"
            "# TYPE offramp_server_restarting gauge\n"
            f"offramp_server_restarting {int(self.restarting)}\n"
        )


@dataclass
class ModelRecord:
    """What the supervisor knows of one model."""

    crashes: int = 0
    restarts: int = 0
    failed_restarts: int = 0
    gave_up: bool = False
    restart_times: list[float] = field(default_factory=list)
    broken_since: float | None = None  # a crash not yet repaired
    not_before: float = 0.0  # backoff: no restart before this time
    dead_regions: list[str] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return self.broken_since is not None


@dataclass(frozen=True)
class SupervisorEvent:
    time: float
    model: str
    kind: str  # "crashed", "restarted", "restart_failed", "gave_up"
    detail: str = ""


class Supervisor:
    """Polls a server's stubs; restarts the models whose stubs died, with backoff and a budget."""

    def __init__(
        self,
        server: ServerView,
        policy: RestartPolicy = RestartPolicy(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.policy = policy
        self.clock = clock
        self.models: dict[str, ModelRecord] = {}
        self.events: list[SupervisorEvent] = []
        self._known: dict[int, PythonStub] = dict(server.stubs())
        self._lock = threading.Lock()

    def record(self, model: str) -> ModelRecord:
        return self.models.setdefault(model, ModelRecord())

    def _event(self, model: str, kind: str, detail: str = "") -> None:
        event = SupervisorEvent(self.clock(), model, kind, detail)
        self.events.append(event)
        log = LOGGER.error if kind in ("gave_up", "restart_failed") else LOGGER.warning
        log("supervisor: %s %s%s", model, kind, f": {detail}" if detail else "")

    def poll(self) -> None:
        """One look at the server: record the stubs that died, repair what is due."""
        with self._lock:
            stubs = dict(self.server.stubs())
            for pid in self._known.keys() - stubs.keys():
                stub = self._known[pid]
                if self.server.region_exists(stub.region):
                    self._crashed(stub)
            self._known = stubs
            due = [
                m
                for m, r in self.models.items()
                if r.broken and not r.gave_up and self.clock() >= r.not_before
            ]
            for model in due:
                self._repair(model, self.models[model])

    def _crashed(self, stub: PythonStub) -> None:
        record = self.record(stub.model)
        record.crashes += 1
        record.dead_regions.append(stub.region)
        if record.broken_since is None:
            record.broken_since = self.clock()
        self._event(stub.model, "crashed", f"stub {stub.pid} (version {stub.version}) died")

    def _repair(self, model: str, record: ModelRecord) -> None:
        now = self.clock()
        if not self.server.model_ready(model):
            # Not loaded (an operator unloaded it, or it is loading): nothing of ours to restart.
            self._clean_up(record)
            record.broken_since = None
            return
        recent = record.restart_times = self.policy.in_window(record.restart_times, now)
        if len(recent) >= self.policy.max_restarts:
            record.gave_up = True
            self._event(
                model, "gave_up", f"{len(recent)} restarts within {self.policy.window_s:.0f} s; unloading it"
            )
            try:
                self.server.unload(model)
            except Exception as error:  # noqa: BLE001 (the model stays broken either way; say why)
                LOGGER.error("supervisor: unloading %s failed: %s", model, error)
            self._clean_up(record)
            return
        try:
            self.server.restart(model)
            reloaded = self.clock()
            # The stubs the restart started are watched from now on, before the restart is counted:
            # one that dies after the count (a model that crashes on its first request, a test that
            # kills it as soon as it sees the count) would otherwise never be seen alive, so its death
            # would go unnoticed and the model would stay broken.
            self._known |= self.server.stubs()
        except Exception as error:  # noqa: BLE001 (a failed restart is retried after the backoff)
            record.failed_restarts += 1
            record.restart_times.append(now)
            record.not_before = now + self.policy.backoff(len(record.restart_times))
            self._event(model, "restart_failed", str(error))
            return
        record.restarts += 1
        record.restart_times.append(now)
        record.not_before = now + self.policy.backoff(len(record.restart_times))
        since = record.broken_since if record.broken_since is not None else now
        self._event(
            model,
            "restarted",
            f"found dead {now - since:.2f} s before; the reload took {reloaded - now:.2f} s",
        )
        record.broken_since = None
        self._clean_up(record)

    def _clean_up(self, record: ModelRecord) -> None:
        """Unlinks the dead stubs' regions: nothing else will (Triton keeps them until it exits, then
        leaves them behind)."""
        for region in record.dead_regions:
            self.server.remove_region(region)
        record.dead_regions.clear()

    # --- What it reports ---

    def broken_models(self) -> list[str]:
        with self._lock:
            return sorted(m for m, r in self.models.items() if r.broken or r.gave_up)

    def given_up_models(self) -> list[str]:
        with self._lock:
            return sorted(m for m, r in self.models.items() if r.gave_up)

    def metrics_text(self) -> str:
        """The supervisor's counters in Prometheus' text format."""
        families = {
            "offramp_supervisor_stub_crashes_total": (
                "counter",
                "Python-backend stubs found dead",
                "crashes",
            ),
            "offramp_supervisor_restarts_total": ("counter", "models reloaded after a stub died", "restarts"),
            "offramp_supervisor_restart_failures_total": (
                "counter",
                "reloads that failed",
                "failed_restarts",
            ),
            "offramp_supervisor_broken": (
                "gauge",
                "1 while a model has a dead stub not yet repaired",
                "broken",
            ),
            "offramp_supervisor_gave_up": (
                "gauge",
                "1 once the supervisor stopped restarting a model",
                "gave_up",
            ),
        }
        with self._lock:
            records = sorted(self.models.items())
            lines = []
            for name, (kind, description, attribute) in families.items():
                lines += [f"# HELP {name} {description}", f"# TYPE {name} {kind}"]
                lines += [f"{name}{{model={json.dumps(m)}}} {int(getattr(r, attribute))}" for m, r in records]
        return "\n".join(lines) + "\n"


class SupervisorThread:
    """Runs ``supervisor.poll`` every ``policy.poll_s`` in a daemon thread until closed."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offramp-supervisor", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.supervisor.policy.poll_s):
            try:
                self.supervisor.poll()
            except Exception:  # noqa: BLE001 (a server going away mid-poll must not end supervision)
                LOGGER.exception("supervisor: poll failed")

    def __enter__(self) -> SupervisorThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


class TritonServerView:
    """``ServerView`` of a tritonserver on this machine: its stubs from its process group, model control
    over gRPC (explicit model-control mode; ``admin_key`` where the server restricts it)."""

    def __init__(
        self, grpc_url: str, pgid: int, admin_key: str | None = None, shm_dir: Path = SHM_DIR
    ) -> None:
        import tritonclient.grpc as grpcclient

        self.pgid = pgid
        self.shm_dir = shm_dir
        self.headers = {ADMIN_KEY_HEADER: admin_key} if admin_key else None
        # Only the supervisor's own thread uses it.
        self.client = grpcclient.InferenceServerClient(grpc_url)

    def stubs(self) -> dict[int, PythonStub]:
        return python_stubs(self.pgid)

    def region_exists(self, region: str) -> bool:
        return (self.shm_dir / region).exists()

    def remove_region(self, region: str) -> None:
        (self.shm_dir / region).unlink(missing_ok=True)

    def model_ready(self, model: str) -> bool:
        return self.client.is_model_ready(model, headers=self.headers)

    def restart(self, model: str) -> None:
        config = self.client.get_model_config(model, headers=self.headers, as_json=True)["config"]
        parameters = config.setdefault("parameters", {})
        generation = int(parameters.get(RESTART_PARAMETER, {}).get("string_value", "0")) + 1
        parameters[RESTART_PARAMETER] = {"string_value": str(generation)}
        self.client.load_model(model, config=json.dumps(config), headers=self.headers)
        if not self.model_ready(model):
            raise RuntimeError(f"{model} is not ready after its reload")

    def unload(self, model: str) -> None:
        self.client.unload_model(model, headers=self.headers)

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def supervised(server: EmbeddedTritonServer, policy: RestartPolicy = RestartPolicy()) -> Iterator[Supervisor]:
    """Watches ``server``'s stubs in a thread while the block runs; yields the supervisor."""
    if server.pid is None:
        raise RuntimeError("start the server before supervising it")
    view = TritonServerView(server.grpc_url, server.pid, server.admin_key)
    supervisor = Supervisor(view, policy)
    try:
        with SupervisorThread(supervisor):
            yield supervisor
    finally:
        view.close()
