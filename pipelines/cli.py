"""`edgeray run <pipeline>`: start or resume a federated-learning run.

    edgeray run fedavg --config configs/fedavg_mnist.yaml --set rounds=5 --set data.partition=dirichlet
    edgeray run fedavg --resume runs/fedavg-20261124-221500-1234 [--set rounds=20]
"""

from __future__ import annotations

import json
import sys

from edgeray import runs
from edgeray.argparse_util import ArgumentParser
from edgeray.config import load_config
from edgeray.errors import UserError
from pipelines.registry import STRATEGIES as PIPELINES


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="edgeray run", description="Run a federated learning pipeline on Ray.")
    parser.add_argument("pipeline", help="one of: " + ", ".join(PIPELINES))
    parser.add_argument("--config", help="YAML config (see configs/ and docs/reference.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set rounds=5 --set data.alpha=0.1")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    parser.add_argument("--address", help="Ray cluster to attach to (default: RAY_ADDRESS, else local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.pipeline not in PIPELINES:
        raise UserError(f"unknown pipeline {args.pipeline!r}; choose one of: {', '.join(PIPELINES)}")

    from pipelines.fl import FLConfig, run_fl

    if args.resume:
        run_dir = runs.existing_run_dir(args.resume)
        stored = json.loads((run_dir / "run.json").read_text()).get("pipeline") \
            if (run_dir / "run.json").is_file() else args.pipeline
        if stored != args.pipeline:
            raise UserError(f"{run_dir} is a {stored!r} run, not {args.pipeline!r}")
        if args.config:
            raise UserError("--resume uses the run's own config.yaml; drop --config (use --set to change a field)")
        cfg = load_config(FLConfig, run_dir / "config.yaml", args.overrides)
    else:
        cfg = load_config(FLConfig, args.config, args.overrides)
    if args.address:
        cfg.runtime.address = args.address
    if not args.resume:
        run_dir = runs.new_run_dir(cfg.output_dir, cfg.name)
        (run_dir / "run.json").write_text(json.dumps({"pipeline": args.pipeline, "argv": sys.argv}))
    elif args.overrides:
        from edgeray.config import dump_yaml
        dump_yaml(cfg, run_dir / "config.yaml")
    print(f"run directory: {run_dir}", flush=True)
    summary = run_fl(cfg, args.pipeline, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    print(json.dumps(summary), flush=True)
    print(f"results: {run_dir}/summary.json, {run_dir}/metrics.jsonl, {run_dir}/plots/", flush=True)
    return 0
