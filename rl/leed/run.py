"""One training run of LEED / IPPO / BC-then-PPO: their hooks into the shared loop (rl.loop).

What is LEED-specific here:
  * the algorithm: `build_algo_config(method, cfg, run_dir)` (PPO, the method's learner and callback);
  * the metrics columns: per-agent mean returns, the expert weight lambda_k and the expert NLL
    (mean over modules), and the callback's "leed" entry (demonstration round, backend,
    valid-instruction share, repair counts, expert return);
  * checkpoints/leed_generator.pkl: the callback's round and demonstrations (the learners keep
    their own copy in RLlib's checkpoint), so a resumed run refines from where it stopped.
Everything else (run directory, checkpoints/latest, progress.json, resume) is rl.loop's.
Demonstration prompts, raw answers and repair reports are written to <run>/demos/round_<k>.json.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from rl.leed.algorithms import build_algo_config
from rl.leed.config import LEEDConfig
from rl.loop import TrainHooks

GENERATOR_FILE = "leed_generator.pkl"


class LEEDHooks(TrainHooks):
    def __init__(self, method: str, run_dir: str | Path | None = None):
        self.method, self.run_dir = method, run_dir

    def build_algo(self, cfg: LEEDConfig, start_step: int):
        return build_algo_config(self.method, cfg, self.run_dir).build_algo()

    def extra_metrics(self, result: dict) -> dict:
        learners = {m: v for m, v in result.get("learners", {}).items()
                    if isinstance(v, dict) and m != "__all_modules__"}
        row = {"agent_returns": {a: float(r) for a, r in
                                 (result.get("env_runners", {}).get("agent_episode_returns_mean") or {}).items()}}
        nll = [float(v["expert_nll"]) for v in learners.values() if "expert_nll" in v]
        weight = [float(v["expert_weight"]) for v in learners.values() if "expert_weight" in v]
        if weight:
            row["expert_weight"] = weight[0]
        if nll:
            row["expert_nll"] = float(np.mean(nll))
        if "leed" in result:
            row["leed"] = result["leed"]
        return row

    def save_extra(self, algo, checkpoints_dir: Path) -> None:
        if self.method == "ippo":
            return
        tmp = checkpoints_dir / f"{GENERATOR_FILE}.tmp"
        with open(tmp, "wb") as fh:
            pickle.dump(_leed_callback(algo).state(), fh)
        os.replace(tmp, checkpoints_dir / GENERATOR_FILE)  # a crash mid-write keeps the previous file

    def load_extra(self, algo, checkpoints_dir: Path) -> None:
        if self.method == "ippo":
            return
        with open(checkpoints_dir / GENERATOR_FILE, "rb") as fh:
            _leed_callback(algo).load_state(pickle.load(fh))


def _leed_callback(algo):
    """The algorithm's LEEDCallback (RLlib keeps callbacks as one object or a list)."""
    from rl.leed.callbacks import LEEDCallback

    callbacks = algo.callbacks if isinstance(algo.callbacks, list) else [algo.callbacks]
    return next(c for c in callbacks if isinstance(c, LEEDCallback))
