"""Evaluation definitions (rl.deer.analysis), pure numpy: recovery time, censoring, gains."""

import math

import numpy as np
import pytest

from rl.deer.analysis import gains, recovery_times


def _episodes(dip_until):
    # returns 1.0, except 0.2 for episodes ending in [1000, dip_until]
    return np.array([[t, 0.2 if 1000 <= t <= dip_until else 1.0] for t in range(10, 2200, 10)], dtype=float)


def test_recovery_time_is_steps_until_rolling_mean_is_back():
    (r,) = recovery_times(_episodes(1300), [1000], 2200, window=500, smooth=5)
    # back within 10 % once the last 5 returns are all 1.0: episode ending at 1350
    assert r["recovery_steps"] == 350 and not r["censored"] and r["drop"] == pytest.approx(0.8)


def test_no_recovery_is_censored_at_the_next_shift_and_late_shifts_are_skipped():
    shifts = [1000, 1800, 2100]
    out = recovery_times(_episodes(5000), shifts, 2200, window=500, smooth=5)
    assert [r["shift"] for r in out] == [1000]  # 1800: only 300 steps to 2100; 2100: 100 to the end
    assert out[0]["censored"] and out[0]["recovery_steps"] == 800


def test_gains_average_per_env_relative_to_baseline_magnitude():
    table = {
        "a": {"deer": {"mean_return": 110.0, "wall_s_per_iter_median": 1.2, "recovery_steps": 50.0},
              "per": {"mean_return": 100.0, "wall_s_per_iter_median": 1.0, "recovery_steps": 100.0},
              "uniform": {"mean_return": 55.0, "wall_s_per_iter_median": 0.9, "recovery_steps": 100.0}},
        "b": {"deer": {"mean_return": -90.0, "wall_s_per_iter_median": 1.4, "recovery_steps": 100.0},
              "per": {"mean_return": -100.0, "wall_s_per_iter_median": 1.0, "recovery_steps": 100.0}},
    }
    g = gains(table)
    assert g["gain_vs_per_pct"] == pytest.approx(10.0)  # (+10 % and +10 %) / 2, negative returns included
    assert g["gain_vs_uniform_pct"] == pytest.approx(100.0)  # only env a has uniform
    assert g["time_ratio_vs_per"] == pytest.approx(1.3)
    assert g["recovery_ratio_vs_per"] == pytest.approx(0.75)
    assert math.isnan(gains({})["gain_vs_per_pct"])


def test_post_shift_auc_averages_the_evaluations_after_each_shift():
    from rl.deer.analysis import post_shift_auc

    evals = [{"step": s, "magnitude": 0.0 if s <= 100 else 1.0, "returns": [s / 10, s / 10]} for s in range(50, 301, 50)]
    out = post_shift_auc(evals, [100, 200], 300)
    assert [(a["shift"], a["magnitude"], a["auc"], a["points"]) for a in out] == [(100, 1.0, 17.5, 2), (200, 1.0, 27.5, 2)]
    # a K-step horizon keeps only the evaluations in (s, s + K]
    assert post_shift_auc(evals, [100], 300, auc_steps=50)[0]["auc"] == 15.0


def test_detection_stats_count_hits_delays_and_false_alarms():
    from rl.deer.analysis import detection_stats

    out = detection_stats([900, 1300, 2500, 5000], [1000, 3000], window=200, hit_steps=400)
    # 900 hits 1000 (within the change-point estimate's window); 1300 is a second alarm for it;
    # 3000 is missed (2500 is too early, 5000 too late)
    assert out == {"hits": 1, "shifts": 2, "delays": [-100], "declare_delays": [], "false_alarms": 3}
    declared = detection_stats([900, 1300], [1000], window=200, hit_steps=400, declared=[2000, 2500])
    assert declared["declare_delays"] == [1000] and declared["false_alarms"] == 1


def test_evaluate_policy_freezes_the_dynamics_of_the_step():
    from rl.deer.analysis import evaluate_policy, random_return

    cfg = {"shift_every": 100, "magnitudes": [0.0, 2.0], "schedule": "hold", "max_episode_steps": 300}
    seen = []

    def act(obs):
        seen.append(obs)
        return 0

    returns = evaluate_policy("ns-cartpole", cfg, 150, act, episodes=2, seed=0)
    assert len(returns) == 2 and len(seen) > 2
    # evaluation never advances the schedule: same returns at any step of the same segment
    assert evaluate_policy("ns-cartpole", cfg, 150, lambda o: 0, 2, 0) == evaluate_policy("ns-cartpole", cfg, 10_000, lambda o: 0, 2, 0)
    assert evaluate_policy("ns-cartpole", cfg, 50, lambda o: 0, 2, 0) != returns
    assert np.isfinite(random_return("ns-cartpole", cfg, 2.0, episodes=3))


def _synthetic_run(env, seed, variant, post_shift_return):
    """One run of 200 env steps with a shift at 100: greedy evaluations every 50 steps."""
    from edgeray.config import load_config
    from rl.deer.config import ExperimentConfig

    overrides = [f"env.name={env}", f"train.seed={seed}", "env.shift_every=100", "env.magnitudes=[0.0, 1.0]",
                 "env.schedule=hold"] + (["deer.change_source=oracle"] if variant == "deer-oracle" else [])
    cfg = load_config(ExperimentConfig, None, overrides)
    rows = [{"env_steps": s, "eval": {"step": s, "magnitude": 0.0 if s <= 100 else 1.0,
                                      "returns": [10.0 if s <= 100 else post_shift_return]}}
            for s in (50, 100, 150, 200)]
    if variant.startswith("deer"):
        for r in rows[2:]:
            r["deer"] = {"change_points": [100]}  # declared at step 150
    return ("per" if variant == "per" else "deer"), cfg, rows


def test_post_shift_summary_pairs_runs_by_env_and_seed_and_reports_each_env():
    from rl.deer.analysis import post_shift_summary

    runs = []
    for seed in range(3):
        # ns-cartpole: DEER and the oracle recover to 60 + seed after the shift, PER to 50 + seed;
        # ns-acrobot: every variant to 40 + seed
        runs += [_synthetic_run("ns-cartpole", seed, "per", 50.0 + seed),
                 _synthetic_run("ns-cartpole", seed, "deer", 60.0 + seed),
                 _synthetic_run("ns-cartpole", seed, "deer-oracle", 60.0 + seed),
                 _synthetic_run("ns-acrobot", seed, "per", 40.0 + seed),
                 _synthetic_run("ns-acrobot", seed, "deer", 40.0 + seed)]
    randoms = {(env, m): 0.0 for env in ("ns-cartpole", "ns-acrobot") for m in (0.0, 1.0)}
    out = post_shift_summary(runs, random_returns=randoms, reps=500)
    assert out["deer_vs_per"]["pairs"] == 6  # (env, seed) pairs over both envs
    cartpole, acrobot = out["per_env_paired"]["ns-cartpole"], out["per_env_paired"]["ns-acrobot"]
    assert cartpole["deer_vs_per"]["pairs"] == 3 and cartpole["deer_vs_per"]["diff_mean"] > 0.1
    assert cartpole["deer_vs_per"]["diff_ci_low"] > 0
    assert acrobot["deer_vs_per"]["diff_mean"] == 0 and acrobot["oracle_vs_per"] is None
    # normalized between the random return (0) and the best evaluation of the env and magnitude
    assert out["normalized_auc"]["ns-cartpole"]["deer"] == pytest.approx(np.mean([(60 + s) / 62 for s in range(3)]))
    assert out["detection"]["hit_rate"] == 1.0 and out["detection"]["delay_steps_median"] == 50
