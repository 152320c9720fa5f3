"""Benchmark: DEER vs RLlib's stock PER vs uniform replay on the four non-stationary envs.

Each (env, seed) trains all three replay methods with the same algorithm and hyper-parameters
(DQN for discrete envs, SAC for ns-pendulum) through the same code path as `edgeray rl train`
(rl.cli.METHODS[method].train, i.e. rl.loop.train_run), one after another in this process on one
Ray (edgeray.connect: RAY_ADDRESS if set, else a local Ray of 2 CPUs). Runs are ordered
seed-major and the method order rotates, so a run cut short by `--budget-min` still leaves a
balanced, clearly labelled partial result ("complete": false in the JSON).

Writes under bench/results/deer[-quick]/: runs/<method>-<env>-s<seed>-<stamp>/ (run.json, config,
metrics.jsonl with per-iteration wall time and load average), table.md, summary.json,
returns_<env>.png (return over env steps, band = sd across seeds, red dashed lines = true shifts,
triangles = DEER detections).
Last stdout line: JSON with gain_vs_per_pct, gain_vs_uniform_pct, time_ratio_vs_per, ...

    python bench/deer.py --quick          # < 2 min on an idle 2-core machine
    python bench/deer.py                  # 4 envs x 5 seeds x 3 methods, ~1 h idle
    python bench/deer.py --summarize-only # re-read finished runs and print the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeray import runs  # noqa: E402
from edgeray.config import load_config  # noqa: E402
from rl.deer.config import REPLAY_METHODS, ExperimentConfig  # noqa: E402

ENVS = ("ns-cartpole", "ns-acrobot", "ns-mountaincar", "ns-pendulum")
METHODS = ("uniform", "per", "deer")

# Shared settings: small networks, few updates per env step (notes Part B5: training_intensity
# and reporting settings are what make off-policy RLlib affordable on 2 CPU cores).
FULL = ["train.stop_iters=10", "train.env_steps_per_iter=1000", "env.shift_every=2500", "env.magnitudes=[0.0, 1.0]",
        "train.rollout_fragment_length=32", "train.training_intensity=4.0", "train.train_batch_size=64",
        "train.hidden=[64, 64]", "train.learning_starts=500", "train.epsilon_steps=2500", "train.checkpoint_every=10",
        "deer.detector.window=500", "deer.detector.subseq_len=32", "deer.detector.check_every=250",
        "deer.detector.cooldown=1000"]
QUICK = ["train.stop_iters=3", "train.env_steps_per_iter=300", "env.shift_every=400", "env.magnitudes=[0.0, 1.0]",
         "train.rollout_fragment_length=20", "train.training_intensity=2.0", "train.train_batch_size=32",
         "train.hidden=[32]", "train.learning_starts=100", "train.epsilon_steps=400", "train.checkpoint_every=3",
         "deer.detector.window=100", "deer.detector.subseq_len=16", "deer.detector.check_every=100", "deer.detector.cooldown=200",
         "deer.detector.calibration_trials=20"]
PER_ENV = {"ns-pendulum": ["train.training_intensity=1.0"],  # SAC updates cost ~2x a DQN update
           "ns-acrobot": ["env.max_episode_steps=300"]}


def plan(envs, seeds):
    jobs = []
    for seed in range(seeds):
        for k, env in enumerate(envs):
            rotation = (seed + k) % len(METHODS)
            for method in METHODS[rotation:] + METHODS[:rotation]:
                jobs.append((seed, env, method))
    return jobs


def summarize(out: Path, complete: bool, planned: int, load_start) -> dict:
    from rl.deer.analysis import markdown_table, plot_returns, summarize as summarize_runs
    from rl.loop import load_run

    finished = [load_run(d, ExperimentConfig, REPLAY_METHODS)
                for d in sorted((out / "runs").iterdir()) if (d / "metrics.jsonl").is_file()]
    summary = summarize_runs(finished)
    summary["plots"] = plot_returns(finished, out)
    (out / "table.md").write_text(markdown_table(summary))
    iter_walls = [r["iteration_wall_s"] for _, _, rows in finished for r in rows[1:]]
    line = {
        "gain_vs_per_pct": summary["gain_vs_per_pct"],
        "gain_vs_uniform_pct": summary["gain_vs_uniform_pct"],
        "time_ratio_vs_per": summary["time_ratio_vs_per"],
        "recovery_ratio_vs_per": summary["recovery_ratio_vs_per"],
        "per_env": {env: {m: {k: v[k] for k in ("seeds", "mean_return", "mean_return_std", "recovery_steps",
                                                "recovery_steps_std", "wall_s_per_iter", "wall_s_per_iter_median")}
                          for m, v in methods.items()} for env, methods in summary["per_env"].items()},
        "runs_done": len(finished), "runs_planned": planned, "complete": complete and len(finished) == planned,
        "median_iter_wall_s": float(sorted(iter_walls)[len(iter_walls) // 2]) if iter_walls else None,
        "load_avg_start": load_start, "load_avg_end": list(os.getloadavg()),
    }
    (out / "summary.json").write_text(json.dumps({**summary, **line}, indent=2, default=str))
    print(markdown_table(summary), end="", file=sys.stderr)
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 envs, 1 seed, 3 short iterations")
    parser.add_argument("--seeds", type=int, help="seeds per env (default 5, quick 1)")
    parser.add_argument("--envs", nargs="+", choices=ENVS, help="subset of envs")
    parser.add_argument("--budget-min", type=float, default=None, help="start no new run after this many minutes")
    parser.add_argument("--out", help="results folder (default bench/results/deer or deer-quick)")
    parser.add_argument("--summarize-only", action="store_true", help="only summarize finished runs")
    args = parser.parse_args()

    root = Path(__file__).resolve().parents[1]
    out = Path(args.out) if args.out else root / "bench" / "results" / ("deer-quick" if args.quick else "deer")
    envs = args.envs or (("ns-cartpole", "ns-pendulum") if args.quick else ENVS)
    seeds = args.seeds or (1 if args.quick else 5)
    jobs = plan(envs, seeds)
    load_start = list(os.getloadavg())
    if args.summarize_only:
        print(json.dumps(summarize(out, True, len(jobs), load_start)))
        return 0

    from edgeray.connect import connect
    from rl.cli import METHODS as RL_METHODS

    if (out / "runs").exists():
        shutil.rmtree(out / "runs")
    (out / "runs").mkdir(parents=True)
    t0 = time.time()
    connection = connect(num_cpus=2, log_to_driver=False)
    done = 0
    try:
        for seed, env, method in jobs:
            if args.budget_min is not None and time.time() - t0 > 60 * args.budget_min:
                print(f"budget of {args.budget_min} min used: stopping after {done}/{len(jobs)} runs", file=sys.stderr)
                break
            overrides = [f"env.name={env}", f"train.seed={seed}", *(QUICK if args.quick else FULL),
                         *PER_ENV.get(env, [])]
            cfg = load_config(ExperimentConfig, None, overrides)
            run_dir = runs.new_run_dir(out / "runs", f"{method}-{env}-s{seed}", kind="rl", method=method)
            RL_METHODS[method].train(cfg, run_dir, log=lambda msg: print(msg, file=sys.stderr, flush=True))
            done += 1
    finally:
        if connection is not None:  # None: this process was connected already, by someone else
            import ray
            ray.shutdown()
    line = summarize(out, done == len(jobs), len(jobs), load_start)
    line["bench_wall_s"] = time.time() - t0
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
