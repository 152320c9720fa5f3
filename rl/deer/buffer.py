"""DEER's replay buffer: RLlib's `PrioritizedEpisodeReplayBuffer` (through its vectorized subclass
`rl.deer.fast_replay.FastPrioritizedEpisodeReplayBuffer`) plus what DEER needs.

  * every stored timestep is stamped with the global step at which it was added;
  * the rewards of every FINISHED episode are kept for the change detector, one episode after
    the other (`drain_stream`: rewards, the positions where each episode starts, and each
    reward's stamp), so the detector's blocks are whole episodes even when a vectorized env
    runner interleaves several episodes' chunks; a change point is a stamp, so it splits the
    buffer into "pre" and "post" transitions;
  * `sample()` tags each sampled transition with its phase (0 no change yet, 1 pre, 2 post) in
    `extra_model_outputs["deer_phase"]`, which reaches the learner as `batch["deer_phase"]`;
    `sample_batch()` (the vectorized path) adds the same phases as a "deer_phase" column;
  * with `keep_transitions = True` (set by the callback for `deer.change_source=dynamics`) every added
    transition (s, a, s', stamp) is also kept, in arrival order, for the dynamics-model detector
    (`drain_transitions`);
  * `sample()` and `update_priorities()` must alternate: a second sample before the priorities of
    the first were written back raises (PER would silently drop those updates otherwise).

Priorities themselves are computed in the learner (`rl.deer.learners`) and arrive through
RLlib's normal TD-error path. Plug in with the dotted path (RLlib only accepts a string that
contains "EpisodeReplayBuffer"): `replay_buffer_config={"type": DEER_BUFFER_TYPE, ...}`.
"""

from __future__ import annotations

import numpy as np
from ray.rllib.env.utils.infinite_lookback_buffer import InfiniteLookbackBuffer

from rl.deer.fast_replay import FastPrioritizedEpisodeReplayBuffer
from rl.deer.priorities import PHASE_NO_CHANGE, PHASE_POST, PHASE_PRE

DEER_BUFFER_TYPE = "rl.deer.buffer.DEERPrioritizedEpisodeReplayBuffer"


