"""Reward-window change detector of DEER (arXiv 2509.15032), plain torch, no Ray.

The paper's rule [P]: a binary MLP f is trained to tell reward subsequences of a reference
window W_rf (the m rewards before the last m, label 0) from those of a test window W_te (the
last m rewards, label 1) with the logistic loss
    L(f) = -mean_{W_rf} log(1 - f(r)) - mean_{W_te} log f(r),
so f/(1-f) estimates the density ratio p_te/p_rf.

OUR RECONSTRUCTION (each a named field of `DetectorSettings`):
  * fixed-length subsequences: every `stride`-th length-`subseq_len` slice of a window (stride 1 =
    all); the paper's r_{i:j} have variable length, an MLP needs a fixed input size;
  * both windows are z-scored with the reference window's mean/std, so one threshold works for
    any reward scale;
  * score S = mean over W_te of log f/(1-f) (a KL(te||rf) estimate);
  * threshold: `threshold`, or when it is None the `quantile` of S over `calibration_trials`
    simulated stationary Gaussian streams (the "calibrated threshold");
  * a change is declared when S > threshold; the change point is the start of the test window;
    no new change is declared for `cooldown` steps afterwards.

CALIBRATION ON THE AGENT'S OWN STREAM (`calibration="episode_permutation"`, OUR RECONSTRUCTION): real
reward streams are autocorrelated, episodic and drift as the agent learns, so a threshold
calibrated on i.i.d. noise fires on episode structure. With this null the stream is fed one
finished episode at a time (`update(rewards, blocks=...)` marks where each episode starts), and
at each check the 2m rewards of both windows are cut into their episode blocks, the block order is
shuffled `permutations` times and each shuffle is split again at m: the scores of those
shuffles are the null distribution of S for this very stream, and the check exceeds when S is
above their `quantile`. To save time the null is recomputed every `null_refresh` checks and at
every check whose S beats the last null's threshold (so an exceedance is always judged against a
fresh null; a stale, higher threshold can only delay a detection by up to `null_refresh` checks). A change needs `confirmations` consecutive exceeding checks; its change
point is the start of the test window of the first one. Windows should span >= 10 episodes
(`window` is in env steps; the bench sets it from the episode length). `calibration="iid_gaussian"`
with `confirmations=1` is the earlier rule, kept for comparison.

The stream may carry a stamp per reward (the replay buffer's global step of that timestep,
`update(..., stamps=...)`); change points are then reported as stamps, else as stream positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class DetectorSettings:
    window: int = 500
    subseq_len: int = 32
    check_every: int = 250
    epochs: int = 40
    hidden: int = 16
    lr: float = 0.02
    threshold: float | None = None
    quantile: float = 0.99
    calibration_trials: int = 60
    cooldown: int = 1000
    seed: int = 0
    calibration: str = "episode_permutation"
    permutations: int = 19
    confirmations: int = 2
    stride: int = 1
    null_refresh: int = 1
    dynamics_min_ratio: float = 3.0


NULLS = ("episode_permutation", "iid_gaussian")


@dataclass
class ConfirmationStreak:
    """The confirmation rule both DEER detectors share: a change is declared at the `needed`-th
    consecutive exceeding check, and its change point is the test-window start of the first one."""

    needed: int
    count: int = 0
    start: int | None = None  # test-window start of the streak's first exceeding check

    def observe(self, exceeds: bool, test_window_start: int) -> int | None:
        """One check's outcome; returns the change point when this check completes a streak."""
        if not exceeds:
            self.count, self.start = 0, None
            return None
        if self.count == 0:
            self.start = int(test_window_start)
        self.count += 1
        if self.count < self.needed:
            return None
        point, self.count, self.start = self.start, 0, None
        return point


def _subsequences(x: np.ndarray, length: int, stride: int = 1) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(x, length)[::stride].copy()


def _shuffles(stream: np.ndarray, blocks: np.ndarray, settings: DetectorSettings,
              rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """`settings.permutations` episode-block shuffles of `stream` (2m rewards), each split at m.
    `blocks[i]` is the block id of `stream[i]` (blocks are contiguous)."""
    starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
    pieces = np.split(stream, starts[1:])
    m = len(stream) // 2
    out = []
    for _ in range(settings.permutations):
        shuffled = np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])
        out.append((shuffled[:m], shuffled[m:]))
    return out


def permutation_scores(stream: np.ndarray, blocks: np.ndarray, settings: DetectorSettings,
                       generator: torch.Generator, rng: np.random.Generator) -> list[float]:
    """S of `settings.permutations` episode-block shuffles of `stream` (2m rewards), each split at m."""
    return change_scores(_shuffles(stream, blocks, settings, rng), settings, generator)


def change_score(reference: np.ndarray, test: np.ndarray, settings: DetectorSettings,
                 generator: torch.Generator) -> float:
    """Train f on the two windows and return S = mean_{W_te} log f/(1-f)."""
    return change_scores([(reference, test)], settings, generator)[0]


