"""LEED's policy optimization (PO): RLlib's PPO torch learner plus an expert loss.

For each module (one per agent, or the shared one):

    L_i(theta_i) = L_PPO(theta_i) + lambda_k * L_exp,i,    L_exp,i = -mean_{(o,a) in D_i} log pi_theta_i(a | o)

What the paper gives [P]: decentralized training, each agent adds an expert-policy loss built
from its own demonstrations D_i to its own PPO loss. Our reconstruction [R] (notes A3 step 5):
the loss is the negative log-likelihood of the demonstrated actions (behaviour cloning), and
lambda_k follows `expert_weight` (exponential lambda_0 * decay^k by default, k = learner updates
so far, i.e. PPO iterations), floored at lambda_min.

The demonstrations live inside the learner (notes B3): the driver's `LEEDCallback` hands them
over with `learner_group.foreach_learner(lambda l: l.set_demonstrations(...))`; they, the update
count k and the BC flag are part of the learner state, so a checkpoint restores them.
The "bc-ppo" baseline uses the same class with lambda_0 = 0: on the first demonstrations it runs
`bc_pretrain_steps` Adam steps on the NLL alone, then trains with plain PPO.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns

DEMO_STATE_KEY = "leed_demonstrations"


def expert_weight(k: int, lambda0: float, schedule: str, decay: float, decay_iters: int, lambda_min: float) -> float:
    """lambda_k of the expert loss after k updates [R]."""
    if schedule == "constant":
        value = lambda0
    elif schedule == "linear":
        value = lambda0 + (lambda_min - lambda0) * min(1.0, k / decay_iters)
    elif schedule == "exponential":
        value = lambda0 * decay ** k
    else:
        raise ValueError(f"unknown expert-weight schedule {schedule!r}")
    return max(lambda_min, value)


def expert_nll(module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """-mean log pi(a | o) of `module` on demonstration rows."""
    out = module.forward_train({Columns.OBS: obs})
    dist = module.get_train_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
    return -dist.logp(actions).mean()


class LEEDPPOTorchLearner(PPOTorchLearner):
    def build(self) -> None:
        super().build()
        s = self.config.learner_config_dict["leed_expert"]
        self.expert_settings = dict(s)
        self._demos: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._updates = 0
        self._bc_done = False
        self._rng = np.random.default_rng(self.config.learner_config_dict.get("seed", 0))

    # ----------------------------------------------------------------- demonstrations
    def set_demonstrations(self, demos: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
        """Replace the demonstrations (module_id -> (obs, actions)); returns what BC pre-training did."""
        self._demos = {mid: (torch.as_tensor(o, dtype=torch.float32, device=self._device),
                             torch.as_tensor(a, dtype=torch.long, device=self._device))
                       for mid, (o, a) in demos.items() if mid in self.module.keys() and len(a)}
        if self.expert_settings["bc_pretrain_steps"] and self.expert_settings["bc"] and not self._bc_done:
            self._bc_done = True
            return self.behaviour_cloning(self.expert_settings["bc_pretrain_steps"], self.expert_settings["bc_lr"])
        return {}

    def num_demonstrations(self) -> dict[str, int]:
        return {mid: int(len(a)) for mid, (_, a) in self._demos.items()}

    def _demo_batch(self, module_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        obs, actions = self._demos[module_id]
        size = self.expert_settings["expert_batch_size"]
        if len(actions) <= size:
            return obs, actions
        rows = torch.as_tensor(self._rng.choice(len(actions), size, replace=False), device=obs.device)
        return obs[rows], actions[rows]

    def expert_loss(self, module_id: str) -> torch.Tensor:
        return expert_nll(self.module[module_id], *self._demo_batch(module_id))

    def behaviour_cloning(self, steps: int, lr: float) -> dict:
        """`steps` Adam steps on the expert NLL alone, every module with demonstrations (bc-ppo)."""
        before, after = {}, {}
        for module_id in self._demos:
            module = self.module[module_id]
            optimizer = torch.optim.Adam(module.parameters(), lr=lr)
            for step in range(steps):
                loss = self.expert_loss(module_id)
                if step == 0:
                    before[module_id] = loss.item()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                after[module_id] = float(expert_nll(module, *self._demos[module_id]))
        return {"bc_nll_before": before, "bc_nll_after": after}

    # ----------------------------------------------------------------- loss and schedule
    def current_expert_weight(self) -> float:
        s = self.expert_settings
        return expert_weight(self._updates, s["lambda0"], s["schedule"], s["decay"], s["decay_iters"], s["lambda_min"])

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        weight = self.current_expert_weight()
        self.metrics.log_value((module_id, "expert_weight"), weight, window=1)
        if weight > 0 and module_id in self._demos:
            nll = self.expert_loss(module_id)
            self.metrics.log_value((module_id, "expert_nll"), nll.detach(), window=1)
            loss = loss + weight * nll
        return loss

    def after_gradient_based_update(self, *, timesteps) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        self._updates += 1  # once per Learner.update(), i.e. once per PPO iteration (notes B3)

    # ----------------------------------------------------------------- checkpoints
    def get_state(self, *args, **kwargs):
        state = super().get_state(*args, **kwargs)
        state[DEMO_STATE_KEY] = {"updates": self._updates, "bc_done": self._bc_done,
                                 "demos": {m: (o.cpu().numpy(), a.cpu().numpy()) for m, (o, a) in self._demos.items()}}
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        saved = state.get(DEMO_STATE_KEY)
        if saved:
            self._updates, self._bc_done = saved["updates"], saved["bc_done"]
            bc_done = self._bc_done
            self.set_demonstrations(saved["demos"])
            self._bc_done = bc_done
