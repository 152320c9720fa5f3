"""Reward-window change detector of DEER (arXiv 2509.15032), plain torch, no Ray.

The paper's rule [P]: a binary MLP f is trained to tell reward subsequences of a reference
window W_rf (the m rewards before the last m, label 0) from those of a test window W_te (the
last m rewards, label 1) with the logistic loss
    L(f) = -mean_{W_rf} log(1 - f(r)) - mean_{W_te} log f(r),
so f/(1-f) estimates the density ratio p_te/p_rf.

OUR RECONSTRUCTION (each a named field of `DetectorSettings`):
  * fixed-length subsequences: every length-`subseq_len` slice of a window (stride 1); the
    paper's r_{i:j} have variable length, an MLP needs a fixed input size;
  * both windows are z-scored with the reference window's mean/std, so one threshold works for
    any reward scale;
  * score S = mean over W_te of log f/(1-f) (a KL(te||rf) estimate);
  * threshold: `threshold`, or when it is None the `quantile` of S over `calibration_trials`
    simulated stationary Gaussian streams (the "calibrated threshold");
  * a change is declared when S > threshold; the change point is the start of the test window;
    no new change is declared for `cooldown` steps afterwards.
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


def _subsequences(x: np.ndarray, length: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(x, length).copy()


def change_score(reference: np.ndarray, test: np.ndarray, settings: DetectorSettings,
                 generator: torch.Generator) -> float:
    """Train f on the two windows and return S = mean_{W_te} log f/(1-f)."""
    mean, std = float(reference.mean()), float(reference.std()) + 1e-6
    rf = torch.as_tensor(_subsequences((reference - mean) / std, settings.subseq_len), dtype=torch.float32)
    te = torch.as_tensor(_subsequences((test - mean) / std, settings.subseq_len), dtype=torch.float32)
    x = torch.cat([rf, te])
    y = torch.cat([torch.zeros(len(rf)), torch.ones(len(te))])
    classifier = nn.Sequential(nn.Linear(settings.subseq_len, settings.hidden), nn.Tanh(),
                               nn.Linear(settings.hidden, 1))
    with torch.no_grad():  # seeded init so a score is reproducible
        for p in classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (1.0 / p.shape[-1]) ** 0.5)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=settings.lr)
    # Balanced logistic loss = the paper's L(f) with both means weighted equally.
    weights = torch.where(y > 0, 0.5 / len(te), 0.5 / len(rf))
    for _ in range(settings.epochs):
        optimizer.zero_grad()
        logits = classifier(x).squeeze(-1)
        loss = (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * weights).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        # logit(f) = log f/(1-f): the estimated log density ratio
        return float(classifier(te).squeeze(-1).mean())


def calibrate_threshold(settings: DetectorSettings) -> float:
    """The `quantile` of S on stationary N(0,1) streams (the windows are z-scored, so scale-free)."""
    rng = np.random.default_rng(settings.seed + 1)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    scores = [change_score(rng.standard_normal(settings.window), rng.standard_normal(settings.window),
                           settings, generator) for _ in range(settings.calibration_trials)]
    return float(np.quantile(scores, settings.quantile))


class RewardChangeDetector:
    """Feed rewards in stream order with `update`; it returns the change points it declares."""

    def __init__(self, settings: DetectorSettings):
        if settings.window <= settings.subseq_len:
            raise ValueError("window must be longer than subseq_len")
        self.settings = settings
        self.threshold = settings.threshold if settings.threshold is not None else calibrate_threshold(settings)
        self._generator = torch.Generator().manual_seed(settings.seed)
        self._recent = np.zeros(0)  # the last 2*window rewards
        self.steps_seen = 0
        self._next_check = 2 * settings.window
        self._quiet_until = 0
        self.change_points: list[int] = []
        self.scores: list[tuple[int, float]] = []

    def update(self, rewards) -> list[int]:
        s = self.settings
        rewards = np.asarray(rewards, dtype=np.float64).ravel()
        found = []
        start = 0
        while start < len(rewards):
            # consume up to the next check position, then check
            take = min(len(rewards) - start, self._next_check - self.steps_seen)
            chunk = rewards[start:start + take]
            self._recent = np.concatenate([self._recent, chunk])[-2 * s.window:]
            self.steps_seen += take
            start += take
            if self.steps_seen == self._next_check:
                self._next_check += s.check_every
                if self.steps_seen >= self._quiet_until:
                    score = change_score(self._recent[:s.window], self._recent[s.window:], s, self._generator)
                    self.scores.append((self.steps_seen, score))
                    if score > self.threshold:
                        change_point = self.steps_seen - s.window
                        self.change_points.append(change_point)
                        found.append(change_point)
                        self._quiet_until = self.steps_seen + s.cooldown
        return found

    def get_state(self) -> dict:
        return {"settings": dataclasses.asdict(self.settings), "threshold": self.threshold,
                "recent": self._recent.tolist(), "steps_seen": self.steps_seen, "next_check": self._next_check,
                "quiet_until": self._quiet_until, "change_points": list(self.change_points),
                "generator": self._generator.get_state()}

    @classmethod
    def from_state(cls, state: dict) -> "RewardChangeDetector":
        settings = DetectorSettings(**state["settings"])
        detector = cls(dataclasses.replace(settings, threshold=state["threshold"]))
        detector._recent = np.asarray(state["recent"], dtype=np.float64)
        detector.steps_seen = state["steps_seen"]
        detector._next_check = state["next_check"]
        detector._quiet_until = state["quiet_until"]
        detector.change_points = list(state["change_points"])
        detector._generator.set_state(state["generator"])
        return detector