class DEERPrioritizedEpisodeReplayBuffer(FastPrioritizedEpisodeReplayBuffer):
    def __init__(self, capacity: int = 10000, **kwargs):
        super().__init__(capacity=capacity, **kwargs)
        self._added_at = np.full(self._sum_segment.capacity, -1, dtype=np.int64)
        self._next_stamp = 0
        self.steps_added = 0
        self._pending_rewards: list[np.ndarray] = []  # finished episodes' rewards, in finishing order
        self._pending_stamps: list[np.ndarray] = []
        self._open: dict = {}  # episode id -> ([reward arrays], [stamp arrays]) of unfinished episodes
        self.change_steps: list[int] = []
        self.num_samples = 0
        self.num_priority_updates = 0
        self._awaiting_update = False
        # Opaque detector state kept here so it travels with the buffer in checkpoints.
        self.detector_state: dict | None = None
        self.keep_transitions = False  # rl.deer.dynamics_detector's input
        self._pending_transitions: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, episodes, weight=None) -> None:
        episodes = episodes if isinstance(episodes, list) else [episodes]
        first = self.steps_added
        for episode in episodes:  # super().add stamps them in this order (see _get_free_node_and_assign)
            rewards, stamps = self._open.setdefault(episode.id_, ([], []))
            rewards.append(np.asarray(episode.get_rewards(), dtype=np.float64))
            stamps.append(np.arange(first, first + len(episode), dtype=np.int64))
            if self.keep_transitions and len(episode):
                obs = np.asarray(episode.get_observations())
                self._pending_transitions.append((obs[:-1], np.asarray(episode.get_actions()), obs[1:], stamps[-1]))
            first += len(episode)
            if episode.is_done:
                del self._open[episode.id_]
                self._pending_rewards.append(np.concatenate(rewards))
                self._pending_stamps.append(np.concatenate(stamps))
        self._next_stamp = self.steps_added
        super().add(episodes, weight=weight)
        self.steps_added += sum(len(e) for e in episodes)

    def _get_free_node_and_assign(self, sample_index, weight: float = 1.0) -> int:
        tree_idx = super()._get_free_node_and_assign(sample_index, weight)
        self._added_at[tree_idx] = self._next_stamp
        self._next_stamp += 1
        return tree_idx

    def drain_stream(self) -> tuple[np.ndarray, list[int], np.ndarray]:
        """Episodes finished since the last call: (rewards, start position of each episode, stamps)."""
        if not self._pending_rewards:
            return np.zeros(0), [], np.zeros(0, dtype=np.int64)
        starts = np.cumsum([0] + [len(r) for r in self._pending_rewards[:-1]]).tolist()
        out = (np.concatenate(self._pending_rewards), starts, np.concatenate(self._pending_stamps))
        self._pending_rewards, self._pending_stamps = [], []
        return out

    def drain_transitions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Transitions added since the last call (with `keep_transitions`): (obs, actions, next obs, stamps)."""
        if not self._pending_transitions:
            return None
        out = tuple(np.concatenate([t[i] for t in self._pending_transitions]) for i in range(4))
        self._pending_transitions = []
        return out

    def drain_rewards(self) -> np.ndarray:
        """Rewards of the episodes finished since the last call, episode after episode."""
        return self.drain_stream()[0]

    def mark_change(self, step: int) -> None:
        """A change was detected at global step `step`: older transitions become "pre"."""
        self.change_steps.append(int(step))

    def phases(self, tree_indices) -> np.ndarray:
        if not self.change_steps:
            return np.full(len(tree_indices), PHASE_NO_CHANGE, dtype=np.int64)
        stamps = self._added_at[np.asarray(tree_indices, dtype=np.int64)]
        return np.where(stamps < self.change_steps[-1], PHASE_PRE, PHASE_POST)

    def sample(self, num_items=None, **kwargs):
        if self._awaiting_update:
            raise RuntimeError("DEER buffer sampled twice without update_priorities in between")
        episodes = super().sample(num_items, **kwargs)
        for episode, phase in zip(episodes, self.phases(self._last_sampled_indices)):
            episode.extra_model_outputs["deer_phase"] = InfiniteLookbackBuffer(data=[int(phase)])
        self.num_samples += 1
        self._awaiting_update = True
        return episodes

    def sample_batch(self, num_items, **kwargs):
        if self._awaiting_update:
            raise RuntimeError("DEER buffer sampled twice without update_priorities in between")
        batch = super().sample_batch(num_items, **kwargs)
        batch["deer_phase"] = self.phases(self._last_sampled_indices)
        self.num_samples += 1
        self._awaiting_update = True
        return batch

    def update_priorities(self, priorities, module_id=None) -> None:
        super().update_priorities(priorities, module_id)
        self.num_priority_updates += 1
        self._awaiting_update = False

    def get_state(self) -> dict:
        state = super().get_state()
        state.update(deer_added_at=self._added_at, deer_steps_added=self.steps_added,
                     deer_change_steps=list(self.change_steps), deer_detector_state=self.detector_state,
                     deer_pending_rewards=[r.tolist() for r in self._pending_rewards],
                     deer_pending_stamps=[r.tolist() for r in self._pending_stamps],
                     deer_open={k: ([r.tolist() for r in v[0]], [t.tolist() for t in v[1]]) for k, v in self._open.items()})
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        self._added_at = np.asarray(state["deer_added_at"], dtype=np.int64)
        self.steps_added = int(state["deer_steps_added"])
        self.change_steps = list(state["deer_change_steps"])
        self.detector_state = state["deer_detector_state"]
        self._pending_rewards = [np.asarray(r, dtype=np.float64) for r in state["deer_pending_rewards"]]
        self._pending_stamps = [np.asarray(r, dtype=np.int64) for r in state.get("deer_pending_stamps", [])]
        self._open = {k: ([np.asarray(r, dtype=np.float64) for r in v[0]], [np.asarray(t, dtype=np.int64) for t in v[1]])
                      for k, v in state.get("deer_open", {}).items()}
        self._awaiting_update = False
