"""rl.deer.dynamics_detector (deer.change_source=dynamics, optional, our reconstruction): the prediction
error of s' from (s, a) finds a one-quantity shift of the real benchmark dynamics soon after it happens,
stays quiet on the same stream without a shift, survives a checkpoint, and runs inside a DEER RLlib run."""

import numpy as np
import pytest

from rl.deer.detector import DetectorSettings

SETTINGS = dict(window=1000, subseq_len=16, check_every=250, epochs=150, hidden=32, lr=0.01, permutations=99,
                quantile=0.99, confirmations=2, cooldown=2000, seed=0)


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    from rl.loop import torch_threads

    with torch_threads(1):
        yield


def _stream(env_name, magnitudes, steps, seed, shift_every=6000, shift_params=None):
    """Transitions of a uniformly random policy on a real non-stationary env (stamps = env steps)."""
    from rl.envs.nonstationary import make_ns_env

    cfg = {"shift_every": shift_every, "magnitudes": magnitudes, "schedule": "hold", "max_episode_steps": 100}
    if shift_params:
        cfg["shift_params"] = shift_params
    env = make_ns_env(env_name, cfg)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    o, a, o2 = [], [], []
    for _ in range(steps):
        act = env.action_space.sample()
        nxt, _, term, trunc, _ = env.step(act)
        o.append(obs), a.append(act), o2.append(nxt)
        obs = nxt
        if term or trunc:
            obs, _ = env.reset()
    return np.array(o), np.array(a), np.array(o2), np.arange(steps)


@pytest.mark.parametrize("env_name,n_actions,params", [("ns-cartpole", 2, ["length"]), ("ns-acrobot", 3, None)])
def test_dynamics_detector_finds_a_shift_and_stays_quiet_without_one(env_name, n_actions, params):
    from rl.deer.dynamics_detector import DynamicsChangeDetector

    false_alarms = 0
    for seed in (1, 2, 3):
        shifted = DynamicsChangeDetector(DetectorSettings(**SETTINGS), n_actions)
        found = shifted.update(*_stream(env_name, [0.0, 1.0], 8000, seed, shift_params=params))
        assert len(found) == 1, (seed, found, shifted.scores)
        # the change point lies within one window of the true shift at 6000
        assert 6000 - SETTINGS["window"] <= found[0] <= 6000 + SETTINGS["window"], found
        quiet = DynamicsChangeDetector(DetectorSettings(**SETTINGS), n_actions)
        false_alarms += len(quiet.update(*_stream(env_name, [0.0], 8000, seed, shift_params=params)))
        # the shift's score is far above every no-change score of the same stream
        assert max(shifted.scores) > max(quiet.scores) + 1.0
    # measured: 0 of 3 quiet streams alarmed on ns-cartpole, 1 of 3 on ns-acrobot (26 checks each)
    assert false_alarms <= 1


def test_dynamics_detector_box_actions_and_checkpoint_roundtrip():
    from rl.deer.dynamics_detector import DynamicsChangeDetector

    o, a, o2, stamps = _stream("ns-pendulum", [0.0, 1.0], 8000, 3)
    settings = DetectorSettings(**SETTINGS)
    whole = DynamicsChangeDetector(settings, None)
    whole_found = whole.update(o, a, o2, stamps)
    part = DynamicsChangeDetector(settings, None)
    first = part.update(o[:5000], a[:5000], o2[:5000], stamps[:5000])
    resumed = DynamicsChangeDetector.from_state(part.get_state())
    rest = resumed.update(o[5000:], a[5000:], o2[5000:], stamps[5000:])
    assert first + rest == whole_found and len(whole_found) == 1
    np.testing.assert_allclose(resumed.scores, whole.scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same length"):
        whole.update(o[:10], a[:10], o2[:9], stamps[:10])


def test_deer_with_the_dynamics_detector_trains_in_rllib(ray_session):
    from edgeray.config import load_config
    from rl.deer.algorithms import build_algo_config
    from rl.deer.config import ExperimentConfig, variant_of
    from rl.deer.dynamics_detector import DynamicsChangeDetector

    cfg = load_config(ExperimentConfig, None, [
        "env.name=ns-cartpole", "env.shift_params=[length]", "env.magnitudes=[0.0, 2.0]", "env.shift_every=1200",
        "env.max_episode_steps=50", "train.env_steps_per_iter=400", "train.rollout_fragment_length=10",
        "train.num_envs=2", "train.learning_starts=100", "train.train_batch_size=16", "train.hidden=[16]",
        "train.training_intensity=4", "deer.change_source=dynamics", "deer.detector.window=300",
        "deer.detector.subseq_len=10", "deer.detector.check_every=100", "deer.detector.epochs=100",
        "deer.detector.hidden=32", "deer.detector.lr=0.01", "deer.detector.permutations=49",
        "deer.detector.cooldown=600"])
    assert variant_of("deer", cfg) == "deer-dynamics"
    algo = build_algo_config("deer", cfg).build_algo()
    try:
        assert algo.local_replay_buffer.keep_transitions
        results = [algo.train() for _ in range(6)]
        callback = algo.callbacks[0] if isinstance(algo.callbacks, list) else algo.callbacks
        detector = callback.detector
        assert isinstance(detector, DynamicsChangeDetector)
        assert results[-1]["deer"]["change_source"] == "dynamics"
        # it saw every stored transition, stamped in the buffer's order
        assert detector._stamps[-1] == algo.local_replay_buffer.steps_added - 1
        assert len(detector.scores) > 5
        changes = results[-1]["deer"]["change_points"]
        # a 3x longer pole at 1,200 env steps (2 copies x 600) is found, and found after the data before it
        assert any(900 <= c <= 1800 for c in changes), (changes, detector.scores)
        assert algo.local_replay_buffer.change_steps == changes
    finally:
        algo.stop()
