"""Virtual clock and topology (no Ray)."""

import json

import numpy as np
import pytest

from actors.clock import VirtualClock
from pipelines.population import ClientProfile, load_trace, modulo_coverage, sample_profiles, save_trace
from actors.topology import assign_edges, plan_pool
from edgeray.errors import UserError


def _profiles(speeds, up=8.0, down=8.0, avail=1.0):
    return [ClientProfile(i, s, up, down, avail) for i, s in enumerate(speeds)]


def test_client_time_is_download_compute_upload():
    clock = VirtualClock(_profiles([100.0]), seed=0)
    t = clock.timing(1, 0, work_examples=500, down_bytes=1e6, up_bytes=2e6)
    assert t.download_s == pytest.approx(1.0) and t.compute_s == pytest.approx(5.0)
    assert t.upload_s == pytest.approx(2.0) and t.total_s == pytest.approx(8.0)


def test_deadline_overselection_keeps_fastest_target():
    speeds = [100, 50, 25, 10, 200]            # compute times 1, 2, 4, 10, 0.5 s for 100 examples
    clock = VirtualClock(_profiles(speeds), seed=0, deadline_s=5.0, over_selection=1.5)
    invited = list(range(5))
    assert clock.invite_count(2) == 3
    zero = {c: 0.0 for c in invited}
    plan = clock.plan_round(1, invited, target=2, work={c: 100.0 for c in invited}, down_bytes=zero, up_bytes=zero)
    assert plan.kept == [0, 4]                     # the two earliest finishers
    assert plan.timings[3].status == "straggler"   # 10 s > deadline
    assert plan.timings[1].status == plan.timings[2].status == "surplus"
    assert plan.sim_time_s == pytest.approx(1.0)   # round closes when the 2nd report arrives


def test_round_waits_for_deadline_when_too_few_finish():
    clock = VirtualClock(_profiles([10, 10, 100]), seed=0, deadline_s=5.0)
    zero = {c: 0.0 for c in range(3)}
    plan = clock.plan_round(1, [0, 1, 2], target=3, work={c: 100.0 for c in range(3)}, down_bytes=zero, up_bytes=zero)
    assert plan.kept == [2] and plan.count("straggler") == 2
    assert plan.sim_time_s == pytest.approx(5.0)


def test_clients_in_turn_take_the_sum_of_their_times_per_edge():
    clock = VirtualClock(_profiles([100.0, 50.0, 25.0]), seed=0)
    kept = [clock.timing(1, c, work_examples=100, down_bytes=0, up_bytes=0) for c in range(3)]   # 1, 2, 4 s
    assert clock.round_time(kept, target=3) == pytest.approx(4.0)                        # in parallel: slowest
    assert clock.round_time(kept, target=3, edge_upload_s=0.5, edge_spans=[1.0 + 4.0, 2.0]) == pytest.approx(5.5)


def test_sequential_split_learning_declares_its_clients_take_turns():
    from pipelines.split.settings import SplitSettings
    from pipelines.split.strategy import SplitLearning
    from pipelines.fedavg.strategy import FedAvg

    assert SplitLearning(SplitSettings(mode="sequential")).clients_take_turns()
    assert not SplitLearning(SplitSettings(mode="splitfed")).clients_take_turns()
    assert not FedAvg().clients_take_turns()


def test_dropouts_and_availability_rates_are_seeded():
    n = 4000
    clock = VirtualClock(_profiles([100.0] * n, avail=0.7), seed=3, dropout_prob=0.2)
    online = clock.available(1)
    assert abs(len(online) / n - 0.7) < 0.03
    assert online == VirtualClock(_profiles([100.0] * n, avail=0.7), seed=3).available(1)
    assert online != clock.available(2)
    zero = {c: 0.0 for c in range(n)}
    plan = clock.plan_round(1, list(range(n)), target=n, work=zero, down_bytes=zero, up_bytes=zero)
    assert abs(plan.count("dropout") / n - 0.2) < 0.03


def test_sampled_profiles_and_trace_round_trip(tmp_path):
    profiles = sample_profiles(50, seed=1, min_availability=0.5, resource_classes={"small": 0.8, "big": 0.2})
    assert profiles == sample_profiles(50, seed=1, min_availability=0.5, resource_classes={"small": 0.8, "big": 0.2})
    speeds = np.array([p.compute_speed for p in profiles])
    assert speeds.min() > 0 and speeds.max() / speeds.min() > 2          # heterogeneous
    assert {p.resource_class for p in profiles} == {"small", "big"}
    save_trace(profiles, tmp_path / "t.json")
    assert load_trace(tmp_path / "t.json", 50) == profiles
    csv = tmp_path / "t.csv"
    csv.write_text("client_id,compute_speed,uplink_mbps,downlink_mbps,availability\n0,10,1,2,0.5\n1,20,1,2,1\n")
    loaded = load_trace(csv, 2)
    assert loaded[1].compute_speed == 20 and loaded[0].resource_class == "default"


@pytest.mark.parametrize("content, suffix, message", [
    ("client_id,compute_speed\n0,1\n", ".csv", "lacks uplink_mbps"),
    ("client_id,compute_speed,uplink_mbps,downlink_mbps,availability\n0,x,1,1,1\n", ".csv", "row 0"),
    ("client_id,compute_speed,uplink_mbps,downlink_mbps,availability\n0,1,1,1,2\n", ".csv", "availability in [0, 1]"),
    (json.dumps([{"client_id": 0, "compute_speed": 1, "uplink_mbps": 1, "downlink_mbps": 1, "availability": 1}]),
     ".json", "no row for 1 of 2 clients"),
    ("", ".txt", "must be .csv or .json"),
])
def test_bad_traces(tmp_path, content, suffix, message):
    path = tmp_path / f"trace{suffix}"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_trace(path, 2)
    assert message in str(err.value)


def test_plan_pool_from_resources():
    one = {"num_cpus": 1, "num_gpus": 0, "num_actors": 0}
    assert plan_pool({"default": one}, 2, 0) == {"default": 2}
    assert plan_pool({"default": {**one, "num_cpus": 0.5}}, 2, 0) == {"default": 4}
    mixed = {"big": {"num_cpus": 1, "num_gpus": 1, "num_actors": 0},
             "small": {"num_cpus": 1, "num_gpus": 0.25, "num_actors": 0}}
    assert plan_pool(mixed, 16, 2) == {"big": 1, "small": 4}
    assert plan_pool({"big": {**one, "num_actors": 3}}, 2, 0) == {"big": 3}
    with pytest.raises(UserError, match="asks 1 GPU per actor but the cluster has 0 GPUs"):
        plan_pool({"big": {"num_cpus": 1, "num_gpus": 1, "num_actors": 0}}, 2, 0)


def test_edge_coverage_overlap_and_balanced_assignment():
    coverage = modulo_coverage(30, 3, overlap=1, seed=0)
    assert all(len(c) == 2 and c[0] != c[1] for c in coverage)
    assert all(cid % 3 in c for cid, c in enumerate(coverage))
    load = assign_edges(list(range(30)), coverage, 3)
    assert sorted(c for cs in load.values() for c in cs) == list(range(30))
    assert all(cid in edge_clients and e in coverage[cid] for e, edge_clients in load.items() for cid in edge_clients)
    assert max(map(len, load.values())) - min(map(len, load.values())) <= 1
    assert modulo_coverage(10, 1, overlap=0, seed=0) == [[0]] * 10
    with pytest.raises(UserError, match="edge_overlap=3 must be <"):
        modulo_coverage(10, 3, overlap=3, seed=0)
