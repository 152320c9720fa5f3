"""The shared paired bootstrap helpers (edgeray/stats.py), numpy only."""
import numpy as np
import pytest

from edgeray.stats import paired_gain, stratified_paired_bootstrap


def test_paired_gain_and_its_interval():
    a, b = np.array([1.1, 1.2, 1.3, 1.15, 1.25]), np.array([1.0, 1.0, 1.1, 1.0, 1.1])
    out = paired_gain(a, b, reps=2000)
    assert out["gain_pct"] == pytest.approx((a.mean() - b.mean()) / b.mean() * 100)
    assert 0 < out["ci_low_pct"] < out["gain_pct"] < out["ci_high_pct"]
    assert out["diff_mean"] == pytest.approx(0.16) and 0 < out["diff_ci_low"] < 0.16 < out["diff_ci_high"]
    noisy = paired_gain(np.array([1.0, 0.5, 1.5]), np.array([1.0, 1.0, 1.0]), reps=2000)
    assert noisy["ci_low_pct"] < 0 < noisy["ci_high_pct"]
    with pytest.raises(ValueError, match="paired"):
        paired_gain(a, b[:3])


def test_paired_gain_is_paired_not_two_sample():
    """A constant per-seed difference on top of large between-seed spread has a zero-width
    interval: the seeds are resampled together for both methods."""
    base = np.array([0.1, 5.0, 10.0, 20.0])
    out = paired_gain(base + 1.0, base, reps=500)
    assert out["diff_ci_low"] == pytest.approx(1.0) and out["diff_ci_high"] == pytest.approx(1.0)


def test_stratified_paired_bootstrap():
    zero = stratified_paired_bootstrap([np.zeros(20), np.zeros(30)], reps=200)
    assert zero["mean"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    gain = stratified_paired_bootstrap([np.array([1, 0, 0, 1] * 10), np.array([0, 0, 1, -1] * 10)], reps=500)
    assert gain["per_group"][0]["mean"] == 0.5 and gain["mean"]["mean"] == 0.25
    low, high = gain["mean"]["ci"]
    assert low < 0.25 < high
    with pytest.raises(ValueError, match="empty"):
        stratified_paired_bootstrap([np.zeros(3), np.zeros(0)])
