"""RLlib callbacks: per-episode logging for the non-stationary benchmarks, and DEER's driver loop.

`NonStationaryEpisodeLogger` (all methods) logs, for every finished episode, the env's global
step at its end, its return and its dynamics segment, so evaluation can plot return over time
with the true shift markers (`result["env_runners"]["ns_episodes"]`).

`DEERCallback` (DEER only) runs the change detector on the driver after each training iteration:
it reads the rewards the DEER buffer received, feeds them to `RewardChangeDetector`, and on a
change (a) marks the change point in the buffer (older transitions become "pre") and (b) makes
every learner snapshot its Q-network for the DoE estimate.
"""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback

from rl.deer.detector import DetectorSettings, RewardChangeDetector

NS_EPISODES_KEY = "ns_episodes"


class NonStationaryEpisodeLogger(RLlibCallback):
    def on_episode_end(self, *, episode, prev_episode_chunks=None, metrics_logger=None, **kwargs) -> None:
        chunks = [episode] + list(prev_episode_chunks or [])
        info = episode.get_infos(-1)
        metrics_logger.log_value(
            NS_EPISODES_KEY,
            {"step": int(info.get("global_step", -1)), "return": float(sum(c.get_return() for c in chunks)),
             "segment": int(info.get("segment", -1)), "shift_steps": list(info.get("shift_steps", []))},
            reduce="item_series")


class DEERCallback(NonStationaryEpisodeLogger):
    def __init__(self):
        super().__init__()
        self.detector: RewardChangeDetector | None = None

    def on_train_result(self, *, algorithm, metrics_logger=None, result, **kwargs) -> None:
        buffer = algorithm.local_replay_buffer
        if self.detector is None:
            if buffer.detector_state is not None:  # resumed from a checkpoint
                self.detector = RewardChangeDetector.from_state(buffer.detector_state)
            else:
                settings = algorithm.config.learner_config_dict.get("deer_detector", {})
                self.detector = RewardChangeDetector(DetectorSettings(**settings))
        changes = self.detector.update(buffer.drain_rewards())
        for change_point in changes:
            buffer.mark_change(change_point)
        if changes:
            algorithm.learner_group.foreach_learner(lambda learner: learner.snapshot_q_network())
        buffer.detector_state = self.detector.get_state()
        result["deer"] = {"change_points": list(self.detector.change_points),
                          "threshold": float(self.detector.threshold),
                          "buffer_samples": buffer.num_samples,
                          "buffer_priority_updates": buffer.num_priority_updates}
