"""`edgeray rl ...`: train and evaluate the RLlib-hosted methods.

    edgeray rl train <method> --env ENV --config FILE [--set key=value ...] [--stop-iters N]
                     [--runs-root DIR] [--resume RUN_DIR]
    edgeray rl eval <method> --runs RUN_DIR [RUN_DIR ...] [--out DIR]
    edgeray rl list

Methods are entries of `METHODS`: each names its config class and its train / eval functions,
so RL-CRP and LEED plug in as new entries. "deer", "per" and "uniform" share one experiment
(same algorithm and hyper-parameters, only the replay differs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeray.errors import UserError


@dataclass(frozen=True)
class RLMethod:
    summary: str
    config_cls: Callable[[], type]
    train: Callable[..., Path]
    evaluate: Callable[..., dict]


def _experiment_config_cls():
    from rl.deer.algorithms import ExperimentConfig
    return ExperimentConfig


def _train_replay(method: str, cfg, run_dir: Path, *, resume: bool, stop_iters: int | None) -> Path:
    import ray

    from rl.deer.run import train_run

    started = not ray.is_initialized()
    if started and os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit` or pointed at a cluster: join it
    elif started:
        # a bare ray.init() could join someone else's head on a shared machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return train_run(method, cfg, run_dir, resume=resume, stop_iters=stop_iters)
    finally:
        if started:
            ray.shutdown()


def _evaluate_replay(run_dirs: list[Path], out_dir: Path) -> dict:
    from rl.deer.analysis import markdown_table, plot_returns, summarize
    from rl.deer.run import load_run

    runs = [load_run(d) for d in run_dirs]
    empty = [str(d) for d, (_, _, rows) in zip(run_dirs, runs) if not rows]
    if len(empty) == len(runs):
        raise UserError(f"none of the runs has metrics yet: {', '.join(empty)}")
    summary = summarize(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary["plots"] = plot_returns(runs, out_dir)
    table = markdown_table(summary)
    (out_dir / "table.md").write_text(table)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table, end="")
    print(f"wrote {out_dir}/table.md, summary.json and {len(summary['plots'])} plot(s)")
    return summary


def _replay_entry(name: str, summary: str) -> RLMethod:
    def train(cfg, run_dir, **kw):
        return _train_replay(name, cfg, run_dir, **kw)
    return RLMethod(summary, _experiment_config_cls, train, _evaluate_replay)


METHODS: dict[str, RLMethod] = {
    "deer": _replay_entry("deer", "DEER: replay prioritized by discrepancy of environment dynamics"),
    "per": _replay_entry("per", "baseline: RLlib's stock prioritized replay (|TD| priorities)"),
    "uniform": _replay_entry("uniform", "baseline: RLlib's uniform episode replay"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we raise the one error type
        raise UserError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgeray rl", description="train and evaluate RLlib methods")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train one method on one environment")
    train.add_argument("method")
    train.add_argument("--env", help="environment name (overrides env.name of the config)")
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    train.add_argument("--stop-iters", type=int, help="train until this many iterations in total")
    train.add_argument("--runs-root", default="runs", help="where new run directories go")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    ev = sub.add_parser("eval", help="compare runs: table, summary.json and return-over-time plots")
    ev.add_argument("method")
    ev.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR")
    ev.add_argument("--out", help="output folder (default: runs/eval-<method>)")
    sub.add_parser("list", help="list the methods")
    return parser


def _method(name: str) -> RLMethod:
    if name not in METHODS:
        raise UserError(f"unknown RL method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for name, method in METHODS.items():
            print(f"{name:10s} {method.summary}")
        return 0
    method = _method(args.method)
    if args.command == "eval":
        run_dirs = [Path(d) for d in args.runs]
        missing = [str(d) for d in run_dirs if not d.is_dir()]
        if missing:
            raise UserError(f"run directory not found: {', '.join(missing)}")
        method.evaluate(run_dirs, Path(args.out or f"runs/eval-{args.method}"))
        return 0
    # train
    from edgeray.config import load_config
    from rl.deer.run import load_run, new_run_dir

    if args.stop_iters is not None and args.stop_iters < 1:
        raise UserError(f"--stop-iters must be >= 1, got {args.stop_iters}")
    if args.resume:
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise UserError(f"run directory not found: {run_dir}")
        run_method, cfg, _ = load_run(run_dir)
        if run_method != args.method:
            raise UserError(f"{run_dir} is a {run_method!r} run, not {args.method!r}")
        if args.config or args.set or args.env:
            raise UserError("--resume takes the run's own config.yaml; drop --config/--set/--env")
        method.train(cfg, run_dir, resume=True, stop_iters=args.stop_iters)
        return 0
    overrides = list(args.set) + ([f"env.name={args.env}"] if args.env else [])
    cfg = load_config(method.config_cls(), args.config, overrides)
    run_dir = new_run_dir(args.runs_root, args.method, cfg)
    print(f"run directory: {run_dir}")
    method.train(cfg, run_dir, resume=False, stop_iters=args.stop_iters)
    return 0


if __name__ == "__main__":
    from edgeray.cli import main as edgeray_main
    sys.exit(edgeray_main(["rl", *sys.argv[1:]]))
