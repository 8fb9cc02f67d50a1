"""The supervisor's decisions, on a scripted server: what counts as a crash, restarts, backoff, give-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from offramp.client.serving.processes import PythonStub
from offramp.client.serving.supervisor import RestartPolicy, ServerRestarts, Supervisor

DEFAULT_POLICY = RestartPolicy()


@dataclass
class ScriptedServer:
    """Stubs and regions as a test sets them; model control recorded, optionally failing."""

    live: dict[int, PythonStub] = field(default_factory=dict)
    regions: set[str] = field(default_factory=set)
    ready: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail_restarts: int = 0
    next_pid: int = 100

    def start(self, model: str, version: str = "1") -> PythonStub:
        self.next_pid += 1
        stub = PythonStub(self.next_pid, model, version, f"region-{self.next_pid}")
        self.live[stub.pid] = stub
        self.regions.add(stub.region)
        self.ready.add(model)
        return stub

    def kill(self, stub: PythonStub) -> None:  # SIGKILL: the region stays
        del self.live[stub.pid]

    def exit_cleanly(self, stub: PythonStub) -> None:  # unload: the stub unlinks its region first
        del self.live[stub.pid]
        self.regions.discard(stub.region)

    # ServerView
    def stubs(self) -> dict[int, PythonStub]:
        return dict(self.live)

    def region_exists(self, region: str) -> bool:
        return region in self.regions

    def remove_region(self, region: str) -> None:
        self.calls.append(("remove_region", region))
        self.regions.discard(region)

    def model_ready(self, model: str) -> bool:
        return model in self.ready

    def restart(self, model: str) -> None:
        self.calls.append(("restart", model))
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise RuntimeError("load failed")
        for stub in [s for s in self.live.values() if s.model == model]:
            self.exit_cleanly(stub)
        self.start(model)

    def unload(self, model: str) -> None:
        self.calls.append(("unload", model))
        self.ready.discard(model)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _supervised(
    *models: str, policy: RestartPolicy = DEFAULT_POLICY
) -> tuple[ScriptedServer, Supervisor, Clock]:
    server, clock = ScriptedServer(), Clock()
    for model in models:
        server.start(model)
    return server, Supervisor(server, policy, clock), clock


def test_a_killed_stub_is_restarted_and_its_region_removed() -> None:
    server, supervisor, _ = _supervised("seg_0", "seg_1", "orch")
    victim = next(s for s in server.live.values() if s.model == "seg_1")
    server.kill(victim)
    supervisor.poll()
    assert server.calls == [("restart", "seg_1"), ("remove_region", victim.region)]
    record = supervisor.models["seg_1"]
    assert (record.crashes, record.restarts, record.broken, record.gave_up) == (1, 1, False, False)
    assert victim.region not in server.regions
    assert supervisor.broken_models() == []
    assert 'offramp_supervisor_restarts_total{model="seg_1"} 1' in supervisor.metrics_text()


def test_a_stub_that_exits_cleanly_is_no_crash() -> None:
    """Unloads, policy swaps and the supervisor's own restarts retire stubs that unlink their regions."""
    server, supervisor, _ = _supervised("seg_0", "orch")
    server.exit_cleanly(next(iter(server.live.values())))
    supervisor.poll()
    assert server.calls == [] and supervisor.models == {}


def test_a_model_no_longer_ready_is_not_restarted_but_cleaned_up() -> None:
    server, supervisor, _ = _supervised("seg_0")
    victim = next(iter(server.live.values()))
    server.kill(victim)
    server.ready.discard("seg_0")  # an operator unloaded it meanwhile
    supervisor.poll()
    assert server.calls == [("remove_region", victim.region)]
    assert not supervisor.models["seg_0"].broken


def test_restarts_back_off_and_give_up_after_the_budget() -> None:
    policy = RestartPolicy(max_restarts=4, window_s=600, backoff_s=(0.0, 1.0, 2.0, 4.0))
    server, supervisor, clock = _supervised("seg_1", policy=policy)
    for attempt in range(4):
        server.kill(next(s for s in server.live.values() if s.model == "seg_1"))
        supervisor.poll()
        if attempt >= 1:  # the restart waits out the backoff after the previous one
            assert supervisor.models["seg_1"].broken
            clock.now += policy.backoff(attempt)
            supervisor.poll()
        assert not supervisor.models["seg_1"].broken, attempt
        clock.now += 0.5
    assert supervisor.models["seg_1"].restarts == 4
    server.kill(next(s for s in server.live.values() if s.model == "seg_1"))
    clock.now += 10
    supervisor.poll()
    record = supervisor.models["seg_1"]
    assert record.gave_up and record.crashes == 5 and record.restarts == 4
    assert server.calls[-2:][0] == ("unload", "seg_1")
    assert supervisor.given_up_models() == ["seg_1"]
    assert 'offramp_supervisor_gave_up{model="seg_1"} 1' in supervisor.metrics_text()
    calls = len(server.calls)
    clock.now += 1000
    supervisor.poll()
    assert len(server.calls) == calls, "a model given up on is left alone"


