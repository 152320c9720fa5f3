"""Benchmark: DEER vs DEER-oracle vs RLlib's stock PER vs uniform replay on non-stationary envs.

Each (env, seed) trains the four variants with the same algorithm and hyper-parameters (DQN for
discrete envs, SAC for ns-pendulum) through the same code path as `edgeray rl train`
(rl.cli.METHODS[method].train, i.e. rl.loop.train_run), one after another in this process on one
Ray (edgeray.connect: RAY_ADDRESS if set, else a local Ray of 2 CPUs). "deer-oracle" is DEER told
the true shift steps (`deer.change_source=oracle`): the priority rule without detector errors.
Runs are ordered seed-major with the variant order rotating, so a run cut short by
`--budget-min` still leaves a balanced, clearly labelled partial result ("complete": false).

What is scored (rl.deer.analysis, OUR CHOICES): greedy evaluation episodes every iteration on an
env copy frozen at the current dynamics; per true shift, the mean greedy return over the segment
after it (post-shift AUC), normalized per env and magnitude between a random policy and the best
evaluation seen in the benchmark; per seed the mean over shifts; gain of DEER over PER =
relative difference of the seed means, 95 % percentile-bootstrap interval over paired seeds.
Detection: hit rate, delay and false alarms per run against the true shifts.

Writes under bench/results/deer[-quick]/: runs/<variant>-<env>-s<seed>-<stamp>/, table.md,
summary.json, returns_<env>.png. First stdout lines: the plan and its time estimate. Last stdout
line: JSON with gain_vs_per_pct, gain_vs_per_ci_low_pct, oracle_gain_vs_per_pct,
time_ratio_vs_per, false_alarms_per_run, detection_delay_steps, ... and `cut` (what this grid
leaves out against issue 17's matrix).

    python bench/deer.py --quick                     # < 2 min (ns-cartpole, DQN)
    python bench/deer.py --quick --envs ns-pendulum  # the SAC leg's smoke test, < 2 min
    python bench/deer.py                  # issue 17's matrix: ns-cartpole + ns-acrobot (DQN), ns-pendulum (SAC),
                                          # 5 seeds x 4 variants = 60 runs: ~112 min on the quiet 2-core
                                          # machine (5 x seed 0's 22.4 min, 2026-12-03; issue 17 asks for 90)
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

ENVS = ("ns-cartpole", "ns-acrobot", "ns-pendulum", "ns-mountaincar")
VARIANTS = {"uniform": ("uniform", []), "per": ("per", []), "deer": ("deer", []),
            "deer-oracle": ("deer", ["deer.change_source=oracle"]),
            # optional (not in the default matrix): the dynamics-model detector, rl.deer.dynamics_detector
            "deer-dynamics": ("deer", ["deer.change_source=dynamics", "deer.detector.epochs=150", "deer.detector.check_every=250",
                                       "deer.detector.hidden=32", "deer.detector.lr=0.01",
                                       "deer.detector.permutations=99", "deer.detector.quantile=0.99"])}
DEFAULT_VARIANTS = ("uniform", "per", "deer", "deer-oracle")

# Non-reverting schedule nominal -> +100 % -> +200 % of ONE quantity (see PER_ENV);
# 100-step episodes so the detector's 1000-step windows span >= 10 episodes; 4 vectorized env copies
# and 1 update per 4 env steps (training_intensity 16 at batch 64), see bench/rl_throughput.py.
FULL = ["env.max_episode_steps=100", "env.shift_every=5000", "env.magnitudes=[0.0, 1.0, 2.0]", "env.schedule=hold",
        "train.stop_iters=15", "train.env_steps_per_iter=1000", "train.num_envs=4", "train.rollout_fragment_length=8",
        "train.training_intensity=16.0", "train.train_batch_size=64", "train.hidden=[64, 64]",
        "train.learning_starts=500", "train.epsilon_steps=3000", "train.target_update_freq=500",
        "train.checkpoint_every=15", "eval.every_iters=1", "eval.episodes=5",
        "deer.detector.window=1000", "deer.detector.subseq_len=16", "deer.detector.stride=4",
        "deer.detector.epochs=30", "deer.detector.check_every=500", "deer.detector.cooldown=2000", "deer.detector.null_refresh=4",
        "deer.detector.permutations=19", "deer.detector.quantile=0.95", "deer.detector.confirmations=2"]
QUICK = ["env.max_episode_steps=50", "env.shift_every=400", "env.magnitudes=[0.0, 1.0, 2.0]", "env.schedule=hold",
         "train.stop_iters=3", "train.env_steps_per_iter=400", "train.num_envs=2", "train.rollout_fragment_length=10",
         "train.training_intensity=4.0", "train.train_batch_size=32", "train.hidden=[32]",
         "train.learning_starts=100", "train.epsilon_steps=400", "train.checkpoint_every=3",
         "eval.every_iters=1", "eval.episodes=2",
         "deer.detector.window=200", "deer.detector.subseq_len=8", "deer.detector.stride=4", "deer.detector.epochs=10",
         "deer.detector.check_every=200", "deer.detector.cooldown=200", "deer.detector.permutations=5"]
# Per-env sizing of the full matrix (quick runs only take the shifted quantity):
# * ns-cartpole shifts the pole length: +100 % / +200 % gravity barely moves a trained greedy policy (92 -> 92.5 of
#   100 in a probe), a 3x longer pole drops it to 43, so only this shift leaves something to recover; the greedy
#   return reaches ~90 of 100 within ~3k steps, so 5k-step segments (15 iterations);
# * ns-acrobot: 12k-step segments (the 12k probe was the first budget at which the policies learned part of the way),
#   200-step episodes, 2,000-step detector windows (10 episodes);
# * ns-pendulum (SAC): 8k-step segments, 1 update of 64 per 2 env steps (training_intensity 32; at the earlier 1 per
#   64 SAC stayed at random level), 2,000-step windows.
PER_ENV = {"ns-cartpole": ["env.shift_params=[length]"],
           "ns-acrobot": ["env.max_episode_steps=200", "deer.detector.window=2000", "env.shift_every=12000",
                          "train.stop_iters=36", "train.checkpoint_every=36"],
           "ns-pendulum": ["env.max_episode_steps=200", "deer.detector.window=2000", "env.shift_every=8000",
                           "train.stop_iters=24", "train.checkpoint_every=24", "train.training_intensity=32.0"]}
DEFAULT_ENVS = ("ns-cartpole", "ns-acrobot", "ns-pendulum")  # issue 17's matrix; --quick: ns-cartpole
BUDGET_MIN = 90.0  # issue 17: the full matrix fits 90 minutes on the 2-core machine
# Time model of the plan line: seconds per 1,000 env steps of one PER run (training + greedy evaluation) and
# seconds to build / stop a run, measured in seed 0 of the full matrix on the quiet machine (2026-12-03, docs/deer.md);
# DEER's detector and snapshots add DEER_FACTOR; "uniform" runs RLlib's stock DQN / SAC with its EpisodeReplayBuffer
# (no fast path), UNIFORM_FACTOR times PER's time. The first finished run refines the estimate.
SEC_PER_KSTEP = {"ns-cartpole": 1.2, "ns-acrobot": 1.3, "ns-pendulum": 7.4, "ns-mountaincar": 1.3}
UNIFORM_FACTOR = {"ns-cartpole": 2.6, "ns-acrobot": 2.5, "ns-pendulum": 1.7, "ns-mountaincar": 2.5}
BUILD_S = 6.0
DEER_FACTOR = 1.15
CUT = ("issue 17 asks for 20-25k env steps per segment; this matrix (ns-cartpole + ns-acrobot DQN, ns-pendulum SAC, "
       "{seeds} seeds, uniform / PER / DEER / DEER-oracle; ~112 min on the quiet 2-core machine, over issue 17's 90) "
       "uses 5k (cartpole), 12k (acrobot) and 8k (pendulum) env steps per segment, 3 segments (nominal, +100 %, "
       "+200 %); ns-mountaincar is not in it (--envs adds it)")


def run_seconds(cfg, variant: str) -> float:
    """Modelled wall seconds of one run (SEC_PER_KSTEP, BUILD_S, DEER_FACTOR, UNIFORM_FACTOR); scaled by the updates
    per env step relative to the env's default intensity when --set changes it (updates dominate)."""
    default = load_config(ExperimentConfig, None, overrides(cfg.env.name, 0, "per", False))
    per_update = cfg.train.training_intensity / cfg.train.train_batch_size
    base = default.train.training_intensity / default.train.train_batch_size
    kstep = SEC_PER_KSTEP.get(cfg.env.name, 1.3) * (0.4 + 0.6 * per_update / base)
    seconds = cfg.train.stop_iters * cfg.train.env_steps_per_iter / 1000 * kstep
    factor = (DEER_FACTOR if variant.startswith("deer")
              else UNIFORM_FACTOR[cfg.env.name] if variant == "uniform" else 1.0)
    return BUILD_S + seconds * factor


