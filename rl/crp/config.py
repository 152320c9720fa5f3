"""RL-CRP's experiment config: one `CRPConfig` drives RL-CRP ("rl-crp") and its ablation without
conflict-risk prediction ("rl-no-crp": the same env, policy and PPO; the risk feature is 0).

Importing it starts nothing and imports neither Ray nor torch: the CLI loads and checks a config
before it connects to Ray. Settings marked [R] are our reconstruction (rl/crp/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.config import param, section
from edgeray.errors import UserError
from rl.envs.crp import CRPEnvSection
from rl.loop import LoopSection

CRP_METHODS = ("rl-crp", "rl-no-crp")


@dataclass
class PolicySection:
    """Each edge server's network (pipelines/selection/crp_policy.py): one per server, no sharing."""
    hidden: list[int] = param([64, 64], "hidden layer sizes of the per-client encoder")


@dataclass
class TrainSection(LoopSection):
    """Independent PPO per edge server (plus the loop's seed, stop_iters, checkpoint_every, torch_threads)."""
    env_steps_per_iter: int = param(1200, "env steps per iteration (train_batch_size_per_learner); a round is "
                                    "k steps", ge=32)
    minibatch_size: int = param(300, "PPO minibatch size", ge=8)
    num_epochs: int = param(4, "PPO epochs per iteration", ge=1)
    lr: float = param(5e-4, "learning rate", gt=0)
    gamma: float = param(0.95, "discount per pick step", gt=0, le=1)
    gae_lambda: float = param(0.95, "GAE lambda", ge=0, le=1)
    clip_param: float = param(0.2, "PPO clip", gt=0)
    entropy_coeff: float = param(0.01, "entropy bonus", ge=0)
    num_env_runners: int = param(0, "remote env runners (0 = sample in the driver)", ge=0)

    def validate(self) -> None:
        if self.minibatch_size > self.env_steps_per_iter:
            raise UserError(f"train.minibatch_size={self.minibatch_size} must be <= "
                            f"train.env_steps_per_iter={self.env_steps_per_iter}")


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
    train: TrainSection = section(TrainSection)
    eval: EvalSection = section(EvalSection)

    def validate(self) -> None:
        """Build the simulation once, so a bad trace, sizes file, coverage or k fails before Ray starts."""
        from rl.envs.crp import CRPSimulation
        CRPSimulation(self.env)
