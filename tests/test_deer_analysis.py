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
