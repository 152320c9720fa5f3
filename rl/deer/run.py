"""One training run of DEER / PER / uniform replay: RLlib algorithm + run directory.

runs/<run_id>/
  config.yaml      resolved ExperimentConfig plus `method`
  metrics.jsonl    one row per iteration: env steps, return, the iteration's finished episodes
                   (end step, return, segment), true shift steps, DEER's detected change points,
                   wall time, load average
  checkpoints/latest/   RLlib checkpoint (algorithm, learner incl. DEER's Q snapshot)
  checkpoints/replay_buffer.pkl   replay buffer state (incl. DEER's stamps and detector state)
  checkpoints/progress.json       iteration and env steps of the checkpoint; `--resume` continues there
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
from pathlib import Path

import torch
import yaml

from edgeray import runs
from edgeray.config import load_config, to_dict
from edgeray.errors import UserError
from rl.deer.algorithms import ExperimentConfig, build_algo_config
from rl.deer.callbacks import NS_EPISODES_KEY

CHECKPOINT_DIR = "checkpoints/latest"
BUFFER_FILE = "checkpoints/replay_buffer.pkl"


def new_run_dir(root: str | Path, method: str, cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{method}-{cfg.env.name}-s{cfg.train.seed}-{stamp}"
    run_dir, k = base, 1
    while run_dir.exists():
        run_dir, k = Path(f"{base}-{k}"), k + 1
    run_dir.mkdir(parents=True)
    return run_dir


def load_run(run_dir: str | Path) -> tuple[str, ExperimentConfig, list[dict]]:
    """(method, config, metrics rows) of an existing run directory."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass a runs/<run_id> folder")
    raw = yaml.safe_load(config_path.read_text()) or {}
    method = raw.pop("method", None)
    cfg = load_config(ExperimentConfig, data=raw)
    return method, cfg, runs.read_metrics(run_dir)


def _row(result: dict, iteration_wall_s: float) -> dict:
    runners = result.get("env_runners", {})
    episodes = runners.get(NS_EPISODES_KEY) or []
    if isinstance(episodes, dict):  # RLlib unwraps a one-item series
        episodes = [episodes]
    shift_steps = max((e["shift_steps"] for e in episodes), key=len, default=[])
    row = {
        "iteration": int(result["training_iteration"]),
        "env_steps": int(result.get("num_env_steps_sampled_lifetime", runners.get("num_env_steps_sampled_lifetime", 0))),
        "episode_return_mean": _float(runners.get("episode_return_mean")),
        "episodes": [[e["step"], e["return"], e["segment"]] for e in episodes],
        "shift_steps": shift_steps,
        "iteration_wall_s": iteration_wall_s,
        "load_avg_1m": os.getloadavg()[0],
    }
    if "deer" in result:
        row["deer"] = result["deer"]
    return row


def _float(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value


def train_run(method: str, cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False,
              stop_iters: int | None = None, log=print) -> Path:
    """Train `method` until `stop_iters` (default cfg.train.stop_iters) iterations, checkpointing."""
    with torch_threads(cfg.train.torch_threads):
        return _train(method, cfg, run_dir, resume, stop_iters or cfg.train.stop_iters, log)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with `n` torch intra-op threads, restoring the previous number afterwards. The nets
    here are tiny: extra threads only spin, and on a busy 2-core machine that made the detector
    25x slower in our measurements."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(method, cfg, run_dir, resume, stop_iters, log) -> Path:
    rows = []
    if resume:
        if not (run_dir / CHECKPOINT_DIR).is_dir():
            raise UserError(f"{run_dir} has no checkpoint ({CHECKPOINT_DIR}); nothing to resume")
        _, _, rows = load_run(run_dir)
        state = json.loads((run_dir / "checkpoints" / "progress.json").read_text())
        # drop rows logged after the checkpoint, so metrics match an uninterrupted run
        rows = [r for r in rows if r["iteration"] <= state["iteration"]]
        runs.rewrite_metrics(run_dir, rows)
        algo = build_algo_config(method, cfg, start_step=state["env_steps"]).build_algo()
        algo.restore_from_path(str((run_dir / CHECKPOINT_DIR).resolve()))
        # RLlib's new-stack checkpoints leave the replay buffer out; we keep it beside them.
        with open(run_dir / BUFFER_FILE, "rb") as fh:
            algo.local_replay_buffer.set_state(pickle.load(fh))
    else:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"method": method, **to_dict(cfg)}, sort_keys=False))
        algo = build_algo_config(method, cfg).build_algo()
    try:
        iteration = rows[-1]["iteration"] if rows else 0
        while iteration < stop_iters:
            t0 = time.perf_counter()
            result = algo.train()
            row = _row(result, time.perf_counter() - t0)
            iteration = row["iteration"]
            runs.append_metrics(run_dir, row)
            log(f"[{method} {cfg.env.name} seed={cfg.train.seed}] iter {iteration} steps {row['env_steps']} "
                f"return {row['episode_return_mean']} ({row['iteration_wall_s']:.1f}s)")
            if iteration % cfg.train.checkpoint_every == 0 or iteration >= stop_iters:
                algo.save_to_path(str((run_dir / CHECKPOINT_DIR).resolve()))
                with open(run_dir / BUFFER_FILE, "wb") as fh:
                    pickle.dump(algo.local_replay_buffer.get_state(), fh)
                (run_dir / "checkpoints" / "progress.json").write_text(
                    json.dumps({"iteration": iteration, "env_steps": row["env_steps"]}))
    finally:
        algo.stop()
    return run_dir

