"""Warm actors (actors/warm.py): reused across runs, equal to cold runs, isolated between runs
sharing them, retired when unused, ended when idle, and a pool that cannot start is an error."""

import time
from pathlib import Path

import numpy as np
import pytest

from edgeray.config import load_config
from edgeray.errors import UserError
from actors.config import FLConfig
from actors.driver import FLRun, prepare

pytestmark = pytest.mark.ray
DIGITS = Path(__file__).resolve().parents[1] / "configs" / "fedavg_digits.yaml"
STATEFUL = ["data.num_clients=12", "data.min_size=20", "strategy.clients_per_round=6",
            "strategy.params.keep_optimizer_state=true", "runtime.num_edge_servers=2", "runtime.edge_overlap=1"]


def make_run(overrides=(), warm=True):
    cfg = load_config(FLConfig, DIGITS, list(overrides))
    return FLRun(cfg, cfg.strategy.spec(), prepare(cfg), warm=warm)


@pytest.fixture
def ray_without_pools(ray_session):
    """No warm actor outlives the test: the session's 2 CPUs are needed by the next tests."""
    from actors.warm import retire_unused_pools

    retire_unused_pools()
    yield ray_session
    retire_unused_pools()


def warm_names(ray) -> list[str]:
    from actors.warm import NAMESPACE

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith("edgeray-warm-"))


def train(ray, fl, rounds) -> dict:
    for rnd in rounds:
        row = ray.get(fl.aggregator.run_round.remote(rnd))
        assert row["clients_failed"] == 0
    return ray.get(fl.aggregator.global_weights.remote())


def assert_same_weights(a: dict, b: dict) -> None:
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)


def test_warm_runs_reuse_the_processes_and_match_a_cold_run(ray_without_pools):
    ray = ray_without_pools
    weights, pids = [], []
    for warm in (False, True, True):
        fl = make_run(STATEFUL, warm=warm)
        try:
            weights.append(train(ray, fl, (1, 2)))
            pids.append(sorted(ray.get([a.pid.remote() for a in fl.clients()])))
        finally:
            fl.shutdown()
    assert pids[1] == pids[2] and pids[0] != pids[1]      # the second warm run started no process
    assert len(warm_names(ray)) == 2 + 2 + 1               # 2 clients, 2 edges, 1 aggregator stay
    assert_same_weights(weights[0], weights[1])
    assert_same_weights(weights[0], weights[2])


def test_two_runs_sharing_the_pool_do_not_mix(ray_without_pools):
    """Rounds of two runs interleaved on the same warm actors end as each run alone does."""
    ray = ray_without_pools
    other = [*STATEFUL, "seed=7"]
    alone = {}
    for name, overrides in (("a", STATEFUL), ("b", other)):
        fl = make_run(overrides, warm=False)
        try:
            alone[name] = train(ray, fl, (1, 2))
        finally:
            fl.shutdown()
    a, b = make_run(STATEFUL), make_run(other)
    try:
        for rnd in (1, 2):
            train(ray, a, (rnd,))
            train(ray, b, (rnd,))
        assert_same_weights(alone["a"], ray.get(a.aggregator.global_weights.remote()))
        assert_same_weights(alone["b"], ray.get(b.aggregator.global_weights.remote()))
    finally:
        a.shutdown()
        b.shutdown()


def test_pools_of_other_code_are_retired_unless_in_use(ray_without_pools, monkeypatch):
    import actors.warm

    ray = ray_without_pools
    whole_cpus = ["runtime.resource_classes.default.num_cpus=1"]  # 2 actors hold both CPUs
    monkeypatch.setattr(actors.warm, "code_fingerprint", lambda strategy, task: "a" * 12)
    old = make_run(whole_cpus)
    monkeypatch.setattr(actors.warm, "code_fingerprint", lambda strategy, task: "b" * 12)
    # The old run is live, so its pool stays and holds both CPUs: the new pool cannot start.
    with pytest.raises(UserError, match="actors did not start within runtime.actor_start_timeout_s=3"):
        make_run([*whole_cpus, "runtime.actor_start_timeout_s=3"])
    assert any(name.startswith("edgeray-warm-aaaaaaaaaaaa-") for name in warm_names(ray))
    old.shutdown()                                          # its store dies: the pool is unused
    fl = make_run(whole_cpus)
    try:
        assert warm_names(ray) and all(n.startswith("edgeray-warm-bbbbbbbbbbbb-") for n in warm_names(ray))
        train(ray, fl, (1,))
    finally:
        fl.shutdown()


def test_idle_warm_actors_end_themselves(ray_without_pools):
    from ray.exceptions import RayActorError

    ray = ray_without_pools
    fl = make_run(["runtime.warm_idle_exit_s=10"])
    train(ray, fl, (1,))
    fl.shutdown()
    deadline = time.monotonic() + 60
    while warm_names(ray):  # polled through the GCS: a call to an actor would reset its idle clock
        assert time.monotonic() < deadline, f"warm actors did not end themselves: {warm_names(ray)}"
        time.sleep(0.5)
    with pytest.raises(RayActorError):
        ray.get(fl.clients()[0].pid.remote(), timeout=30)
