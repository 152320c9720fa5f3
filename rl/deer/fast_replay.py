"""A vectorized sampling path for RLlib's `PrioritizedEpisodeReplayBuffer`, and DQN / SAC that use it.

Why (profiled with cProfile on ns-cartpole, DQN + PER, batch 64, 1 update per 4 env steps; see
docs/deer.md): per update RLlib's stock loop spends about 7 ms in
`PrioritizedEpisodeReplayBuffer.sample` (a Python loop over the batch that walks a list-based
segment tree, builds one `SingleAgentEpisode` per item and an `lfilter` per n-step reward) and
about 3.5 ms in the learner connector pipeline that turns those 64 one-step episodes back into a
batch, against 1-2 ms for the whole update of a lean torch loop.

This module keeps RLlib's algorithm, learner, env runner and buffer bookkeeping and replaces
only those two steps, at RLlib's extension points:

  * `NumpySumSegmentTree` / `NumpyMinSegmentTree`: RLlib's segment trees (same layout, same
    `find_prefixsum_idx` rule, including its clip of a prefix sum at the total) stored in a numpy
    array, with batched writes (`set_many`) and a batched prefix-sum search (`find_prefixsum_many`).
  * `FastPrioritizedEpisodeReplayBuffer` (a subclass of RLlib's prioritized episode buffer):
    `add()` runs the stock bookkeeping (episodes, eviction, free tree nodes) and also writes every
    timestep, under its tree node, into flat arrays (obs, action, reward, next obs, terminated /
    truncated at the episode's end, the node of the next timestep of the same episode).
    `sample_batch()` draws the batch from those arrays in a few numpy operations: every item is an
    independent draw with probability p_i = priority_i^alpha / sum (exactly as the stock `sample()`
    draws, one `rng.random() * total` per item), n-step returns follow the next-node links, an
    item whose n steps are not all stored yet is redrawn (as the stock loop does), and the
    importance weights are (p_i N)^-beta / (p_min N)^-beta. It returns the learner's columns
    (obs, new_obs, actions, rewards, terminateds, truncateds, weights, n_step) as numpy arrays.
    `update_priorities()` writes the whole batch into both trees at once (a transition drawn twice
    keeps the last priority, as with the stock per-item loop). The stock `sample()` still works on
    this buffer (same trees, same episodes): tests/test_deer_fast_replay.py checks that both draw
    with the same probabilities.
  * `FastReplayMixin` (`FastDQN`, `FastSAC`): overrides `training_step`, the
    algorithm's documented extension point, with the stock new-API-stack DQN/SAC step (same
    rr-weights of sampling and updates, same timers, target updates inside the learner) except
    that each update samples with `sample_batch()` and hands the learner a `MultiAgentBatch`
    (`LearnerGroup.update(batch=...)`), so no one-step episodes and no learner connector pass; the
    buffer's metrics are reduced once per training step instead of once per update.

Switch: `train.replay_impl` = "fast" (default) or "stock" (RLlib's own buffer class, sample path
and training step; `replay_buffer_config["fast_sampling"] = False` keeps this buffer class but
runs the stock step).
Only flat Box / Discrete spaces, a fixed integer n-step, and no info / extra-model-output
columns take the fast path; anything else falls back to the stock `sample()`.

DEER (arXiv 2509.15032) itself is not changed by this: its buffer (`rl.deer.buffer`) subclasses
this one and adds its phase column to the batch.
"""

from __future__ import annotations

import numpy as np
from ray.rllib.algorithms.dqn import DQN
from ray.rllib.algorithms.sac import SAC
from ray.rllib.core import DEFAULT_AGENT_ID, DEFAULT_MODULE_ID
from ray.rllib.execution.segment_tree import MinSegmentTree, SumSegmentTree
from ray.rllib.utils import force_list
from ray.rllib.utils.replay_buffers.prioritized_episode_buffer import PrioritizedEpisodeReplayBuffer

FAST_BUFFER_TYPE = "rl.deer.fast_replay.FastPrioritizedEpisodeReplayBuffer"


