"""Benchmark: RL-CRP vs random, greedy-latency, RL without CRP (ablation) and the conflict-free
oracle, in RL-CRP's environment and in the FL runtime (FedAvg, MNIST, 4 overlapping edge servers).

Two settings (`--setting`, docs/rl_crp.md): ``mnist`` (configs/crp_mnist.yaml and
configs/crp_fedavg_mnist.yaml: modulo coverage, every client has a home edge, static links) and
``contested`` (configs/crp_contested.yaml and configs/crp_fedavg_contested.yaml, our
reconstruction of a setting where conflicts matter: disc coverage whose shared clients have no
owner, Gilbert-Elliott links, availability U(0.7, 1)).

Per seed s (population, coverage, RL training and FL run all seeded s; the env config is the
population of the FL config, checked):
  1. train rl-crp and rl-no-crp through the shared loop (rl.loop.train_run, as `edgeray rl train`);
  2. env leg: every method as a `Selector` on the same evaluation episodes (per-round draws seeded
     10_000 + i, never seen in training; rl.crp.analysis.compare): conflicts per round, mean edge
     latency T_m, Jain's index of participation;
  3. FL leg: `edgeray run`'s code path (actors.driver.run_fl) with selection.method = random and
     rl-crp (the exported policy, loaded without RLlib): rounds and simulated
     time to the target accuracy, conflicts per round in the runtime.
Paired over seeds (edgeray.stats.paired_gain: the seeds resampled, the same draw for both
methods): a ratio key is mean(ours) / mean(baseline) over seeds with the 95 % percentile interval of
that ratio, plus the per-seed ratios; a difference key is the mean per-seed difference and its
interval. With 3 seeds the bootstrap has only 10 distinct resamples: the interval is coarse.
env_steps_per_s: the env alone (random masked actions); train_env_steps_per_s: sampling + learning
in the RLlib training loop.

Writes bench/results/rl_crp[_contested][-quick]/: runs/ (RL and FL run directories), rows.json, table.md,
summary.json, comparison.png, fl_accuracy.png. Last stdout line: JSON with
conflict_ratio_vs_random, latency_ratio_vs_greedy, conflict_ratio_vs_no_crp,
fl_time_to_target_ratio_vs_random, env_steps_per_s and what was cut versus the issue's grid.

    python bench/rl_crp.py --quick [--setting contested]   # < 2 min on an idle 2-core machine
    python bench/rl_crp.py [--setting contested]           # training + env leg ~5 min, FL leg ~3 min more
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

import numpy as np  # noqa: E402

from edgeray import runs  # noqa: E402
from edgeray.config import load_config  # noqa: E402

SETTINGS = {"mnist": ("configs/crp_mnist.yaml", "configs/crp_fedavg_mnist.yaml"),
            "contested": ("configs/crp_contested.yaml", "configs/crp_fedavg_contested.yaml")}
ENV_CONFIG, FL_CONFIG = SETTINGS["mnist"]   # set by --setting
FULL = {"seeds": (0, 1, 2), "iters": 24, "steps_per_iter": 300, "eval_episodes": 5, "eval_rounds": 20,
        "fl_rounds": 10, "fl_methods": ("random", "rl-crp", "rl-no-crp"), "target": 0.93}
QUICK = {"seeds": (0,), "iters": 2, "steps_per_iter": 240, "eval_episodes": 1, "eval_rounds": 10,
         "fl_rounds": 3, "fl_methods": ("random", "rl-crp"), "target": 0.9}
CUT = {"full": "3 seeds; 24 PPO iterations x 300 env steps per method and seed (7,200; sized to the shared "
               "15-minute benchmark slot of the 2-core machine; the issue names no budget); FL leg: FedAvg + MLP (not the CNN) for 10 rounds, random vs rl-crp vs rl-no-crp "
               "(greedy-latency and the oracle in the env leg only)",
       "quick": "1 seed, 2 PPO iterations x 240 env steps (barely trained policies), 1 evaluation episode of 10 "
                "rounds, FL leg 3 rounds of random vs rl-crp with target 0.9"}


def env_steps_per_second(env_cfg, seconds: float = 5.0) -> float:
    """The MultiAgentEnv alone: steps per second with random allowed actions, HMM fits included,
    after one warm-up episode (hmmlearn's import alone took 5 s on the loaded machine)."""
    from rl.envs.crp_rllib import CRPMultiAgentEnv

    env = CRPMultiAgentEnv(env_cfg)
    rng = np.random.default_rng(0)
    for warmup in (True, False):
        obs, _ = env.reset(seed=0)
        steps, start = 0, time.perf_counter()
        while (time.perf_counter() - start < seconds) if not warmup else steps < env.sim.k * env.sim.section.rounds:
            actions = {a: int(rng.choice(np.flatnonzero(o[-env.action_spaces[a].n:] > 0.5))) for a, o in obs.items()}
            obs, _, term, _, _ = env.step(actions)
            steps += 1
            if term["__all__"]:
                obs, _ = env.reset()
    return steps / (time.perf_counter() - start)


def train(method: str, seed: int, grid: dict, root: Path) -> Path:
    from rl.crp.config import CRPConfig
    from rl.crp.run import CRPHooks
    from rl.loop import train_run

    cfg = load_config(CRPConfig, ENV_CONFIG, [f"env.seed={seed}", f"train.seed={seed}",
                                              f"train.env_steps_per_iter={grid['steps_per_iter']}",
                                              f"train.minibatch_size={min(100, grid['steps_per_iter'])}",
                                              f"train.checkpoint_every={grid['iters']}"])
    run_dir = runs.new_run_dir(root, f"{method}-{cfg.env.name}-s{seed}", kind="rl", method=method,
                               argv=["bench/rl_crp.py"])
    train_run(CRPHooks(method), cfg, run_dir, stop_iters=grid["iters"], log=lambda line: print(line, flush=True))
    return run_dir


def fl_run(method: str, seed: int, grid: dict, root: Path, checkpoint: Path | None) -> dict:
    from actors.config import FLConfig
    from actors.driver import run_fl

    # both trained methods run through the one `rl-crp` selector; the ablation's export says use_crp false
    selector = "rl-crp" if method in ("rl-crp", "rl-no-crp") else method
    overrides = [f"seed={seed}", f"rounds={grid['fl_rounds']}", f"target_accuracy={grid['target']}",
                 f"selection.method={selector}", f"output_dir={root}"]
    if checkpoint is not None:
        overrides.append(f"selection.settings.checkpoint={checkpoint}")
    if method == "greedy-latency":
        overrides += ["selection.settings.model_bytes=407080", "selection.settings.local_epochs=1"]
    cfg = load_config(FLConfig, FL_CONFIG, overrides)
    run_dir = runs.new_run_dir(root, f"fl-{method}-s{seed}", kind="fl", method="fedavg", argv=["bench/rl_crp.py"])
    summary = run_fl(cfg, run_dir, progress=False)
    rows = runs.read_metrics(run_dir)
    hit = next((r for r in rows if r.get("test_accuracy", 0) >= grid["target"]), None)
    trained = [r for r in rows if r["round"] > 0]
    return {"method": method, "seed": seed, "run_dir": str(run_dir),
            "final_accuracy": summary["final_test_accuracy"], "rounds_to_target": hit["round"] if hit else None,
            "sim_time_to_target_s": hit["sim_time_s"] if hit else None, "sim_time_s": summary["sim_time_s"],
            "conflicts_per_round": float(np.mean([r["conflicts"] for r in trained])),
            "mean_edge_round_s": float(np.mean([np.mean(r["edge_round_s"]) for r in trained])),
            "curve": [(r["round"], r["sim_time_s"], r.get("test_accuracy")) for r in rows]}


def check_same_population(seed: int) -> None:
    """The env's profiles, coverage, availability draws and links are the FL run's (same sampling,
    same seed)."""
    from actors.config import FLConfig
    from actors.driver import prepare
    from rl.crp.config import CRPConfig
    from rl.envs.crp import CRPSimulation

    from actors.clock import VirtualClock
    from pipelines.population import LinkModel

    fl_cfg = load_config(FLConfig, FL_CONFIG, [f"seed={seed}"])
    fl = prepare(fl_cfg)
    sim = CRPSimulation(load_config(CRPConfig, ENV_CONFIG, [f"env.seed={seed}"]).env)
    same = [(p.compute_speed, p.uplink_mbps, p.downlink_mbps, p.availability) for p in fl.profiles] == \
        [(p.compute_speed, p.uplink_mbps, p.downlink_mbps, p.availability) for p in sim.population.profiles]
    edges = fl_cfg.runtime.num_edge_servers
    coverage = {e: [c for c, cov in enumerate(fl.coverage) if e in cov] for e in range(edges)}
    clock = VirtualClock(fl.profiles, seed, links=LinkModel(fl.profiles, seed, fl_cfg.clock.link_model,
                                                            fl_cfg.clock.link_min_gain))
    sim.start(seed)
    draws = all(clock.available(r) == np.flatnonzero(sim.available(r)).tolist() and
                all(clock.link(r, c) == sim.links.link(r, c) for c in range(len(fl.profiles))) for r in range(1, 21))
    if not same or coverage != sim.coverage or list(sim.population.sizes) != [len(p) for p in fl.parts] or not draws:
        raise SystemExit(f"seed {seed}: {ENV_CONFIG} does not describe the population of {FL_CONFIG}")


def paired_ratio(ours: list[float | None], base: list[float | None]) -> dict:
    """mean(ours) / mean(base) over the seeds where both were measured, with the 95 % interval of
    that ratio from edgeray.stats.paired_gain (seeds resampled, paired), and the per-seed ratios.
    A baseline whose every value is 0 gives no ratio (``mean`` None; the difference keys show it)."""
    from edgeray.stats import paired_gain

    pairs = [(a, b) for a, b in zip(ours, base) if a is not None and b is not None]
    per_seed = [a / b if a is not None and b else None for a, b in zip(ours, base)]
    out = {"mean": None, "ci95": None, "per_seed": per_seed, "ours": ours, "baseline": base, "seeds": len(pairs)}
    if pairs and any(b for _, b in pairs):
        g = paired_gain([a for a, _ in pairs], [b for _, b in pairs])
        out["mean"] = 1 + g["gain_pct"] / 100
        out["ci95"] = [1 + g["ci_low_pct"] / 100, 1 + g["ci_high_pct"] / 100] if len(pairs) >= 2 else None
    return out


def paired_diff(ours: list[float], base: list[float]) -> dict:
    """Mean per-seed difference ours - base with its 95 % interval (edgeray.stats.paired_gain)."""
    from edgeray.stats import paired_gain

    g = paired_gain(ours, base)
    return {"mean": g["diff_mean"], "ci95": [g["diff_ci_low"], g["diff_ci_high"]] if len(ours) >= 2 else None,
            "per_seed": [a - b for a, b in zip(ours, base)]}


def plots(env_results: dict, fl_rows: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    methods = list(next(iter(env_results.values()))["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(axes, ("conflicts_per_round", "latency_s", "jain"),
                              ("conflicts per round", "mean edge latency T_m (s)", "Jain's index")):
        vals = [[env_results[s]["methods"][m][key] for s in env_results] for m in methods]
        ax.bar(methods, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], color="tab:blue", capsize=3)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=40, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
    files.append(str(out / "comparison.png"))
    if fl_rows:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for row in fl_rows:
            pts = [(t, a) for _, t, a in row["curve"] if a is not None]
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{row['method']} s{row['seed']}")
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fl_accuracy.png", dpi=100)
        plt.close(fig)
        files.append(str(out / "fl_accuracy.png"))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="mnist",
                        help="mnist: configs/crp_mnist.yaml (every client has a home edge); contested: "
                             "configs/crp_contested.yaml (shared clients without owner, time-varying links)")
    parser.add_argument("--skip-fl", action="store_true", help="env leg only")
    parser.add_argument("--reuse-training", action="store_true",
                        help="take the trained rl-crp / rl-no-crp runs of a previous run of this grid from its "
                             "runs/ folder instead of training again (env and FL legs are re-run)")
    args = parser.parse_args()
    global ENV_CONFIG, FL_CONFIG
    ENV_CONFIG, FL_CONFIG = SETTINGS[args.setting]
    grid = QUICK if args.quick else FULL
    out = Path("bench/results") / (("rl_crp" if args.setting == "mnist" else f"rl_crp_{args.setting}")
                                   + ("-quick" if args.quick else ""))
    from rl.crp.config import CRPConfig

    env_name = load_config(CRPConfig, ENV_CONFIG).env.name
    previous = {}
    if args.reuse_training:
        tag = f"-{env_name}-s"
        previous = {(d.name.split(tag)[0], int(d.name.split(tag)[1].split("-")[0])): d
                    for d in sorted((out / "runs").glob(f"rl-*{tag}*"))}
        for d in (out / "runs").glob("fl-*"):
            shutil.rmtree(d)
    else:
        shutil.rmtree(out, ignore_errors=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from edgeray.connect import connect
    from rl.crp.analysis import compare, markdown_table
    from rl.loop import torch_threads

    cut = CUT["quick" if args.quick else "full"] + ("; FL leg skipped (--skip-fl)" if args.skip_fl else "")
    result: dict = {"load_avg_start": list(os.getloadavg()), "cut": cut, "setting": args.setting,
                    "env_config": ENV_CONFIG, "fl_config": FL_CONFIG, "seeds": list(grid["seeds"]),
                    "fl_target_accuracy": grid["target"], "reused_training": bool(previous)}
    env_cfg = load_config(CRPConfig, ENV_CONFIG).env
    result["env_steps_per_s"] = env_steps_per_second(env_cfg)
    connect(None, num_cpus=2, log_to_driver=False)
    env_results, trained, fl_rows = {}, {}, []
    with torch_threads(1):
        for seed in grid["seeds"]:
            check_same_population(seed)
            trained[seed] = {m: previous.get((m, seed)) or train(m, seed, grid, out / "runs")
                             for m in ("rl-crp", "rl-no-crp")}
            cfg = load_config(CRPConfig, ENV_CONFIG, [f"env.seed={seed}"])
            env_results[seed] = compare(cfg.env, {m: [d] for m, d in trained[seed].items()},
                                        grid["eval_episodes"], grid["eval_rounds"])
            print(markdown_table(env_results[seed]), flush=True)
    histories = [runs.read_metrics(d) for ms in trained.values() for d in ms.values()]
    steps = sum(rows[-1]["env_steps"] - rows[0]["env_steps"] for rows in histories)
    walls = sum(r["iteration_wall_s"] for rows in histories for r in rows[1:])  # the first one builds
    result["train_env_steps_per_s"] = steps / walls if walls else None
    per_seed = {s: e["methods"] for s, e in env_results.items()}

    def values(method: str, key: str) -> list[float]:
        return [m[method][key] for m in per_seed.values()]

    result["conflict_ratio_vs_random"] = paired_ratio(values("rl-crp", "conflicts_per_round"),
                                                      values("random", "conflicts_per_round"))
    result["latency_ratio_vs_greedy"] = paired_ratio(values("rl-crp", "latency_s"), values("greedy-latency", "latency_s"))
    result["conflict_ratio_vs_no_crp"] = paired_ratio(values("rl-crp", "conflicts_per_round"),
                                                      values("rl-no-crp", "conflicts_per_round"))
    if not any(values("rl-no-crp", "conflicts_per_round")) and not any(values("rl-crp", "conflicts_per_round")):
        result["conflict_ratio_vs_no_crp"]["mean"] = 1.0   # both conflict-free: not fewer
    result["conflict_diff_vs_no_crp"] = paired_diff(values("rl-crp", "conflicts_per_round"),
                                                    values("rl-no-crp", "conflicts_per_round"))
    result["latency_ratio_vs_no_crp"] = paired_ratio(values("rl-crp", "latency_s"), values("rl-no-crp", "latency_s"))
    result["reward_gain_vs_no_crp"] = paired_diff(values("rl-crp", "reward"), values("rl-no-crp", "reward"))
    result["no_crp_conflict_ratio_vs_random"] = paired_ratio(values("rl-no-crp", "conflicts_per_round"),
                                                             values("random", "conflicts_per_round"))
    result["env"] = {name: {k: float(np.mean([per_seed[s][name][k] for s in per_seed]))
                            for k in ("conflicts_per_round", "latency_s", "round_latency_s", "jain", "reward")}
                     for name in next(iter(per_seed.values()))}
    result["final_train_row"] = {f"{m}-s{s}": {k: runs.read_metrics(d)[-1].get(k) for k in
                                              ("iteration", "env_steps", "episode_return_mean", "conflicts_per_round",
                                               "latency_s", "jain")}
                                 for s, ms in trained.items() for m, d in ms.items()}
    (out / "rows.json").write_text(json.dumps({"env": {str(s): e for s, e in env_results.items()}}, default=str))
    print(json.dumps({k: result[k] for k in ("conflict_ratio_vs_random", "latency_ratio_vs_greedy",
                                                 "conflict_ratio_vs_no_crp")}), flush=True)

    result["fl_time_to_target_ratio_vs_random"] = None
    if not args.skip_fl:
        try:
            for seed in grid["seeds"]:
                for method in grid["fl_methods"]:
                    ckpt = trained[seed][method] / "checkpoints" / "crp_policy.pt" if method in trained[seed] else None
                    fl_rows.append(fl_run(method, seed, grid, out / "runs", ckpt))
                    print(json.dumps({k: v for k, v in fl_rows[-1].items() if k != "curve"}), flush=True)
            by = {(r["method"], r["seed"]): r["sim_time_to_target_s"] for r in fl_rows}
            result["fl_time_to_target_ratio_vs_random"] = paired_ratio([by["rl-crp", s] for s in grid["seeds"]],
                                                                       [by["random", s] for s in grid["seeds"]])
            if "rl-no-crp" in grid["fl_methods"]:
                result["fl_time_to_target_ratio_vs_no_crp"] = paired_ratio(
                    [by["rl-crp", s] for s in grid["seeds"]], [by["rl-no-crp", s] for s in grid["seeds"]])
            result["fl"] = {m: {k: float(np.mean([r[k] for r in fl_rows if r["method"] == m and r[k] is not None]))
                                if any(r[k] is not None for r in fl_rows if r["method"] == m) else None
                                for k in ("final_accuracy", "rounds_to_target", "sim_time_to_target_s",
                                          "conflicts_per_round", "mean_edge_round_s")}
                            for m in grid["fl_methods"]}
        except Exception as exc:  # the env results above stand on their own
            result["fl_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    result["plots"] = plots(env_results, fl_rows, out)
    result["fl_runs"] = [{k: v for k, v in r.items() if k != "curve"} for r in fl_rows]
    table = "\n".join(markdown_table(env_results[s]) for s in env_results)
    (out / "table.md").write_text(table)
    result["targets"] = {
        "conflicts <= 0.5 x random": _met(result["conflict_ratio_vs_random"]["mean"], 0.5),
        "latency < greedy": _met(result["latency_ratio_vs_greedy"]["mean"], 1.0, strict=True),
        "fewer conflicts than no-CRP": _met(result["conflict_ratio_vs_no_crp"]["mean"], 1.0, strict=True),
        "FL time to target < random": _met((result["fl_time_to_target_ratio_vs_random"] or {}).get("mean"), 1.0,
                                           strict=True)}
    result["wall_s"] = time.perf_counter() - started
    result["load_avg"] = list(os.getloadavg())
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    import ray
    ray.shutdown()
    flat = {**{k: (v["mean"] if isinstance(v, dict) and "mean" in v else v) for k, v in result.items()
               if k in ("conflict_ratio_vs_random", "latency_ratio_vs_greedy", "conflict_ratio_vs_no_crp",
                        "fl_time_to_target_ratio_vs_random", "reward_gain_vs_no_crp", "conflict_diff_vs_no_crp",
                        "latency_ratio_vs_no_crp", "no_crp_conflict_ratio_vs_random",
                        "fl_time_to_target_ratio_vs_no_crp")},
            "env_steps_per_s": result["env_steps_per_s"], "train_env_steps_per_s": result["train_env_steps_per_s"],
            "env": result["env"], "fl": result.get("fl"), "fl_error": result.get("fl_error"),
            "ci95": {k: result[k]["ci95"] for k in ("conflict_ratio_vs_random", "latency_ratio_vs_greedy",
                                                    "conflict_ratio_vs_no_crp", "reward_gain_vs_no_crp",
                                                    "conflict_diff_vs_no_crp", "latency_ratio_vs_no_crp",
                                                    "no_crp_conflict_ratio_vs_random",
                                                    "fl_time_to_target_ratio_vs_random",
                                                    "fl_time_to_target_ratio_vs_no_crp")
                     if isinstance(result.get(k), dict)},
            "targets": result["targets"], "setting": args.setting, "seeds": result["seeds"], "fl_target_accuracy": grid["target"],
            "reused_training": result["reused_training"], "wall_s": result["wall_s"],
            "load_avg_start": result["load_avg_start"], "load_avg": result["load_avg"], "cut": result["cut"]}
    print(json.dumps(flat, default=str))


def _met(value, bound, strict=False):
    if value is None:
        return None
    return bool(value < bound) if strict else bool(value <= bound)


if __name__ == "__main__":
    main()
