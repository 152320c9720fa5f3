"""RLlib builder of RL-CRP and its no-CRP ablation (config: `rl.crp.config`); new API stack, PPO.

Independent PPO per edge server [P: decentralized, one policy per server]: one `CRPTorchRLModule`
per agent in a `MultiRLModuleSpec` (module id = agent id "edge_<m>"), no parameter sharing.
"rl-no-crp" is the same with `env.use_crp` false (the risk feature is 0).
"""

from __future__ import annotations

import dataclasses

from edgeray.config import to_dict
from edgeray.errors import UserError
from rl.crp.config import CRP_METHODS, CRPConfig


def _map_to_self(agent_id, episode=None, **kwargs):
    return agent_id


def method_env(method: str, cfg: CRPConfig):
    """The env section `method` trains on (the ablation switches the risk off)."""
    if method not in CRP_METHODS:
        raise UserError(f"unknown RL-CRP method {method!r}; choose one of: {', '.join(CRP_METHODS)}")
    return dataclasses.replace(cfg.env, use_crp=method == "rl-crp")


def build_algo_config(method: str, cfg: CRPConfig):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from rl.crp.callbacks import CRPMetricsCallback
    from rl.crp.module import CRPTorchRLModule
    from rl.envs.crp_rllib import CRP_ENV, CRPMultiAgentEnv, register_crp_env

    env = method_env(method, cfg)
    register_crp_env()
    agents = CRPMultiAgentEnv(env).possible_agents
    t = cfg.train
    spec = MultiRLModuleSpec(rl_module_specs={
        a: RLModuleSpec(module_class=CRPTorchRLModule, model_config={"hidden": list(cfg.policy.hidden),
                                                                          "client_bias": cfg.policy.client_bias})
        for a in agents})
    return (PPOConfig()
            .environment(CRP_ENV, env_config=to_dict(env))
            .multi_agent(policies=set(agents), policy_mapping_fn=_map_to_self)
            .rl_module(rl_module_spec=spec)
            .env_runners(num_env_runners=t.num_env_runners, num_envs_per_env_runner=1)
            .training(lr=t.lr, gamma=t.gamma, lambda_=t.gae_lambda, clip_param=t.clip_param,
                      entropy_coeff=t.entropy_coeff, num_epochs=t.num_epochs, minibatch_size=t.minibatch_size,
                      train_batch_size_per_learner=t.env_steps_per_iter, use_kl_loss=t.kl_coeff > 0,
                      kl_coeff=t.kl_coeff, vf_loss_coeff=t.vf_loss_coeff)
            .callbacks(CRPMetricsCallback)
            .reporting(metrics_num_episodes_for_smoothing=20, min_time_s_per_iteration=0)
            .debugging(seed=t.seed))