class _NumpySegmentTree:
    """Mixin: a segment tree's `value` list as a numpy array, with batched writes."""

    _combine = None  # np.add / np.minimum

    def _init_array(self) -> None:
        self.value = np.full(2 * self.capacity, self.neutral_element, dtype=np.float64)
        self._depth = int(self.capacity).bit_length() - 1  # levels above the leaves

    def __setitem__(self, idx: int, val: float) -> None:
        assert 0 <= idx < self.capacity, f"idx={idx} capacity={self.capacity}"
        v = self.value
        idx += self.capacity
        v[idx] = val
        idx >>= 1
        while idx >= 1:
            v[idx] = self._combine(v[2 * idx], v[2 * idx + 1])
            idx >>= 1

    def set_many(self, idx: np.ndarray, vals: np.ndarray) -> None:
        """`tree[i] = val` for every pair; `idx` must hold distinct indices."""
        v = self.value
        pos = np.asarray(idx, dtype=np.int64) + self.capacity
        v[pos] = vals
        for _ in range(self._depth):  # level by level; a parent listed twice gets the same value twice
            pos >>= 1
            v[pos] = self._combine(v[2 * pos], v[2 * pos + 1])

    def reduce(self, start: int = 0, end=None):
        if start == 0 and end is None:
            return float(self.value[1])
        return super().reduce(start, end)

    def get_state(self):
        return self.value.copy()

    def set_state(self, state) -> None:
        assert len(state) == self.capacity * 2
        self.value = np.asarray(state, dtype=np.float64)


class NumpySumSegmentTree(_NumpySegmentTree, SumSegmentTree):
    _combine = staticmethod(np.add)

    def __init__(self, capacity: int):
        SumSegmentTree.__init__(self, capacity)
        self._init_array()

    def find_prefixsum_many(self, prefixsums: np.ndarray) -> np.ndarray:
        """`find_prefixsum_idx` for every entry (the stock per-item rule, including its clip)."""
        v, cap = self.value, self.capacity
        mass = np.asarray(prefixsums, dtype=np.float64)
        mass = np.where(mass >= v[1], v[1] - 1e-5, mass)
        idx = np.ones(mass.shape, dtype=np.int64)
        while cap > 1 and idx.size and idx[0] < cap:  # every walk has the same depth
            left = v[2 * idx]
            go_left = left > mass
            mass = np.where(go_left, mass, mass - left)
            idx = np.where(go_left, 2 * idx, 2 * idx + 1)
        return idx - cap


class NumpyMinSegmentTree(_NumpySegmentTree, MinSegmentTree):
    _combine = staticmethod(np.minimum)

    def __init__(self, capacity: int):
        MinSegmentTree.__init__(self, capacity)
        self._init_array()


def _chunk_arrays(episode):
    """(obs [T+1], actions [T], rewards [T]) of one episode chunk, as numpy arrays."""
    obs = np.asarray(episode.get_observations())
    return obs, np.asarray(episode.get_actions()), np.asarray(episode.get_rewards(), dtype=np.float64)


