"""RL-CRP's experiment config: one `CRPConfig` drives RL-CRP ("rl-crp") and its ablation without
conflict-risk prediction ("rl-no-crp": the same env, policy and PPO; the risk feature is 0).

Importing it starts nothing and imports neither Ray nor torch: the CLI loads and checks a config
before it connects to Ray. Settings marked [R] are our reconstruction (rl/crp/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.config import param, section
from rl.envs.crp import CRPEnvSection
from rl.leed.config import TrainSection  # independent PPO: LEED's settings (set in configs/crp*.yaml), plus below

CRP_METHODS = ("rl-crp", "rl-no-crp")


@dataclass
class PolicySection:
    """Each edge server's network (pipelines/selection/crp_policy.py): one per server, no sharing."""
    hidden: list[int] = param([64, 64], "hidden layer sizes of the per-client encoder")
    client_bias: bool = param(False, "a learned logit offset per covered client, so a server can tell its clients "
                              "apart (pipelines/selection/crp_policy.py) [R]")


@dataclass
class CRPTrainSection(TrainSection):
    """LEED's PPO settings plus the two of PPO's loss RL-CRP sets (RLlib's defaults: KL 0.2, value 1.0)."""
    kl_coeff: float = param(0.2, "PPO's adaptive KL penalty, initial weight (0: no KL term, only the clip)", ge=0)
    vf_loss_coeff: float = param(1.0, "weight of the value loss (the value head shares the per-client encoder)",
                                 ge=0)


@dataclass
class EvalSection:
    """`edgeray rl eval rl-crp`: the exported policies against the baselines, in the same simulation."""
    episodes: int = param(3, "evaluation episodes per method (per-round draws seeded 10_000 + i, unseen in "
                          "training)", ge=1)
    rounds: int = param(0, "rounds per evaluation episode (0: env.rounds)", ge=0)


@dataclass
class CRPConfig:
    """One training run of RL-CRP or its no-CRP ablation."""
    env: CRPEnvSection = section(CRPEnvSection)
    policy: PolicySection = section(PolicySection)
    train: CRPTrainSection = section(CRPTrainSection)
    eval: EvalSection = section(EvalSection)

    def validate(self) -> None:
        """Build the simulation once, so a bad trace, sizes file, coverage or k fails before Ray starts."""
        from rl.envs.crp import CRPSimulation
        CRPSimulation(self.env)
