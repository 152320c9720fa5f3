"""rl.deer.fast_replay: the vectorized PER path draws what RLlib's stock PrioritizedEpisodeReplayBuffer
draws (draw for draw with the same random numbers, and in distribution by chi-square tests), builds the
same transitions (n-step returns, terminals, links that never cross episodes, eviction), updates
priorities like the stock loop, checkpoints, and runs inside a real RLlib DQN."""

import numpy as np
import pytest
from scipy import stats

GAMMA = 0.9


def _chunks(n_slots=3, steps=120, cut_every=7, seed=0, box_actions=False, max_len=30):
    """Episode chunks as a vectorized env runner hands them over: `n_slots` episodes run side by side,
    every `cut_every` steps all open episodes are cut and their chunks come in a shuffled order.
    obs = [episode number, t, noise]; reward = episode number * 100 + t (so every test can recompute
    what a transition must hold). Episodes end terminated or truncated at random lengths."""
    import gymnasium as gym
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    rng = np.random.default_rng(seed)
    space_o = gym.spaces.Box(-1e6, 1e6, (3,), np.float32)
    space_a = gym.spaces.Box(-1, 1, (2,), np.float32) if box_actions else gym.spaces.Discrete(3)
    counter = iter(range(10**6))

    def new_episode():
        number = next(counter)
        ep = SingleAgentEpisode(observations=[np.array([number, 0, rng.random()], np.float32)],
                                observation_space=space_o, action_space=space_a)
        return ep, number, int(rng.integers(3, max_len))

    slots = [new_episode() for _ in range(n_slots)]
    batches = []
    for step in range(1, steps + 1):
        for i, (ep, number, length) in enumerate(slots):
            t = len(ep) + ep.t_started
            done = t + 1 >= length
            terminated = done and rng.random() < 0.5
            action = rng.uniform(-1, 1, 2).astype(np.float32) if box_actions else int(rng.integers(3))
            ep.add_env_step(np.array([number, t + 1, rng.random()], np.float32), action, float(number * 100 + t),
                            terminated=terminated, truncated=done and not terminated)
        if step % cut_every == 0 or any(ep.is_done for ep, _, _ in slots):
            out = []
            for i, (ep, number, length) in enumerate(slots):
                if len(ep) == 0 and not ep.is_done:
                    continue
                ep.to_numpy()
                out.append(ep)
                slots[i] = new_episode() if ep.is_done else (ep.cut(), number, length)
            rng.shuffle(out)
            batches.append(out)
    return batches


def _filled(cls, seed=0, capacity=2000, alpha=0.6, **chunk_kwargs):
    buffer = cls(capacity=capacity, alpha=alpha)
    for batch in _chunks(seed=seed, **chunk_kwargs):
        buffer.add(batch)
    return buffer


def _randomize_priorities(buffer, seed=0):
    """Give every stored timestep a random priority in [0.01, 5) through the stock update rule."""
    nodes = np.flatnonzero(buffer._sum_segment.value[buffer._sum_segment.capacity:] > 0)
    buffer._last_sampled_indices = nodes.tolist()
    priorities = np.random.default_rng(seed).uniform(0.01, 5.0, len(nodes)) ** 2
    buffer.update_priorities(priorities)
    return nodes


def _expected(buffer, n_step):
    """Exact draw probability of every tree node given that its n-step transition is stored."""
    cap = buffer._sum_segment.capacity
    leaves = buffer._sum_segment.value[cap:].copy()
    nodes = np.flatnonzero(leaves > 0)
    valid = np.array([buffer._indices[buffer._tree_idx_to_sample_idx[k]][1] + n_step
                      <= len(buffer.episodes[buffer._indices[buffer._tree_idx_to_sample_idx[k]][0]
                                             - buffer._num_episodes_evicted]) for k in nodes])
    p = np.where(valid, leaves[nodes], 0.0)
    return nodes, p / p.sum()


def _binned_counts(drawn, nodes, p, bins=20):
    """Counts in `bins` groups of nodes with equal expected mass, and the expected counts."""
    order = np.argsort(nodes)
    nodes, p = nodes[order], p[order]
    group = np.minimum((np.cumsum(p) - p / 2) * bins, bins - 1).astype(int)
    observed = np.bincount(group[np.searchsorted(nodes, drawn)], minlength=bins)
    expected = np.bincount(group, weights=p, minlength=bins) * len(drawn)
    return observed, expected


