"""DEER's experiment config: one `ExperimentConfig` drives DEER and both baselines ("per",
"uniform") with the same algorithm and hyper-parameters; only the replay differs.

Importing it starts nothing and imports no Ray: the CLI loads and checks a config before it
connects to Ray (`edgeray.connect` must set its environment before Ray is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.config import param, section
from edgeray.errors import UserError
from rl.deer.priorities import DOE_ESTIMATES, POST_RULES, PRE_RULES
from rl.envs.nonstationary import MAX_MAGNITUDE, MIN_MAGNITUDE, NS_ENVS, SCHEDULES
from rl.loop import LoopSection

REPLAY_METHODS = ("deer", "per", "uniform")
REPLAY_IMPLS = ("fast", "stock")  # rl.deer.fast_replay


def variant_of(method: str, cfg) -> str:
    """The label a run is reported under: DEER told the true shifts is "deer-oracle"."""
    if method == "deer" and cfg.deer.change_source != "detector":
        return f"deer-{cfg.deer.change_source}"  # deer-oracle, deer-dynamics
    return method


@dataclass
class EnvSection:
    """The non-stationary environment."""
    name: str = param("ns-cartpole", "benchmark env", choices=tuple(NS_ENVS))
    shift_every: int = param(4000, "env steps per dynamics segment", ge=1)
    magnitudes: list[float] = param([0.0, 1.0, 2.0], "relative parameter change per segment "
                                    "(0 = nominal, 1.0 = +100 %, 2.0 = +200 %)")
    schedule: str = param("hold", "hold: segment k uses magnitudes[min(k, last)] (non-reverting); "
                          "cycle: magnitudes[k % len] (reverting)", choices=SCHEDULES)
    shift_params: list[str] = param([], "physical parameters that shift (empty = the env's one default: "
                                    "cartpole gravity, acrobot LINK_MASS_2, mountaincar gravity, pendulum g)")
    max_episode_steps: int = param(200, "episode length cap", ge=1)

    def validate(self) -> None:
        for m in self.magnitudes:
            if not MIN_MAGNITUDE <= m <= MAX_MAGNITUDE:
                raise UserError(f"env.magnitudes has {m}; allowed {MIN_MAGNITUDE} .. {MAX_MAGNITUDE}")
        if not self.magnitudes:
            raise UserError("env.magnitudes must list at least one magnitude, e.g. [0.0, 1.0]")


@dataclass
class TrainSection(LoopSection):
    """Algorithm and schedule, shared by all replay methods (plus the loop's seed, stop_iters,
    checkpoint_every, torch_threads)."""
    env_steps_per_iter: int = param(1000, "env steps per iteration (min_sample_timesteps_per_iteration)", ge=1)
    rollout_fragment_length: int = param(32, "env steps per sampling round (per env copy)", ge=1)
    num_envs: int = param(1, "env copies stepped in lockstep by the env runner (vectorized)", ge=1)
    training_intensity: float = param(4.0, "replayed / sampled steps ratio (RLlib training_intensity)", gt=0)
    train_batch_size: int = param(64, "replay batch size", ge=1)
    learning_starts: int = param(500, "env steps before the first update", ge=0)
    buffer_capacity: int = param(50000, "replay capacity in env steps", ge=100)
    replay_impl: str = param("fast", "prioritized replay path: fast = RLlib's buffer and DQN/SAC with a vectorized "
                             "sample / priority update (rl.deer.fast_replay, same draw probabilities); "
                             "stock = RLlib's own per-item sample() and training step", choices=REPLAY_IMPLS)
    hidden: list[int] = param([64, 64], "hidden layer sizes of every network")
    lr: float = param(1e-3, "learning rate (SAC: actor, critic and alpha)", gt=0)
    gamma: float = param(0.99, "discount", gt=0, le=1)
    n_step: int = param(1, "n-step returns", ge=1)
    target_update_freq: int = param(500, "DQN: env steps between target-network syncs", ge=1)
    epsilon_final: float = param(0.05, "DQN: final exploration epsilon", ge=0, le=1)
    epsilon_steps: int = param(5000, "DQN: env steps of linear epsilon decay", ge=1)
    tau: float = param(0.005, "SAC: target-network soft-update rate", gt=0, le=1)
    device: str = param("cpu", "learner device", choices=("cpu", "cuda"))


@dataclass
class EvalSection:
    """Greedy evaluation during training (all methods; rl.deer.callbacks)."""
    every_iters: int = param(0, "iterations between greedy evaluations (0 = off)", ge=0)
    episodes: int = param(5, "greedy episodes per evaluation, on an env copy frozen at the current dynamics", ge=1)


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
    calibration: str = param("episode_permutation", "threshold: episode_permutation = quantile of S over episode-block "
                      "shuffles of the agent's own two windows; iid_gaussian = calibrated once on N(0,1) noise [R]",
                      choices=("episode_permutation", "iid_gaussian"))
    permutations: int = param(19, "episode-block shuffles per check (episode_permutation)", ge=1)
    confirmations: int = param(2, "consecutive exceeding checks needed to declare a change [R]", ge=1)
    null_refresh: int = param(1, "checks between fresh permutation nulls (also recomputed whenever S beats the "
                              "last threshold) [R]", ge=1)
    stride: int = param(1, "every stride-th subsequence of a window is a classifier sample (cost / stride) [R]", ge=1)
    dynamics_min_ratio: float = param(3.0, "change_source=dynamics: a change also needs the test window's held-out "
                                      "model error >= this x the reference's (rl.deer.dynamics_detector) [R]", gt=1)

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
    doe_estimate: str = param("bellman_residual", "DoE: bellman_residual = Bellman residual of the frozen snapshot "
                              "from before the change under its own policy; snapshot_diff = Q_theta - Q_snapshot "
                              "(earlier rule) [R]", choices=DOE_ESTIMATES)
    doe_normalize: bool = param(True, "divide |d| by its running mean on pre-change samples and multiply by the "
                                "running mean |TD| (bellman_residual) [R]")
    scale_decay: float = param(0.99, "decay of those running means", gt=0, lt=1)


@dataclass
class DEERSection:
    """DEER-only settings (ignored by the baselines)."""
    change_source: str = param("detector", "detector = the reward-window detector; oracle = the env's true "
                               "shift steps (ablation: the priority rule without detector errors); dynamics = "
                               "prediction error of s' from (s, a) of a small model, rl.deer.dynamics_detector "
                               "(optional; uses deer.detector's window, subseq_len (block), check_every, epochs, "
                               "hidden, lr, quantile, permutations, confirmations, cooldown) [R]",
                               choices=("detector", "oracle", "dynamics"))
    snapshot_ring: int = param(8, "Q snapshots kept (one per iteration); a change freezes the newest one taken "
                               "at or before the change point", ge=1)
    detector: DetectorSection = section(DetectorSection)
    priority: PrioritySection = section(PrioritySection)


@dataclass
class ExperimentConfig:
    """One training run of DEER or a baseline on a non-stationary env."""
    env: EnvSection = section(EnvSection)
    train: TrainSection = section(TrainSection)
    replay: ReplaySection = section(ReplaySection)
    eval: EvalSection = section(EvalSection)
    deer: DEERSection = section(DEERSection)
