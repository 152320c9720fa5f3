"""A pool actor's process dies (SIGKILL, not ``ray.kill``) in the middle of a run: while it
trains a client and while the pool evaluates, on a cold pool and on a warm one. The run completes,
counts the lost assignments, re-runs them on a live actor and ends where an uninterrupted run ends."""

import os
import signal
from pathlib import Path

import pytest

from edgeray.config import load_config
from actors.config import FLConfig
from actors.driver import FLRun, prepare

pytestmark = pytest.mark.ray
DIGITS = Path(__file__).resolve().parents[1] / "configs" / "fedavg_digits.yaml"
ALL_CLIENTS = ["data.num_clients=8", "strategy.clients_per_round=8", "rounds=4",
               "runtime.num_edge_servers=2", "runtime.edge_overlap=0", "runtime.inflight_per_actor=1"]
TRAIN_KILL_ROUND, EVAL_KILL_ROUND, VICTIM = 2, 3, 3


def run_rounds(ray, fl, rounds: int, kill_during_evaluation_of: int | None = None) -> list[dict]:
    """The driver's loop (run_fl), with a SIGKILL of the first ClientActor's process right after the
    evaluation of round ``kill_during_evaluation_of`` is sent to the pool."""
    rows = []
    for rnd in range(1, rounds + 1):
        row = ray.get(fl.aggregator.run_round.remote(rnd), timeout=300)
        pending = fl.aggregator.evaluate.remote()
        if rnd == kill_during_evaluation_of:
            os.kill(ray.get(fl.pool["default"][0].pid.remote(), timeout=60), signal.SIGKILL)
        row.update(ray.get(pending, timeout=300))
        rows.append(row)
    return rows


@pytest.fixture
def ray_without_pools(ray_session):
    from actors.warm import retire_unused_pools

    retire_unused_pools()
    yield ray_session
    retire_unused_pools()


@pytest.mark.parametrize("warm", [False, True], ids=["cold-pool", "warm-pool"])
def test_run_survives_sigkill_during_training_and_evaluation(ray_without_pools, tmp_path, warm):
    from fl_helpers import SigkillOnce

    ray = ray_without_pools
    cfg = load_config(FLConfig, DIGITS, ALL_CLIENTS)
    prepared = prepare(cfg)
    settings = cfg.strategy.spec().build().settings

    def run(strategy, kill_evaluation: bool) -> list[dict]:
        fl = FLRun(cfg, strategy, prepared, warm=warm)
        try:
            return run_rounds(ray, fl, cfg.rounds, EVAL_KILL_ROUND if kill_evaluation else None)
        finally:
            fl.shutdown()

    never = SigkillOnce(settings, kill_round=0, victim=VICTIM, marker=str(tmp_path / "unused"))
    uninterrupted = run(never, kill_evaluation=False)
    marker = tmp_path / "killed"
    killed = run(SigkillOnce(settings, TRAIN_KILL_ROUND, VICTIM, str(marker)), kill_evaluation=True)

    assert marker.exists()                                            # the process really died in training
    assert all(r["clients_failed"] == 0 and r["clients_completed"] == 8 for r in uninterrupted + killed)
    assert [r["actor_failures"] for r in uninterrupted] == [0, 0, 0, 0]
    assert killed[TRAIN_KILL_ROUND - 1]["actor_failures"] >= 1       # counted, and its clients ran elsewhere
    # A lost client is re-run from its seed and stored state, so nothing of the death remains.
    for got, want in zip(killed, uninterrupted):
        assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1e-6)
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)