def _stock_draws(buffer, count, n_step, beta=0.0):
    drawn = []
    while len(drawn) < count:
        buffer.sample(num_items=256, n_step=n_step, gamma=GAMMA, beta=beta)
        drawn.extend(buffer._last_sampled_indices)
    return np.asarray(drawn[:count])


def _fast_draws(buffer, count, n_step, beta=0.0):
    drawn = []
    while len(drawn) < count:
        buffer.sample_batch(1024, n_step=n_step, gamma=GAMMA, beta=beta)
        drawn.extend(buffer._last_sampled_indices)
    return np.asarray(drawn[:count])


def test_numpy_segment_trees_match_rllibs():
    from ray.rllib.execution.segment_tree import MinSegmentTree, SumSegmentTree

    from rl.deer.fast_replay import NumpyMinSegmentTree, NumpySumSegmentTree

    rng = np.random.default_rng(1)
    cap = 256
    stock_sum, stock_min = SumSegmentTree(cap), MinSegmentTree(cap)
    fast_sum, fast_min = NumpySumSegmentTree(cap), NumpyMinSegmentTree(cap)
    for _ in range(5):
        idx = rng.choice(cap, 60, replace=False)
        vals = rng.random(60)
        for i, v in zip(idx, vals):
            stock_sum[int(i)] = float(v)
            stock_min[int(i)] = float(v)
        fast_sum.set_many(idx, vals)
        fast_min.set_many(idx, vals)
        single = int(rng.integers(cap))
        stock_sum[single] = 0.5
        fast_sum[single] = 0.5
        assert np.allclose(fast_sum.value[1:], stock_sum.value[1:])
        assert np.allclose(fast_min.value[1:], stock_min.value[1:])
        assert fast_sum.sum() == pytest.approx(stock_sum.sum()) and fast_min.min() == pytest.approx(stock_min.min())
    masses = np.r_[rng.random(500) * fast_sum.sum(), fast_sum.sum(), fast_sum.sum() + 1e-6, 0.0]
    expected = [stock_sum.find_prefixsum_idx(min(float(m), stock_sum.sum())) for m in masses]
    assert fast_sum.find_prefixsum_many(masses).tolist() == expected


def test_sample_batch_is_the_stock_sample_draw_for_draw():
    """n_step=1 (nothing to redraw): with the same random numbers, sample_batch picks the same
    transitions as RLlib's per-item loop and returns the columns its learner connector would build."""
    from rl.deer.fast_replay import FastPrioritizedEpisodeReplayBuffer

    buffer = _filled(FastPrioritizedEpisodeReplayBuffer)
    _randomize_priorities(buffer)
    state = buffer.rng.bit_generator.state
    episodes = buffer.sample(num_items=300, n_step=1, gamma=GAMMA, beta=0.4)
    stock_nodes = list(buffer._last_sampled_indices)
    buffer.rng.bit_generator.state = state
    batch = buffer.sample_batch(300, n_step=1, gamma=GAMMA, beta=0.4)
    assert buffer._last_sampled_indices == stock_nodes
    assert np.array_equal(batch["obs"], np.stack([e.get_observations(0) for e in episodes]))
    assert np.array_equal(batch["new_obs"], np.stack([e.get_observations(1) for e in episodes]))
    assert np.array_equal(batch["actions"], np.array([e.get_actions(0) for e in episodes]))
    assert np.allclose(batch["rewards"], [e.get_rewards(0) for e in episodes])
    assert batch["terminateds"].tolist() == [e.is_terminated for e in episodes]
    assert batch["truncateds"].tolist() == [e.is_truncated for e in episodes]
    assert np.allclose(batch["weights"], [e.get_extra_model_outputs("weights", 0) for e in episodes], rtol=1e-5)
    assert batch["terminateds"].any() and batch["truncateds"].any()  # both kinds of episode end were drawn