def change_scores(pairs: list[tuple[np.ndarray, np.ndarray]], settings: DetectorSettings,
                  generator: torch.Generator) -> list[float]:
    """`change_score` of every (reference, test) pair, the classifiers trained side by side.

    Pairs of equal window lengths (the permutation null's shuffles) train as ONE batched model:
    K independent MLPs as (K, ...) weight tensors, the summed loss (its gradient w.r.t. each
    classifier's weights is that classifier's own) and one Adam (element-wise, so each classifier
    gets exactly its own update). Initial weights are drawn from `generator` classifier after
    classifier, in the order a loop of single `change_score` calls would draw them, so the scores
    equal those of such a loop up to floating-point summation order."""
    if not pairs:
        return []
    if len({(len(r), len(t)) for r, t in pairs}) > 1:
        return [score for pair in pairs for score in change_scores([pair], settings, generator)]
    xs, ys, ws, n_te = [], [], [], None
    for reference, test in pairs:
        mean, std = float(reference.mean()), float(reference.std()) + 1e-6
        rf = _subsequences((reference - mean) / std, settings.subseq_len, settings.stride)
        te = _subsequences((test - mean) / std, settings.subseq_len, settings.stride)
        xs.append(np.concatenate([rf, te]))
        ys.append(np.r_[np.zeros(len(rf)), np.ones(len(te))])
        # Balanced logistic loss = the paper's L(f) with both means weighted equally.
        ws.append(np.r_[np.full(len(rf), 0.5 / len(rf)), np.full(len(te), 0.5 / len(te))])
        n_te = len(te)
    x = torch.as_tensor(np.stack(xs), dtype=torch.float32)  # (K, N, L)
    y = torch.as_tensor(np.stack(ys), dtype=torch.float32)
    w = torch.as_tensor(np.stack(ws), dtype=torch.float32)
    length, hidden = settings.subseq_len, settings.hidden
    shapes = [(hidden, length), (hidden,), (1, hidden), (1,)]  # nn.Linear(L, H), nn.Linear(H, 1): weight, bias
    draws = [[torch.randn(shape, generator=generator) * (1.0 / shape[-1]) ** 0.5 for shape in shapes]
             for _ in pairs]  # seeded init, classifier by classifier, so a score is reproducible
    w1, b1, w2, b2 = (torch.stack([d[i] for d in draws]).requires_grad_(True) for i in range(4))
    optimizer = torch.optim.Adam([w1, b1, w2, b2], lr=settings.lr)

    def logits(inputs):
        h = torch.tanh(torch.baddbmm(b1.unsqueeze(1), inputs, w1.transpose(1, 2)))  # (K, N, H)
        return torch.bmm(h, w2.transpose(1, 2)).squeeze(-1) + b2  # (K, N)

    for _ in range(settings.epochs):
        optimizer.zero_grad()
        loss = (nn.functional.binary_cross_entropy_with_logits(logits(x), y, reduction="none") * w).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        # logit(f) = log f/(1-f): the estimated log density ratio, averaged over W_te
        return logits(x[:, -n_te:]).mean(-1).tolist()


def calibrate_threshold(settings: DetectorSettings) -> float:
    """The `quantile` of S on stationary N(0,1) streams (the windows are z-scored, so scale-free)."""
    rng = np.random.default_rng(settings.seed + 1)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    pairs = [(rng.standard_normal(settings.window), rng.standard_normal(settings.window))
             for _ in range(settings.calibration_trials)]
    scores = change_scores(pairs, settings, generator)
    return float(np.quantile(scores, settings.quantile))


