"""RL-CRP with a local Ray: a 2-iteration training run through `edgeray rl train` (the shared
loop), resume, the exported policy loaded without RLlib as the FL selector for 2 rounds, `edgeray
rl eval rl-crp`, bad input, and parity: the env's per-edge latency equals the FL runtime's."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from actors.config import FLConfig
from actors.driver import FLRun, prepare
from edgeray import runs
from edgeray.cli import main
from edgeray.config import load_config
from pipelines.population import save_trace
from pipelines.selection import GreedyLatencySelector
from rl.envs.crp import CRPEnvSection, CRPSimulation

pytestmark = pytest.mark.ray
DIGITS = Path(__file__).resolve().parents[1] / "configs" / "fedavg_digits.yaml"
# the population of configs/fedavg_digits.yaml: 10 clients, 2 edges covering all of them, 5 per round
SMALL = ["--set", "env.num_clients=10", "--set", "env.num_edges=2", "--set", "env.clients_per_round=5",
         "--set", "env.rounds=6", "--set", "train.env_steps_per_iter=120", "--set", "train.minibatch_size=60",
         "--set", "train.num_epochs=2", "--set", "policy.hidden=[16]"]


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    from rl.loop import torch_threads

    with torch_threads(1):
        yield


def _train(method, root, *extra):
    argv = ["rl", "train", method, "--config", "configs/crp.yaml", "--runs-root", str(root), *SMALL, *extra]
    assert main(argv) == 0
    (run_dir,) = [d for d in root.iterdir() if d.name.startswith(f"{method}-")]
    return run_dir


def test_train_resume_export_and_run_the_policy_in_fl(ray_session, tmp_path, capsys):
    run_dir = _train("rl-crp", tmp_path / "crp", "--stop-iters", "2")
    rows = runs.read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2] and rows[-1]["env_steps"] >= 240
    assert sorted(rows[-1]["agent_returns"]) == ["edge_0", "edge_1"]
    assert {"conflicts_per_round", "latency_s", "jain"} <= set(rows[-1])
    assert main(["rl", "train", "rl-crp", "--resume", str(run_dir), "--stop-iters", "3"]) == 0
    assert [r["iteration"] for r in runs.read_metrics(run_dir)] == [1, 2, 3]

    # the export is plain torch weights: the selector loads it, never importing RLlib
    export = run_dir / "checkpoints" / "crp_policy.pt"
    from pipelines.selection.crp import load_export
    meta, policies = load_export(run_dir)
    assert meta["num_edges"] == 2 and meta["use_crp"] and sorted(policies) == [0, 1]
    assert all(not k.startswith("net.") for k in policies[0])
    assert meta["client_bias"] and policies[0]["bias"].shape == (10,)   # configs/crp.yaml: policy.client_bias

    ablation = _train("rl-no-crp", tmp_path / "nocrp", "--stop-iters", "1")
    assert load_export(ablation)[0]["use_crp"] is False
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["rl", "eval", "rl-crp", "--runs", str(run_dir), str(ablation), "--out", str(out)]) == 0
    assert "| rl-crp |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    (setting,) = [k for k in summary if k != "training_plot"]
    assert set(summary[setting]["methods"]) == {"random", "greedy-latency", "oracle", "rl-crp", "rl-no-crp"}
    assert summary[setting]["methods"]["oracle"]["conflicts_per_round"] == 0
    assert (out / f"comparison_{setting}.png").is_file()

    # the checkpoint as the FL selector, 2 rounds of FedAvg on the digits with two overlapping edges
    cfg = load_config(FLConfig, DIGITS, ["model.name=mlp", "selection.method=rl-crp",
                                         f"selection.settings.checkpoint={export}"])
    fl = FLRun(cfg, cfg.strategy.spec(), prepare(cfg))
    try:
        rows = [ray_session.get(fl.aggregator.run_round.remote(r)) for r in (1, 2)]
    finally:
        fl.shutdown()
    assert all(r["clients_selected"] == 2 * 3 - r["conflicts"] for r in rows)   # k = 3 per edge
    assert all(r["clients_completed"] == min(r["clients_selected"], 5) for r in rows)  # the clock keeps 5

    # a checkpoint that does not match the run: one line, exit 2
    capsys.readouterr()
    code = main(["run", "fedavg", "--config", str(DIGITS), "--set", "data.num_clients=12", "--set", "rounds=1",
                 "--set", f"output_dir={tmp_path / 'fl'}", "--set", "selection.method=rl-crp",
                 "--set", f"selection.settings.checkpoint={export}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("edgeray: error: the RL-CRP checkpoint was trained on 10 clients, this run "
                                     "has 12 (data.num_clients)")


def two_fl_rounds(ray_session, cfg, tmp_path):
    """Two rounds of the FL runtime; the run's client profiles and partition sizes are written to
    tmp_path (client_profiles.json, sizes.json) for the env to load. Returns (prepared, rows, sizes)."""
    prepared = prepare(cfg)
    fl = FLRun(cfg, cfg.strategy.spec(), prepared)
    try:
        rows = [ray_session.get(fl.aggregator.run_round.remote(r)) for r in (1, 2)]
    finally:
        fl.shutdown()
    save_trace(prepared.profiles, tmp_path / "client_profiles.json")
    sizes = [len(p) for p in prepared.parts]
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    return prepared, rows, sizes


@pytest.mark.parametrize("rule", ["share", "fail"])
def test_env_latency_equals_the_fl_runtimes_edge_round_time(ray_session, tmp_path, rule):
    cfg = load_config(FLConfig, DIGITS, ["model.name=mlp", "selection.method=greedy-latency",
                                         f"selection.conflict_rule={rule}"])
    prepared, rows, sizes = two_fl_rounds(ray_session, cfg, tmp_path)
    # model bytes per client and direction, from the runtime's own meter (down also carries the
    # instruction, a few hundred bytes of ~1e5: within the tolerance below)
    kept = rows[0]["clients_completed"]
    model_bytes = (rows[0]["bytes_down"] + rows[0]["bytes_up"]) / (2 * kept)
    env = CRPEnvSection(num_clients=10, num_edges=2, edge_overlap=1, clients_per_round=5, seed=cfg.seed,
                        trace=str(tmp_path / "client_profiles.json"), sizes_file=str(tmp_path / "sizes.json"),
                        local_epochs=cfg.strategy.local_epochs, model_bytes=model_bytes, conflict_rule=rule)
    sim = CRPSimulation(env)
    assert sim.k == math.ceil(5 / 2)
    sim.start(cfg.seed)
    greedy = GreedyLatencySelector(sim.population, cfg.seed)
    for row in rows:
        result = sim.play(greedy.select_all(sim.requests(sim.round), sim.round))
        assert result.conflicts == row["conflicts"] > 0
        assert np.allclose([result.edge_round_s[e] for e in (0, 1)], row["edge_round_s"], rtol=0.01)
