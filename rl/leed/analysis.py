"""Compare LEED runs with their baselines: table, summary and return-over-steps plots (no Ray).

Definitions (used by `edgeray rl eval leed` and bench/leed.py alike):
  * final return: mean `episode_return_mean` (sum over agents per episode, RLlib's smoothing over
    the last 20 episodes) of a run's last `FINAL_ROWS` iterations;
  * target: IPPO's final return of the same setting (mean over its seeds);
  * steps to target: the env steps of the first iteration whose return reaches the target (None
    when a run never does); steps ratio = LEED's / IPPO's, from the seed means;
  * iteration seconds: mean wall time of an iteration, the first one (build, warm-up) left out;
  * paired by seed: each run against IPPO's run of the same seed (its own target), the per-seed
    steps ratios, their mean and a bootstrap 95 % interval over seeds (``paired_by_seed``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeray.stats import paired_gain

FINAL_ROWS = 3


def _returns(rows):
    return [(r["env_steps"], r["episode_return_mean"]) for r in rows if r.get("episode_return_mean") is not None]


def final_return(rows) -> float | None:
    values = [ret for _, ret in _returns(rows)][-FINAL_ROWS:]
    return float(np.mean(values)) if values else None


def steps_to_reach(rows, target: float | None) -> int | None:
    if target is None:
        return None
    for steps, ret in _returns(rows):
        if ret >= target:
            return int(steps)
    return None


def iteration_seconds(rows) -> float | None:
    walls = [r["iteration_wall_s"] for r in rows[1:]] or [r["iteration_wall_s"] for r in rows]
    return float(np.mean(walls)) if walls else None


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def setting_key(cfg) -> str:
    """Runs are compared within one setting: the same network and agent count."""
    return f"{cfg.env.name}-{cfg.env.num_agents}"


def summarize(runs: list[tuple[str, object, list[dict]]]) -> dict:
    """runs: (method, config, metrics rows). Per setting and method: final return, steps to IPPO's
    final return, iteration seconds, and (demonstration methods) the demonstration quality."""
    settings: dict[str, dict[str, list]] = {}
    for method, cfg, rows in runs:
        settings.setdefault(setting_key(cfg), {}).setdefault(method, []).append((cfg, rows))
    out = {}
    for key, methods in settings.items():
        ippo = methods.get("ippo", [])
        target = _mean(final_return(rows) for _, rows in ippo)
        entry = {"target_return": target, "methods": {}}
        for method, items in methods.items():
            steps = [steps_to_reach(rows, target) for _, rows in items]
            leed_rows = [r["leed"] for _, rows in items for r in rows if "leed" in r]
            entry["methods"][method] = {
                "seeds": len(items),
                "final_return": _mean(final_return(rows) for _, rows in items),
                "steps_to_target": _mean(steps) if all(s is not None for s in steps) else None,
                "reached_target": sum(s is not None for s in steps),
                "iter_seconds": _mean(iteration_seconds(rows) for _, rows in items),
                "env_steps": _mean(rows[-1]["env_steps"] if rows else None for _, rows in items),
                "valid_instruction_share": _mean(r.get("valid_share") for r in leed_rows[:1]),
                "demo_episode_return": _mean(r.get("expert_episode_return") for r in leed_rows[:1]),
                "demo_backend": leed_rows[0].get("backend") if leed_rows else None,
            }
        ippo_steps = entry["methods"].get("ippo", {}).get("steps_to_target")
        for method, m in entry["methods"].items():
            m["steps_ratio_vs_ippo"] = (m["steps_to_target"] / ippo_steps
                                        if m["steps_to_target"] is not None and ippo_steps else None)
            m.update(paired_by_seed(methods[method], ippo))
        out[key] = entry
    return out


IMPROVEMENT_SHARE = 0.9   # the second, noise-robust target: 90 % of IPPO's improvement [R]


def paired_by_seed(items, ippo) -> dict:
    """Per seed, against IPPO's run of the same seed: the steps ratio to that run's final return
    (None where either never reaches it) with a paired bootstrap 95 % interval over the seeds
    where both do, and the final-return difference with its interval.

    The issue's target (IPPO's final return) sits on IPPO's plateau when IPPO converges, so the
    step at which a curve first crosses it is decided by noise near the plateau. The same ratio is
    also given for a target of IMPROVEMENT_SHARE of IPPO's improvement (first iteration's return +
    0.9 × (final − first)), keys ``*_90pct_*``: our addition, not the issue's metric."""
    ippo_by_seed = {cfg.train.seed: rows for cfg, rows in ippo}
    ratios, ratios_90, own, base = {}, {}, [], []
    for cfg, rows in items:
        if cfg.train.seed not in ippo_by_seed:
            continue
        ippo_rows = ippo_by_seed[cfg.train.seed]
        final = final_return(ippo_rows)
        ippo_curve = _returns(ippo_rows)
        first = ippo_curve[0][1] if ippo_curve else None
        partial = None if final is None or first is None else first + IMPROVEMENT_SHARE * (final - first)
        for target, into in ((final, ratios), (partial, ratios_90)):
            mine, theirs = steps_to_reach(rows, target), steps_to_reach(ippo_rows, target)
            into[cfg.train.seed] = mine / theirs if mine is not None and theirs else None
        own.append(final_return(rows))
        base.append(final_return(ippo_rows))
    out = {"final_return_minus_ippo": None, "final_return_minus_ippo_ci": None}
    for suffix, per_seed in (("", ratios), ("_90pct", ratios_90)):
        defined = [r for r in per_seed.values() if r is not None]
        out[f"steps_ratio_vs_ippo{suffix}_per_seed"] = per_seed
        out[f"steps_ratio_vs_ippo{suffix}_paired_mean"] = float(np.mean(defined)) if defined else None
        out[f"steps_ratio_vs_ippo{suffix}_ci"] = None
        if len(defined) >= 2:
            b = paired_gain(np.array(defined), np.zeros(len(defined)))
            out[f"steps_ratio_vs_ippo{suffix}_ci"] = [b["diff_ci_low"], b["diff_ci_high"]]
    if len(own) >= 2 and None not in own and None not in base:
        b = paired_gain(np.array(own), np.array(base))
        out["final_return_minus_ippo"], out["final_return_minus_ippo_ci"] = b["diff_mean"], [b["diff_ci_low"],
                                                                                          b["diff_ci_high"]]
    return out


