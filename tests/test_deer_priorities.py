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


# ---------------------------------------------------------------- DoE: Bellman residual of a frozen snapshot

def _exact_q(next_state, rewards, policy, gamma):
    """Q of a fixed deterministic policy on a deterministic tabular MDP (exact linear solve)."""
    n_s, n_a = rewards.shape
    # V = R_pi + gamma P_pi V
    p_pi = np.zeros((n_s, n_s))
    for s in range(n_s):
        p_pi[s, next_state[s, policy[s]]] = 1.0
    v = np.linalg.solve(np.eye(n_s) - gamma * p_pi, rewards[np.arange(n_s), policy])
    return rewards + gamma * v[next_state], v


def test_bellman_residual_doe_is_zero_on_unchanged_and_not_on_changed_dynamics():
    from rl.deer.priorities import bellman_residual

    gamma = 0.9
    rewards = np.array([[0.0, 1.0], [0.5, 0.0], [1.0, 0.2], [0.0, 0.0]])
    old = np.array([[1, 2], [2, 3], [3, 0], [0, 1]])  # next state of (s, a)
    policy = np.array([1, 0, 0, 1])
    q_old, v_old = _exact_q(old, rewards, policy, gamma)
    new = old.copy()
    new[2, 0] = 1  # the shift changes where (2, 0) leads; every other (s, a) is unchanged

    def residual(dynamics):
        s, a = np.meshgrid(np.arange(4), np.arange(2), indexing="ij")
        s, a = s.ravel(), a.ravel()
        d = bellman_residual(torch.tensor(q_old[s, a]), torch.tensor(v_old[dynamics[s, a]]),
                             torch.tensor(rewards[s, a]), torch.zeros(len(s)), gamma)
        return d.abs().numpy().reshape(4, 2)

    assert np.allclose(residual(old), 0.0, atol=1e-5)  # the snapshot is consistent with its dynamics
    changed = residual(new)
    assert changed[2, 0] == pytest.approx(gamma * abs(v_old[1] - v_old[3]))
    assert changed[2, 0] > 0.1 and np.allclose(np.delete(changed.ravel(), 2 * 2 + 0), 0.0, atol=1e-5)
    # terminal transitions do not bootstrap
    d = bellman_residual(torch.tensor([2.0]), torch.tensor([5.0]), torch.tensor([1.0]), torch.tensor([True]), gamma)
    assert d.item() == pytest.approx(-1.0)


def test_running_scale_is_an_ema_of_batch_means():
    from rl.deer.priorities import RunningScale

    scale = RunningScale(decay=0.5)
    assert scale.get(default=3.0) == 3.0
    scale.update(torch.tensor([2.0, 4.0]))
    scale.update(torch.tensor([]))  # an empty batch (no pre-change samples) leaves it alone
    assert scale.get() == 3.0
    scale.update(torch.tensor([1.0]))
    assert scale.get() == pytest.approx(2.0)


def test_drain_stream_orders_interleaved_chunks_by_episode():
    """Chunks of two episodes arrive interleaved (as from a vectorized env runner); the detector
    stream holds each finished episode whole, with the stamps its timesteps got in the buffer."""
    import gymnasium as gym
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    space_o, space_a = gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(2)

    def chunk(ep_id, rewards, done, start_obs=None):
        ep = SingleAgentEpisode(id_=ep_id, observations=[np.zeros(3, np.float32)], observation_space=space_o,
                                action_space=space_a)
        for k, r in enumerate(rewards):
            ep.add_env_step(np.zeros(3, np.float32), 0, float(r), terminated=done and k == len(rewards) - 1)
        ep.to_numpy()
        return ep

    buffer = _buffer()
    a1, b1 = chunk("a", [1, 1, 1], False), chunk("b", [2, 2], False)
    buffer.add([a1, b1])  # stamps a: 0-2, b: 3-4
    assert buffer.drain_stream()[0].size == 0  # nothing finished yet
    a2 = a1.cut()
    a2.add_env_step(np.zeros(3, np.float32), 0, 1.5, terminated=True)
    a2.to_numpy()
    b2 = b1.cut()
    b2.add_env_step(np.zeros(3, np.float32), 0, 2.5, terminated=True)
    b2.to_numpy()
    buffer.add([b2, a2])  # stamps b: 5, a: 6
    rewards, starts, stamps = buffer.drain_stream()
    assert rewards.tolist() == [2, 2, 2.5, 1, 1, 1, 1.5] and starts == [0, 3]
    assert stamps.tolist() == [3, 4, 5, 0, 1, 2, 6]
    assert np.array_equal(np.sort(buffer._added_at[buffer._added_at >= 0]), np.arange(7))