def print_plan(jobs, configs: dict, seeds: int, variants, budget_min) -> float:
    """Print the plan (runs, env steps and the modelled time per env) and return the estimate in seconds."""
    total_s, total_steps = 0.0, 0
    for env, cfg in configs.items():
        env_jobs = [(s, v) for s, e, v in jobs if e == env]
        secs = sum(run_seconds(cfg, v) for _, v in env_jobs)
        steps = cfg.train.stop_iters * cfg.train.env_steps_per_iter
        algo = "DQN" if env != "ns-pendulum" else "SAC"
        updates = steps * cfg.train.training_intensity / cfg.train.train_batch_size
        print(f"plan {env} ({algo}): {len(env_jobs)} runs x {steps} env steps ({len(cfg.env.magnitudes)} segments of "
              f"{cfg.env.shift_every}), ~{updates:.0f} updates of {cfg.train.train_batch_size} per run; "
              f"~{secs / 60:.1f} min", flush=True)
        total_s += secs
        total_steps += steps * len(env_jobs)
    fits = "fits" if total_s <= 60 * BUDGET_MIN else "does NOT fit"
    print(f"plan: {len(jobs)} runs ({', '.join(configs)} x {seeds} seeds x {', '.join(variants)}), {total_steps} env "
          f"steps; estimate {total_s / 60:.0f} min on a quiet 2-core machine ({fits} issue 17's {BUDGET_MIN:.0f} min; "
          f"model: PER {', '.join(f'{e} {SEC_PER_KSTEP[e]} s' for e in configs if e in SEC_PER_KSTEP)} per 1,000 env "
          f"steps, {BUILD_S:.0f} s per run, DEER x{DEER_FACTOR}, uniform (stock RLlib) "
          f"x{'/'.join(str(UNIFORM_FACTOR[e]) for e in configs)}; a loaded machine is slower)"
          + (f"; --budget-min {budget_min:g} stops starting runs after that" if budget_min is not None else ""),
          flush=True)
    return total_s


