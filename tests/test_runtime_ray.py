"""The FL runtime on a real local Ray: pool multiplexing, state store, hierarchy, exchange, faults."""

import time
from pathlib import Path

import numpy as np
import pytest

from edgeray.config import load_config
from actors.config import FLConfig
from actors.driver import FLRun, prepare

pytestmark = pytest.mark.ray
DIGITS = Path(__file__).resolve().parents[1] / "configs" / "fedavg_digits.yaml"


def make_run(overrides=(), strategy=None):
    cfg = load_config(FLConfig, DIGITS, list(overrides))
    return FLRun(cfg, strategy or cfg.strategy.spec(), prepare(cfg)), cfg


def test_virtual_clients_multiplexed_and_state_survives_actor_restart(ray_session):
    ray = ray_session
    fl, cfg = make_run(["data.num_clients=12", "data.min_size=20", "strategy.clients_per_round=12", "strategy.params.keep_optimizer_state=true",
                        "runtime.num_edge_servers=1", "runtime.edge_overlap=0"])
    try:
        actors = fl.pool["default"]
        assert len(actors) == 2
        row = ray.get(fl.aggregator.run_round.remote(1))
        assert row["clients_completed"] == 12 and row["clients_failed"] == 0
        assert ray.get(fl.store.size.remote()) == 12          # 12 virtual clients on 2 actors
        old_pid = ray.get(actors[0].pid.remote())
        ray.kill(actors[0], no_restart=False)                  # the actor dies and Ray restarts it
        deadline, new_pid = time.time() + 60, old_pid
        while new_pid == old_pid:                              # the kill is asynchronous
            assert time.time() < deadline, "actor did not restart"
            try:
                new_pid = ray.get(actors[0].pid.remote(), timeout=10)
            except Exception:
                time.sleep(0.2)
        row = ray.get(fl.aggregator.run_round.remote(2))
        assert row["clients_completed"] == 12
        states = ray.get(fl.store.snapshot.remote())
        assert sorted(states) == list(range(12))
        assert all(s["rounds_trained"] == 2 for s in states.values())  # state outlived the actor
    finally:
        fl.shutdown()


def test_hierarchical_aggregation_equals_flat(ray_session):
    ray = ray_session
    weights = []
    for edges, overlap in ((1, 0), (3, 1)):
        fl, _ = make_run(["data.num_clients=12", "strategy.clients_per_round=9",
                          f"runtime.num_edge_servers={edges}", f"runtime.edge_overlap={overlap}"])
        try:
            row = ray.get(fl.aggregator.run_round.remote(1))
            assert row["clients_completed"] == 9
            weights.append(ray.get(fl.aggregator.global_weights.remote()))
        finally:
            fl.shutdown()
    flat, hierarchical = weights
    for key in flat:
        np.testing.assert_allclose(hierarchical[key], flat[key], rtol=1e-5, atol=1e-6)


def test_per_batch_exchange_with_edge_server(ray_session):
    from fl_helpers import LabelSumExchange
    from pipelines.fedavg.settings import FedAvgSettings

    ray = ray_session
    fl, cfg = make_run(["data.num_clients=6", "strategy.clients_per_round=6", "runtime.num_edge_servers=2"],
                       strategy=LabelSumExchange(FedAvgSettings(batch_size=16)))
    try:
        row = ray.get(fl.aggregator.run_round.remote(1))
        data = prepare(cfg)
        expected = sum(int(data.data.y_train[p].sum()) for p in data.parts)
        assert row["clients_completed"] == 6 and row["train_label_total"] == expected
    finally:
        fl.shutdown()


@pytest.mark.parametrize("victim", ["client_actor", "edge_server"])
def test_actor_killed_mid_round_degrades_the_round_then_recovers(ray_session, victim):
    """A dead ClientActor's clients run again on the live one (counted as actor failures); a dead
    EdgeServerActor fails its clients. Either way the round completes and Ray restarts the actor."""
    ray = ray_session
    fl, _ = make_run(["data.num_clients=12", "strategy.clients_per_round=12", "strategy.local_epochs=30",
                      "runtime.num_edge_servers=2", "runtime.edge_overlap=0", "runtime.inflight_per_actor=1"])
    try:
        pending = fl.aggregator.run_round.remote(1)
        time.sleep(2.0)
        ray.kill(fl.pool["default"][0] if victim == "client_actor" else fl.edges[1], no_restart=False)
        row = ray.get(pending, timeout=300)
        assert row["clients_completed"] + row["clients_failed"] == 12
        if victim == "client_actor":
            assert row["actor_failures"] >= 1 and row["clients_failed"] == 0   # moved, not lost
        else:
            assert row["clients_failed"] >= 1 and row["clients_completed"] >= 1   # degraded, not failed
        row = ray.get(fl.aggregator.run_round.remote(2), timeout=300)          # whole again
        assert row["clients_failed"] == 0 and row["clients_completed"] == 12
    finally:
        fl.shutdown()


