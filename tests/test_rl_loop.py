"""The shared RL train / checkpoint / resume loop (rl.loop), no Ray: an algorithm that counts
stands in for RLlib's, so the loop's own rules are checked in milliseconds."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeray import runs
from edgeray.config import section
from edgeray.errors import UserError
from rl.loop import LoopSection, TrainHooks, load_run, train_run


@dataclass
class CountingConfig:
    """A method config as the loop needs it: a `train` section that subclasses LoopSection."""
    train: LoopSection = section(LoopSection)


class CountingAlgo:
    """The part of RLlib's Algorithm the loop uses; each iteration samples 10 env steps."""

    def __init__(self, fail_at: int | None):
        self.iteration, self.fail_at, self.stopped = 0, fail_at, False

    def train(self) -> dict:
        if self.iteration + 1 == self.fail_at:
            raise RuntimeError("killed")
        self.iteration += 1
        return {"training_iteration": self.iteration, "num_env_steps_sampled_lifetime": 10 * self.iteration,
                "env_runners": {"episode_return_mean": float("nan") if self.iteration == 1 else 1.0}}

    def save_to_path(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "state.json").write_text(json.dumps(self.iteration))

    def restore_from_path(self, path: str) -> None:
        self.iteration = json.loads((Path(path) / "state.json").read_text())

    def stop(self) -> None:
        self.stopped = True


class CountingHooks(TrainHooks):
    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.algos, self.start_steps, self.loaded_extra = fail_at, [], [], None

    def build_algo(self, cfg, start_step):
        self.start_steps.append(start_step)
        self.algos.append(CountingAlgo(self.fail_at))
        return self.algos[-1]

    def extra_metrics(self, result):
        return {"twice": 2 * result["training_iteration"]}

    def save_extra(self, algo, checkpoints_dir):
        (checkpoints_dir / "extra.json").write_text(json.dumps(algo.iteration))

    def load_extra(self, algo, checkpoints_dir):
        self.loaded_extra = json.loads((checkpoints_dir / "extra.json").read_text())


def _run_dir(root, method="count"):
    return runs.new_run_dir(root, f"{method}-s0", kind="rl", method=method, argv=["test"])


def _cfg(**train):
    from edgeray.config import load_config
    return load_config(CountingConfig, data={"train": {"checkpoint_every": 2, "stop_iters": 5, **train}})


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in ("iteration_wall_s", "load_avg_1m")} for r in rows]


def test_a_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    whole = _run_dir(tmp_path / "whole")
    train_run(CountingHooks(), _cfg(), whole, log=lambda _: None)

    cut = _run_dir(tmp_path / "cut")
    killed = CountingHooks(fail_at=4)  # iteration 3 is logged, the checkpoint is at 2
    with pytest.raises(RuntimeError, match="killed"):
        train_run(killed, _cfg(), cut, log=lambda _: None)
    assert killed.algos[0].stopped  # stopped in `finally`, also when training fails
    assert [r["iteration"] for r in runs.read_metrics(cut)] == [1, 2, 3]
    resumed = CountingHooks()
    train_run(resumed, _cfg(), cut, resume=True, log=lambda _: None)
    assert resumed.start_steps == [20] and resumed.loaded_extra == 2 and resumed.algos[0].stopped

    rows = runs.read_metrics(cut)
    assert _comparable(rows) == _comparable(runs.read_metrics(whole))
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["episode_return_mean"] is None
    assert rows[-1]["twice"] == 10 and rows[-1]["env_steps"] == 50
    assert json.loads((cut / "checkpoints" / "progress.json").read_text()) == {"iteration": 5, "env_steps": 50}
    assert json.loads((cut / "checkpoints" / "extra.json").read_text()) == 5


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path):
    run_dir = _run_dir(tmp_path)
    with pytest.raises(RuntimeError):
        train_run(CountingHooks(fail_at=1), _cfg(), run_dir, log=lambda _: None)
    with pytest.raises(UserError, match="has no checkpoint"):
        train_run(CountingHooks(), _cfg(), run_dir, resume=True)


def test_load_run_reads_the_method_from_run_json(tmp_path):
    run_dir = _run_dir(tmp_path)
    train_run(CountingHooks(), _cfg(stop_iters=2), run_dir, log=lambda _: None)
    method, cfg, rows = load_run(run_dir, CountingConfig, ["count"])
    assert method == "count" and cfg == _cfg(stop_iters=2) and len(rows) == 2
    with pytest.raises(UserError, match="is a 'count' run, not one of: deer, per"):
        load_run(run_dir, CountingConfig, ["deer", "per"])
