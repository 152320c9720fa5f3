"""`edgeray rl ...`: train and evaluate the RLlib-hosted methods.

    edgeray rl train <method> --env ENV --config FILE [--set key=value ...] [--stop-iters N]
                     [--runs-root DIR] [--resume RUN_DIR] [--address ADDR] [--num-cpus N]
    edgeray rl eval <method> --runs RUN_DIR [RUN_DIR ...] [--out DIR]
    edgeray rl list

Methods are entries of `METHODS`: each names its config class and its train / eval functions;
train is a thin call into the shared loop (rl.loop), so RL-CRP plugs in as a new entry.
"deer", "per" and "uniform" share one experiment (same algorithm and hyper-parameters, only the
replay differs); so do "leed", "ippo" and "bc-ppo" (same env and PPO, only the use of
demonstrations differs). Ray is joined through `edgeray.connect` (`--address`, else RAY_ADDRESS, else a
local Ray of `--num-cpus`), after the config is checked, so bad input fails before Ray starts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeray.argparse_util import ArgumentParser
from edgeray.errors import UserError


@dataclass(frozen=True)
class RLMethod:
    summary: str
    config_cls: Callable[[], type]
    train: Callable[..., Path]
    evaluate: Callable[[list[Path], Path], dict]
    # checks what a config points at (a network file, an LLM endpoint) before Ray starts and
    # before a run directory exists; may settle a setting (LEED: the LLM fallback actually used)
    preflight: Callable[[object], None] | None = None


def _experiment_config_cls():
    from rl.deer.config import ExperimentConfig
    return ExperimentConfig


def _compare_runs(analysis_module: str, config_cls: type, methods, run_dirs: list[Path], out_dir: Path) -> dict:
    """`edgeray rl eval`: an experiment's analysis module (summarize, markdown_table,
    plot_returns) over its runs; writes table.md, summary.json and the plots."""
    import importlib

    from rl.loop import load_run

    analysis = importlib.import_module(analysis_module)
    runs = [load_run(d, config_cls, methods) for d in run_dirs]
    empty = [str(d) for d, (_, _, rows) in zip(run_dirs, runs) if not rows]
    if len(empty) == len(runs):
        raise UserError(f"none of the runs has metrics yet: {', '.join(empty)}")
    summary = analysis.summarize(runs)
    table = analysis.markdown_table(summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary["plots"] = analysis.plot_returns(runs, out_dir)
    (out_dir / "table.md").write_text(table)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table, end="")
    print(f"wrote {out_dir}/table.md, summary.json and {len(summary['plots'])} plot(s)")
    return summary


def _evaluate_replay(run_dirs: list[Path], out_dir: Path) -> dict:
    from rl.deer.config import REPLAY_METHODS, ExperimentConfig
    return _compare_runs("rl.deer.analysis", ExperimentConfig, REPLAY_METHODS, run_dirs, out_dir)


def _replay_entry(name: str, summary: str) -> RLMethod:
    def train(cfg, run_dir, **kw):
        from rl.deer.run import ReplayHooks
        from rl.loop import train_run
        return train_run(ReplayHooks(name), cfg, run_dir, **kw)
    return RLMethod(summary, _experiment_config_cls, train, _evaluate_replay)


def _leed_config_cls():
    from rl.leed.config import LEEDConfig
    return LEEDConfig


def _evaluate_leed(run_dirs: list[Path], out_dir: Path) -> dict:
    from rl.leed.config import LEED_METHODS, LEEDConfig
    return _compare_runs("rl.leed.analysis", LEEDConfig, LEED_METHODS, run_dirs, out_dir)


def _leed_entry(name: str, summary: str) -> RLMethod:
    def train(cfg, run_dir, **kw):
        from rl.leed.run import LEEDHooks
        from rl.loop import train_run
        return train_run(LEEDHooks(name, run_dir), cfg, run_dir, **kw)
    def preflight(cfg):
        from rl.leed.demonstrations import preflight as leed_preflight
        leed_preflight(cfg, uses_demonstrations=name != "ippo")
    return RLMethod(summary, _leed_config_cls, train, _evaluate_leed, preflight)


def _crp_entry(name: str, summary: str) -> RLMethod:
    def train(cfg, run_dir, **kw):
        from rl.crp.run import CRPHooks
        from rl.loop import train_run
        return train_run(CRPHooks(name), cfg, run_dir, **kw)
    def config_cls():
        from rl.crp.config import CRPConfig
        return CRPConfig
    def evaluate(run_dirs, out_dir):
        from rl.crp.analysis import evaluate_runs
        return evaluate_runs(run_dirs, out_dir)
    return RLMethod(summary, config_cls, train, evaluate)


METHODS: dict[str, RLMethod] = {
    "deer": _replay_entry("deer", "DEER: replay prioritized by discrepancy of environment dynamics"),
    "per": _replay_entry("per", "baseline: RLlib's stock prioritized replay (|TD| priorities)"),
    "uniform": _replay_entry("uniform", "baseline: RLlib's uniform episode replay"),
    "leed": _leed_entry("leed", "LEED: PPO per agent + expert NLL on LLM-generated demonstrations (routing)"),
    "ippo": _leed_entry("ippo", "baseline: independent PPO on the routing env, no demonstrations"),
    "bc-ppo": _leed_entry("bc-ppo", "baseline: behaviour cloning on LEED's demonstrations, then PPO"),
    "rl-crp": _crp_entry("rl-crp", "RL-CRP: independent PPO per edge server + HMM conflict risk (client selection)"),
    "rl-no-crp": _crp_entry("rl-no-crp", "ablation: RL-CRP without the conflict-risk feature"),
}


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="edgeray rl", description="train and evaluate RLlib methods")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one method on one environment")
    train.add_argument("method")
    train.add_argument("--env", help="environment name (overrides env.name of the config)")
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    train.add_argument("--stop-iters", type=int, help="train until this many iterations in total")
    train.add_argument("--runs-root", default="runs", help="where new run directories go")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    train.add_argument("--address", help="Ray cluster to train on (default: RAY_ADDRESS, else a local Ray)")
    train.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2; "
                       "ignored when attaching to a cluster)")
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


def _train(args, argv: list[str]) -> Path:
    from edgeray import runs
    from edgeray.config import load_config
    from edgeray.connect import connect

    method = _method(args.method)
    if args.stop_iters is not None and args.stop_iters < 1:
        raise UserError(f"--stop-iters must be >= 1, got {args.stop_iters}")
    if args.num_cpus < 1:
        raise UserError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    if args.resume:
        if args.config or args.set or args.env:
            raise UserError("--resume takes the run's own config.yaml; drop --config/--set/--env")
        run_dir = runs.open_run_dir(args.resume, kind="rl", method=args.method)
        cfg = load_config(method.config_cls(), run_dir / "config.yaml")
    else:
        overrides = list(args.set) + ([f"env.name={args.env}"] if args.env else [])
        cfg = load_config(method.config_cls(), args.config, overrides)
        if method.preflight is not None:
            method.preflight(cfg)
    # after the config is checked (bad input fails before Ray starts) and before the run
    # directory exists (an unreachable cluster leaves no empty run behind)
    connection = connect(args.address, num_cpus=args.num_cpus, log_to_driver=False)
    try:
        if not args.resume:
            run_dir = runs.new_run_dir(args.runs_root, f"{args.method}-{cfg.env.name}-s{cfg.train.seed}",
                                       kind="rl", method=args.method, argv=["edgeray", "rl", *argv])
            print(f"run directory: {run_dir}")
        return method.train(cfg, run_dir, resume=bool(args.resume), stop_iters=args.stop_iters)
    finally:
        if connection is not None:  # None: this process was connected already, by someone else
            import ray
            ray.shutdown()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for name, method in METHODS.items():
            print(f"{name:10s} {method.summary}")
        return 0
    if args.command == "eval":
        method = _method(args.method)
        method.evaluate([Path(d) for d in args.runs], Path(args.out or f"runs/eval-{args.method}"))
        return 0
    _train(args, argv)
    return 0


if __name__ == "__main__":
    from edgeray.cli import main as edgeray_main
    sys.exit(edgeray_main(["rl", *sys.argv[1:]]))