def plan(envs, seeds, variants=None):
    jobs, names = [], list(variants or DEFAULT_VARIANTS)
    for seed in range(seeds):
        for k, env in enumerate(envs):
            rotation = (seed + k) % len(names)
            for variant in names[rotation:] + names[:rotation]:
                jobs.append((seed, env, variant))
    return jobs


def overrides(env: str, seed: int, variant: str, quick: bool, extra=()) -> list[str]:
    return [f"env.name={env}", f"train.seed={seed}", *(QUICK if quick else FULL),
            *[o for o in PER_ENV.get(env, []) if not quick or o.startswith("env.shift_params")], *extra,
            *VARIANTS[variant][1]]


def random_returns(finished) -> dict:
    from rl.deer.algorithms import env_config
    from rl.deer.analysis import random_return

    out = {}
    for _, cfg, rows in finished:
        for r in rows:
            e = r.get("eval")
            if e and (cfg.env.name, e["magnitude"]) not in out:
                out[(cfg.env.name, e["magnitude"])] = random_return(cfg.env.name, env_config(cfg), e["magnitude"])
    return out


def summarize(out: Path, complete: bool, planned: int, load_start, seeds: int) -> dict:
    import numpy as np

    from rl.deer.analysis import markdown_table, plot_returns, post_shift_summary, summarize as summarize_runs
    from rl.deer.config import variant_of
    from rl.loop import load_run

    # finished = its last checkpoint was written (a run killed midway is left out)
    finished = [load_run(d, ExperimentConfig, REPLAY_METHODS) for d in sorted((out / "runs").iterdir())
                if (d / "checkpoints" / "progress.json").is_file()]
    summary = summarize_runs(finished)
    summary["plots"] = plot_returns(finished, out)
    post = post_shift_summary(finished, random_returns=random_returns(finished))
    (out / "table.md").write_text(markdown_table(summary))
    iter_walls = [r["iteration_wall_s"] for _, _, rows in finished for r in rows[1:]]
    # where the policies reach: mean greedy return in the last 3 evaluations of each segment
    reach = {}
    for method, cfg, rows in finished:
        evals = [r["eval"] for r in rows if r.get("eval")]
        by_mag = {}
        for e in evals:
            by_mag.setdefault(e["magnitude"], []).append(float(np.mean(e["returns"])))
        key = f"{cfg.env.name}/{variant_of(method, cfg)}"
        for mag, vals in by_mag.items():
            reach.setdefault(key, {}).setdefault(f"+{int(mag * 100)}%", []).append(float(np.mean(vals[-3:])))
    reach = {k: {m: round(float(np.mean(v)), 2) for m, v in mags.items()} for k, mags in reach.items()}
    dvp, ovp = post["deer_vs_per"] or {}, post["oracle_vs_per"] or {}
    nan = float("nan")
    line = {
        "gain_vs_per_pct": dvp.get("gain_pct", nan), "gain_vs_per_ci_low_pct": dvp.get("ci_low_pct", nan),
        "gain_vs_per_ci_high_pct": dvp.get("ci_high_pct", nan),
        "oracle_gain_vs_per_pct": ovp.get("gain_pct", nan), "oracle_gain_vs_per_ci_low_pct": ovp.get("ci_low_pct", nan),
        "oracle_gain_vs_per_ci_high_pct": ovp.get("ci_high_pct", nan),
        "oracle_vs_deer_pct": (post["oracle_vs_deer"] or {}).get("gain_pct", nan),
        "dynamics_gain_vs_per_pct": (post["dynamics_vs_per"] or {}).get("gain_pct", nan),
        "detection_dynamics": post["detection_dynamics"],
        "gain_vs_uniform_pct": (post["deer_vs_uniform"] or {}).get("gain_pct", nan),
        "per_vs_uniform_pct": (post["per_vs_uniform"] or {}).get("gain_pct", nan),
        "time_ratio_vs_per": summary["time_ratio_vs_per"],
        "false_alarms_per_run": post["detection"]["false_alarms_per_run"],
        "detection_delay_steps": post["detection"]["delay_steps_median"],
        "change_point_error_steps": post["detection"]["change_point_error_median"],
        "detection_hit_rate": post["detection"]["hit_rate"],
        "normalized_post_shift_auc": post["normalized_auc"],
        "greedy_return_reached_end_of_segment": reach,
        "mean_return_gain_vs_per_pct": summary["gain_vs_per_pct"],
        "paired": {k: post[k] for k in ("deer_vs_per", "oracle_vs_per", "oracle_vs_deer", "deer_vs_uniform",
                                        "per_vs_uniform")},
        "gain_vs_per_pct_per_env": {env: {k: None if v is None else [round(v[f], 2) for f in
                                                                     ("gain_pct", "ci_low_pct", "ci_high_pct")]
                                          for k, v in pairs.items()} for env, pairs in post["per_env_paired"].items()},
        "runs_done": len(finished), "runs_planned": planned, "complete": complete and len(finished) == planned,
        "median_iter_wall_s": float(sorted(iter_walls)[len(iter_walls) // 2]) if iter_walls else None,
        "cut": CUT.format(seeds=seeds),
        "load_avg_start": load_start, "load_avg_end": list(os.getloadavg()),
    }
    (out / "summary.json").write_text(json.dumps({**summary, **post, **line}, indent=2, default=str))
    print(markdown_table(summary), end="", file=sys.stderr)
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 short iterations (default env ns-cartpole)")
    parser.add_argument("--seeds", type=int, help="seeds per env (default 5, quick 1)")
    parser.add_argument("--envs", nargs="+", choices=ENVS,
                        help="envs (default ns-cartpole ns-acrobot ns-pendulum; quick: ns-cartpole)")
    parser.add_argument("--budget-min", type=float, default=None, help="start no new run after this many minutes")
    parser.add_argument("--out", help="results folder (default bench/results/deer or deer-quick)")
    parser.add_argument("--summarize-only", action="store_true", help="only summarize finished runs")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and its time estimate, run nothing")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="variants to train (default uniform per deer deer-oracle; deer-dynamics = the optional "
                             "dynamics-model detector; e.g. --variants per deer for a paired probe)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to every run after the grid's own (e.g. env.shift_every=8000)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed+seeds-1")
    parser.add_argument("--append", action="store_true",
                        help="keep the finished runs in --out and skip the (variant, env, seed) they already cover")
    args = parser.parse_args()
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.first_seed < 0:
        parser.error("--first-seed must be >= 0")

    root = Path(__file__).resolve().parents[1]
    out = Path(args.out) if args.out else root / "bench" / "results" / ("deer-quick" if args.quick else "deer")
    envs = tuple(dict.fromkeys(args.envs or (("ns-cartpole",) if args.quick else DEFAULT_ENVS)))
    seeds = args.seeds or (1 if args.quick else 5)
    variants = list(dict.fromkeys(args.variants or DEFAULT_VARIANTS))
    jobs = [(seed + args.first_seed, env, variant) for seed, env, variant in plan(envs, seeds, variants)]
    load_start = list(os.getloadavg())
    steps = {env: load_config(ExperimentConfig, None, overrides(env, 0, "per", args.quick, args.set)) for env in envs}
    total = sum(steps[env].train.stop_iters * steps[env].train.env_steps_per_iter for _, env, _ in jobs)
    estimate_s = print_plan(jobs, steps, seeds, variants, args.budget_min)
    if args.plan_only:
        return 0
    if args.summarize_only:
        line = summarize(out, True, len(jobs), load_start, seeds)
        line["grid"] = {"envs": list(envs), "variants": variants, "set": list(args.set)}
        print(json.dumps(line))
        return 0

    from edgeray.connect import connect
    from rl.cli import METHODS as RL_METHODS

    if (out / "runs").exists() and not args.append:
        shutil.rmtree(out / "runs")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    planned = len(jobs)
    if args.append:  # a run counts as done when its last checkpoint was written
        have = {d.name.rsplit("-s", 1)[0] + "-s" + d.name.rsplit("-s", 1)[1].split("-")[0]
                for d in (out / "runs").iterdir() if (d / "checkpoints" / "progress.json").is_file()}
        skipped = [j for j in jobs if f"{j[2]}-{j[1]}-s{j[0]}" in have]
        jobs = [j for j in jobs if f"{j[2]}-{j[1]}-s{j[0]}" not in have]
        print(f"append: {len(skipped)} planned runs already done, {len(jobs)} to run", flush=True)
    t0 = time.time()
    connection = connect(num_cpus=2, log_to_driver=False)
    t_runs = time.time()  # the first run's time, for the estimate, leaves out Ray's start
    done = 0
    try:
        for seed, env, variant in jobs:
            if args.budget_min is not None and time.time() - t0 > 60 * args.budget_min:
                print(f"budget of {args.budget_min} min used: stopping after {done}/{len(jobs)} runs", file=sys.stderr)
                break
            cfg = load_config(ExperimentConfig, None, overrides(env, seed, variant, args.quick, args.set))
            method = VARIANTS[variant][0]
            run_dir = runs.new_run_dir(out / "runs", f"{variant}-{env}-s{seed}", kind="rl", method=method)
            RL_METHODS[method].train(cfg, run_dir, log=lambda msg: print(msg, file=sys.stderr, flush=True))
            done += 1
            if done == 1:
                modelled = run_seconds(cfg, variant)
                actual = time.time() - t_runs
                print(f"first run: {actual:.0f} s against {modelled:.0f} s modelled -> estimate "
                      f"{estimate_s * actual / modelled / 60:.0f} min in all", flush=True)
    finally:
        if connection is not None:  # None: this process was connected already, by someone else
            import ray
            ray.shutdown()
    line = summarize(out, done == len(jobs), planned, load_start, seeds)
    line["bench_wall_s"] = time.time() - t0
    line["estimate_s"] = estimate_s
    line["grid"] = {"envs": list(envs), "variants": variants, "set": list(args.set)}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
