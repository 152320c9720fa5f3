"""DEER's reward-window change detector, pure torch (no Ray)."""

import dataclasses

import numpy as np
import pytest
import torch

from rl.deer.detector import (ConfirmationStreak, DetectorSettings, RewardChangeDetector, calibrate_threshold,
                              change_score)

# the earlier rule: threshold calibrated once on i.i.d. N(0,1) noise, one exceedance declares
SETTINGS = DetectorSettings(window=100, subseq_len=8, check_every=50, epochs=30, calibration_trials=40,
                            cooldown=200, seed=0, calibration="iid_gaussian", confirmations=1)
# the agent's-own-stream rule: episode-block permutation null, two consecutive exceedances
EPISODIC = DetectorSettings(window=300, subseq_len=8, stride=4, check_every=75, epochs=20, cooldown=300,
                            seed=0, calibration="episode_permutation", permutations=9, quantile=0.9, confirmations=2,
                            null_refresh=3)


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


def _episodic_stream(seed, n_episodes=100, length=30, shift_at=None, shift=2.0):
    """Episodes whose level differs a lot from episode to episode and whose reward falls within an
    episode (autocorrelated, episodic, like an agent's reward stream); `shift` adds to every
    reward of the episodes starting at or after step `shift_at`."""
    rng = np.random.default_rng(seed)
    episodes = []
    for e in range(n_episodes):
        level = rng.normal(0.0, 1.0)
        noise = np.zeros(length)
        for t in range(1, length):
            noise[t] = 0.8 * noise[t - 1] + rng.normal(0.0, 0.3)
        r = level + np.linspace(0.5, -0.5, length) + noise
        if shift_at is not None and e * length >= shift_at:
            r = r + shift
        episodes.append(r)
    return episodes


def _feed(detector, episodes, per_call=4):
    for k in range(0, len(episodes), per_call):
        chunk = episodes[k:k + per_call]
        starts = np.cumsum([0] + [len(e) for e in chunk[:-1]]).tolist()
        detector.update(np.concatenate(chunk), blocks=starts)


def test_permutation_null_keeps_false_alarms_low_on_an_episodic_stream():
    """On a stationary but episodic, autocorrelated stream the i.i.d.-calibrated threshold fires
    again and again; the episode-block permutation null with two confirmations rarely does."""
    iid_threshold = calibrate_threshold(dataclasses.replace(EPISODIC, calibration="iid_gaussian", calibration_trials=20))
    iid_alarms = own_alarms = checks = 0
    for seed in range(3):
        episodes = _episodic_stream(seed)
        iid = RewardChangeDetector(dataclasses.replace(EPISODIC, calibration="iid_gaussian", threshold=iid_threshold,
                                                       confirmations=1, cooldown=0, seed=seed))
        own = RewardChangeDetector(dataclasses.replace(EPISODIC, cooldown=0, seed=seed))
        _feed(iid, episodes)
        _feed(own, episodes)
        iid_alarms += len(iid.change_points)
        own_alarms += len(own.change_points)
        checks += len(own.scores)
    assert checks >= 90
    assert own_alarms / checks <= 0.06, (own_alarms, checks)
    assert iid_alarms >= max(8, 2 * own_alarms), (iid_alarms, own_alarms)


def test_permutation_null_detects_a_shift_in_an_episodic_stream():
    for seed in range(3):
        detector = RewardChangeDetector(dataclasses.replace(EPISODIC, seed=seed))
        _feed(detector, _episodic_stream(seed, shift_at=1500))
        hits = [c for c in detector.change_points if abs(c - 1500) <= EPISODIC.window]
        assert hits, (seed, detector.change_points)
        # a fresh null was not needed at every check
        assert detector.null_computations < len(detector.scores)


# every check exceeds; a change needs three in a row
EVERY_CHECK_EXCEEDS = dataclasses.replace(SETTINGS, threshold=-1e9, cooldown=0, confirmations=3)


def test_confirmations_need_consecutive_exceedances_and_stamps_map_change_points():
    detector = RewardChangeDetector(EVERY_CHECK_EXCEEDS)
    detector.update(np.zeros(400), stamps=np.arange(400) * 10 + 7)  # e.g. global steps of 4 env copies
    # checks at 200, 250, 300, 350, 400: every one exceeds, every third declares
    assert len(detector.scores) == 5 and len(detector.change_points) == 1
    # the change point is the stamp of the first test-window reward of the first exceedance
    assert detector.change_points == [100 * 10 + 7]


def test_confirmation_streak_declares_at_the_nth_consecutive_exceedance():
    streak = ConfirmationStreak(needed=2)
    # an exceedance, a miss (resets), two exceedances: the change point is the first of the two
    assert [streak.observe(e, start) for e, start in [(True, 10), (False, 20), (True, 30), (True, 40)]] == \
        [None, None, None, 30]
    assert (streak.count, streak.start) == (0, None)  # declared: a new streak starts from scratch
    assert ConfirmationStreak(needed=1).observe(True, 5) == 5


def test_a_checkpoint_taken_mid_streak_resumes_the_streak():
    whole = RewardChangeDetector(EVERY_CHECK_EXCEEDS)
    whole.update(np.zeros(400), stamps=np.arange(400) * 10 + 7)
    first = RewardChangeDetector(EVERY_CHECK_EXCEEDS)
    first.update(np.zeros(260), stamps=np.arange(260) * 10 + 7)  # checks at 200 and 250: two of three
    state = first.get_state()
    assert (state["streak"], state["streak_point"]) == (2, 100 * 10 + 7)
    second = RewardChangeDetector.from_state(state)
    second.update(np.zeros(140), stamps=np.arange(260, 400) * 10 + 7)
    assert second.change_points == whole.change_points == [100 * 10 + 7]


def test_batched_scores_equal_one_classifier_at_a_time():
    """change_scores trains K classifiers as one batched model; each score is the one a single
    change_score call would give with the same generator draws (the permutation null relies on it)."""
    from rl.deer.detector import change_scores

    rng = np.random.default_rng(4)
    pairs = [(rng.normal(0, 1, 300), rng.normal(shift, 1, 300)) for shift in (0.0, 0.5, 1.5, 0.0)]
    batched = change_scores(pairs, SETTINGS, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    single = [change_score(r, t, SETTINGS, g) for r, t in pairs]
    assert np.allclose(batched, single, atol=1e-4)
    assert batched[2] > batched[0] + 0.5  # the classifiers are not the same: a shifted pair scores higher
