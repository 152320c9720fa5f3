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

Post-shift evaluation (what the bench reports; OUR CHOICES):
  * greedy evaluation: `evaluate_policy` runs the current policy greedily for a few episodes on an
    env copy frozen at the dynamics of the current step, every `eval.every_iters` iterations;
  * post-shift AUC of a run at a true shift s: the mean greedy return over the evaluations in
    (s, s + K], K = `auc_steps` (default: the whole segment);
  * normalized per env and segment magnitude: (R - R_random) / (R_best - R_random), R_random the
    mean return of uniformly random actions in those dynamics, R_best the best single evaluation
    of any run of that env in those dynamics (a "converged" proxy: we have no converged policy);
  * paired gain of A over B: per seed, the mean normalized AUC over all (env, shift) of A and of B;
    gain = (mean_A - mean_B) / mean_B * 100 over seeds; 95 % interval: percentile bootstrap over
    seeds (resampling seeds, same resample for A and B);
  * detection: a detection is a hit of shift s if it falls in [s - window, s + hit_steps]
    (the change point is an estimate); the first hit per shift gives the delay; other detections
    are false alarms.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np

from edgeray.stats import paired_gain
from rl.envs.nonstationary import ShiftSchedule

VARIANTS = ("uniform", "per", "deer", "deer-oracle", "deer-dynamics")


def evaluate_policy(env_name: str, env_config: dict, step: int, act, episodes: int, seed: int) -> list[float]:
    """Returns of `episodes` episodes of `act(obs) -> action` on `env_name` frozen at the dynamics of
    global step `step` (the schedule does not advance during evaluation)."""
    from rl.envs.nonstationary import make_ns_env

    schedule = ShiftSchedule(env_config.get("shift_every", 5000), env_config.get("magnitudes", [0.0, 1.0]),
                             env_config.get("schedule", "cycle"))
    frozen = {k: v for k, v in env_config.items() if k not in ("start_step", "step_scale")}
    frozen.update(magnitudes=[schedule.magnitude(step)], shift_every=10**12, schedule="hold")
    env = make_ns_env(env_name, frozen)
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed * 1000 + k)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def random_return(env_name: str, env_config: dict, magnitude: float, episodes: int = 20, seed: int = 0) -> float:
    """Mean return of uniformly random actions in the dynamics of `magnitude`."""
    from rl.envs.nonstationary import make_ns_env

    space = make_ns_env(env_name, {**env_config, "magnitudes": [magnitude]}).action_space
    space.seed(seed)
    cfg = {**env_config, "magnitudes": [magnitude], "shift_every": 10**12, "schedule": "hold"}
    return float(np.mean(evaluate_policy(env_name, cfg, 0, lambda obs: space.sample(), episodes, seed)))


def post_shift_auc(evals: list[dict], shifts: list[int], end_step: int, auc_steps: int | None = None) -> list[dict]:
    """Per true shift: mean greedy return of the evaluations in (s, s + K] and the dynamics' magnitude."""
    out = []
    bounds = list(shifts) + [end_step]
    for s, nxt in zip(shifts, bounds[1:]):
        hi = min(nxt, s + auc_steps) if auc_steps else nxt
        pts = [e for e in evals if s < e["step"] <= hi]
        if pts:
            out.append({"shift": s, "magnitude": pts[0]["magnitude"],
                        "auc": float(np.mean([np.mean(e["returns"]) for e in pts])), "points": len(pts)})
    return out


def detection_stats(detected: list[int], shifts: list[int], *, window: int, hit_steps: int,
                    declared: list[int] | None = None) -> dict:
    """Hits, delays and false alarms of detected change points against the true shifts. `delays`:
    estimated change point - shift; `declare_delays` (with `declared`, the env step at which each
    change was declared): declaration step - shift."""
    used, delays, declare_delays = set(), [], []
    for s in shifts:
        hits = [i for i, c in enumerate(detected) if s - window <= c <= s + hit_steps and i not in used]
        if hits:
            used.add(hits[0])
            delays.append(detected[hits[0]] - s)
            if declared is not None:
                declare_delays.append(declared[hits[0]] - s)
    return {"hits": len(delays), "shifts": len(shifts), "delays": delays, "declare_delays": declare_delays,
            "false_alarms": len(detected) - len(used)}


def episodes_of(rows: list[dict]) -> np.ndarray:
    """(end step, return) of every finished episode, sorted by step; shape (n, 2)."""
    eps = [(e[0], e[1]) for r in rows for e in r.get("episodes", [])]
    return np.array(sorted(eps), dtype=float).reshape(-1, 2)


def true_shift_steps(cfg, rows: list[dict]) -> list[int]:
    last_step = max((r["env_steps"] for r in rows), default=0)
    return ShiftSchedule(cfg.env.shift_every, cfg.env.magnitudes, cfg.env.schedule).shift_steps(last_step)


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
    from rl.deer.config import variant_of

    grouped = defaultdict(lambda: defaultdict(list))
    for method, cfg, rows in runs:
        if rows:
            grouped[cfg.env.name][variant_of(method, cfg)].append(run_metrics(cfg, rows))
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
        for method in VARIANTS:
            if method not in methods:
                continue
            m = methods[method]
            lines.append(f"| {env} | {method} | {m['seeds']} | {m['mean_return']:.2f} ± {m['mean_return_std']:.2f} | "
                         f"{m['recovery_steps']:.0f} ± {m['recovery_steps_std']:.0f} | {m['censored_shifts']} | "
                         f"{m['wall_s_per_iter']:.2f} ± {m['wall_s_per_iter_std']:.2f} | "
                         f"{m['detected_changes_per_run'] if method.startswith('deer') else '-'} |")
    lines.append("")
    lines.append(f"gain vs PER: {summary['gain_vs_per_pct']:.2f} %, gain vs uniform: {summary['gain_vs_uniform_pct']:.2f} %, "
                 f"wall time ratio DEER/PER: {summary['time_ratio_vs_per']:.3f}, "
                 f"recovery ratio DEER/PER: {summary['recovery_ratio_vs_per']:.3f}")
    return "\n".join(lines) + "\n"


