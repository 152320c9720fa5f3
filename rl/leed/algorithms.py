"""RLlib builder of LEED and its baselines (config: `rl.leed.config`); new API stack, PPO.

  * "leed":   `LEEDPPOTorchLearner` (PPO + lambda_k x expert NLL) + `LEEDCallback` (generation,
              refinement every `expert.refine_every` iterations);
  * "bc-ppo": the same learner with lambda = 0 and behaviour cloning on the round-0
              demonstrations before the first PPO update; no refinement;
  * "ippo":   RLlib's stock PPO learner, no demonstrations (independent PPO).
All three share the env, the policy layout and every PPO setting. `policy.sharing` "per_agent"
gives every agent its own RLModule (module id = agent id, the paper's decentralized PO);
"shared" maps every agent to one module "shared" (parameter sharing for large agent counts).
"""

from __future__ import annotations

import dataclasses

from edgeray.config import to_dict
from edgeray.errors import UserError
from rl.envs.routing import agent_ids
from rl.leed.config import LEED_METHODS, LEEDConfig

SHARED_MODULE = "shared"


def module_of(cfg: LEEDConfig) -> dict[str, str]:
    """Agent id -> RLModule id."""
    agents = agent_ids(cfg.env.num_agents)
    return {a: (SHARED_MODULE if cfg.policy.sharing == "shared" else a) for a in agents}


def _map_to_self(agent_id, episode=None, **kwargs):
    return agent_id


def _map_to_shared(agent_id, episode=None, **kwargs):
    return SHARED_MODULE


def build_algo_config(method: str, cfg: LEEDConfig, run_dir=None):
    """The RLlib PPOConfig of `method`."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from rl.envs.routing_rllib import ROUTING_ENV, register_routing_env

    if method not in LEED_METHODS:
        raise UserError(f"unknown LEED method {method!r}; choose one of: {', '.join(LEED_METHODS)}")
    register_routing_env()
    t = cfg.train
    modules = sorted(set(module_of(cfg).values()))
    model = DefaultModelConfig(fcnet_hiddens=list(cfg.policy.hidden), head_fcnet_hiddens=[])
    config = (PPOConfig()
              .environment(ROUTING_ENV, env_config=to_dict(cfg.env))
              .multi_agent(policies=set(modules),
                           policy_mapping_fn=_map_to_shared if cfg.policy.sharing == "shared" else _map_to_self)
              .rl_module(rl_module_spec=MultiRLModuleSpec(
                  rl_module_specs={m: RLModuleSpec(model_config=model) for m in modules}))
              .env_runners(num_env_runners=t.num_env_runners, num_envs_per_env_runner=1)
              .training(lr=t.lr, gamma=t.gamma, lambda_=t.gae_lambda, clip_param=t.clip_param,
                        entropy_coeff=t.entropy_coeff, num_epochs=t.num_epochs, minibatch_size=t.minibatch_size,
                        train_batch_size_per_learner=t.env_steps_per_iter)
              .reporting(metrics_num_episodes_for_smoothing=20, min_time_s_per_iteration=0)
              .debugging(seed=t.seed))
    if method == "ippo":
        return config
    from rl.leed.callbacks import LEEDCallback
    from rl.leed.learners import LEEDPPOTorchLearner

    expert = dataclasses.asdict(cfg.expert)
    expert["bc"] = method == "bc-ppo"
    if method == "bc-ppo":
        expert["lambda0"], expert["lambda_min"] = 0.0, 0.0
    return (config
            .learners(learner_class=LEEDPPOTorchLearner,
                      learner_config_dict={"leed_expert": expert, "seed": t.seed, "leed_method": method,
                                           "leed_config": to_dict(cfg), "leed_module_of": module_of(cfg),
                                           "leed_run_dir": str(run_dir) if run_dir else ""})
            .callbacks(LEEDCallback))
