"""The train / checkpoint / resume loop every RLlib method shares (DEER and its baselines today,
RL-CRP and LEED next). It knows no method: a method hands it a `TrainHooks` object.

Shared here, for every method:
  * `train_run`: write config.yaml (the resolved config), build the algorithm, restore it on
    `--resume` (metrics rows logged after the checkpoint are dropped, so a resumed run's
    metrics.jsonl matches an uninterrupted run's), train until `stop_iters`, append one metrics
    row per iteration, checkpoint every `train.checkpoint_every` iterations and at the end,
    limit torch's threads, and always `algo.stop()`;
  * `LoopSection`: the settings the loop reads; a method's `train` section subclasses it;
  * `load_run`: (method, config, metrics rows) of a finished or running RL run, for evaluation.
The run directory itself (run.json, kind "rl") comes from `edgeray.runs.new_run_dir`.

    runs/<run_id>/
      run.json, config.yaml, metrics.jsonl          (edgeray.runs)
      checkpoints/latest/       RLlib checkpoint (`Algorithm.save_to_path`)
      checkpoints/progress.json iteration and env steps of that checkpoint, written last and atomically
      checkpoints/...           whatever a method's `save_extra` adds (DEER: replay_buffer.pkl)

Each metrics row holds `iteration`, `env_steps`, `episode_return_mean`, `iteration_wall_s` and
`load_avg_1m` (from RLlib's result, the same for every algorithm), plus the method's
`extra_metrics(result)`.

A new method plugs in with its hooks and one `METHODS` line in rl/cli.py, e.g.::

    class CRPHooks(TrainHooks):
        def build_algo(self, cfg, start_step):
            return crp_algo_config(cfg).build_algo()       # e.g. multi-agent PPOConfig
        def extra_metrics(self, result):
            return {"conflicts": result["env_runners"]["conflicts"]}

    train_run(CRPHooks(), cfg, run_dir)

A method's config has a `train` section that subclasses `LoopSection` and an `env.name`: the
CLI names a run `<method>-<env.name>-s<train.seed>-<date>-<time>-<pid>`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from edgeray import runs
from edgeray.config import dump_yaml, load_config, param
from edgeray.errors import UserError

CHECKPOINT_DIR = "checkpoints/latest"
PROGRESS_FILE = "checkpoints/progress.json"


@dataclass
class LoopSection:
    """Settings of the shared train loop (rl.loop); every RL method's `train` section subclasses it."""
    seed: int = param(0, "seed for RLlib, the env and the method's own randomness", ge=0)
    stop_iters: int = param(16, "training iterations", ge=1)
    checkpoint_every: int = param(5, "iterations between checkpoints (the last one is always saved)", ge=1)
    torch_threads: int = param(1, "torch intra-op threads of the training process; small nets are "
                               "fastest single-threaded, and extra threads spin badly on a busy machine", ge=1)


class TrainHooks(abc.ABC):
    """What a method gives the loop."""

    @abc.abstractmethod
    def build_algo(self, cfg, start_step: int):
        """The RLlib Algorithm for `cfg`. `start_step` is the env steps already done (non-zero on
        resume), for envs whose dynamics depend on the global step."""

    def extra_metrics(self, result: dict) -> dict:
        """The method's own columns of an iteration's metrics row."""
        return {}

    def save_extra(self, algo, checkpoints_dir: Path) -> None:
        """Save state RLlib's checkpoint leaves out (DEER: the replay buffer) into `checkpoints_dir`."""

    def load_extra(self, algo, checkpoints_dir: Path) -> None:
        """Restore what `save_extra` saved."""


def train_run(hooks: TrainHooks, cfg, run_dir: Path, *, resume: bool = False, stop_iters: int | None = None,
              log: Callable[[str], Any] = print) -> Path:
    """Train until `stop_iters` (default cfg.train.stop_iters) iterations in total, checkpointing;
    with `resume`, continue `run_dir` from its last checkpoint."""
    run_dir = Path(run_dir)
    stop_iters = stop_iters or cfg.train.stop_iters
    latest = str((run_dir / CHECKPOINT_DIR).resolve())  # RLlib wants an absolute path
    if resume:
        progress = _checkpoint_progress(run_dir)
        kept = [r for r in runs.read_metrics(run_dir) if r["iteration"] <= progress["iteration"]]
        runs.rewrite_metrics(run_dir, kept)
    else:
        progress = {"iteration": 0, "env_steps": 0}
        dump_yaml(cfg, run_dir / "config.yaml")
    with torch_threads(cfg.train.torch_threads):
        algo = hooks.build_algo(cfg, start_step=progress["env_steps"])
        try:
            if resume:
                algo.restore_from_path(latest)
                hooks.load_extra(algo, run_dir / "checkpoints")
            iteration = progress["iteration"]
            while iteration < stop_iters:
                t0 = time.perf_counter()
                result = algo.train()
                row = {**_common_metrics(result, time.perf_counter() - t0), **hooks.extra_metrics(result)}
                iteration = row["iteration"]
                runs.append_metrics(run_dir, row)
                log(f"[{run_dir.name}] iter {iteration} steps {row['env_steps']} "
                    f"return {row['episode_return_mean']} ({row['iteration_wall_s']:.1f}s)")
                if iteration % cfg.train.checkpoint_every == 0 or iteration >= stop_iters:
                    algo.save_to_path(latest)
                    hooks.save_extra(algo, run_dir / "checkpoints")
                    # written last: a crash mid-save leaves the previous progress, never a newer one
                    runs.write_json(run_dir / PROGRESS_FILE, {"iteration": iteration, "env_steps": row["env_steps"]})
        finally:
            algo.stop()
    return run_dir


def load_run(run_dir: str | Path, config_cls: type, methods: Iterable[str]) -> tuple[str, Any, list[dict]]:
    """(method, config, metrics rows) of an RL run whose method is one of `methods`."""
    run_dir = runs.open_run_dir(run_dir, kind="rl")
    method = runs.run_info(run_dir)["method"]
    methods = tuple(methods)
    if method not in methods:
        raise UserError(f"{run_dir} is a {method!r} run, not one of: {', '.join(methods)}")
    return method, load_config(config_cls, run_dir / "config.yaml"), runs.read_metrics(run_dir)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with `n` torch intra-op threads, restoring the previous number afterwards. The nets
    here are tiny: extra threads only spin, and on a busy 2-core machine that made DEER's
    detector 25x slower in our measurements."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _checkpoint_progress(run_dir: Path) -> dict:
    if not (run_dir / CHECKPOINT_DIR).is_dir() or not (run_dir / PROGRESS_FILE).is_file():
        raise UserError(f"{run_dir} has no checkpoint ({CHECKPOINT_DIR}); nothing to resume")
    return json.loads((run_dir / PROGRESS_FILE).read_text())


def _common_metrics(result: dict, iteration_wall_s: float) -> dict:
    runners = result.get("env_runners", {})
    return {
        "iteration": int(result["training_iteration"]),
        "env_steps": int(result.get("num_env_steps_sampled_lifetime",
                                    runners.get("num_env_steps_sampled_lifetime", 0))),
        "episode_return_mean": _float_or_none(runners.get("episode_return_mean")),
        "iteration_wall_s": iteration_wall_s,
        "load_avg_1m": os.getloadavg()[0],
    }


def _float_or_none(value):
    """RLlib reports NaN (or nothing) before the first episode ends; JSON gets null."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value
