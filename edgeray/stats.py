"""Paired bootstrap intervals, the one copy every benchmark and analysis uses (numpy only).

Two shapes of paired data occur in this project:

- **per seed** (``paired_gain``): one score per seed for a method and for its baseline, run with the
  same seed; the seeds are resampled, the same resample for both, so the interval is of the paired
  difference (and of the relative gain).
- **per item within groups** (``stratified_paired_bootstrap``): per-item differences (e.g. SVD − warm
  start on each test question), one array per benchmark; items are resampled within each benchmark,
  and the mean over benchmarks gets its interval from the same draws.

Intervals are percentile intervals at 95 %.
"""
from __future__ import annotations

import numpy as np

LOW, HIGH = 2.5, 97.5


def _resampled_means(values: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    return values[rng.integers(0, len(values), size=(reps, len(values)))].mean(axis=1)


def paired_gain(a, b, *, reps: int = 10000, seed: int = 0) -> dict:
    """Per-seed scores ``a`` of a method against ``b`` of its baseline (same seeds, same order).

    Returns the mean paired difference ``diff_mean`` with ``diff_ci_low``/``diff_ci_high``, and the
    relative gain ``gain_pct`` = (mean a − mean b) / |mean b| × 100 with ``ci_low_pct``/``ci_high_pct``.
    For a one-sample interval of per-seed values, pass ``b`` as zeros and read the ``diff_*`` keys."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"paired scores need the same, non-zero number of seeds (got {len(a)} and {len(b)})")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(reps, len(a)))
    mean_a, mean_b = a[idx].mean(axis=1), b[idx].mean(axis=1)
    gain = (mean_a - mean_b) / np.maximum(np.abs(mean_b), 1e-9) * 100
    diff = a - b
    diff_draws = diff[idx].mean(axis=1)
    return {"gain_pct": float((a.mean() - b.mean()) / max(abs(b.mean()), 1e-9) * 100),
            "ci_low_pct": float(np.percentile(gain, LOW)), "ci_high_pct": float(np.percentile(gain, HIGH)),
            "diff_mean": float(diff.mean()), "diff_ci_low": float(np.percentile(diff_draws, LOW)),
            "diff_ci_high": float(np.percentile(diff_draws, HIGH)), "seeds": int(len(a))}


def stratified_paired_bootstrap(diffs, *, reps: int = 2000, seed: int = 0) -> dict:
    """Per-item paired differences, one array per group (benchmark). Returns ``per_group``: the mean
    and 95 % interval of each group's mean difference, and ``mean``: the same for the unweighted mean
    over groups (items resampled within each group, the groups' draws averaged)."""
    if not diffs or any(len(d) == 0 for d in diffs):
        raise ValueError("stratified bootstrap needs at least one group and no empty group")
    rng = np.random.default_rng(seed)
    per_group, draws = [], []
    for d in diffs:
        d = np.asarray(d, dtype=float)
        sample = _resampled_means(d, reps, rng)
        draws.append(sample)
        per_group.append({"mean": float(d.mean()),
                          "ci": [float(np.percentile(sample, LOW)), float(np.percentile(sample, HIGH))]})
    mean_draws = np.mean(draws, axis=0)
    overall = {"mean": float(np.mean([g["mean"] for g in per_group])),
               "ci": [float(np.percentile(mean_draws, LOW)), float(np.percentile(mean_draws, HIGH))]}
    return {"per_group": per_group, "mean": overall}
