"""DEER's reward-window change detector, pure torch (no Ray)."""

import dataclasses

import numpy as np
import pytest

from rl.deer.detector import DetectorSettings, RewardChangeDetector, calibrate_threshold, change_score

SETTINGS = DetectorSettings(window=100, subseq_len=8, check_every=50, epochs=30, calibration_trials=40,
                            cooldown=200, seed=0)


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    from rl.loop import torch_threads

    with torch_threads(1):  # as train_run does (train.torch_threads); restored afterwards
        yield


@pytest.fixture(scope="module")
def threshold(single_threaded_torch):
    return calibrate_threshold(SETTINGS)


def test_detects_a_step_change_within_bounded_delay(threshold):
    settings = dataclasses.replace(SETTINGS, threshold=threshold)
    delays = []
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        change_at = 1000
        stream = np.concatenate([rng.normal(0.0, 1.0, change_at), rng.normal(1.0, 1.0, 1000)])
        detector = RewardChangeDetector(settings)
        detections = []
        for start in range(0, len(stream), 137):  # arbitrary chunking, as from RLlib iterations
            detector.update(stream[start:start + 137])
        # the first detection at or after the change; its check step bounds the delay
        after = [c for c in detector.change_points if c + settings.window >= change_at]
        assert after, f"seed {seed}: no detection of the step change"
        detections.append(after[0])
        delays.append(after[0] + settings.window - change_at)
        # the estimated change point is within one window of the true one
        assert abs(after[0] - change_at) <= settings.window
    # bounded delay: a change is declared within one window plus one check interval
    assert max(delays) <= settings.window + settings.check_every


def test_false_alarm_rate_on_stationary_noise(threshold):
    settings = dataclasses.replace(SETTINGS, threshold=threshold, cooldown=0)
    checks = alarms = 0
    for seed in range(3):
        detector = RewardChangeDetector(dataclasses.replace(settings, seed=seed))
        detector.update(np.random.default_rng(500 + seed).normal(3.0, 2.0, 4000))  # other scale than calibration
        checks += len(detector.scores)
        alarms += len(detector.change_points)
    assert checks >= 200
    assert alarms / checks <= 0.05


def test_cooldown_suppresses_repeated_alarms():
    settings = dataclasses.replace(SETTINGS, threshold=-1e9, cooldown=300)  # every check would fire
    detector = RewardChangeDetector(settings)
    detector.update(np.zeros(1000))
    points = detector.change_points
    assert len(points) >= 2 and all(b - a >= 300 for a, b in zip(points, points[1:]))


def test_score_separates_shifted_windows():
    import torch

    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    same = change_score(rng.normal(0, 1, 200), rng.normal(0, 1, 200), SETTINGS, g)
    shifted = change_score(rng.normal(0, 1, 200), rng.normal(2, 1, 200), SETTINGS, g)
    assert shifted > same + 1.0


def test_state_round_trip_continues_identically(threshold):
    settings = dataclasses.replace(SETTINGS, threshold=threshold)
    stream = np.concatenate([np.random.default_rng(1).normal(0, 1, 700), np.random.default_rng(2).normal(2, 1, 700)])
    whole = RewardChangeDetector(settings)
    whole.update(stream)
    first = RewardChangeDetector(settings)
    first.update(stream[:600])
    second = RewardChangeDetector.from_state(first.get_state())
    second.update(stream[600:])
    assert second.change_points == whole.change_points
    assert [s for _, s in second.scores] == pytest.approx([s for _, s in whole.scores][len(first.scores):])
