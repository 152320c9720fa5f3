"""DEER's priority rules, plain torch, no Ray (arXiv 2509.15032).

Paper [P]: transitions collected before and after a detected change get different priority
rules, using the discrepancy of environment DoE(s,a) = Q_new(s,a) - Q_old(s,a) (same policy,
new vs old dynamics) next to the TD error.

OUR RECONSTRUCTION (the paper's formulas were not retrievable); every choice is a named field
of `PrioritySettings`:
  * `doe_estimate`:
      "bellman_residual" (default): the paper holds the policy fixed, so d is computed from ONE
        frozen network Q_old, the snapshot taken before the (estimated) change point, and its own
        greedy / deterministic policy: d = r + gamma^n (1 - done) Q_old(s', pi_old(s')) - Q_old(s, a)
        (`bellman_residual`). It is the old value function's one-step inconsistency with the
        dynamics that produced the transition: ~0 (fit noise) where the dynamics did not change,
        large at once where they did, and it does not grow as the live network keeps learning.
        It is a first-order proxy of the paper's Q_new - Q_old (the difference of the two
        Bellman operators applied to Q_old);
      "snapshot_diff" (the earlier rule, kept for comparison): d = Q_theta(s,a) - Q_snapshot(s,a),
        snapshot taken at the detection; it grows with ordinary learning;
  * `doe_normalize` (bellman_residual only): |d| is divided by a running mean of |d| on
    pre-change samples (the snapshot's fit error on the dynamics it was trained on,
    `RunningScale`) and multiplied by a running mean of |delta|, so kappa means the same for every
    env and reward scale: d_used = mean|delta| * |d| / mean|d_pre|;
  * `post_rule`:
      "td_plus_doe"  p = |delta| + doe_weight * |d|     (favour what the shift changed)
      "td_only"      p = |delta|                         (ablation)
  * `pre_rule`:
      "td_over_doe"  p = |delta| / (1 + pre_doe_weight * |d|)   (suppress outdated transitions)
      "td_exp_doe"   p = |delta| * exp(-pre_doe_weight * |d|)
      "td_only"      p = |delta|                                  (ablation)
  * before any change is detected: p = |delta| (plain PER);
  * every priority gets `+ epsilon` so nothing becomes unsampleable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PHASE_NO_CHANGE, PHASE_PRE, PHASE_POST = 0, 1, 2
POST_RULES = ("td_plus_doe", "td_only")
PRE_RULES = ("td_over_doe", "td_exp_doe", "td_only")


@dataclass
class PrioritySettings:
    post_rule: str = "td_plus_doe"
    pre_rule: str = "td_over_doe"
    doe_weight: float = 1.0
    pre_doe_weight: float = 1.0
    epsilon: float = 1e-3
    doe_estimate: str = "bellman_residual"
    doe_normalize: bool = True
    scale_decay: float = 0.99


DOE_ESTIMATES = ("bellman_residual", "snapshot_diff")


def bellman_residual(q_sa: torch.Tensor, next_v: torch.Tensor, rewards: torch.Tensor,
                     terminateds: torch.Tensor, discount: torch.Tensor | float) -> torch.Tensor:
    """d = r + discount * (1 - terminated) * V_old(s') - Q_old(s, a), all from the frozen snapshot
    (V_old(s') = Q_old(s', pi_old(s')), pi_old the snapshot's own greedy / deterministic policy)."""
    return rewards + discount * (1.0 - terminateds.float()) * next_v - q_sa


class RunningScale:
    """Exponential moving average of a batch mean, for normalizing |d| and |delta| (no Ray)."""

    def __init__(self, decay: float = 0.99):
        self.decay = decay
        self.value: float | None = None

    def update(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        mean = float(values.mean())
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean

    def get(self, default: float = 1.0) -> float:
        return default if self.value is None or self.value <= 0 else self.value


def deer_priorities(td_abs: torch.Tensor, doe_abs: torch.Tensor, phase: torch.Tensor,
                    settings: PrioritySettings) -> torch.Tensor:
    """Priority per sample from |TD error|, |DoE| and the sample's phase (0 none, 1 pre, 2 post)."""
    if settings.post_rule == "td_plus_doe":
        post = td_abs + settings.doe_weight * doe_abs
    elif settings.post_rule == "td_only":
        post = td_abs
    else:
        raise ValueError(f"unknown post_rule {settings.post_rule!r}; choose one of {POST_RULES}")
    if settings.pre_rule == "td_over_doe":
        pre = td_abs / (1.0 + settings.pre_doe_weight * doe_abs)
    elif settings.pre_rule == "td_exp_doe":
        pre = td_abs * torch.exp(-settings.pre_doe_weight * doe_abs)
    elif settings.pre_rule == "td_only":
        pre = td_abs
    else:
        raise ValueError(f"unknown pre_rule {settings.pre_rule!r}; choose one of {PRE_RULES}")
    phase = phase.to(td_abs.device).long().view(td_abs.shape)
    priority = torch.where(phase == PHASE_POST, post, torch.where(phase == PHASE_PRE, pre, td_abs))
    return priority + settings.epsilon
