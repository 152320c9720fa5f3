"""One training run of DEER / PER / uniform replay: their hooks into the shared loop (rl.loop).

What is replay-specific here:
  * the algorithm: `build_algo_config(method, cfg, start_step)` (DQN or SAC, the method's buffer);
  * the metrics columns: the iteration's finished episodes as (end step, return, segment), the
    true shift steps, the greedy evaluation if one ran (`eval`: step, magnitude, returns), and
    DEER's detected change points, frozen snapshot steps and buffer counters (`result["deer"]`);
  * checkpoints/replay_buffer.pkl: RLlib's new-stack checkpoints leave the replay buffer out, and
    a resumed off-policy run needs it (for DEER also its step stamps, change marks and detector state).
Everything else (run directory, checkpoints/latest, progress.json, resume) is rl.loop's.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from rl.deer.algorithms import build_algo_config
from rl.deer.callbacks import NS_EPISODES_KEY, NS_EVAL_KEY
from rl.deer.config import ExperimentConfig
from rl.loop import TrainHooks

BUFFER_FILE = "replay_buffer.pkl"


class ReplayHooks(TrainHooks):
    def __init__(self, method: str):
        self.method = method

    def build_algo(self, cfg: ExperimentConfig, start_step: int):
        return build_algo_config(self.method, cfg, start_step=start_step).build_algo()

    def extra_metrics(self, result: dict) -> dict:
        episodes = result.get("env_runners", {}).get(NS_EPISODES_KEY) or []
        if isinstance(episodes, dict):  # RLlib unwraps a one-item series
            episodes = [episodes]
        row = {"episodes": [[e["step"], e["return"], e["segment"]] for e in episodes],
               "shift_steps": max((e["shift_steps"] for e in episodes), key=len, default=[])}
        if "deer" in result:
            row["deer"] = result["deer"]
        if NS_EVAL_KEY in result:
            row["eval"] = result[NS_EVAL_KEY]
        return row

    def save_extra(self, algo, checkpoints_dir: Path) -> None:
        tmp = checkpoints_dir / f"{BUFFER_FILE}.tmp"
        with open(tmp, "wb") as fh:
            pickle.dump(algo.local_replay_buffer.get_state(), fh)
        os.replace(tmp, checkpoints_dir / BUFFER_FILE)  # a crash mid-write keeps the previous buffer

    def load_extra(self, algo, checkpoints_dir: Path) -> None:
        with open(checkpoints_dir / BUFFER_FILE, "rb") as fh:
            algo.local_replay_buffer.set_state(pickle.load(fh))