class FastPrioritizedEpisodeReplayBuffer(PrioritizedEpisodeReplayBuffer):
    """RLlib's prioritized episode buffer with a vectorized `sample_batch()` (see the module doc)."""

    def __init__(self, capacity: int = 10000, **kwargs):
        super().__init__(capacity=capacity, **kwargs)
        nodes = self._sum_segment.capacity
        self._sum_segment = NumpySumSegmentTree(nodes)
        self._min_segment = NumpyMinSegmentTree(nodes)
        self._flat: dict[str, np.ndarray] | None = None  # allocated on the first add (shapes from the data)
        self._next_node = np.full(nodes, -1, dtype=np.int64)
        self._node_episode = np.full(nodes, -1, dtype=np.int64)
        self._open_tail: dict = {}  # episode id -> tree node of its last stored timestep (episode not done)
        self._assigned: list[int] | None = None
        self.fast_ok = True  # False once a chunk's data cannot be stored flat (then sample() only)
        # sample_batch()'s metrics, summed over draws and logged into RLlib's buffer metrics on get_metrics()
        self._pending_sample_metrics: list[int] | None = None

    # ---- storing
    def _get_free_node_and_assign(self, sample_index, weight: float = 1.0) -> int:
        node = super()._get_free_node_and_assign(sample_index, weight)
        if self._assigned is not None:
            self._assigned.append(node)
        return node

    def _allocate(self, obs: np.ndarray, act: np.ndarray) -> None:
        n = self._sum_segment.capacity
        self._flat = {"obs": np.zeros((n, *obs.shape[1:]), dtype=obs.dtype),
                      "new_obs": np.zeros((n, *obs.shape[1:]), dtype=obs.dtype),
                      "actions": np.zeros((n, *act.shape[1:]), dtype=act.dtype),
                      "rewards": np.zeros(n, dtype=np.float64),
                      "terminateds": np.zeros(n, dtype=bool), "truncateds": np.zeros(n, dtype=bool)}

    def add(self, episodes, weight=None) -> None:
        episodes = force_list(episodes)
        chunks = []
        for episode in episodes:
            try:
                arrays = _chunk_arrays(episode)
            except (TypeError, ValueError):  # nested / ragged spaces: no flat store
                arrays = None
            if arrays is None or arrays[0].dtype == object or arrays[1].dtype == object:
                self.fast_ok = False
            chunks.append((episode.id_, len(episode), episode.is_terminated, episode.is_truncated, arrays))
        self._assigned = []
        try:
            super().add(episodes, weight=weight)
            nodes = np.asarray(self._assigned, dtype=np.int64)
        finally:
            self._assigned = None
        for eid in [e for e in self._open_tail if e not in self.episode_id_to_index]:
            del self._open_tail[eid]  # evicted: its nodes are free again
        pos = 0
        for eid, length, terminated, truncated, arrays in chunks:
            if length == 0 or eid not in self.episode_id_to_index:
                continue  # empty, or a chunk of an episode the stock add just evicted (skipped there)
            ks = nodes[pos:pos + length]
            pos += length
            prev = self._open_tail.pop(eid, None)
            if prev is not None:
                self._next_node[prev] = ks[0]
            self._next_node[ks[:-1]] = ks[1:]
            self._next_node[ks[-1]] = -1
            self._node_episode[ks] = self.episode_id_to_index[eid]
            if not (terminated or truncated):
                self._open_tail[eid] = int(ks[-1])
            if not self.fast_ok:
                continue
            obs, act, rew = arrays
            if self._flat is None:
                self._allocate(obs, act)
            f = self._flat
            f["obs"][ks], f["new_obs"][ks], f["actions"][ks], f["rewards"][ks] = obs[:-1], obs[1:], act, rew
            f["terminateds"][ks] = False
            f["truncateds"][ks] = False
            f["terminateds"][ks[-1]], f["truncateds"][ks[-1]] = bool(terminated), bool(truncated)
        if pos != len(nodes):
            raise RuntimeError(f"fast replay: {len(nodes)} tree nodes assigned but {pos} timesteps stored")

    # ---- sampling
    def draw_nodes(self, count: int) -> np.ndarray:
        """`count` independent proportional draws of tree nodes (the stock per-item rule)."""
        total = self._sum_segment.sum()
        nodes = self._sum_segment.find_prefixsum_many(self.rng.random(count) * total)
        return nodes

    def _walk(self, nodes: np.ndarray, n_step: int, gamma: float):
        """Follow n-step links: (valid, node of the n-th timestep, discounted n-step reward)."""
        f = self._flat
        ok = self._sum_segment.value[nodes + self._sum_segment.capacity] > 0  # a free node (rounding) is redrawn
        cur = nodes
        ret = f["rewards"][nodes].copy()
        for i in range(1, n_step):
            nxt = self._next_node[cur]
            ok &= nxt >= 0
            cur = np.where(ok, nxt, cur)
            ret += np.where(ok, gamma ** i * f["rewards"][cur], 0.0)
        return ok, cur, ret

    def can_sample_batch(self, n_step=None, **kwargs) -> bool:
        return (self.fast_ok and self._flat is not None and not isinstance(n_step, tuple)
                and not kwargs.get("include_infos") and not kwargs.get("include_extra_model_outputs")
                and not kwargs.get("batch_length_T"))

    def sample_batch(self, num_items: int, *, n_step: int | None = None, beta: float = 0.0,
                     gamma: float = 0.99) -> dict[str, np.ndarray]:
        """A train batch of `num_items` prioritized transitions as numpy columns (module doc)."""
        if not self.can_sample_batch(n_step):
            raise ValueError("sample_batch needs flat Box/Discrete data and a fixed integer n_step; "
                             "use sample() for this buffer")
        assert beta >= 0.0
        n = int(n_step or 1)
        picked, last, returns = [], [], []
        got = resamples = 0
        while got < num_items:
            nodes = self.draw_nodes(num_items - got)
            ok, end, ret = self._walk(nodes, n, gamma)
            resamples += int((~ok).sum())
            picked.append(nodes[ok])
            last.append(end[ok])
            returns.append(ret[ok])
            got += int(ok.sum())
            if resamples > 100 * num_items:
                raise RuntimeError(f"fast replay: no stored transition spans n_step={n} timesteps")
        nodes, end, ret = np.concatenate(picked), np.concatenate(last), np.concatenate(returns)
        total = self._sum_segment.sum()
        num_ts = self.get_num_timesteps()
        p_min = self._min_segment.min() / total
        max_weight = (p_min * num_ts) ** (-beta)
        p = self._sum_segment.value[nodes + self._sum_segment.capacity] / total
        f = self._flat
        batch = {"obs": f["obs"][nodes], "new_obs": f["new_obs"][end], "actions": f["actions"][nodes],
                 "rewards": ret.astype(np.float32), "terminateds": f["terminateds"][end],
                 "truncateds": f["truncateds"][end],
                 "weights": ((p * num_ts) ** (-beta) / max_weight).astype(np.float32),
                 "n_step": np.full(num_items, n, dtype=np.int64)}
        self._last_sampled_indices = nodes.tolist()
        self.sampled_timesteps += num_items
        self._log_sample_metrics(nodes, num_items, n, resamples)
        return batch

    def _log_sample_metrics(self, nodes: np.ndarray, count: int, n_step: int, resamples: int) -> None:
        """Accumulate this draw's sample metrics; `get_metrics()` logs the sums once (RLlib's stock
        sample() logs 15 values per draw, ~0.4 ms, for diagnostics only). Counts are summed (RLlib
        reduces them by sum anyway); the n-step is the same for every draw."""
        episodes = len(np.unique(self._node_episode[nodes]))
        steps = len(np.unique(nodes))
        pending = self._pending_sample_metrics
        if pending is None or pending[4] != n_step:
            self.flush_sample_metrics()
            pending = self._pending_sample_metrics = [0, 0, 0, 0, n_step]
        pending[0] += count
        pending[1] += episodes
        pending[2] += steps
        pending[3] += resamples

    def flush_sample_metrics(self) -> None:
        """Log the accumulated sample_batch() metrics into RLlib's buffer metrics (same keys as stock)."""
        pending, self._pending_sample_metrics = self._pending_sample_metrics, None
        if pending is None:
            return
        count, episodes, steps, resamples, n_step = pending
        self._update_sample_metrics(
            num_env_steps_sampled=count, num_episodes_per_sample=episodes, num_env_steps_per_sample=steps,
            sampled_n_step=float(n_step), num_resamples=resamples,
            agent_to_num_steps_sampled={DEFAULT_AGENT_ID: count},
            agent_to_num_episodes_per_sample={DEFAULT_AGENT_ID: episodes},
            agent_to_num_steps_per_sample={DEFAULT_AGENT_ID: steps},
            agent_to_sampled_n_step={DEFAULT_AGENT_ID: float(n_step)},
            agent_to_num_resamples={DEFAULT_AGENT_ID: resamples},
            module_to_num_steps_sampled={DEFAULT_MODULE_ID: count},
            module_to_num_episodes_per_sample={DEFAULT_MODULE_ID: episodes},
            module_to_num_steps_per_sample={DEFAULT_MODULE_ID: steps},
            module_to_sampled_n_step={DEFAULT_MODULE_ID: float(n_step)},
            module_to_num_resamples={DEFAULT_MODULE_ID: resamples})

    def get_metrics(self):
        self.flush_sample_metrics()
        return super().get_metrics()

    # ---- priorities
    def update_priorities(self, priorities, module_id=None) -> None:
        """The stock per-item update, batched: both trees written once; a node drawn twice keeps
        the priority of its last occurrence (as in the stock loop)."""
        nodes = np.asarray(self._last_sampled_indices, dtype=np.int64)
        priorities = np.asarray(priorities, dtype=np.float64).reshape(-1)
        assert len(priorities) == len(nodes)
        if len(nodes):
            assert nodes.min() >= 0 and nodes.max() < self._sum_segment.capacity
            priorities = np.maximum(priorities, 1e-12)
            rev_first = np.unique(nodes[::-1], return_index=True)[1]
            keep = len(nodes) - 1 - rev_first
            values = priorities[keep] ** self._alpha
            self._sum_segment.set_many(nodes[keep], values)
            self._min_segment.set_many(nodes[keep], values)
            self._max_priority = max(self._max_priority, float(priorities.max()))
        self._last_sampled_indices = []

    # ---- checkpoints
    def get_state(self) -> dict:
        state = super().get_state()
        state.update(fast_flat=self._flat, fast_next_node=self._next_node, fast_node_episode=self._node_episode,
                     fast_open_tail=dict(self._open_tail), fast_ok=self.fast_ok)
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        self._flat = state.get("fast_flat")
        self._next_node = np.asarray(state["fast_next_node"], dtype=np.int64)
        self._node_episode = np.asarray(state["fast_node_episode"], dtype=np.int64)
        self._open_tail = dict(state["fast_open_tail"])
        self.fast_ok = bool(state["fast_ok"])
        self._last_sampled_indices = list(self._last_sampled_indices)