def markdown_table(summary: dict) -> str:
    lines = ["| setting | method | seeds | final return | steps to IPPO's final | ratio vs IPPO | s / iter | "
             "demo valid share | demo return |", "|---|---|---|---|---|---|---|---|---|"]
    for key, entry in summary.items():
        for method, m in sorted(entry["methods"].items()):
            lines.append(f"| {key} | {method} | {m['seeds']} | {_fmt(m['final_return'])} "
                         f"| {_fmt(m['steps_to_target'], 0)} "
                         f"| {_fmt(m['steps_ratio_vs_ippo'])} | {_fmt(m['iter_seconds'])} "
                         f"| {_fmt(m['valid_instruction_share'])} | {_fmt(m['demo_episode_return'])} |")
    return "\n".join(lines) + "\n"


def _fmt(x, digits=2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def plot_returns(runs, out_dir: Path) -> list[str]:
    """returns_<setting>.png: return over env steps per method (mean over seeds), IPPO's final
    return dashed, the demonstrations' own return dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    files = []
    for key, entry in summary.items():
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for method in sorted(entry["methods"]):
            curves = [_returns(rows) for m, cfg, rows in runs if m == method and setting_key(cfg) == key]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = [s for s, _ in curves[0][:n]]
            mean = np.mean([[c[i][1] for i in range(n)] for c in curves], axis=0)
            ax.plot(steps, mean, marker="o", ms=3, label=method)
        if entry["target_return"] is not None:
            ax.axhline(entry["target_return"], ls="--", color="gray", lw=1, label="IPPO final")
        demo = next((m["demo_episode_return"] for m in entry["methods"].values() if m["demo_episode_return"]), None)
        if demo is not None:
            ax.axhline(demo, ls=":", color="green", lw=1, label="demonstrations")
        ax.set_xlabel("env steps")
        ax.set_ylabel("episode return (sum over agents)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"returns_{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(str(path))
    return files
