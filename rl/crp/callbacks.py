"""Episode metrics of RL-CRP's env (conflicts per round, mean edge latency, Jain's index, invalid
actions), from the last step's info, logged into RLlib's result under `env_runners`."""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback

EPISODE_KEYS = ("conflicts_per_round", "latency_s", "jain", "invalid_actions")


class CRPMetricsCallback(RLlibCallback):
    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        infos = episode.get_infos(-1)
        info = next(iter(infos.values()), {}) if infos else {}
        for key in EPISODE_KEYS:
            if key in info and metrics_logger is not None:
                metrics_logger.log_value(f"crp_{key}", float(info[key]), reduce="mean", window=20)
