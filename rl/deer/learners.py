"""DEER learners: RLlib's DQN and SAC torch learners with DEER priorities (arXiv 2509.15032).

After the stock loss (which logs |TD error| per sample under TD_ERROR_KEY), the learner
  * estimates DoE for the sampled transitions (`rl.deer.priorities`, `doe_estimate`):
      - "bellman_residual" (default): the Bellman residual of ONE frozen network, the snapshot
        taken before the estimated change point, under its own greedy (DQN) / deterministic
        (SAC: tanh of the policy mean, min over the twin critics) policy. The learner keeps a ring
        of snapshots (`push_snapshot(step)`, called by the driver after every iteration with the
        env-step count); on a change at step c the driver calls `freeze_snapshot(c)`, which picks
        the newest snapshot taken at or before c, so the policy is held fixed from before the
        change, not from the detection up to a detector delay later. |d| is normalized by running
        means (see `PrioritySettings.doe_normalize`);
      - "snapshot_diff" (the earlier rule): d = Q_theta - Q_snapshot, snapshot taken at detection;
  * replaces the logged TD errors by `deer_priorities(|delta|, |d|, phase)`, which RLlib's
    training step then hands to the buffer's `update_priorities` unchanged.
Until the first change there is no frozen snapshot and the priority is |delta| + epsilon (plain PER).
The frozen snapshot and the ring are part of the learner state, so they survive checkpoint / resume.
"""

from __future__ import annotations

import copy

import torch
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner
from ray.rllib.algorithms.sac.torch.sac_torch_learner import SACTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.utils.metrics import TD_ERROR_KEY

from rl.deer.priorities import (PHASE_POST, PHASE_PRE, PrioritySettings, RunningScale, bellman_residual,
                                deer_priorities)

SNAPSHOT_STATE_KEY = "deer_q_snapshots"
RING_STATE_KEY = "deer_snapshot_ring"


def _copy_weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _DEERLearnerMixin:
    """Shared DEER logic; the concrete classes below only say how to read Q(s, a) and V(s')."""

    def build(self) -> None:
        super().build()
        cfg = self.config.learner_config_dict
        self.deer_settings = PrioritySettings(**cfg.get("deer_priority", {}))
        self._ring_size = int(cfg.get("deer_snapshot_ring", 8))
        self._q_snapshots: dict = {}   # module id -> frozen module used for DoE
        self._ring: list[tuple[int, dict]] = []  # (env step, {module id: weights}), oldest first
        self.frozen_at: int | None = None  # env step of the frozen snapshot's weights
        self._doe_scale = RunningScale(self.deer_settings.scale_decay)
        self._td_scale = RunningScale(self.deer_settings.scale_decay)

    # ---- snapshots
    def snapshot_q_network(self) -> None:
        """Freeze the current weights (the "snapshot_diff" rule's snapshot at detection)."""
        for module_id in self.module.keys():
            snapshot = copy.deepcopy(self.module[module_id])
            snapshot.requires_grad_(False)
            self._q_snapshots[module_id] = snapshot

    def push_snapshot(self, step: int) -> None:
        """Keep the current weights, taken at env step `step`, in the ring."""
        self._ring.append((int(step), {mid: _copy_weights(self.module[mid]) for mid in self.module.keys()}))
        del self._ring[:-self._ring_size]

    def freeze_snapshot(self, change_step: int) -> int:
        """Freeze the newest ring snapshot taken at or before `change_step` (the oldest one if
        none is that old; the current weights if the ring is empty). Returns its step."""
        if self.deer_settings.doe_estimate == "snapshot_diff" or not self._ring:
            self.snapshot_q_network()
            self.frozen_at = int(change_step)
            return self.frozen_at
        older = [entry for entry in self._ring if entry[0] <= change_step]
        step, weights = older[-1] if older else self._ring[0]
        for module_id in self.module.keys():
            snapshot = copy.deepcopy(self.module[module_id])
            snapshot.load_state_dict(weights[module_id])
            snapshot.requires_grad_(False)
            self._q_snapshots[module_id] = snapshot
        self.frozen_at = step
        self._doe_scale = RunningScale(self.deer_settings.scale_decay)  # a new snapshot, a new fit error
        return step

    def has_q_snapshot(self) -> bool:
        return bool(self._q_snapshots)

    # ---- Q readers (per algorithm)
    def _q_taken(self, module, batch) -> torch.Tensor:
        raise NotImplementedError

    def _v_next(self, module, batch) -> torch.Tensor:
        raise NotImplementedError

    def _doe(self, module_id, batch, phase) -> torch.Tensor:
        snapshot = self._q_snapshots[module_id]
        s = self.deer_settings
        if s.doe_estimate == "snapshot_diff":
            return (self._q_taken(self.module[module_id], batch) - self._q_taken(snapshot, batch)).abs().reshape(-1)
        discount = self.config.gamma ** batch["n_step"] if "n_step" in batch else self.config.gamma
        d = bellman_residual(self._q_taken(snapshot, batch).reshape(-1), self._v_next(snapshot, batch).reshape(-1),
                             batch[Columns.REWARDS].reshape(-1).float(), batch[Columns.TERMINATEDS].reshape(-1),
                             discount.reshape(-1) if torch.is_tensor(discount) else discount).abs()
        self.metrics.log_value((module_id, "deer_doe_raw_pre"), d[phase == PHASE_PRE].mean() if (phase == PHASE_PRE).any()
                               else torch.tensor(float("nan")), window=1)
        self.metrics.log_value((module_id, "deer_doe_raw_post"), d[phase == PHASE_POST].mean()
                               if (phase == PHASE_POST).any() else torch.tensor(float("nan")), window=1)
        if not s.doe_normalize:
            return d
        pre = d[phase == PHASE_PRE]
        self._doe_scale.update(pre if pre.numel() else d)
        return d / self._doe_scale.get() * self._td_scale.get()

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        if "deer_phase" not in batch:
            return loss
        # The stock loss just logged this batch's |TD| as the last item of an item series.
        td_abs = self.metrics.peek((module_id, TD_ERROR_KEY), compile=False)[-1]
        td_abs = torch.as_tensor(td_abs, device=loss.device).detach().reshape(-1)
        self._td_scale.update(td_abs)
        phase = batch["deer_phase"].reshape(-1)
        doe_abs = torch.zeros_like(td_abs)
        if module_id in self._q_snapshots:
            with torch.no_grad():
                doe_abs = self._doe(module_id, batch, phase)
            self.metrics.log_value((module_id, "deer_doe_abs_mean"), doe_abs.mean(), window=1)
            self.metrics.log_value((module_id, "deer_post_fraction"),
                                   (phase == PHASE_POST).float().mean(), window=1)
            self.metrics.log_value((module_id, "deer_pre_fraction"),
                                   (phase == PHASE_PRE).float().mean(), window=1)
        priorities = deer_priorities(td_abs, doe_abs, phase, self.deer_settings)
        self.metrics.delete(module_id, TD_ERROR_KEY)
        self.metrics.log_value(key=(module_id, TD_ERROR_KEY), value=priorities, reduce="item_series")
        return loss

    def get_state(self, *args, **kwargs):
        state = super().get_state(*args, **kwargs)
        state[SNAPSHOT_STATE_KEY] = {mid: m.get_state() for mid, m in self._q_snapshots.items()}
        state[RING_STATE_KEY] = {"ring": self._ring, "frozen_at": self.frozen_at}
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        for module_id, module_state in (state.get(SNAPSHOT_STATE_KEY) or {}).items():
            snapshot = copy.deepcopy(self.module[module_id])
            snapshot.set_state(module_state)
            snapshot.requires_grad_(False)
            self._q_snapshots[module_id] = snapshot
        ring = state.get(RING_STATE_KEY)
        if ring:
            self._ring, self.frozen_at = list(ring["ring"]), ring["frozen_at"]


class DEERDQNTorchLearner(_DEERLearnerMixin, DQNTorchLearner):
    def _q_taken(self, module, batch) -> torch.Tensor:
        q_all = module.compute_q_values({Columns.OBS: batch[Columns.OBS]})["qf_preds"]
        return q_all.gather(-1, batch[Columns.ACTIONS].long().view(-1, 1)).squeeze(-1)

    def _v_next(self, module, batch) -> torch.Tensor:
        # the snapshot's own greedy policy: V(s') = max_a' Q_old(s', a')
        return module.compute_q_values({Columns.OBS: batch[Columns.NEXT_OBS]})["qf_preds"].max(-1).values


class DEERSACTorchLearner(_DEERLearnerMixin, SACTorchLearner):
    def _q_taken(self, module, batch) -> torch.Tensor:
        # continuous SAC: Q(s, a) is the min over the twin critics for the taken action
        return module.compute_q_values({Columns.OBS: batch[Columns.OBS], Columns.ACTIONS: batch[Columns.ACTIONS]})

    def _v_next(self, module, batch) -> torch.Tensor:
        # the snapshot's deterministic policy: the tanh-squashed mean of its Gaussian
        dist_inputs = module.pi(module.pi_encoder({Columns.OBS: batch[Columns.NEXT_OBS]})["encoder_out"])
        action = torch.tanh(dist_inputs.chunk(2, dim=-1)[0])
        return module.compute_q_values({Columns.OBS: batch[Columns.NEXT_OBS], Columns.ACTIONS: action})