@pytest.mark.parametrize("n_step", [1, 3])
def test_fast_and_stock_sampling_draw_with_the_same_probabilities(n_step):
    """Chi-square goodness of fit of both samplers against the exact probabilities p_i ~ priority_i^alpha
    (over the transitions whose n steps are stored), and of one against the other. The same test
    rejects a sampler that ignores the priorities, so it can fail."""
    from rl.deer.fast_replay import FastPrioritizedEpisodeReplayBuffer

    buffer = _filled(FastPrioritizedEpisodeReplayBuffer, seed=3)
    buffer.rng = np.random.default_rng(11)
    _randomize_priorities(buffer, seed=5)
    nodes, p = _expected(buffer, n_step)
    fast = _fast_draws(buffer, 40_000, n_step)
    stock = _stock_draws(buffer, 6_000, n_step)
    for drawn in (fast, stock):
        assert set(drawn.tolist()) <= set(nodes[p > 0].tolist())  # never a transition without its n steps
        observed, expected = _binned_counts(drawn, nodes, p)
        assert stats.chisquare(observed, expected).pvalue > 1e-3
    table = np.stack([_binned_counts(fast, nodes, p)[0], _binned_counts(stock, nodes, p)[0]])
    assert stats.chi2_contingency(table).pvalue > 1e-3
    # node level: the most likely transitions are drawn as often as their probability says
    top = np.argsort(p)[-5:]
    counts = np.array([(fast == k).sum() for k in nodes[top]])
    assert np.allclose(counts / len(fast), p[top], rtol=0.25)
    # power: uniform draws over the same transitions are rejected by the same test
    uniform = np.random.default_rng(0).choice(nodes[p > 0], 40_000)
    observed, expected = _binned_counts(uniform, nodes, p)
    assert stats.chisquare(observed, expected).pvalue < 1e-6


@pytest.mark.parametrize("box_actions", [False, True])
def test_n_step_transitions_returns_and_episode_ends(box_actions):
    from rl.deer.fast_replay import FastPrioritizedEpisodeReplayBuffer

    buffer = _filled(FastPrioritizedEpisodeReplayBuffer, seed=4, box_actions=box_actions)
    batch = buffer.sample_batch(2000, n_step=3, gamma=GAMMA, beta=0.4)
    ep, t = batch["obs"][:, 0], batch["obs"][:, 1]
    assert np.array_equal(batch["new_obs"][:, 0], ep)  # the 3-step link never leaves the episode
    assert np.array_equal(batch["new_obs"][:, 1], t + 3)
    want = sum(GAMMA ** i * (ep * 100 + t + i) for i in range(3))
    assert np.allclose(batch["rewards"], want, rtol=1e-5)
    assert (batch["n_step"] == 3).all() and batch["actions"].shape == ((2000, 2) if box_actions else (2000,))
    assert ((batch["weights"] > 0) & (batch["weights"] <= 1.0 + 1e-6)).all()
    # a terminal flag only where the 3rd step is the episode's last one
    lengths = {}
    for e in buffer.episodes:
        lengths[int(e.get_observations(0)[0])] = (len(e), e.is_terminated, e.is_truncated)
    for k in range(2000):
        length, term, trunc = lengths[int(ep[k])]
        last = t[k] + 3 == length
        assert batch["terminateds"][k] == (last and term) and batch["truncateds"][k] == (last and trunc)


def test_batched_priority_update_equals_the_stock_loop():
    """Same data in RLlib's buffer and the fast one (same tree nodes); a batch with repeated nodes:
    the trees and the max priority end up equal (a repeated node keeps its last priority)."""
    from ray.rllib.utils.replay_buffers.prioritized_episode_buffer import PrioritizedEpisodeReplayBuffer

    from rl.deer.fast_replay import FastPrioritizedEpisodeReplayBuffer

    stock = _filled(PrioritizedEpisodeReplayBuffer, seed=6)
    fast = _filled(FastPrioritizedEpisodeReplayBuffer, seed=6)
    rng = np.random.default_rng(2)
    stored = np.flatnonzero(np.asarray(fast._sum_segment.value[fast._sum_segment.capacity:]) > 0)
    assert sorted(stock._tree_idx_to_sample_idx) == stored.tolist()
    for _ in range(3):
        nodes = rng.choice(stored, 128).tolist()  # with repeats
        priorities = rng.uniform(0, 3, 128).astype(np.float32)
        for buffer in (stock, fast):
            buffer._last_sampled_indices = list(nodes)
            buffer.update_priorities(priorities)
        assert np.allclose(np.asarray(stock._sum_segment.value[1:]), fast._sum_segment.value[1:])
        assert np.allclose(np.asarray(stock._min_segment.value[1:]), fast._min_segment.value[1:])
        assert fast._max_priority == pytest.approx(stock._max_priority)


