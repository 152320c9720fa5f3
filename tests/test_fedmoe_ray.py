"""FedAvg-MoE, HFedMoE and FedAlign-MoE through `edgeray run` on the session's local Ray: two
rounds each on the synthetic topic task, with the MoE telemetry in every metrics row."""

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["fedavg-moe", "hfedmoe", "fedalign-moe"])
def test_two_rounds_through_edgeray_run(ray_session, tmp_path, capsys, method):
    from actors.cli import main

    code = main([method, "--config", str(ROOT / "configs" / "fedmoe_topics.yaml"), "--no-progress",
                 "--set", "rounds=2", "--set", "data.num_clients=4", "--set", "strategy.clients_per_round=4",
                 "--set", "data.args.train_size=256", "--set", "data.args.test_size=64", "--set", "data.alpha=0.5",
                 "--set", "data.min_size=8", "--set", f"output_dir={tmp_path}",
                 "--set", "runtime.resource_classes.default.num_actors=1"])
    assert code == 0
    run_dir = next(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["final_round"] == 2 and summary["clients_failed_total"] == 0
    assert summary["final_test_accuracy"] > 0.25                     # 4 balanced-ish topics: above chance
    for row in rows[1:]:
        assert len(row["train_expert_load"]) == 8 and len(row["train_routing_entropy_per_client"]) == 4
        assert 0 < row["train_routing_entropy"] <= math.log(8) + 1e-6
        assert row["train_budget_violations"] == 0 and row["bytes_up"] > 0
        if method == "hfedmoe":
            assert all(n <= 16 for n in row["train_experts_uploaded_per_client"])
        if method == "fedalign-moe":
            assert row["train_expert_slices_held"] >= row["train_expert_slices_aligned"] > 0
