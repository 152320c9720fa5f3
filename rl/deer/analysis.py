"""Evaluation of non-stationary replay runs, no Ray: mean return, recovery after shifts, plots.

Definitions (OUR CHOICES; the paper's exact metric definitions were not recoverable):
  * mean return of a run: mean over all episodes that finished during training;
  * recovery time after a true shift at step s: the env steps from s until the rolling mean of
    the last `smooth` episode returns is back within `tolerance * |level|` of `level`, the mean
    return of episodes that ended in the `window` steps before s. If it never recovers before
    the next shift (or the run's end), the time to that point is used and the shift is counted as
    censored; a shift followed by fewer than `window` steps (e.g. at the very end) is not scored;
  * gain of A over B on one env: (mean_A - mean_B) / |mean_B| * 100 with means over seeds; the
    reported gain is the average of the per-env gains;
  * wall-time ratio on one env: median seconds per iteration over all iterations (first excluded)
    of all seeds, DEER / PER; the reported ratio is the average over envs.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np

from rl.envs.nonstationary import ShiftSchedule


def episodes_of(rows: list[dict]) -> np.ndarray:
    """(end step, return) of every finished episode, sorted by step; shape (n, 2)."""
    eps = [(e[0], e[1]) for r in rows for e in r.get("episodes", [])]
    return np.array(sorted(eps), dtype=float).reshape(-1, 2)


def true_shift_steps(cfg, rows: list[dict]) -> list[int]:
    last_step = max((r["env_steps"] for r in rows), default=0)
    return ShiftSchedule(cfg.env.shift_every, cfg.env.magnitudes).shift_steps(last_step)


def recovery_times(episodes: np.ndarray, shifts: list[int], end_step: int, *, window: int,
                   smooth: int = 5, tolerance: float = 0.1) -> list[dict]:
    """Per shift; a shift with less than `window` steps after it (before the next or the end) is skipped."""
    out = []
    bounds = list(shifts) + [end_step]
    for s, nxt in zip(shifts, bounds[1:]):
        if nxt - s < window:
            continue
        steps, returns = episodes[:, 0], episodes[:, 1]
        before = returns[(steps >= s - window) & (steps < s)]
        after_mask = (steps >= s) & (steps < nxt)
        after_steps, after = steps[after_mask], returns[after_mask]
        if len(before) == 0 or len(after) == 0:
            continue
        level = float(before.mean())
        rolling = np.array([after[max(0, i - smooth + 1):i + 1].mean() for i in range(len(after))])
        ok = np.nonzero(rolling >= level - tolerance * abs(level))[0]
        censored = len(ok) == 0
        recovery = (nxt - s) if censored else float(after_steps[ok[0]] - s)
        out.append({"shift": s, "level": level, "recovery_steps": recovery, "censored": censored,
                    "drop": float(level - rolling.min())})
    return out


def run_metrics(cfg, rows: list[dict]) -> dict:
    episodes = episodes_of(rows)
    end_step = max((r["env_steps"] for r in rows), default=0)
    shifts = true_shift_steps(cfg, rows)
    recoveries = recovery_times(episodes, shifts, end_step, window=max(1, cfg.env.shift_every // 2))
    walls = [r["iteration_wall_s"] for r in rows]
    detected = rows[-1].get("deer", {}).get("change_points", []) if rows else []
    return {
        "mean_return": float(episodes[:, 1].mean()) if len(episodes) else float("nan"),
        "recovery_steps": float(np.mean([r["recovery_steps"] for r in recoveries])) if recoveries else float("nan"),
        "censored_shifts": int(sum(r["censored"] for r in recoveries)),
        "return_drop": float(np.mean([r["drop"] for r in recoveries])) if recoveries else float("nan"),
        # the first iteration includes building and warm-up; per-iteration time is the rest
        "wall_s_per_iter": float(np.median(walls[1:] if len(walls) > 1 else walls)) if walls else float("nan"),
        "iteration_walls": walls[1:] if len(walls) > 1 else walls,
        "shifts": shifts,
        "detected_changes": detected,
        "env_steps": end_step,
    }


def _mean_std(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if v == v], dtype=float)
    if not len(values):
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: list[tuple[str, object, list[dict]]]) -> dict:
    """runs: (method, config, rows). Returns {env: {method: aggregate}} plus gains."""
    grouped = defaultdict(lambda: defaultdict(list))
    for method, cfg, rows in runs:
        if rows:
            grouped[cfg.env.name][method].append(run_metrics(cfg, rows))
    table = {}
    for env, methods in grouped.items():
        table[env] = {}
        for method, metrics in methods.items():
            mean_return, mean_return_std = _mean_std(m["mean_return"] for m in metrics)
            recovery, recovery_std = _mean_std(m["recovery_steps"] for m in metrics)
            wall, wall_std = _mean_std(m["wall_s_per_iter"] for m in metrics)
            table[env][method] = {
                "seeds": len(metrics), "mean_return": mean_return, "mean_return_std": mean_return_std,
                "recovery_steps": recovery, "recovery_steps_std": recovery_std,
                "censored_shifts": sum(m["censored_shifts"] for m in metrics),
                "return_drop": _mean_std(m["return_drop"] for m in metrics)[0],
                "wall_s_per_iter": wall, "wall_s_per_iter_std": wall_std,
                # median over every iteration of every seed: robust to a run caught in a load spike
                "wall_s_per_iter_median": float(np.median([w for m in metrics for w in m["iteration_walls"]])),
                "detected_changes_per_run": float(np.mean([len(m["detected_changes"]) for m in metrics])),
            }
    return {"per_env": table, **gains(table)}


def gains(table: dict) -> dict:
    def gain(a: str, b: str, key: str = "mean_return") -> float:
        per_env = [(t[a][key] - t[b][key]) / abs(t[b][key]) * 100 for t in table.values()
                   if a in t and b in t and t[b][key] not in (0,) and t[b][key] == t[b][key]]
        return float(np.mean(per_env)) if per_env else float("nan")

    ratios = [t["deer"]["wall_s_per_iter_median"] / t["per"]["wall_s_per_iter_median"] for t in table.values()
              if "deer" in t and "per" in t]
    recovery = [t["deer"]["recovery_steps"] / t["per"]["recovery_steps"] for t in table.values()
                if "deer" in t and "per" in t and t["per"]["recovery_steps"] > 0]
    return {"gain_vs_per_pct": gain("deer", "per"), "gain_vs_uniform_pct": gain("deer", "uniform"),
            "time_ratio_vs_per": float(np.mean(ratios)) if ratios else float("nan"),
            "recovery_ratio_vs_per": float(np.nanmean(recovery)) if recovery else float("nan")}


def markdown_table(summary: dict) -> str:
    lines = ["| env | method | seeds | mean return (± sd) | recovery steps (± sd) | censored | wall s/iter (± sd) | DEER changes/run |",
             "|---|---|---|---|---|---|---|---|"]
    for env, methods in sorted(summary["per_env"].items()):
        for method in ("uniform", "per", "deer"):
            if method not in methods:
                continue
            m = methods[method]
            lines.append(f"| {env} | {method} | {m['seeds']} | {m['mean_return']:.2f} ± {m['mean_return_std']:.2f} | "
                         f"{m['recovery_steps']:.0f} ± {m['recovery_steps_std']:.0f} | {m['censored_shifts']} | "
                         f"{m['wall_s_per_iter']:.2f} ± {m['wall_s_per_iter_std']:.2f} | "
                         f"{m['detected_changes_per_run'] if method == 'deer' else '-'} |")
    lines.append("")
    lines.append(f"gain vs PER: {summary['gain_vs_per_pct']:.2f} %, gain vs uniform: {summary['gain_vs_uniform_pct']:.2f} %, "
                 f"wall time ratio DEER/PER: {summary['time_ratio_vs_per']:.3f}, "
                 f"recovery ratio DEER/PER: {summary['recovery_ratio_vs_per']:.3f}")
    return "\n".join(lines) + "\n"


def plot_returns(runs: list[tuple[str, object, list[dict]]], out_dir, bins_per_segment: int = 4) -> list[str]:
    """One PNG per env: mean episode return over env steps per method (band = sd across seeds),
    dashed lines at the true shifts, DEER's detected changes as triangles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_env = defaultdict(list)
    for method, cfg, rows in runs:
        if rows:
            by_env[cfg.env.name].append((method, cfg, rows))
    paths = []
    for env, env_runs in sorted(by_env.items()):
        cfg = env_runs[0][1]
        end = max(max(r["env_steps"] for r in rows) for _, _, rows in env_runs)
        width = max(1, cfg.env.shift_every // bins_per_segment)
        edges = np.arange(0, end + width, width)
        fig, ax = plt.subplots(figsize=(8, 4))
        for method in ("uniform", "per", "deer"):
            curves = []
            for m, _, rows in env_runs:
                if m != method:
                    continue
                eps = episodes_of(rows)
                idx = np.digitize(eps[:, 0], edges) - 1
                curves.append([eps[idx == b, 1].mean() if np.any(idx == b) else np.nan for b in range(len(edges) - 1)])
            if not curves:
                continue
            curves = np.array(curves, dtype=float)
            centres = (edges[:-1] + edges[1:]) / 2
            with warnings.catch_warnings():  # bins with no finished episode stay NaN (gaps in the line)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(curves, axis=0)
                sd = np.nanstd(curves, axis=0)
            ax.plot(centres, mean, label=f"{method} (n={len(curves)})")
            ax.fill_between(centres, mean - sd, mean + sd, alpha=0.2)
            if method == "deer":
                detected = [c for m, _, rows in env_runs if m == "deer"
                            for c in rows[-1].get("deer", {}).get("change_points", [])]
                if detected:
                    ax.plot(detected, [np.nanmin(mean)] * len(detected), "v", color="k", alpha=0.4,
                            label="DEER detected change")
        for s in true_shift_steps(cfg, env_runs[0][2]):
            ax.axvline(s, color="r", linestyle="--", alpha=0.6)
        ax.set_title(f"{env}: episode return over training (red dashed = dynamics shift)")
        ax.set_xlabel("env steps")
        ax.set_ylabel("episode return")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"returns_{env}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths
