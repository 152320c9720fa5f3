"""DEER learners: RLlib's DQN and SAC torch learners with DEER priorities.

After the stock loss (which logs |TD error| per sample under TD_ERROR_KEY), the learner
  * estimates DoE for the sampled (s, a): d = Q_theta(s,a) - Q_snapshot(s,a), with Q_snapshot a
    frozen copy of the Q-network taken when the driver's change detector fired
    (`snapshot_q_network`, called through `learner_group.foreach_learner`); for SAC both use the
    min over the twin critics;
  * replaces the logged TD errors by `deer_priorities(|delta|, |d|, phase)`, which RLlib's
    training step then hands to the buffer's `update_priorities` unchanged.
Until the first change there is no snapshot and the priority is |delta| + epsilon (plain PER).
The snapshot is part of the learner state, so it survives checkpoint / resume.
"""

from __future__ import annotations

import copy

import torch
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner
from ray.rllib.algorithms.sac.torch.sac_torch_learner import SACTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.utils.metrics import TD_ERROR_KEY

from rl.deer.priorities import PHASE_POST, PHASE_PRE, PrioritySettings, deer_priorities

SNAPSHOT_STATE_KEY = "deer_q_snapshots"


class _DEERLearnerMixin:
    """Shared DEER logic; the concrete classes below only say how to read Q(s, a)."""

    def build(self) -> None:
        super().build()
        self.deer_settings = PrioritySettings(**self.config.learner_config_dict.get("deer_priority", {}))
        self._q_snapshots: dict = {}

    def snapshot_q_network(self) -> None:
        for module_id in self.module.keys():
            snapshot = copy.deepcopy(self.module[module_id])
            snapshot.requires_grad_(False)
            self._q_snapshots[module_id] = snapshot

    def has_q_snapshot(self) -> bool:
        return bool(self._q_snapshots)

    def _q_taken(self, module, batch) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        if "deer_phase" not in batch:
            return loss
        # The stock loss just logged this batch's |TD| as the last item of an item series.
        td_abs = self.metrics.peek((module_id, TD_ERROR_KEY), compile=False)[-1]
        td_abs = torch.as_tensor(td_abs, device=loss.device).detach().reshape(-1)
        phase = batch["deer_phase"].reshape(-1)
        doe_abs = torch.zeros_like(td_abs)
        if module_id in self._q_snapshots:
            with torch.no_grad():
                doe_abs = (self._q_taken(self.module[module_id], batch)
                           - self._q_taken(self._q_snapshots[module_id], batch)).abs().reshape(-1)
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
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        for module_id, module_state in (state.get(SNAPSHOT_STATE_KEY) or {}).items():
            snapshot = copy.deepcopy(self.module[module_id])
            snapshot.set_state(module_state)
            snapshot.requires_grad_(False)
            self._q_snapshots[module_id] = snapshot


class DEERDQNTorchLearner(_DEERLearnerMixin, DQNTorchLearner):
    def _q_taken(self, module, batch) -> torch.Tensor:
        q_all = module.compute_q_values({Columns.OBS: batch[Columns.OBS]})["qf_preds"]
        return q_all.gather(-1, batch[Columns.ACTIONS].long().view(-1, 1)).squeeze(-1)


class DEERSACTorchLearner(_DEERLearnerMixin, SACTorchLearner):
    def _q_taken(self, module, batch) -> torch.Tensor:
        # continuous SAC: Q(s, a) is the min over the twin critics for the taken action
        return module.compute_q_values({Columns.OBS: batch[Columns.OBS], Columns.ACTIONS: batch[Columns.ACTIONS]})
