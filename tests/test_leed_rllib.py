"""LEED on RLlib with a local Ray: a 2-iteration smoke run with 3 agents through `edgeray rl train`
(the shared loop), a refinement round, resume from the checkpoint, the baselines, the shared-policy
option, and `edgeray rl eval leed` (table, summary, plots)."""

import json

import pytest
import yaml

from edgeray import runs
from edgeray.cli import main

SMALL = ["--set", "env.num_agents=3", "--set", "env.max_steps=40", "--set", "train.env_steps_per_iter=200",
         "--set", "train.minibatch_size=100", "--set", "train.num_epochs=2", "--set", "policy.hidden=[32]"]


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    from rl.loop import torch_threads

    with torch_threads(1):
        yield


def _train(method, root, *extra):
    argv = ["rl", "train", method, "--config", "configs/leed.yaml", "--runs-root", str(root), *SMALL, *extra]
    assert main(argv) == 0
    (run_dir,) = [d for d in root.iterdir() if d.name.startswith(f"{method}-")]
    return run_dir


def test_leed_smoke_run_refines_resumes_and_evaluates(ray_session, tmp_path, capsys):
    root = tmp_path / "runs"
    run_dir = _train("leed", root / "leed", "--stop-iters", "2", "--set", "expert.refine_every=1")
    rows = runs.read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[-1]["env_steps"] >= 400
    assert sorted(rows[-1]["agent_returns"]) == ["Agent_0", "Agent_1", "Agent_2"]
    assert rows[0]["expert_weight"] == pytest.approx(1.0) and rows[1]["expert_weight"] == pytest.approx(0.95)
    assert rows[0]["expert_nll"] > 0
    leed = rows[-1]["leed"]
    assert leed["backend"] == "planner" and leed["valid_share"] == 1.0 and leed["round"] == 2
    refinement = leed["refinement"]
    assert refinement["round"] == 2
    assert refinement["kept_previous"] == (refinement["candidate_return"] < refinement["previous_return"])
    assert (run_dir / "demos" / "round_000.json").is_file() and (run_dir / "demos" / "round_002.json").is_file()
    assert (run_dir / "checkpoints" / "leed_generator.pkl").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["env"]["num_agents"] == 3

    assert main(["rl", "train", "leed", "--resume", str(run_dir), "--stop-iters", "3"]) == 0
    rows = runs.read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[-1]["expert_weight"] == pytest.approx(0.95 ** 2)  # the schedule continued from the checkpoint
    assert rows[-1]["leed"]["round"] == 3 and rows[-1]["env_steps"] > rows[1]["env_steps"]

    ippo_dir = _train("ippo", root / "ippo", "--stop-iters", "2")
    ippo_rows = runs.read_metrics(ippo_dir)
    assert "expert_nll" not in ippo_rows[-1] and "leed" not in ippo_rows[-1]

    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["rl", "eval", "leed", "--runs", str(run_dir), str(ippo_dir), "--out", str(out)]) == 0
    assert "| grid-3 | leed | 1 |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["grid-3"]["methods"]) == {"leed", "ippo"}
    assert (out / "returns_grid-3.png").is_file()


def test_bc_ppo_pretrains_and_shared_policy_trains(ray_session, tmp_path):
    bc_dir = _train("bc-ppo", tmp_path / "bc", "--stop-iters", "1", "--set", "expert.bc_pretrain_steps=150")
    row = runs.read_metrics(bc_dir)[-1]
    bc = row["leed"]["bc"]
    assert all(bc["bc_nll_after"][m] < bc["bc_nll_before"][m] for m in bc["bc_nll_before"])
    # the first rollouts already come from the cloned policy: the vehicles arrive (untrained,
    # they rarely do, and an episode's return summed over the agents is negative)
    assert row["episode_return_mean"] > 0
    assert row["expert_weight"] == 0.0 and "expert_nll" not in row

    shared_dir = _train("leed", tmp_path / "shared", "--stop-iters", "1", "--set", "policy.sharing=shared",
                        "--set", "env.num_agents=6")
    row = runs.read_metrics(shared_dir)[-1]
    assert sorted(row["agent_returns"]) == [f"Agent_{i}" for i in range(6)] and row["expert_nll"] > 0


def test_leed_trains_on_sumo_with_a_remote_env_runner(ray_session, tmp_path):
    try:
        import libsumo  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"libsumo cannot load here ({exc}); `pip install eclipse-sumo libsumo`")
    run_dir = _train("leed", tmp_path / "sumo", "--stop-iters", "2", "--set", "env.backend=sumo",
                     "--set", "train.num_env_runners=1", "--set", "env.grid_rows=3", "--set", "env.grid_cols=3",
                     "--set", "env.min_trip_hops=2")
    rows = runs.read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2] and rows[-1]["leed"]["expert_arrived_share"] == 1.0
    assert rows[-1]["episode_return_mean"] is not None
