"""The SLO ladder in a real server: with a latency target it cannot meet, the orchestrator climbs to the
ladder's top rung within a few windows and answers as that rung's rules do; forced requests stay at
rung 0; the rung is published as a metric."""

from __future__ import annotations

from dataclasses import replace

import pytest

from offramp.backend.orchestrator import ServingOptions
from offramp.backend.policy import Rung
from offramp.build.repository import RepositoryOptions, write_repository
from offramp.client.serving.server import ServerPorts
from tests.reliability_support import Traffic, assert_rows_match, infer, metric_values, wait_for
from tests.served_reference import Reference, spread_policy

pytestmark = pytest.mark.integration


def test_an_unreachable_target_climbs_the_ladder_to_its_top_rung(
    quick_cnn, fashion_test, tmp_path, running_server, execution_env
):
    artifacts, directory = quick_cnn
    images = fashion_test[0]
    rung_0 = spread_policy(artifacts, directory, {"IMAGE": images[5000:6000]})
    # A cheaper rung: every early threshold lowered, so more rows leave early.
    cheaper = tuple(replace(rule, threshold=rule.threshold * 0.8) for rule in rung_0.exits)
    policy = replace(rung_0, version="ladder-1", rungs=(Rung(0.05, cheaper, expected_cost=0.5),))
    ports = ServerPorts.free()
    # 0.01 ms: no request can meet it, so every busy window climbs.
    serving = ServingOptions(
        slo_p99_ms=0.01, slo_window_s=0.5, metrics_url=f"http://127.0.0.1:{ports.metrics}/metrics"
    )
    write_repository(
        artifacts,
        directory,
        policy,
        tmp_path / "repo",
        RepositoryOptions(execution_env=execution_env, serving=serving),
    )
    rows = images[:64]
    at_top = Reference(artifacts, directory, replace(rung_0, exits=cheaper))({"IMAGE": rows})
    at_zero = Reference(artifacts, directory, rung_0)({"IMAGE": rows})
    assert (at_top.exit != at_zero.exit).any(), "the rungs should answer differently"
    with (
        running_server(tmp_path / "repo", ports=ports) as server,
        # Steady traffic: a window without requests counts as quiet, and quiet windows descend.
        Traffic(server, artifacts.name, images[:256], threads=2, timeout_s=30),
    ):

        def climbed() -> bool:
            rungs = metric_values(server, "offramp_slo_rung")
            return bool(rungs) and min(rungs.values()) == 1  # every orchestrator instance at the top

        assert wait_for(climbed, timeout_s=60, interval_s=0.2), metric_values(server, "offramp_slo_rung")
        answer = infer("grpc", server, artifacts.name, {"IMAGE": rows})
        forced = infer("grpc", server, artifacts.name, {"IMAGE": rows}, parameters={"force_full": True})
        # At the top rung and over the target: the SLO is missed (a window without requests misses nothing).
        missed = wait_for(
            lambda: max(metric_values(server, "offramp_slo_missed").values(), default=0) == 1, 30
        )
    assert answer.ok and forced.ok
    assert_rows_match(answer.outputs, at_top)
    assert (forced.outputs["EXIT"] == artifacts.num_exits - 1).all()
    assert missed
