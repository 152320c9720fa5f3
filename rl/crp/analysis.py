"""Evaluate RL-CRP runs against the baselines in the same simulation (no Ray, no RLlib).

Every method is a `pipelines.selection.Selector` playing the same episodes of `rl.envs.crp`
(per-round draws seeded `EVAL_SEED0 + episode`, never used in training): random, greedy by
estimated latency, the centralized conflict-free oracle (a bound), and each run's exported
policy through `RLCRPSelector` (rl-crp, and rl-no-crp for the ablation), exactly as the FL
runtime would run it. Per method: conflicts per round, mean edge latency T_m, mean round latency
(slowest edge), Jain's index of all clients' participation at the end, mean reward per edge and
round; means over episodes (and over seeds for trained methods), with ratios to random and greedy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeray.config import to_dict
from rl.envs.crp import CRPEnvSection, CRPSimulation, episode_metrics, run_selector

EVAL_SEED0 = 10_000
METRICS = ("conflicts_per_round", "latency_s", "round_latency_s", "jain", "reward")


def baseline_factories(env: CRPEnvSection) -> dict:
    from pipelines.selection import ConflictFreeOracle, GreedyLatencySelector, RandomSelector

    return {"random": lambda pop, seed: RandomSelector(pop, seed),
            "greedy-latency": lambda pop, seed: GreedyLatencySelector(pop, seed, local_epochs=env.local_epochs,
                                                                      model_bytes=env.model_bytes),
            "oracle": lambda pop, seed: ConflictFreeOracle(pop, seed)}


def policy_factory(checkpoint: str | Path, sample: bool = True):
    from pipelines.selection.crp import RLCRPSelector

    return lambda pop, seed: RLCRPSelector(pop, seed, checkpoint=str(checkpoint), sample=sample)


def evaluate(env: CRPEnvSection, factory, episodes: int, rounds: int = 0) -> dict:
    """Mean metrics (and the per-episode values) of one selector factory over `episodes` episodes."""
    sim = CRPSimulation(env)
    per_episode = []
    for i in range(episodes):
        selector = factory(sim.population, i)
        results = run_selector(sim, selector, rounds or env.rounds, EVAL_SEED0 + i)
        per_episode.append(episode_metrics(sim, results))
    return {**{k: float(np.mean([m[k] for m in per_episode])) for k in METRICS},
            "episodes": per_episode}


def setting_key(env: CRPEnvSection) -> str:
    return f"{env.name}-{env.num_edges}x{env.num_clients}-{env.conflict_rule}"


def compare(env: CRPEnvSection, trained: dict[str, list[Path]], episodes: int, rounds: int = 0) -> dict:
    """Baselines once, each trained method's runs (one per seed) on the same episodes; ratios."""
    from pipelines.selection.crp import EXPORT_FILE

    methods = {name: evaluate(env, f, episodes, rounds) for name, f in baseline_factories(env).items()}
    for method, run_dirs in trained.items():
        seeds = [evaluate(env, policy_factory(Path(d) / "checkpoints" / EXPORT_FILE), episodes, rounds)
                 for d in run_dirs]
        methods[method] = {**{k: float(np.mean([s[k] for s in seeds])) for k in METRICS},
                           "seeds": [{k: s[k] for k in METRICS} for s in seeds]}
    for m in methods.values():
        m["conflict_ratio_vs_random"] = _ratio(m["conflicts_per_round"], methods["random"]["conflicts_per_round"])
        m["latency_ratio_vs_greedy"] = _ratio(m["latency_s"], methods["greedy-latency"]["latency_s"])
    return {"setting": setting_key(env), "env": to_dict(env), "episodes": episodes, "methods": methods}


def _ratio(a, b):
    return float(a / b) if b else None


def markdown_table(summary: dict) -> str:
    lines = [f"setting {summary['setting']}, {summary['episodes']} evaluation episodes",
             "", "| method | conflicts / round | vs random | edge latency (s) | vs greedy | round latency (s) "
             "| Jain | reward |", "|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        lines.append(f"| {name} | {m['conflicts_per_round']:.2f} | {_fmt(m['conflict_ratio_vs_random'])} "
                     f"| {m['latency_s']:.2f} | {_fmt(m['latency_ratio_vs_greedy'])} | {m['round_latency_s']:.2f} "
                     f"| {m['jain']:.3f} | {m['reward']:.3f} |")
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def plot_comparison(summary: dict, out_dir: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key, label in zip(axes, ("conflicts_per_round", "latency_s", "jain"),
                              ("conflicts per round", "mean edge latency (s)", "Jain's index")):
        ax.bar(names, [summary["methods"][n][key] for n in names], color="tab:blue")
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.suptitle(summary["setting"], fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / f"comparison_{summary['setting']}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_training(runs: list[tuple[str, object, list[dict]]], out_dir: Path) -> str:
    """Conflicts per round over env steps in training, per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, cfg, rows in runs:
        pts = [(r["env_steps"], r["conflicts_per_round"]) for r in rows if "conflicts_per_round" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{method} s{cfg.train.seed}")
    ax.set_xlabel("env steps")
    ax.set_ylabel("conflicts per round (training)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "training_conflicts.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def evaluate_runs(run_dirs: list[Path], out_dir: Path) -> dict:
    """`edgeray rl eval rl-crp --runs ...`: runs grouped by setting; table.md, summary.json, plots."""
    from edgeray.errors import UserError
    from pipelines.selection.crp import EXPORT_FILE
    from rl.crp.algorithms import method_env
    from rl.crp.config import CRP_METHODS, CRPConfig
    from rl.loop import load_run

    runs = [load_run(d, CRPConfig, CRP_METHODS) for d in run_dirs]
    missing = [str(d) for d in run_dirs if not (Path(d) / "checkpoints" / EXPORT_FILE).is_file()]
    if missing:
        raise UserError(f"no exported policy (checkpoints/{EXPORT_FILE}) in {', '.join(missing)}: "
                        f"train until the first checkpoint")
    groups: dict[str, dict] = {}
    for d, (method, cfg, _) in zip(run_dirs, runs):
        env = method_env("rl-crp", cfg)   # the setting, with the risk on (baselines ignore it)
        g = groups.setdefault(setting_key(env), {"env": env, "cfg": cfg, "trained": {}})
        g["trained"].setdefault(method, []).append(Path(d))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, tables = {}, []
    for key, g in groups.items():
        s = compare(g["env"], g["trained"], g["cfg"].eval.episodes, g["cfg"].eval.rounds)
        s["plot"] = plot_comparison(s, out_dir)
        summary[key] = s
        tables.append(markdown_table(s))
    summary["training_plot"] = plot_training(runs, out_dir)
    table = "\n".join(tables)
    (out_dir / "table.md").write_text(table)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(table, end="")
    print(f"wrote {out_dir}/table.md, summary.json and plots")
    return summary