def test_eviction_and_checkpoint_keep_the_flat_store_consistent():
    from rl.deer.fast_replay import FastPrioritizedEpisodeReplayBuffer

    buffer = _filled(FastPrioritizedEpisodeReplayBuffer, seed=7, capacity=150, steps=400)
    assert buffer._num_episodes_evicted > 5
    cap = buffer._sum_segment.capacity
    live = np.flatnonzero(buffer._sum_segment.value[cap:] > 0)
    assert len(live) == buffer.get_num_timesteps()
    for k in live:  # every stored timestep's flat row is the episode's data at that timestep
        eps_idx, ts, node = buffer._indices[buffer._tree_idx_to_sample_idx[k]]
        assert node == k
        episode = buffer.episodes[eps_idx - buffer._num_episodes_evicted]
        assert np.array_equal(buffer._flat["obs"][k], episode.get_observations(ts))
        assert np.array_equal(buffer._flat["new_obs"][k], episode.get_observations(ts + 1))
    batch = buffer.sample_batch(500, n_step=2, gamma=GAMMA)
    assert np.array_equal(batch["new_obs"][:, 0], batch["obs"][:, 0])
    assert np.array_equal(batch["new_obs"][:, 1], batch["obs"][:, 1] + 2)

    restored = FastPrioritizedEpisodeReplayBuffer(capacity=150, alpha=0.6)
    restored.set_state(buffer.get_state())
    buffer.rng, restored.rng = np.random.default_rng(9), np.random.default_rng(9)
    a, b = buffer.sample_batch(64, n_step=2, gamma=GAMMA), restored.sample_batch(64, n_step=2, gamma=GAMMA)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for more in _chunks(seed=8, steps=30):  # and it keeps storing after the restore
        restored.add(more)
    assert restored.sample_batch(64, n_step=2, gamma=GAMMA)["obs"].shape == (64, 3)


def test_fast_dqn_trains_through_the_batched_path_and_stock_stays_available(ray_session):
    from edgeray.config import load_config
    from rl.deer.algorithms import build_algo_config
    from rl.deer.config import ExperimentConfig

    tiny = ["env.name=ns-cartpole", "train.env_steps_per_iter=120", "train.rollout_fragment_length=10",
            "train.num_envs=2", "train.learning_starts=40", "train.train_batch_size=16", "train.hidden=[16]",
            "train.training_intensity=4", "env.max_episode_steps=50"]
    algo = build_algo_config("per", load_config(ExperimentConfig, None, tiny)).build_algo()
    try:
        assert type(algo).__name__ == "FastDQN"
        assert type(algo.local_replay_buffer).__name__ == "FastPrioritizedEpisodeReplayBuffer"
        before = algo.local_replay_buffer._sum_segment.value.copy()
        result = [algo.train() for _ in range(2)][-1]
        trained = result["learners"]["default_policy"]["num_module_steps_trained_lifetime"]
        assert trained > 0 and trained == algo.local_replay_buffer.sampled_timesteps
        assert not algo.local_replay_buffer._last_sampled_indices  # every batch's priorities written back
        assert not np.array_equal(before, algo.local_replay_buffer._sum_segment.value)
        assert np.isfinite(result["learners"]["default_policy"]["qf_loss"])
    finally:
        algo.stop()
    stock = build_algo_config("per", load_config(ExperimentConfig, None, tiny + ["train.replay_impl=stock"]))
    assert stock.algo_class.__name__ == "DQN"
    assert stock.replay_buffer_config["type"] == "PrioritizedEpisodeReplayBuffer"
    assert "buffer_class" not in stock.replay_buffer_config
    # DEER's buffer is always the vectorized subclass; with "stock" it is sampled by RLlib's own
    # per-item sample() and training step (the phases then travel in extra_model_outputs)
    deer = build_algo_config("deer", load_config(ExperimentConfig, None, tiny + ["train.replay_impl=stock"])).build_algo()
    try:
        assert deer.config.replay_buffer_config["fast_sampling"] is False
        deer.train()
        assert deer.local_replay_buffer.num_samples > 0
        assert deer.local_replay_buffer.num_priority_updates == deer.local_replay_buffer.num_samples
    finally:
        deer.stop()


@pytest.mark.parametrize("env,method", [("ns-cartpole", "per"), ("ns-cartpole", "deer"), ("ns-pendulum", "per")])
def test_lean_learner_update_is_the_same_gradient_step_as_learner_update(ray_session, env, method):
    """From the same learner state and batch, `lean_learner_update` and RLlib's `Learner.update`
    leave the same weights (main and target nets, optimizer steps included) and log the same
    per-sample |TD| (DEER: its priorities) for the buffer; the lean path's step counts add up."""
    import copy

    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME, TD_ERROR_KEY

    from edgeray.config import load_config
    from rl.deer.algorithms import build_algo_config
    from rl.deer.config import ExperimentConfig
    from rl.deer.fast_replay import lean_learner_update, log_trained_steps

    tiny = [f"env.name={env}", "train.env_steps_per_iter=120", "train.rollout_fragment_length=10",
            "train.num_envs=2", "train.learning_starts=40", "train.train_batch_size=16", "train.hidden=[16]",
            "train.training_intensity=4", "env.max_episode_steps=50", "train.target_update_freq=10"]
    if method == "deer":
        tiny += ["deer.change_source=oracle", "env.shift_every=100"]
    algo = build_algo_config(method, load_config(ExperimentConfig, None, tiny)).build_algo()
    try:
        algo.train()
        algo.train()
        learner, buffer = algo.learner_group._learner, algo.local_replay_buffer
        if method == "deer":
            assert learner.has_q_snapshot()  # the oracle marked a change: DoE enters the priorities
        columns = algo.replay_columns(buffer)
        buffer._last_sampled_indices = []
        # far enough past the last target sync that both paths sync the target nets
        timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: 10**6}
        module = learner.module[DEFAULT_MODULE_ID]
        optimizers = learner._named_optimizers
        alphas = getattr(learner, "curr_log_alpha", {})  # SAC's entropy coefficient lives in the learner
        saved = (copy.deepcopy(module.state_dict()), {n: copy.deepcopy(o.state_dict()) for n, o in optimizers.items()},
                 {k: v.detach().clone() for k, v in alphas.items()}, learner._weights_seq_no,
                 copy.deepcopy(getattr(learner, "last_update_ts_by_mid", None)),
                 copy.deepcopy({k: v for k, v in vars(learner).items() if k in ("_doe_scale", "_td_scale")}))

        def restore():
            module.load_state_dict(saved[0])
            for name, opt in optimizers.items():
                opt.load_state_dict(copy.deepcopy(saved[1][name]))
            with torch.no_grad():
                for k, v in alphas.items():
                    v.copy_(saved[2][k])
            learner._weights_seq_no = saved[3]
            if saved[4] is not None:
                learner.last_update_ts_by_mid = copy.deepcopy(saved[4])
            vars(learner).update(copy.deepcopy(saved[5]))

        def weights():
            out = {k: v.detach().clone() for k, v in module.state_dict().items()}
            out.update({f"alpha/{k}": v.detach().clone() for k, v in alphas.items()})
            return out

        def td():
            out = learner.metrics.peek((DEFAULT_MODULE_ID, TD_ERROR_KEY), compile=False)[-1]
            learner.metrics.delete(DEFAULT_MODULE_ID, TD_ERROR_KEY)
            return torch.as_tensor(out).reshape(-1).clone()

        start = weights()
        torch.manual_seed(7)  # SAC samples actions in its loss: both paths draw the same noise
        learner.update(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(copy.deepcopy(columns))},
                                             env_steps=len(columns["rewards"])), timesteps=timesteps,
                       _no_metrics_reduce=True)
        stock_w, stock_td = weights(), td()
        restore()
        torch.manual_seed(7)
        losses = lean_learner_update(learner, copy.deepcopy(columns), timesteps)
        lean_w, lean_td = weights(), td()
        assert set(stock_w) == set(lean_w)
        changed = [k for k in start if not torch.equal(start[k], stock_w[k])]
        assert changed  # the update moved the weights (a no-op on both sides would also be "equal")
        assert any("target" in k for k in changed)  # and synced a target net
        for k in stock_w:
            assert torch.equal(stock_w[k], lean_w[k]), k
        assert torch.equal(stock_td, lean_td)
        assert set(losses) == {DEFAULT_MODULE_ID}
        before = learner.metrics.peek(("__all_modules__", "num_env_steps_trained_lifetime"), default=0)
        log_trained_steps(learner, 48, 3, losses)
        assert learner.metrics.peek(("__all_modules__", "num_env_steps_trained_lifetime")) == before + 48
    finally:
        algo.stop()
