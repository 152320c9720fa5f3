"""DEER on RLlib: DQN/SAC smoke runs with the DEER buffer, learner and callback; CLI train/resume/eval
through the shared loop (rl.loop)."""

import json

import pytest
import yaml

from edgeray.config import load_config
from edgeray.errors import UserError

TINY = ["train.env_steps_per_iter=200", "train.rollout_fragment_length=20", "train.learning_starts=60",
        "train.train_batch_size=16", "train.hidden=[16]", "train.training_intensity=1.6",
        "train.buffer_capacity=2000", "env.shift_every=150", "env.max_episode_steps=50",
        "deer.detector.window=50", "deer.detector.subseq_len=8", "deer.detector.check_every=50", "deer.detector.cooldown=100",
        # a threshold no score can miss: every check after the cooldown fires, so the
        # snapshot / DoE / pre-post priority path runs inside the smoke test
        "deer.detector.threshold=-1000000000.0"]


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    from rl.loop import torch_threads

    with torch_threads(1):  # as train_run does (train.torch_threads); restored afterwards
        yield


def _tiny(env, *extra):
    from rl.deer.config import ExperimentConfig
    return load_config(ExperimentConfig, None, [f"env.name={env}", *TINY, *extra])


@pytest.mark.parametrize("env", ["ns-cartpole", "ns-pendulum"])
def test_deer_trains_two_iterations(ray_session, env):
    from rl.deer.algorithms import build_algo_config

    algo = build_algo_config("deer", _tiny(env)).build_algo()
    try:
        results = [algo.train() for _ in range(2)]
        buffer = algo.local_replay_buffer
        assert type(buffer).__name__ == "DEERPrioritizedEpisodeReplayBuffer"
        assert buffer.num_samples > 0 and buffer.num_samples == buffer.num_priority_updates
        assert buffer.change_steps, "the forced detector should have fired"
        assert results[-1]["deer"]["change_points"] == buffer.change_steps
        assert all(r.get() for r in algo.learner_group.foreach_learner(lambda learner: learner.has_q_snapshot()))
        learner_stats = results[-1]["learners"]["default_policy"]
        assert "deer_doe_abs_mean" in learner_stats and "deer_doe_raw_post" in learner_stats
        # the frozen snapshot is from the ring, taken at or before the change point, not at detection
        (frozen_at,) = {r.get() for r in algo.learner_group.foreach_learner(lambda learner: learner.frozen_at)}
        assert frozen_at <= buffer.change_steps[-1] < results[-1]["env_runners"]["num_env_steps_sampled_lifetime"]
        assert results[-1]["env_runners"]["num_env_steps_sampled_lifetime"] >= 400
    finally:
        algo.stop()


def _post_share_sampled_vs_stored(algo, change):
    """Share of post-change transitions in a large sample from the live buffer, and in the buffer."""
    import numpy as np
    from rl.deer.priorities import PHASE_POST

    buffer = algo.local_replay_buffer
    batch = buffer.sample(3000, n_step=1, beta=0.4, gamma=0.99)
    sampled = np.mean([int(e.extra_model_outputs["deer_phase"][0]) == PHASE_POST for e in batch])
    buffer.update_priorities(np.ones(len(batch)))  # the strict sample -> update alternation
    stamps = buffer._added_at[buffer._added_at >= 0]
    return float(sampled), float(np.mean(stamps >= change))


def test_deer_priorities_reach_the_buffer_after_a_marked_change(ray_session):
    """A real RLlib run, told the true shift (oracle): after the change DEER's rules boost post-change
    and suppress pre-change transitions, so the sampled distribution moves towards post-change
    data; the same run with both rules off (plain |TD|) samples them about as often as stored."""
    from rl.deer.algorithms import build_algo_config

    shares = {}
    for rules in (["deer.priority.post_rule=td_plus_doe", "deer.priority.pre_rule=td_over_doe",
                   "deer.priority.doe_weight=20.0", "deer.priority.pre_doe_weight=20.0"],
                  ["deer.priority.post_rule=td_only", "deer.priority.pre_rule=td_only"]):
        cfg = _tiny("ns-cartpole", "deer.change_source=oracle", "env.shift_every=400", "env.magnitudes=[0.0, 2.0]",
                    "train.training_intensity=8.0", *rules)
        algo = build_algo_config("deer", cfg).build_algo()
        try:
            results = [algo.train() for _ in range(4)]
            assert results[-1]["deer"]["change_points"] == [400]
            # the snapshot frozen for DoE is the one taken at the boundary (iteration end = step 400)
            assert results[1]["deer"]["snapshot_steps"] == [400]
            shares[rules[0]] = _post_share_sampled_vs_stored(algo, 400)
        finally:
            algo.stop()
    deer_sampled, stored = shares["deer.priority.post_rule=td_plus_doe"]
    plain_sampled, plain_stored = shares["deer.priority.post_rule=td_only"]
    assert deer_sampled > stored + 0.1, shares
    assert deer_sampled > plain_sampled + 0.1, shares


def test_baselines_use_stock_buffers(ray_session):
    from rl.deer.algorithms import build_algo_config

    assert build_algo_config("per", _tiny("ns-cartpole")).replay_buffer_config["type"] == "PrioritizedEpisodeReplayBuffer"
    assert build_algo_config("uniform", _tiny("ns-pendulum")).replay_buffer_config["type"] == "EpisodeReplayBuffer"
    with pytest.raises(UserError):
        build_algo_config("her", _tiny("ns-cartpole"))


def test_cli_train_resume_eval(ray_session, tmp_path):
    from rl.cli import main

    sets = [arg for item in TINY for arg in ("--set", item)]
    assert main(["train", "deer", "--env", "ns-cartpole", *sets, "--set", "train.checkpoint_every=1",
                 "--stop-iters", "1", "--runs-root", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "checkpoints" / "latest").is_dir() and (run_dir / "checkpoints" / "replay_buffer.pkl").is_file()
    info = json.loads((run_dir / "run.json").read_text())
    # the same keys as an FL run's run.json (edgeray.runs)
    assert set(info) == {"run_id", "kind", "method", "argv", "created"}
    assert (info["kind"], info["method"], info["run_id"]) == ("rl", "deer", run_dir.name)
    assert run_dir.name.startswith("deer-ns-cartpole-s0-") and info["argv"][:4] == ["edgeray", "rl", "train", "deer"]
    assert "method" not in yaml.safe_load((run_dir / "config.yaml").read_text())
    # a row logged after the last checkpoint (a crash before the next save) is dropped on resume
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"iteration": 2, "env_steps": -1}) + "\n")
    assert main(["train", "deer", "--resume", str(run_dir), "--stop-iters", "2"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert json.loads((run_dir / "run.json").read_text()) == info
    assert json.loads((run_dir / "checkpoints" / "progress.json").read_text())["iteration"] == 2
    # the resumed run kept its buffer (stamps, change points) and the env schedule position
    assert rows[1]["env_steps"] >= 400 and rows[1]["deer"]["change_points"][:1] == rows[0]["deer"]["change_points"][:1]
    assert rows[1]["shift_steps"] and rows[1]["shift_steps"][0] == 150
    out = tmp_path / "eval"
    assert main(["eval", "deer", "--runs", str(run_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_env"]["ns-cartpole"]["deer"]["seeds"] == 1
    assert (out / "returns_ns-cartpole.png").stat().st_size > 0