# ---- the algorithm side: DQN / SAC whose training step samples with sample_batch()

class FastReplayMixin:
    """`training_step` of RLlib's new-API-stack DQN (SAC inherits it), with the replay batch drawn
    by `FastPrioritizedEpisodeReplayBuffer.sample_batch()` and passed to the learners as a batch."""

    def training_step(self) -> None:
        buffer = getattr(self, "local_replay_buffer", None)
        if (not self.config.enable_env_runner_and_connector_v2 or self._module_is_stateful
                or not self.config.replay_buffer_config.get("fast_sampling", True)
                or not isinstance(buffer, FastPrioritizedEpisodeReplayBuffer)
                or not buffer.can_sample_batch(self.config.n_step)):
            return super().training_step()
        return self._fast_training_step(buffer)

    def _fast_training_step(self, buffer) -> None:
        from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
        from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
        from ray.rllib.utils.metrics import (ALL_MODULES, ENV_RUNNER_RESULTS, ENV_RUNNER_SAMPLING_TIMER,
                                             LEARNER_RESULTS, LEARNER_UPDATE_TIMER, NUM_AGENT_STEPS_SAMPLED_LIFETIME,
                                             NUM_ENV_STEPS_SAMPLED_LIFETIME, REPLAY_BUFFER_ADD_DATA_TIMER,
                                             REPLAY_BUFFER_RESULTS, REPLAY_BUFFER_SAMPLE_TIMER,
                                             REPLAY_BUFFER_UPDATE_PRIOS_TIMER, SYNCH_WORKER_WEIGHTS_TIMER,
                                             TD_ERROR_KEY, TIMERS)
        from ray.rllib.utils.numpy import convert_to_numpy
        from ray.rllib.algorithms.dqn.dqn import calculate_rr_weights

        store_weight, sample_and_train_weight = calculate_rr_weights(self.config)
        # RLlib's forward_exploration / forward_inference switch the module to eval() and back to
        # train() around every call (two recursive walks over its submodules per env step); the env
        # runner never trains its copy, so it stays in eval mode (the same outputs, fewer calls)
        runner_module = getattr(getattr(self, "env_runner", None), "module", None)
        if runner_module is not None and getattr(runner_module, "training", False):
            runner_module.eval()
        for _ in range(store_weight):
            with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
                episodes, env_runner_results = synchronous_parallel_sample(
                    worker_set=self.env_runner_group, concat=True, sample_timeout_s=self.config.sample_timeout_s,
                    _uses_new_env_runners=True, _return_metrics=True)
            self.metrics.aggregate(env_runner_results, key=ENV_RUNNER_RESULTS)
            with self.metrics.log_time((TIMERS, REPLAY_BUFFER_ADD_DATA_TIMER)):
                buffer.add(episodes)

        if self.config.count_steps_by == "agent_steps":
            current_ts = sum(self.metrics.peek((ENV_RUNNER_RESULTS, NUM_AGENT_STEPS_SAMPLED_LIFETIME),
                                               default={}).values())
        else:
            current_ts = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        if current_ts < self.config.num_steps_sampled_before_learning_starts:
            return

        learner_results = None
        local = self.learner_group._learner if self.learner_group.is_local else None
        lean = local is not None and self.config.replay_buffer_config.get("lean_update", True)
        trained = updates = 0
        loss_per_module = {}
        for _ in range(sample_and_train_weight):
            with self.metrics.log_time((TIMERS, REPLAY_BUFFER_SAMPLE_TIMER)):
                columns = self.replay_columns(buffer)
                size = len(columns["rewards"])
                batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=size)
            with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
                timesteps = {
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)),
                    NUM_AGENT_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_AGENT_STEPS_SAMPLED_LIFETIME)),
                }
                if local is not None:
                    # one local learner: its metrics are reduced once per training step, below;
                    # this update's |TD| (DEER: its priorities) is the last item of the series
                    if lean:
                        loss_per_module = lean_learner_update(local, columns, timesteps)
                        trained += size
                        updates += 1
                    else:
                        local.update(batch=batch, timesteps=timesteps, _no_metrics_reduce=True)
                    td_errors = []
                    for module_id in local.module.keys():
                        if (module_id, TD_ERROR_KEY) in local.metrics:
                            td_errors.append(convert_to_numpy(local.metrics.peek((module_id, TD_ERROR_KEY),
                                                                                 compile=False)[-1]))
                            local.metrics.delete(module_id, TD_ERROR_KEY)
                else:
                    learner_results = self.learner_group.update(batch=batch, timesteps=timesteps)
                    td_errors = []
                    for res in learner_results:
                        module_results = res.get(DEFAULT_MODULE_ID, {})
                        if TD_ERROR_KEY in module_results:
                            td_errors.extend(convert_to_numpy(module_results.pop(TD_ERROR_KEY).peek()))
                    self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
            with self.metrics.log_time((TIMERS, REPLAY_BUFFER_UPDATE_PRIOS_TIMER)):
                if td_errors:
                    buffer.update_priorities(np.concatenate([np.reshape(t, -1) for t in td_errors]))
        if local is not None:
            if lean and updates:
                log_trained_steps(local, trained, updates, loss_per_module)
            learner_results = [local.metrics.reduce()]
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        # the buffer's sample metrics: reduced once per training step (the stock step does it per update)
        self.metrics.aggregate([buffer.get_metrics()], key=REPLAY_BUFFER_RESULTS)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            modules_to_update = set(learner_results[0].keys()) - {ALL_MODULES}
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                               policies=modules_to_update, global_vars=None, inference_only=True)

    def replay_columns(self, buffer) -> dict:
        """One replay batch as numpy columns (a subclass may add columns, e.g. DEER's phase)."""
        return buffer.sample_batch(self.config.total_train_batch_size, n_step=self.config.n_step,
                                   gamma=self.config.gamma, beta=self.config.replay_buffer_config.get("beta") or 0.0)


    def _create_local_replay_buffer_if_necessary(self, config):
        """Build `replay_buffer_config["buffer_class"]` (a dotted path) when given: SAC's config
        validation only accepts RLlib's four buffer names in "type"."""
        replay = config.get("replay_buffer_config") or {}
        if not replay.get("buffer_class"):
            return super()._create_local_replay_buffer_if_necessary(config)
        import importlib

        module, _, name = replay["buffer_class"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        kwargs = {k: v for k, v in replay.items() if k not in ("type", "buffer_class", "fast_sampling", "lean_update")}
        kwargs["metrics_num_episodes_for_smoothing"] = self.config.metrics_num_episodes_for_smoothing
        return cls(**kwargs)


def lean_learner_update(learner, columns: dict, timesteps: dict) -> dict:
    """One gradient update of a local learner on one module's numpy batch: what
    `Learner.update(batch=...)` does for a single minibatch (`before_gradient_based_update`, the
    weights sequence number, float64 -> float32 tensors as `convert_to_torch_tensor` makes them,
    `_update` = forward_train, losses, gradients, postprocessing (clipping), optimizer step;
    `after_gradient_based_update` = DQN / SAC target-network updates), without its per-update
    bookkeeping (TrainingData, minibatch iterator, SampleBatch slicing flags, Ray/Prometheus
    timers, seven step-count metrics): `log_trained_steps` logs those once per training step.
    Returns the losses per module."""
    import torch

    learner.before_gradient_based_update(timesteps=timesteps)
    learner._weights_seq_no += 1
    device = learner._device
    tensors = {}
    for key, value in columns.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        if t.is_floating_point() and t.dtype != torch.float16:
            t = t.float()
        tensors[key] = t.to(device) if device is not None else t
    _, loss_per_module, _ = learner._update({DEFAULT_MODULE_ID: tensors})
    learner.after_gradient_based_update(timesteps=timesteps)
    return loss_per_module


def log_trained_steps(learner, trained: int, updates: int, loss_per_module: dict) -> None:
    """The step counts `Learner.update` logs per update (`_log_steps_trained_metrics`), logged once
    for `updates` updates of `trained` module steps in all (sums and lifetime sums are the same;
    the mean batch size is trained / updates), and the last update's total loss (window 1)."""
    from ray.rllib.core.learner.learner import Learner
    from ray.rllib.utils.metrics import (ALL_MODULES, MODULE_TRAIN_BATCH_SIZE_MEAN, NUM_ENV_STEPS_TRAINED,
                                         NUM_ENV_STEPS_TRAINED_LIFETIME, NUM_MODULE_STEPS_TRAINED,
                                         NUM_MODULE_STEPS_TRAINED_LIFETIME, WEIGHTS_SEQ_NO)

    m = learner.metrics
    m.log_value((DEFAULT_MODULE_ID, WEIGHTS_SEQ_NO), learner._weights_seq_no, window=1)
    m.log_value((DEFAULT_MODULE_ID, MODULE_TRAIN_BATCH_SIZE_MEAN), trained / updates, reduce="mean")
    m.log_value((DEFAULT_MODULE_ID, NUM_MODULE_STEPS_TRAINED), trained, reduce="sum")
    m.log_value((DEFAULT_MODULE_ID, NUM_MODULE_STEPS_TRAINED_LIFETIME), trained, reduce="lifetime_sum",
                with_throughput=True)
    m.log_value((ALL_MODULES, NUM_MODULE_STEPS_TRAINED), trained, reduce="sum", with_throughput=True)
    m.log_value((ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), trained, reduce="lifetime_sum",
                with_throughput=True)
    m.log_value((ALL_MODULES, NUM_ENV_STEPS_TRAINED), trained, reduce="sum", with_throughput=True)
    m.log_value((ALL_MODULES, NUM_ENV_STEPS_TRAINED_LIFETIME), trained, reduce="lifetime_sum", with_throughput=True)
    for mid, loss in loss_per_module.items():
        m.log_value(key=(mid, Learner.TOTAL_LOSS_KEY), value=loss, window=1)


class FastDQN(FastReplayMixin, DQN):
    """RLlib's DQN with the vectorized replay path (`FastReplayMixin`)."""


class FastSAC(FastReplayMixin, SAC):
    """RLlib's SAC with the vectorized replay path (`FastReplayMixin`)."""