def plot_returns(runs: list[tuple[str, object, list[dict]]], out_dir, bins_per_segment: int = 4) -> list[str]:
    """One PNG per env: mean episode return over env steps per method (band = sd across seeds),
    dashed lines at the true shifts, DEER's detected changes as triangles."""
    import matplotlib
    from rl.deer.config import variant_of
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
        for method in VARIANTS:
            curves = []
            for m, run_cfg, rows in env_runs:
                if variant_of(m, run_cfg) != method:
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
                detected = [c for m, run_cfg, rows in env_runs if variant_of(m, run_cfg) == "deer"
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


def post_shift_summary(runs: list[tuple[str, object, list[dict]]], *, random_returns: dict, auc_steps=None,
                       hit_steps: int | None = None, reps: int = 10000) -> dict:
    """Normalized post-shift AUC per (variant, seed), paired gains over PER with bootstrap intervals,
    and DEER's detection quality. `random_returns[(env, magnitude)]` = R_random."""
    from rl.deer.config import variant_of

    per_run = []  # (env, variant, seed, [(magnitude, auc)], detected, shifts, cfg)
    best = defaultdict(lambda: -np.inf)
    for method, cfg, rows in runs:
        evals = [r["eval"] for r in rows if r.get("eval")]
        if not evals:
            continue
        end = max(r["env_steps"] for r in rows)
        shifts = true_shift_steps(cfg, rows)
        aucs = post_shift_auc(evals, shifts, end, auc_steps)
        for e in evals:
            key = (cfg.env.name, e["magnitude"])
            best[key] = max(best[key], float(np.mean(e["returns"])))
        detected = rows[-1].get("deer", {}).get("change_points", [])
        declared = [next(r["env_steps"] for r in rows if c in r.get("deer", {}).get("change_points", []))
                    for c in detected]
        per_run.append((cfg.env.name, variant_of(method, cfg), cfg.train.seed, aucs, (detected, declared), shifts, cfg))
    scores = defaultdict(dict)  # variant -> {(env, seed): normalized mean AUC}
    detection = defaultdict(list)
    detection_dynamics = defaultdict(list)  # deer.change_source=dynamics (optional variant)
    for env, variant, seed, aucs, detected, shifts, cfg in per_run:
        normed = []
        for a in aucs:
            lo, hi = random_returns[(env, a["magnitude"])], best[(env, a["magnitude"])]
            normed.append((a["auc"] - lo) / (hi - lo) if hi > lo else 0.0)
        if normed:
            scores[variant][(env, seed)] = float(np.mean(normed))
        if variant in ("deer", "deer-dynamics"):
            (detection if variant == "deer" else detection_dynamics)[env].append(detection_stats(detected[0], shifts, window=cfg.deer.detector.window,
                                                  hit_steps=hit_steps or cfg.env.shift_every // 2,
                                                  declared=detected[1]))

    def paired(a: str, b: str, env: str | None = None) -> dict | None:
        """Paired gain of variant a over b over their common (env, seed) pairs (one env's seeds when `env`)."""
        keys = sorted(k for k in set(scores.get(a, {})) & set(scores.get(b, {})) if env is None or k[0] == env)
        if not keys:
            return None
        return {**paired_gain([scores[a][k] for k in keys], [scores[b][k] for k in keys], reps=reps),
                "pairs": len(keys)}

    per_env = {}
    for env in sorted({k[0] for v in scores.values() for k in v}):
        per_env[env] = {v: float(np.mean([x for (e, _), x in scores[v].items() if e == env]))
                        for v in VARIANTS if any(e == env for e, _ in scores.get(v, {}))}
    out_dynamics = _detection_summary(detection_dynamics) if detection_dynamics else None
    return {
        "normalized_auc": per_env,
        "deer_vs_per": paired("deer", "per"), "oracle_vs_per": paired("deer-oracle", "per"),
        "deer_vs_uniform": paired("deer", "uniform"), "oracle_vs_deer": paired("deer-oracle", "deer"),
        "per_vs_uniform": paired("per", "uniform"),
        "dynamics_vs_per": paired("deer-dynamics", "per"),
        "per_env_paired": {env: {"deer_vs_per": paired("deer", "per", env),
                                 "oracle_vs_per": paired("deer-oracle", "per", env),
                                 "per_vs_uniform": paired("per", "uniform", env)} for env in per_env},
        "detection": _detection_summary(detection),
        "detection_dynamics": out_dynamics,
    }


def _detection_summary(detection: dict) -> dict:
    all_det = [d for ds in detection.values() for d in ds]
    delays = [x for d in all_det for x in d["declare_delays"]]
    errors = [x for d in all_det for x in d["delays"]]
    return {
        "runs": len(all_det),
        "hit_rate": float(sum(d["hits"] for d in all_det) / max(1, sum(d["shifts"] for d in all_det))),
        "false_alarms_per_run": float(np.mean([d["false_alarms"] for d in all_det])) if all_det else float("nan"),
        "delay_steps_median": float(np.median(delays)) if delays else float("nan"),
        "change_point_error_median": float(np.median(errors)) if errors else float("nan"),
        "per_env": {env: {"hit_rate": float(sum(d["hits"] for d in ds) / max(1, sum(d["shifts"] for d in ds))),
                          "false_alarms_per_run": float(np.mean([d["false_alarms"] for d in ds]))}
                    for env, ds in detection.items()},
    }
