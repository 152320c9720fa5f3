"""DEER priority rules (pure torch) and the DEER replay buffer (RLlib class, no Ray runtime)."""

import numpy as np
import pytest
import torch

from rl.deer.priorities import PHASE_NO_CHANGE, PHASE_POST, PHASE_PRE, PrioritySettings, deer_priorities


def test_no_change_is_plain_per():
    td = torch.tensor([0.5, 2.0])
    doe = torch.tensor([3.0, 3.0])
    p = deer_priorities(td, doe, torch.tensor([PHASE_NO_CHANGE] * 2), PrioritySettings(epsilon=0.01))
    assert torch.allclose(p, td + 0.01)


def test_priorities_differ_before_and_after_a_change():
    settings = PrioritySettings(doe_weight=2.0, pre_doe_weight=1.0, epsilon=0.0)
    td = torch.tensor([1.0, 1.0, 1.0])
    doe = torch.tensor([0.5, 0.5, 0.5])
    phase = torch.tensor([PHASE_NO_CHANGE, PHASE_PRE, PHASE_POST])
    p = deer_priorities(td, doe, phase, settings)
    assert p.tolist() == pytest.approx([1.0, 1.0 / 1.5, 1.0 + 2.0 * 0.5])
    # post-shift transitions the shift affected are favoured, outdated pre-shift ones suppressed
    assert p[2] > p[0] > p[1]


def test_pre_rule_variants_and_ablations():
    td, doe = torch.tensor([2.0]), torch.tensor([1.0])
    pre, post = torch.tensor([PHASE_PRE]), torch.tensor([PHASE_POST])
    exp_rule = PrioritySettings(pre_rule="td_exp_doe", pre_doe_weight=0.5, epsilon=0.0)
    assert deer_priorities(td, doe, pre, exp_rule).item() == pytest.approx(2.0 * np.exp(-0.5))
    off = PrioritySettings(pre_rule="td_only", post_rule="td_only", epsilon=0.0)
    assert deer_priorities(td, doe, pre, off).item() == deer_priorities(td, doe, post, off).item() == 2.0
    with pytest.raises(ValueError):
        deer_priorities(td, doe, pre, PrioritySettings(pre_rule="nope"))


def test_larger_doe_moves_priorities_apart():
    settings = PrioritySettings(epsilon=0.0)
    td = torch.ones(2)
    small, large = torch.tensor([0.1, 0.1]), torch.tensor([2.0, 2.0])
    phases = torch.tensor([PHASE_PRE, PHASE_POST])
    p_small = deer_priorities(td, small, phases, settings)
    p_large = deer_priorities(td, large, phases, settings)
    assert p_large[1] - p_large[0] > p_small[1] - p_small[0] > 0


# ---------------------------------------------------------------- buffer

def _episodes(n_episodes=4, length=25, seed=0):
    import gymnasium as gym
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    rng = np.random.default_rng(seed)
    obs_space, act_space = gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(2)
    out = []
    for _ in range(n_episodes):
        ep = SingleAgentEpisode(observations=[rng.random(3).astype(np.float32)],
                                observation_space=obs_space, action_space=act_space)
        for t in range(length):
            ep.add_env_step(rng.random(3).astype(np.float32), int(rng.integers(2)), float(t),
                            terminated=t == length - 1)
        ep.to_numpy()
        out.append(ep)
    return out


def _buffer():
    from rl.deer.buffer import DEERPrioritizedEpisodeReplayBuffer
    return DEERPrioritizedEpisodeReplayBuffer(capacity=1000, alpha=0.6)


def test_buffer_streams_rewards_and_tags_phases():
    buffer = _buffer()
    buffer.add(_episodes(2))
    rewards = buffer.drain_rewards()
    assert len(rewards) == 50 and rewards[:3].tolist() == [0.0, 1.0, 2.0]
    assert len(buffer.drain_rewards()) == 0
    batch = buffer.sample(16, n_step=1, beta=0.4, gamma=0.99, sample_episodes=True)
    assert {int(e.extra_model_outputs["deer_phase"][0]) for e in batch} == {PHASE_NO_CHANGE}
    buffer.update_priorities(np.ones(16))

    buffer.mark_change(50)  # everything added so far is "pre"
    buffer.add(_episodes(2, seed=1))
    batch = buffer.sample(200, n_step=1, beta=0.4, gamma=0.99)
    phases = np.array([int(e.extra_model_outputs["deer_phase"][0]) for e in batch])
    stamps = buffer._added_at[np.asarray(buffer._last_sampled_indices)]
    assert set(phases) == {PHASE_PRE, PHASE_POST}
    assert np.all((stamps < 50) == (phases == PHASE_PRE))
    buffer.update_priorities(np.ones(200))


def test_every_sample_needs_its_priority_update():
    buffer = _buffer()
    buffer.add(_episodes(2))
    buffer.sample(8, n_step=1, beta=0.4)
    with pytest.raises(RuntimeError, match="update_priorities"):
        buffer.sample(8, n_step=1, beta=0.4)
    buffer.update_priorities(np.ones(8))
    buffer.sample(8, n_step=1, beta=0.4)
    buffer.update_priorities(np.ones(8))
    assert buffer.num_samples == buffer.num_priority_updates == 2


def test_priorities_steer_sampling():
    buffer = _buffer()
    buffer.add(_episodes(2))
    buffer.mark_change(25)
    for _ in range(30):  # post-change items get priority 10, pre-change ones 0.01
        batch = buffer.sample(32, n_step=1, beta=0.4)
        phases = np.array([int(e.extra_model_outputs["deer_phase"][0]) for e in batch])
        buffer.update_priorities(np.where(phases == PHASE_POST, 10.0, 0.01))
    batch = buffer.sample(400, n_step=1, beta=0.4)
    phases = np.array([int(e.extra_model_outputs["deer_phase"][0]) for e in batch])
    assert (phases == PHASE_POST).mean() > 0.8


def test_buffer_state_round_trip():
    buffer = _buffer()
    buffer.add(_episodes(2))
    buffer.mark_change(30)
    buffer.detector_state = {"x": 1}
    restored = _buffer()
    restored.set_state(buffer.get_state())
    assert restored.change_steps == [30] and restored.steps_added == 50 and restored.detector_state == {"x": 1}
    assert np.array_equal(restored._added_at, buffer._added_at)