def test_deadline_and_dropouts_skip_training(ray_session):
    ray = ray_session
    fl, _ = make_run(["data.num_clients=20", "strategy.clients_per_round=5", "clock.over_selection=2.0",
                      "clock.dropout_prob=0.3", "clock.deadline_s=1.0", "clock.speed_median=100"])
    try:
        row = ray.get(fl.aggregator.run_round.remote(1))
        assert row["clients_selected"] == 10
        assert row["clients_completed"] <= 5
        assert row["clients_completed"] + row["clients_dropout"] + row["clients_straggler"] <= 10
        assert row["clients_dropout"] + row["clients_straggler"] > 0
        assert row["sim_round_s"] <= 1.0 + 1e-3 + 1.0  # deadline plus the edge upload
    finally:
        fl.shutdown()



def test_clients_in_a_row_on_one_actor_do_not_leak_into_each_other(ray_session):
    from fl_helpers import LeakProbe
    from pipelines.fedavg.settings import FedAvgSettings

    ray = ray_session
    fl, _ = make_run(["data.num_clients=6", "strategy.clients_per_round=6", "runtime.num_edge_servers=1",
                      "runtime.edge_overlap=0", "runtime.resource_classes.default.num_actors=1",
                      "runtime.inflight_per_actor=1"], strategy=LeakProbe(FedAvgSettings(batch_size=64)))
    try:
        assert fl.pool_sizes == {"default": 1}
        for rnd in (1, 2):                                  # 12 clients in a row on one actor
            row = ray.get(fl.aggregator.run_round.remote(rnd))
            assert row["clients_completed"] == 6 and row["train_probed"] == 6
            assert row["train_leaked_frozen"] == row["train_leaked_hooks"] == row["train_leaked_grads"] == 0
    finally:
        fl.shutdown()


def test_only_trainable_tensors_are_global_state(ray_session):
    """A bf16 LM base with LoRA: what is downloaded, uploaded and checkpointed is the LoRA + router
    tensors, metered exactly, never the base."""
    from actors.metering import payload_bytes

    ray = ray_session
    cfg = load_config(FLConfig, DIGITS.parent / "fedavg_tiny_lm.yaml", ["data.num_clients=4",
                                                                         "strategy.clients_per_round=4"])
    fl = FLRun(cfg, cfg.strategy.spec(), prepare(cfg))
    try:
        before = ray.get(fl.aggregator.global_weights.remote())
        assert before and all("lora_" in k or "mlp.gate" in k for k in before)
        assert {v.dtype for v in before.values()} == {np.dtype(np.float32)}
        row = ray.get(fl.aggregator.run_round.remote(1))
        per_client = sum(payload_bytes(v) for v in before.values())   # each tensor metered as it is sent
        assert per_client < sum(v.nbytes for v in before.values()) + 256 * len(before)   # plus a pickle header each
        assert 4 * per_client < row["bytes_down"] <= 4 * (per_client + 256)   # + each client's instruction
        after = ray.get(fl.aggregator.global_weights.remote())
        assert row["bytes_up"] >= 4 * sum(v.nbytes for v in after.values())
        assert set(after) == set(before) and any(not np.array_equal(after[k], before[k]) for k in before)
        metrics = ray.get(fl.aggregator.evaluate.remote())
        assert set(metrics) == {"test_accuracy", "test_loss"} and 0 <= metrics["test_accuracy"] <= 1
    finally:
        fl.shutdown()


def test_evaluation_survives_a_client_actor_killed_during_it(ray_session):
    """SIGKILL (not ray.kill) of a ClientActor's process while the pool evaluates: its slice of
    the test set is evaluated again on another actor and the result equals an undisturbed one."""
    import os
    import signal

    ray = ray_session
    fl, _ = make_run(["data.num_clients=4", "strategy.clients_per_round=4", "runtime.num_edge_servers=1",
                      "runtime.edge_overlap=0"])
    try:
        ray.get(fl.aggregator.run_round.remote(1))
        undisturbed = ray.get(fl.aggregator.evaluate.remote())
        victim = fl.pool["default"][0]
        pid = ray.get(victim.pid.remote())
        pending = fl.aggregator.evaluate.remote()
        os.kill(pid, signal.SIGKILL)
        assert ray.get(pending, timeout=300) == pytest.approx(undisturbed)
        row = ray.get(fl.aggregator.run_round.remote(2), timeout=300)          # and training carries on
        assert row["clients_completed"] + row["clients_failed"] == 4
    finally:
        fl.shutdown()
