"""`edgeray run <strategy>`: start or resume a federated-learning run.

    edgeray run fedavg --config configs/fedavg_mnist.yaml --set rounds=5 --set data.partition=dirichlet
    edgeray run fedavg --resume runs/fedavg-20261124-221500-1234 [--set rounds=20]
"""

from __future__ import annotations

import json

from edgeray import runs
from edgeray.argparse_util import ArgumentParser
from edgeray.config import dump_yaml, load_config
from edgeray.errors import UserError
from pipelines.registry import STRATEGIES, entry


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="edgeray run", description="Run a federated learning method on Ray.")
    parser.add_argument("strategy", help="one of: " + ", ".join(STRATEGIES))
    parser.add_argument("--config", help="YAML config (see configs/ and docs/reference.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set rounds=5 --set data.alpha=0.1")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    parser.add_argument("--address", help="Ray cluster to attach to (default: RAY_ADDRESS, else local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    entry(STRATEGIES, args.strategy, "strategy")

    from actors.config import FLConfig
    from actors.driver import run_fl

    overrides = [f"strategy.name={args.strategy}", *args.overrides]
    if args.resume:
        run_dir = runs.open_run_dir(args.resume, kind="fl", method=args.strategy)
        if args.config:
            raise UserError("--resume uses the run's own config.yaml; drop --config (use --set to change a field)")
        cfg = load_config(FLConfig, run_dir / "config.yaml", overrides)
    else:
        cfg = load_config(FLConfig, args.config, overrides)
    if args.address:
        cfg.runtime.address = args.address
    if not args.resume:
        run_dir = runs.new_run_dir(cfg.output_dir, cfg.name, kind="fl", method=args.strategy)
    elif args.overrides:
        dump_yaml(cfg, run_dir / "config.yaml")
    print(f"run directory: {run_dir}", flush=True)
    summary = run_fl(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    print(json.dumps(summary), flush=True)
    print(f"results: {run_dir}/summary.json, {run_dir}/metrics.jsonl, {run_dir}/plots/", flush=True)
    return 0