def test_restarts_long_ago_do_not_count_towards_giving_up() -> None:
    policy = RestartPolicy(max_restarts=2, window_s=60, backoff_s=(0.0,))
    server, supervisor, clock = _supervised("orch", policy=policy)
    for _ in range(5):
        server.kill(next(iter(server.live.values())))
        supervisor.poll()
        clock.now += 61
    assert supervisor.models["orch"].restarts == 5 and not supervisor.models["orch"].gave_up


def test_a_failed_restart_is_retried_after_its_backoff() -> None:
    policy = RestartPolicy(max_restarts=4, backoff_s=(3.0,))
    server, supervisor, clock = _supervised("full", policy=policy)
    server.fail_restarts = 1
    server.kill(next(iter(server.live.values())))
    supervisor.poll()
    record = supervisor.models["full"]
    assert record.broken and record.failed_restarts == 1
    supervisor.poll()
    assert record.broken, "retried before its backoff"
    clock.now += 3.0
    supervisor.poll()
    assert not record.broken and record.restarts == 1


def test_a_canary_row_fits_each_kind_of_model() -> None:
    from offramp.client.serving.health import CANARY_TEXT, canary_inputs

    image = {"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]}
    rows = canary_inputs(image)
    assert rows["IMAGE"].shape == (1, 1, 28, 28) and rows["IMAGE"].dtype.name == "float32"
    text = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]},
                       {"name": "INPUT_IDS", "datatype": "INT64", "shape": [-1, -1]}]}  # fmt: skip
    assert canary_inputs(text)["TEXT"].tolist() == [[CANARY_TEXT.encode()]] and len(canary_inputs(text)) == 1
    ids = {"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [-1, -1]}]}
    assert canary_inputs(ids)["INPUT_IDS"].shape == (1, 1)


@dataclass
class KillsOnCleanUp(ScriptedServer):
    """The restarted stub dies while the supervisor is still finishing the restart (it unlinks the dead
    stub's region after counting the restart): the window in which a reader of the count can act."""

    victim_model: str = ""

    def remove_region(self, region: str) -> None:
        super().remove_region(region)
        for stub in [s for s in self.live.values() if s.model == self.victim_model]:
            self.kill(stub)


def test_a_stub_that_dies_right_after_its_restart_is_restarted_again() -> None:
    server, clock = KillsOnCleanUp(victim_model="seg_1"), Clock()
    server.start("seg_1")
    supervisor = Supervisor(server, RestartPolicy(backoff_s=(0.0,)), clock)
    server.kill(next(iter(server.live.values())))
    supervisor.poll()  # restarts it; the new stub dies during the clean-up
    server.victim_model = ""
    supervisor.poll()
    record = supervisor.models["seg_1"]
    assert (record.crashes, record.restarts, record.broken) == (2, 2, False)
    assert len(server.live) == 1


def test_a_dead_server_is_restarted_with_backoff_until_the_budget_is_spent():
    """``offramp serve``'s restarts of tritonserver itself: the model budget's rules (backoff by the
    restarts in the window, give-up once it holds max_restarts), and what the health endpoint shows."""
    clock = Clock()
    restarts = ServerRestarts(RestartPolicy(max_restarts=2, window_s=600, backoff_s=(0.0, 5.0)), clock)
    assert restarts.exited(134) == 0.0 and restarts.restarting  # the first restart at once
    assert "offramp_server_restarting 1" in restarts.metrics_text()
    restarts.restarted()
    assert not restarts.restarting and restarts.restarts == 1
    clock.now += 60
    assert restarts.exited(137) == 5.0  # the second waits: one restart in the window already
    restarts.restarted()
    clock.now += 60
    assert restarts.exited(134) is None and not restarts.restarting  # two within 600 s: give up
    assert restarts.exit_codes == [134, 137, 134]
    assert "offramp_server_restarts_total 2" in restarts.metrics_text()
    # Once the window has passed the old restarts, a crash is repaired again.
    later = ServerRestarts(RestartPolicy(max_restarts=1, window_s=600, backoff_s=(0.0,)), clock)
    later.exited(134)
    later.restarted()
    clock.now += 601
    assert later.exited(134) == 0.0