class RewardChangeDetector:
    """Feed rewards in stream order with `update`; it returns the change points it declares."""

    def __init__(self, settings: DetectorSettings):
        if settings.window <= settings.subseq_len:
            raise ValueError("window must be longer than subseq_len")
        if settings.calibration not in NULLS:
            raise ValueError(f"unknown calibration {settings.calibration!r}; choose one of {NULLS}")
        if settings.confirmations < 1 or settings.permutations < 1:
            raise ValueError("confirmations and permutations must be >= 1")
        self.settings = settings
        if settings.threshold is not None or settings.calibration == "episode_permutation":
            self.threshold = settings.threshold  # None: each check's own permutation null
        else:
            self.threshold = calibrate_threshold(settings)
        self._generator = torch.Generator().manual_seed(settings.seed)
        self._rng = np.random.default_rng(settings.seed + 2)
        self._recent = np.zeros(0)  # the last 2*window rewards
        self._recent_blocks = np.zeros(0, dtype=np.int64)
        self._recent_stamps = np.zeros(0, dtype=np.int64)
        self._next_block = 0
        self._streak = ConfirmationStreak(settings.confirmations)
        self._null_threshold: float | None = None
        self._checks_since_null = 0
        self.null_computations = 0
        self.thresholds: list[tuple[int, float]] = []  # (check step, threshold used)
        self.steps_seen = 0
        self._next_check = 2 * settings.window
        self._quiet_until = 0
        self.change_points: list[int] = []
        self.scores: list[tuple[int, float]] = []

    def update(self, rewards, blocks=None, stamps=None) -> list[int]:
        """Feed rewards in stream order. `blocks`: positions in `rewards` where a new episode
        starts (default: `rewards` continues the current block). `stamps`: a global step per
        reward (default: its stream position). Returns the change points declared."""
        s = self.settings
        rewards = np.asarray(rewards, dtype=np.float64).ravel()
        block_ids = np.zeros(len(rewards), dtype=np.int64)
        if blocks is not None and len(rewards):
            starts = np.zeros(len(rewards), dtype=np.int64)
            starts[np.asarray([b for b in blocks if 0 < b < len(rewards)], dtype=np.int64)] = 1
            first_new = len(blocks) and min(blocks) == 0 and self.steps_seen > 0
            block_ids = np.cumsum(starts) + (1 if first_new else 0)
        block_ids = block_ids + self._next_block
        if len(rewards):
            self._next_block = int(block_ids[-1])
        stamps = (np.arange(self.steps_seen, self.steps_seen + len(rewards)) if stamps is None
                  else np.asarray(stamps, dtype=np.int64).ravel())
        found = []
        start = 0
        while start < len(rewards):
            # consume up to the next check position, then check
            take = min(len(rewards) - start, self._next_check - self.steps_seen)
            self._recent = np.concatenate([self._recent, rewards[start:start + take]])[-2 * s.window:]
            self._recent_blocks = np.concatenate([self._recent_blocks, block_ids[start:start + take]])[-2 * s.window:]
            self._recent_stamps = np.concatenate([self._recent_stamps, stamps[start:start + take]])[-2 * s.window:]
            self.steps_seen += take
            start += take
            if self.steps_seen == self._next_check:
                self._next_check += s.check_every
                if self.steps_seen >= self._quiet_until:
                    point = self._check()
                    if point is not None:
                        self.change_points.append(point)
                        found.append(point)
                        self._quiet_until = self.steps_seen + s.cooldown
        return found

    def _check(self) -> int | None:
        s = self.settings
        observed = (self._recent[:s.window], self._recent[s.window:])
        threshold = self.threshold
        stale = threshold is None and (self._null_threshold is None or self._checks_since_null + 1 >= s.null_refresh)
        if stale:  # the score and a fresh null, trained together (same draws as one after the other)
            scores = change_scores([observed] + _shuffles(self._recent, self._recent_blocks, s, self._rng),
                                   s, self._generator)
            score, null = scores[0], scores[1:]
        else:
            score, null = change_score(*observed, s, self._generator), None
        self.scores.append((self.steps_seen, score))
        if threshold is None:
            # a fresh null every `null_refresh` checks, and whenever S beats the last one
            if stale or score > self._null_threshold:
                if null is None:
                    null = permutation_scores(self._recent, self._recent_blocks, s, self._generator, self._rng)
                self._null_threshold, self._checks_since_null = float(np.quantile(null, s.quantile)), 0
                self.null_computations += 1
            else:
                self._checks_since_null += 1
            threshold = self._null_threshold
        self.thresholds.append((self.steps_seen, threshold))
        return self._streak.observe(score > threshold, self._recent_stamps[s.window])  # start of the test window

    def get_state(self) -> dict:
        return {"settings": dataclasses.asdict(self.settings), "threshold": self.threshold,
                "recent": self._recent.tolist(), "recent_blocks": self._recent_blocks.tolist(),
                "recent_stamps": self._recent_stamps.tolist(), "next_block": self._next_block,
                "streak": self._streak.count, "streak_point": -1 if self._streak.start is None else self._streak.start,
                "rng": self._rng.bit_generator.state,
                "null_threshold": self._null_threshold, "checks_since_null": self._checks_since_null,
                "steps_seen": self.steps_seen, "next_check": self._next_check,
                "quiet_until": self._quiet_until, "change_points": list(self.change_points),
                "generator": self._generator.get_state()}

    @classmethod
    def from_state(cls, state: dict) -> "RewardChangeDetector":
        settings = DetectorSettings(**state["settings"])
        detector = cls(dataclasses.replace(settings, threshold=state["threshold"]))
        detector.threshold = state["threshold"]
        detector._recent = np.asarray(state["recent"], dtype=np.float64)
        detector._recent_blocks = np.asarray(state["recent_blocks"], dtype=np.int64)
        detector._recent_stamps = np.asarray(state["recent_stamps"], dtype=np.int64)
        detector._next_block = state["next_block"]
        detector._streak.count = state["streak"]
        detector._streak.start = state["streak_point"] if state["streak"] else None
        detector._rng.bit_generator.state = state["rng"]
        detector._null_threshold, detector._checks_since_null = state["null_threshold"], state["checks_since_null"]
        detector.steps_seen = state["steps_seen"]
        detector._next_check = state["next_check"]
        detector._quiet_until = state["quiet_until"]
        detector.change_points = list(state["change_points"])
        detector._generator.set_state(state["generator"])
        return detector
