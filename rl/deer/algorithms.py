"""Experiment config and RLlib algorithm builders for DEER and its two baselines.

One `ExperimentConfig` drives all three methods with the same algorithm and hyper-parameters;
only the replay differs:
  * "uniform": RLlib's `EpisodeReplayBuffer`;
  * "per":     RLlib's stock `PrioritizedEpisodeReplayBuffer` (|TD| priorities);
  * "deer":    `DEERPrioritizedEpisodeReplayBuffer` + DEER learner + `DEERCallback`.
Discrete-action envs train with DQN, continuous ones with SAC (`DEERSAC` builds the DEER
buffer itself because `SACConfig.validate` only accepts RLlib's four buffer names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgeray.config import param, section
from edgeray.errors import UserError
from rl.deer.buffer import DEER_BUFFER_TYPE, DEERPrioritizedEpisodeReplayBuffer
from rl.deer.detector import DetectorSettings
from rl.deer.priorities import POST_RULES, PRE_RULES
from rl.envs.nonstationary import MAX_MAGNITUDE, MIN_MAGNITUDE, NS_ENVS

REPLAY_METHODS = ("deer", "per", "uniform")


@dataclass
class EnvSection:
    """The non-stationary environment."""
    name: str = param("ns-cartpole", "benchmark env", choices=tuple(NS_ENVS))
    shift_every: int = param(4000, "env steps per dynamics segment", ge=1)
    magnitudes: list[float] = param([0.0, 1.0], "relative parameter change per segment, cycled "
                                    "(0 = nominal, 1.0 = +100 %, 2.0 = +200 %)")
    shift_params: list[str] = param([], "physical parameters that shift (empty = all the env has)")
    max_episode_steps: int = param(200, "episode length cap", ge=1)

    def validate(self) -> None:
        for m in self.magnitudes:
            if not MIN_MAGNITUDE <= m <= MAX_MAGNITUDE:
                raise UserError(f"env.magnitudes has {m}; allowed {MIN_MAGNITUDE} .. {MAX_MAGNITUDE}")
        if not self.magnitudes:
            raise UserError("env.magnitudes must list at least one magnitude, e.g. [0.0, 1.0]")


@dataclass
class TrainSection:
    """Algorithm and schedule, shared by all replay methods."""
    seed: int = param(0, "seed for RLlib, the env and the detector", ge=0)
    stop_iters: int = param(16, "training iterations", ge=1)
    env_steps_per_iter: int = param(1000, "env steps per iteration (min_sample_timesteps_per_iteration)", ge=1)
    rollout_fragment_length: int = param(32, "env steps per sampling round", ge=1)
    training_intensity: float = param(4.0, "replayed / sampled steps ratio (RLlib training_intensity)", gt=0)
    train_batch_size: int = param(64, "replay batch size", ge=1)
    learning_starts: int = param(500, "env steps before the first update", ge=0)
    buffer_capacity: int = param(50000, "replay capacity in env steps", ge=100)
    hidden: list[int] = param([64, 64], "hidden layer sizes of every network")
    lr: float = param(1e-3, "learning rate (SAC: actor, critic and alpha)", gt=0)
    gamma: float = param(0.99, "discount", gt=0, le=1)
    n_step: int = param(1, "n-step returns", ge=1)
    target_update_freq: int = param(500, "DQN: env steps between target-network syncs", ge=1)
    epsilon_final: float = param(0.05, "DQN: final exploration epsilon", ge=0, le=1)
    epsilon_steps: int = param(5000, "DQN: env steps of linear epsilon decay", ge=1)
    tau: float = param(0.005, "SAC: target-network soft-update rate", gt=0, le=1)
    checkpoint_every: int = param(5, "iterations between checkpoints (the last one is always saved)", ge=1)
    torch_threads: int = param(1, "torch intra-op threads of the training process; small nets are "
                               "fastest single-threaded, and extra threads spin badly on a busy machine", ge=1)
    device: str = param("cpu", "learner device", choices=("cpu", "cuda"))


@dataclass
class ReplaySection:
    """Prioritized replay (PER and DEER)."""
    alpha: float = param(0.6, "priority exponent", ge=0)
    beta: float = param(0.4, "importance-sampling exponent", ge=0, le=1)


@dataclass
class DetectorSection:
    """DEER reward-window change detector (rl.deer.detector)."""
    window: int = param(500, "m: rewards per reference / test window", ge=16)
    subseq_len: int = param(32, "L: reward subsequence length fed to the classifier [R]", ge=2)
    check_every: int = param(250, "H: env steps between detector checks", ge=1)
    epochs: int = param(40, "classifier epochs per check", ge=1)
    hidden: int = param(16, "classifier hidden units", ge=1)
    lr: float = param(0.02, "classifier learning rate", gt=0)
    threshold: float | None = param(None, "eta; null = calibrate on stationary noise [R]")
    quantile: float = param(0.99, "calibration quantile of the stationary score [R]", gt=0.5, lt=1)
    calibration_trials: int = param(60, "stationary streams simulated for calibration", ge=10)
    cooldown: int = param(1000, "env steps without a new detection after one [R]", ge=0)

    def validate(self) -> None:
        if self.subseq_len >= self.window:
            raise UserError(f"deer.detector.subseq_len={self.subseq_len} must be < deer.detector.window={self.window}")


@dataclass
class PrioritySection:
    """DEER priority rules (rl.deer.priorities); all OUR RECONSTRUCTION."""
    post_rule: str = param("td_plus_doe", "priority of post-change transitions", choices=POST_RULES)
    pre_rule: str = param("td_over_doe", "priority of pre-change transitions", choices=PRE_RULES)
    doe_weight: float = param(1.0, "kappa: DoE weight after a change", ge=0)
    pre_doe_weight: float = param(1.0, "kappa': DoE suppression of pre-change transitions", ge=0)
    epsilon: float = param(1e-3, "added to every priority", gt=0)
    doe_estimate: str = param("snapshot_diff", "DoE estimator: Q_theta - Q_snapshot", choices=("snapshot_diff",))


@dataclass
class DEERSection:
    """DEER-only settings (ignored by the baselines)."""
    detector: DetectorSection = section(DetectorSection)
    priority: PrioritySection = section(PrioritySection)


@dataclass
class ExperimentConfig:
    """One training run of DEER or a baseline on a non-stationary env."""
    env: EnvSection = section(EnvSection)
    train: TrainSection = section(TrainSection)
    replay: ReplaySection = section(ReplaySection)
    deer: DEERSection = section(DEERSection)


def env_config(cfg: ExperimentConfig, start_step: int = 0) -> dict:
    out = {"shift_every": cfg.env.shift_every, "magnitudes": list(cfg.env.magnitudes),
           "max_episode_steps": cfg.env.max_episode_steps, "start_step": start_step}
    if cfg.env.shift_params:
        out["shift_params"] = list(cfg.env.shift_params)
    return out


def _deer_sac_class():
    from ray.rllib.algorithms.sac import SAC

    class DEERSAC(SAC):
        """SAC whose local replay buffer is DEER's (SACConfig only validates built-in names)."""

        def _create_local_replay_buffer_if_necessary(self, config):
            kwargs = {k: v for k, v in config["replay_buffer_config"].items() if k != "type"}
            kwargs["metrics_num_episodes_for_smoothing"] = self.config.metrics_num_episodes_for_smoothing
            return DEERPrioritizedEpisodeReplayBuffer(**kwargs)

    return DEERSAC


