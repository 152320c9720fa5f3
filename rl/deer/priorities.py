"""DEER's priority rules, plain torch, no Ray (arXiv 2509.15032).

Paper [P]: transitions collected before and after a detected change get different priority
rules, using the discrepancy of environment DoE(s,a) = Q_new(s,a) - Q_old(s,a) (same policy,
new vs old dynamics) next to the TD error.

OUR RECONSTRUCTION (the paper's formulas were not retrievable); every choice is a named field
of `PrioritySettings`:
  * `doe_estimate`: d = Q_theta(s,a) - Q_snapshot(s,a), Q_snapshot frozen at the last detected
    change ("snapshot_diff", the only estimator implemented);
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
    doe_estimate: str = "snapshot_diff"


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
