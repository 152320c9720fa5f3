"""RLlib algorithm builders for DEER and its two baselines (config: `rl.deer.config`).

The three methods share the algorithm and hyper-parameters; only the replay differs:
  * "uniform": RLlib's `EpisodeReplayBuffer`;
  * "per":     RLlib's `PrioritizedEpisodeReplayBuffer` (|TD| priorities); with
               `train.replay_impl=fast` (default) its vectorized subclass
               `FastPrioritizedEpisodeReplayBuffer` (same draw probabilities) under `FastDQN` /
               `FastSAC` (rl.deer.fast_replay); with "stock" RLlib's own class and DQN / SAC;
  * "deer":    `DEERPrioritizedEpisodeReplayBuffer` + DEER learner + `DEERCallback`.
Discrete-action envs train with DQN, continuous ones with SAC. The prioritized buffers are named in
`replay_buffer_config["buffer_class"]` and built by `FastDQN` / `FastSAC`, because
`SACConfig.validate` only accepts RLlib's four buffer names in "type".
"""

from __future__ import annotations

import dataclasses

from edgeray.errors import UserError
from rl.deer.buffer import DEER_BUFFER_TYPE
from rl.deer.config import REPLAY_METHODS, ExperimentConfig
from rl.deer.detector import DetectorSettings
from rl.envs.nonstationary import NS_ENVS


def env_config(cfg: ExperimentConfig, start_step: int = 0) -> dict:
    out = {"shift_every": cfg.env.shift_every, "magnitudes": list(cfg.env.magnitudes),
           "schedule": cfg.env.schedule, "max_episode_steps": cfg.env.max_episode_steps,
           "start_step": start_step, "step_scale": cfg.train.num_envs}
    if cfg.env.shift_params:
        out["shift_params"] = list(cfg.env.shift_params)
    return out


def build_algo_config(method: str, cfg: ExperimentConfig, start_step: int = 0):
    """The RLlib AlgorithmConfig for `method` on `cfg.env.name` (new API stack)."""
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    from rl.deer.callbacks import NS_EVAL_KEY, DEERCallback, NonStationaryEpisodeLogger
    from rl.envs import register_ns_envs

    if method not in REPLAY_METHODS:
        raise UserError(f"unknown replay method {method!r}; choose one of: {', '.join(REPLAY_METHODS)}")
    register_ns_envs()
    t = cfg.train
    discrete = NS_ENVS[cfg.env.name][1] == "discrete"
    replay = {"capacity": t.buffer_capacity}
    algo_class = None
    if method == "uniform":
        replay["type"] = "EpisodeReplayBuffer"
    else:
        from rl.deer.fast_replay import FAST_BUFFER_TYPE, FastDQN, FastSAC

        replay.update(alpha=cfg.replay.alpha, beta=cfg.replay.beta, type="PrioritizedEpisodeReplayBuffer")
        if method == "deer" or t.replay_impl == "fast":
            algo_class = FastDQN if discrete else FastSAC
            replay["buffer_class"] = DEER_BUFFER_TYPE if method == "deer" else FAST_BUFFER_TYPE
            # DEER's buffer is always the vectorized subclass; "stock" runs RLlib's own sample() on it
            replay["fast_sampling"] = t.replay_impl == "fast"

    if discrete:
        from ray.rllib.algorithms.dqn import DQNConfig
        config = DQNConfig(algo_class=algo_class).training(
            lr=t.lr, gamma=t.gamma, n_step=t.n_step, train_batch_size_per_learner=t.train_batch_size,
            training_intensity=t.training_intensity, num_steps_sampled_before_learning_starts=t.learning_starts,
            target_network_update_freq=t.target_update_freq,
            epsilon=[(0, 1.0), (t.epsilon_steps, t.epsilon_final)], replay_buffer_config=replay)
        model = DefaultModelConfig(fcnet_hiddens=list(t.hidden), head_fcnet_hiddens=[])
    else:
        from ray.rllib.algorithms.sac import SACConfig
        config = SACConfig(algo_class=algo_class).training(
            actor_lr=t.lr, critic_lr=t.lr, alpha_lr=t.lr, gamma=t.gamma, tau=t.tau, n_step=t.n_step,
            train_batch_size_per_learner=t.train_batch_size, training_intensity=t.training_intensity,
            num_steps_sampled_before_learning_starts=t.learning_starts, replay_buffer_config=replay)
        model = DefaultModelConfig(fcnet_hiddens=list(t.hidden), head_fcnet_hiddens=[])

    config = (config.environment(cfg.env.name, env_config=env_config(cfg, start_step))
              .env_runners(num_env_runners=0, num_envs_per_env_runner=t.num_envs,
                           rollout_fragment_length=t.rollout_fragment_length)
              .rl_module(model_config=model)
              .reporting(min_sample_timesteps_per_iteration=t.env_steps_per_iter, min_time_s_per_iteration=0,
                         metrics_num_episodes_for_smoothing=20)
              .debugging(seed=t.seed)
              .callbacks(DEERCallback if method == "deer" else NonStationaryEpisodeLogger))
    if t.device == "cuda":
        config = config.learners(num_gpus_per_learner=1)
    learner_config = {}
    if cfg.eval.every_iters:
        learner_config[NS_EVAL_KEY] = {"env": cfg.env.name, "every_iters": cfg.eval.every_iters,
                                       "episodes": cfg.eval.episodes}
    if method == "deer":
        from rl.deer.learners import DEERDQNTorchLearner, DEERSACTorchLearner
        detector = dataclasses.asdict(cfg.deer.detector)
        detector["seed"] = t.seed
        learner_config.update({"deer_priority": dataclasses.asdict(cfg.deer.priority),
                               "deer_detector": dataclasses.asdict(DetectorSettings(**detector)),
                               "deer_change_source": cfg.deer.change_source,
                               "deer_snapshot_ring": cfg.deer.snapshot_ring})
        config = config.learners(learner_class=DEERDQNTorchLearner if discrete else DEERSACTorchLearner)
    if learner_config:
        config = config.learners(learner_config_dict=learner_config)
    return config