def build_algo_config(method: str, cfg: ExperimentConfig, start_step: int = 0):
    """The RLlib AlgorithmConfig for `method` on `cfg.env.name` (new API stack)."""
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    from rl.deer.callbacks import DEERCallback, NonStationaryEpisodeLogger
    from rl.envs import register_ns_envs

    if method not in REPLAY_METHODS:
        raise UserError(f"unknown replay method {method!r}; choose one of: {', '.join(REPLAY_METHODS)}")
    register_ns_envs()
    t = cfg.train
    discrete = NS_ENVS[cfg.env.name][1] == "discrete"
    replay = {"capacity": t.buffer_capacity}
    if method == "uniform":
        replay["type"] = "EpisodeReplayBuffer"
    else:
        replay.update(alpha=cfg.replay.alpha, beta=cfg.replay.beta)
        replay["type"] = DEER_BUFFER_TYPE if (method == "deer" and discrete) else "PrioritizedEpisodeReplayBuffer"

    if discrete:
        from ray.rllib.algorithms.dqn import DQNConfig
        config = DQNConfig().training(
            lr=t.lr, gamma=t.gamma, n_step=t.n_step, train_batch_size_per_learner=t.train_batch_size,
            training_intensity=t.training_intensity, num_steps_sampled_before_learning_starts=t.learning_starts,
            target_network_update_freq=t.target_update_freq,
            epsilon=[(0, 1.0), (t.epsilon_steps, t.epsilon_final)], replay_buffer_config=replay)
        model = DefaultModelConfig(fcnet_hiddens=list(t.hidden), head_fcnet_hiddens=[])
    else:
        from ray.rllib.algorithms.sac import SACConfig
        config = SACConfig(algo_class=_deer_sac_class() if method == "deer" else None).training(
            actor_lr=t.lr, critic_lr=t.lr, alpha_lr=t.lr, gamma=t.gamma, tau=t.tau, n_step=t.n_step,
            train_batch_size_per_learner=t.train_batch_size, training_intensity=t.training_intensity,
            num_steps_sampled_before_learning_starts=t.learning_starts, replay_buffer_config=replay)
        model = DefaultModelConfig(fcnet_hiddens=list(t.hidden), head_fcnet_hiddens=[])

    config = (config.environment(cfg.env.name, env_config=env_config(cfg, start_step))
              .env_runners(num_env_runners=0, num_envs_per_env_runner=1,
                           rollout_fragment_length=t.rollout_fragment_length)
              .rl_module(model_config=model)
              .reporting(min_sample_timesteps_per_iteration=t.env_steps_per_iter, min_time_s_per_iteration=0,
                         metrics_num_episodes_for_smoothing=20)
              .debugging(seed=t.seed)
              .callbacks(DEERCallback if method == "deer" else NonStationaryEpisodeLogger))
    if t.device == "cuda":
        config = config.learners(num_gpus_per_learner=1)
    if method == "deer":
        from rl.deer.learners import DEERDQNTorchLearner, DEERSACTorchLearner
        detector = dataclasses.asdict(cfg.deer.detector)
        detector["seed"] = t.seed
        config = config.learners(
            learner_class=DEERDQNTorchLearner if discrete else DEERSACTorchLearner,
            learner_config_dict={"deer_priority": dataclasses.asdict(cfg.deer.priority),
                                 "deer_detector": dataclasses.asdict(DetectorSettings(**detector))})
    return config

