"""RLlib callbacks: logging and greedy evaluation for the non-stationary benchmarks, and DEER's driver loop.

`NonStationaryEpisodeLogger` (all methods) logs, for every finished episode, the env's global
step at its end, its return and its dynamics segment (`result["env_runners"]["ns_episodes"]`),
and, when `learner_config_dict["ns_eval"]` asks for it, runs `episodes` GREEDY evaluation
episodes every `every_iters` iterations on a separate env copy frozen at the dynamics of the
current env step (`rl.deer.analysis.evaluate_policy`; seeds depend only on the iteration, so
every method is evaluated from the same start states): `result["ns_eval"]`.

`DEERCallback` (DEER only) runs after each training iteration on the driver:
  1. the learners push their current weights into their snapshot ring, stamped with the env step;
  2. change points: either the reward-window detector (`RewardChangeDetector`) fed with the
     episodes the DEER buffer received, or, with `deer_change_source="oracle"` (the ablation that
     measures the priority rule apart from the detector), the true shift steps of the env's
     schedule, or, with "dynamics" (optional, our reconstruction), the dynamics-model detector
     (`rl.deer.dynamics_detector`) fed with the buffer's transitions;
  3. on a change at step c: the buffer marks c (older transitions become "pre") and every learner
     freezes the ring snapshot taken at or before c (`freeze_snapshot`).
"""

from __future__ import annotations

import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback

from rl.deer.detector import DetectorSettings, RewardChangeDetector
from rl.envs.nonstationary import ShiftSchedule

NS_EPISODES_KEY = "ns_episodes"
NS_EVAL_KEY = "ns_eval"
CHANGE_SOURCES = ("detector", "oracle", "dynamics")


def _schedule(env_config: dict) -> ShiftSchedule:
    return ShiftSchedule(env_config.get("shift_every", 5000), env_config.get("magnitudes", [0.0, 1.0]),
                         env_config.get("schedule", "cycle"))


def _greedy_policy(module, action_space):
    import torch
    from ray.rllib.core.columns import Columns

    def act(obs):
        with torch.no_grad():
            out = module.forward_inference({Columns.OBS: torch.as_tensor(np.asarray(obs, dtype=np.float32)[None])})
        if Columns.ACTIONS in out:  # DQN: argmax Q
            return int(out[Columns.ACTIONS][0])
        mean = torch.tanh(out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)[0][0]).numpy()  # SAC: deterministic
        low, high = action_space.low, action_space.high
        return (low + (mean + 1.0) * 0.5 * (high - low)).astype(np.float32)

    return act


class NonStationaryEpisodeLogger(RLlibCallback):
    def on_episode_end(self, *, episode, prev_episode_chunks=None, metrics_logger=None, **kwargs) -> None:
        chunks = [episode] + list(prev_episode_chunks or [])
        info = episode.get_infos(-1)
        metrics_logger.log_value(
            NS_EPISODES_KEY,
            {"step": int(info.get("global_step", -1)), "return": float(sum(c.get_return() for c in chunks)),
             "segment": int(info.get("segment", -1)), "shift_steps": list(info.get("shift_steps", []))},
            reduce="item_series")

    def on_train_result(self, *, algorithm, metrics_logger=None, result, **kwargs) -> None:
        settings = algorithm.config.learner_config_dict.get(NS_EVAL_KEY)
        if not settings or result["training_iteration"] % settings["every_iters"]:
            return
        from rl.deer.analysis import evaluate_policy

        env_config = dict(algorithm.config.env_config)
        step = int(result.get("num_env_steps_sampled_lifetime", 0))
        module = algorithm.get_module()
        probe = algorithm.env_runner.env.single_action_space if algorithm.env_runner else None
        returns = evaluate_policy(settings["env"], env_config, step, _greedy_policy(module, probe),
                                  settings["episodes"], seed=10_000 + result["training_iteration"])
        result[NS_EVAL_KEY] = {"step": step, "magnitude": _schedule(env_config).magnitude(step),
                               "returns": returns}


class DEERCallback(NonStationaryEpisodeLogger):
    def __init__(self):
        super().__init__()
        self.detector = None  # RewardChangeDetector, or DynamicsChangeDetector for change_source "dynamics"

    def on_algorithm_init(self, *, algorithm, metrics_logger=None, **kwargs) -> None:
        if algorithm.config.learner_config_dict.get("deer_change_source") == "dynamics":
            algorithm.local_replay_buffer.keep_transitions = True

    @staticmethod
    def _make_detector(algorithm, buffer, source, cfg):
        settings = DetectorSettings(**cfg.get("deer_detector", {}))
        if source == "dynamics":
            from rl.deer.dynamics_detector import DynamicsChangeDetector

            buffer.keep_transitions = True
            if buffer.detector_state is not None and buffer.detector_state.get("kind") == "dynamics":
                return DynamicsChangeDetector.from_state(buffer.detector_state)
            space = algorithm.get_module().action_space
            return DynamicsChangeDetector(settings, int(space.n) if hasattr(space, "n") else None)
        if buffer.detector_state is not None:  # resumed from a checkpoint
            return RewardChangeDetector.from_state(buffer.detector_state)
        return RewardChangeDetector(settings)

    def on_train_result(self, *, algorithm, metrics_logger=None, result, **kwargs) -> None:
        super().on_train_result(algorithm=algorithm, metrics_logger=metrics_logger, result=result, **kwargs)
        buffer = algorithm.local_replay_buffer
        cfg = algorithm.config.learner_config_dict
        source = cfg.get("deer_change_source", "detector")
        if self.detector is None:
            self.detector = self._make_detector(algorithm, buffer, source, cfg)
        step = buffer.steps_added
        algorithm.learner_group.foreach_learner(lambda learner: learner.push_snapshot(step))
        rewards, starts, stamps = buffer.drain_stream()
        if source == "dynamics":
            transitions = buffer.drain_transitions()
            changes = self.detector.update(*transitions) if transitions is not None else []
        elif source == "oracle":
            seen = buffer.change_steps[-1] if buffer.change_steps else 0
            changes = [s for s in _schedule(algorithm.config.env_config).shift_steps(step) if s > seen]
            self.detector.change_points.extend(changes)
        else:
            changes = self.detector.update(rewards, blocks=starts, stamps=stamps)
        frozen = []
        for change_point in changes:
            buffer.mark_change(change_point)
        if changes:
            frozen = [r.get() if hasattr(r, "get") else r for r in
                      algorithm.learner_group.foreach_learner(lambda learner: learner.freeze_snapshot(changes[-1]))]
        buffer.detector_state = self.detector.get_state()
        result["deer"] = {"change_points": list(self.detector.change_points), "change_source": source,
                          "threshold": None if self.detector.threshold is None else float(self.detector.threshold),
                          "snapshot_steps": list(frozen),
                          "buffer_samples": buffer.num_samples,
                          "buffer_priority_updates": buffer.num_priority_updates}
