"""Runtime v2 part 2 on a real local Ray: exchanges on the meter, edge state (SplitFed across two
edges, checkpoint/resume, an edge restart), sticky edges, per-edge selection with conflicts."""

import time
from pathlib import Path

import numpy as np
import pytest

from actors.config import FLConfig
from actors.driver import FLRun, prepare
from edgeray.config import load_config

pytestmark = pytest.mark.ray
DIGITS = Path(__file__).resolve().parents[1] / "configs" / "fedavg_digits.yaml"
SPLIT = ["model.name=mlp", "data.num_clients=6", "data.partition=iid", "strategy.clients_per_round=6",
         "strategy.batch_size=64", "runtime.num_edge_servers=2", "runtime.edge_overlap=0"]


def make_run(overrides, strategy=None):
    from fl_helpers import SplitFedProbe
    from pipelines.fedavg.settings import FedAvgSettings

    cfg = load_config(FLConfig, DIGITS, list(overrides))
    prepared = prepare(cfg)
    strategy = strategy or SplitFedProbe(FedAvgSettings(batch_size=cfg.strategy.batch_size))
    return FLRun(cfg, strategy, prepared), cfg, prepared


def batches(prepared, cid, batch_size=64):
    return -(-len(prepared.parts[cid]) // batch_size)


def test_splitfed_tops_averaged_across_two_edges_and_exchanges_metered(ray_session, tmp_path):
    import torch

    from actors.metering import payload_bytes
    from fl_helpers import SplitFedProbe

    ray = ray_session
    fl, cfg, prepared = make_run(SPLIT)
    try:
        before = ray.get(fl.aggregator.global_weights.remote())
        row = ray.get(fl.aggregator.run_round.remote(1))
        after = ray.get(fl.aggregator.global_weights.remote())
        assert row["clients_completed"] == 6 and row["train_edge_rounds"] == 2   # both edges served
        deltas = [0.001 * (c + 1) * batches(prepared, c) for c in range(6)]
        np.testing.assert_allclose(after[SplitFedProbe.TOP], before[SplitFedProbe.TOP] + np.mean(deltas), rtol=1e-5)
        n_batches = sum(batches(prepared, c) for c in range(6))
        assert row["exchange_calls"] == n_batches
        # every request (a float and the labels) and every reply is on the meter, and on the clock
        requests = sum(payload_bytes({"delta": 0.001 * (c + 1), "labels": prepared.data.y_train[
            prepared.parts[c][:64]]}) for c in range(6) for _ in range(batches(prepared, c)))
        update = sum(payload_bytes({k: v for k, v in before.items() if k != SplitFedProbe.TOP})
                     for _ in range(6))
        assert abs(row["bytes_up"] - update - requests) < 64 * n_batches + 2048
        assert row["bytes_down"] > 6 * sum(payload_bytes(v) for v in before.values()) + n_batches * payload_bytes(
            {"ok": True}) - 1
        assert len(row["edge_round_s"]) == 2 and max(row["edge_round_s"]) <= row["sim_round_s"]
        ray.get(fl.aggregator.save_checkpoint.remote(str(tmp_path / "round_00001.pt"), 1, {}))
        ckpt = torch.load(tmp_path / "round_00001.pt", weights_only=False)
        assert ckpt["server_state"]["observed"] == [[1, 6, 6]]          # the strategy heard how the round went
        assert {key[1] for key in ckpt["client_states"] if isinstance(key, tuple)} == {0, 1}   # both edges' state
    finally:
        fl.shutdown()


def test_edge_state_survives_resume_and_equals_an_uninterrupted_run(ray_session, tmp_path):
    ray = ray_session
    fl, _, _ = make_run(SPLIT)
    try:
        full = [ray.get(fl.aggregator.run_round.remote(r)) for r in (1, 2, 3)]
        full_weights = ray.get(fl.aggregator.global_weights.remote())
    finally:
        fl.shutdown()
    fl, _, _ = make_run(SPLIT)
    try:
        part = [ray.get(fl.aggregator.run_round.remote(r)) for r in (1, 2)]
        ray.get(fl.aggregator.save_checkpoint.remote(str(tmp_path / "round_00002.pt"), 2, {}))
    finally:
        fl.shutdown()
    fl, _, _ = make_run(SPLIT)                      # a new run: new actors, new store
    try:
        assert ray.get(fl.aggregator.load_checkpoint.remote(str(tmp_path))) == 2
        part.append(ray.get(fl.aggregator.run_round.remote(3)))
        resumed = ray.get(fl.aggregator.global_weights.remote())
    finally:
        fl.shutdown()
    for key in full_weights:
        np.testing.assert_allclose(resumed[key], full_weights[key], rtol=1e-6, atol=1e-6)
    keep = ("clients_completed", "bytes_up", "bytes_down", "exchange_calls", "sim_time_s", "train_edge_rounds",
            "train_edge_received")   # exchanges of parallel clients arrive in any order: floats approx
    assert [{k: r[k] for k in keep} for r in part] == [pytest.approx({k: r[k] for k in keep}) for r in full]
    assert full[-1]["train_edge_rounds"] == 6      # 2 edges x 3 rounds: the count came back from the checkpoint


def test_a_restarted_edge_recovers_its_state(ray_session):
    ray = ray_session
    fl, _, _ = make_run(SPLIT)
    try:
        first = ray.get(fl.aggregator.run_round.remote(1))
        old_pid = ray.get(fl.edges[1].pid.remote())
        ray.kill(fl.edges[1], no_restart=False)
        deadline, pid = time.time() + 60, old_pid
        while pid == old_pid:
            assert time.time() < deadline, "edge did not restart"
            try:
                pid = ray.get(fl.edges[1].pid.remote(), timeout=10)
            except Exception:
                time.sleep(0.2)
        second = ray.get(fl.aggregator.run_round.remote(2))
        assert second["clients_completed"] == 6 and second["clients_failed"] == 0
        assert second["train_edge_rounds"] == 4    # the restarted edge counted its earlier round too
        assert second["train_edge_received"] == pytest.approx(2 * first["train_edge_received"])
    finally:
        fl.shutdown()


def test_sticky_edges_keep_every_client_at_home(ray_session):
    from pipelines.fedavg.settings import FedAvgSettings
    from fl_helpers import SplitFedProbe

    ray = ray_session
    fl, _, prepared = make_run(["data.num_clients=12", "strategy.clients_per_round=12", "runtime.num_edge_servers=3",
                                "runtime.edge_overlap=2", "runtime.sticky_edges=true", "model.name=mlp"],
                               strategy=SplitFedProbe(FedAvgSettings(batch_size=64)))
    try:
        row = ray.get(fl.aggregator.run_round.remote(1))
        homes = [prepared.coverage[c][0] for c in range(12)]
        assert homes == [c % 3 for c in range(12)] and row["clients_completed"] == 12
        assert row["train_edge_rounds"] == 3      # every edge served its 4 home clients
    finally:
        fl.shutdown()


@pytest.mark.parametrize("method, rule", [("random", "share"), ("random", "fail"), ("oracle", "share")])
def test_per_edge_selection_counts_conflicts(ray_session, method, rule):
    ray = ray_session
    fl, _, _ = make_run(["data.num_clients=10", "strategy.clients_per_round=8", "runtime.num_edge_servers=2",
                         "runtime.edge_overlap=1", f"selection.method={method}", f"selection.conflict_rule={rule}",
                         "model.name=mlp"], strategy=None)
    try:
        rows = [ray.get(fl.aggregator.run_round.remote(r)) for r in (1, 2, 3)]
        conflicts = sum(r["conflicts"] for r in rows)
        if method == "oracle":
            assert conflicts == 0 and all(r["clients_selected"] == 8 for r in rows)
        else:   # every client is covered by both edges: each picks 4 of 10, so conflicts happen
            assert conflicts > 0
            assert all(r["clients_selected"] == 8 - r["conflicts"] for r in rows)   # a shared client trains once
        assert all(r["clients_completed"] == r["clients_selected"] for r in rows)
    finally:
        fl.shutdown()


def test_large_exchanges_on_one_node_go_through_shared_memory_and_leave_nothing(ray_session):
    """A 256 kB payload to an edge on the same node travels in shared memory: the reply is exact,
    the bytes are metered as for any exchange, and no segment outlives the run."""
    import glob

    from actors.metering import payload_bytes
    from actors.shm_channel import SHM_THRESHOLD, segment_prefix
    from fl_helpers import BigExchange
    from pipelines.fedavg.settings import FedAvgSettings

    ray = ray_session
    strategy = BigExchange(FedAvgSettings(batch_size=256))
    fl, _, prepared = make_run(["data.num_clients=2", "strategy.clients_per_round=2", "runtime.num_edge_servers=1",
                                "runtime.edge_overlap=0", "model.name=mlp"], strategy=strategy)
    try:
        row = ray.get(fl.aggregator.run_round.remote(1))
        assert row["clients_completed"] == 2 and row["train_exact"] == 1.0
        payload = BigExchange.payload(0)
        assert payload_bytes(payload) >= SHM_THRESHOLD
        calls = sum(-(-len(prepared.parts[c]) // 256) for c in range(2))
        assert row["exchange_calls"] == calls and row["bytes_up"] >= calls * payload_bytes(payload)
        assert glob.glob(f"/dev/shm/{segment_prefix(fl.run)}-*")        # in use while the run is open
    finally:
        fl.shutdown()
    assert not glob.glob(f"/dev/shm/{segment_prefix(fl.run)}-*")
