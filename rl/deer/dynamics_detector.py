"""DEER's optional dynamics-model change detector (`deer.change_source=dynamics`).

OUR RECONSTRUCTION [R]: the paper detects changes from rewards only (rl.deer.detector). Issue 17 asks
for an optional detector on the prediction error of s' from (s, a), since a shift of the dynamics shows
up there directly, whatever the reward does, and a model of the physics does not change as the agent's
policy improves (the reward stream does).

How a check works (every `check_every` new transitions, once 2m are stored; m = `window`):
  * reference window R = the m transitions before the newest m, test window T = the newest m, both in
    the order the buffer received them;
  * R is cut into blocks of `subseq_len` consecutive transitions; a fresh MLP (inputs: s and the
    action, one-hot for discrete actions; output: s' - s; inputs and targets z-scored with R's
    statistics; `hidden` units, `epochs` full-batch Adam steps at `lr`) is fitted on R's even blocks,
    and R's odd blocks V are held out: V and T are both data the model has not seen, V from the same
    period as the fit, T from after it;
  * per-block error = log of the mean squared normalized error over the block; score S = mean block
    error on T - mean block error on V (log of an error ratio);
  * threshold: `threshold` if set, else the `quantile` of S over `permutations` shuffles of the block
    labels between V and T (the blocks keep their temporal order inside, so autocorrelation within
    a block is kept), and never below log(`dynamics_min_ratio`): V is interleaved in time with the fit
    and T comes after it, so T's error is somewhat higher even without a change (the states drift as
    the policy changes), which the permutation null does not see; in random-policy probes of
    ns-cartpole / ns-pendulum / ns-acrobot the no-change score ranged about -0.7 .. +1.7 and a +100 %
    shift scored 1.6 .. 4.9 (log error ratios);
  * a change needs `confirmations` consecutive exceeding checks; its change point is the first stamp of
    the first exceeding check's test window; `cooldown` env steps without a new one after it.
Terminal transitions are kept: s' is then the env's last observation, still a step of the same physics.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from rl.deer.detector import ConfirmationStreak, DetectorSettings


class DynamicsChangeDetector:
    def __init__(self, settings: DetectorSettings, n_actions: int | None = None):
        self.settings = settings
        self.n_actions = n_actions  # discrete actions: one-hot inputs; None: Box actions as they are
        self.rng = np.random.default_rng(settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed)
        cap = 2 * settings.window
        self._x: deque = deque(maxlen=cap)   # model inputs, one row per transition
        self._y: deque = deque(maxlen=cap)   # s' - s
        self._stamps: deque = deque(maxlen=cap)
        self._since_check = 0
        self._streak = ConfirmationStreak(settings.confirmations)
        self._cooldown_until = -1
        self.change_points: list[int] = []
        self.scores: list[float] = []
        self.threshold: float | None = settings.threshold

    # ---- stream
    def _inputs(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
        if self.n_actions is not None:
            act = np.eye(self.n_actions, dtype=np.float32)[np.asarray(actions, dtype=np.int64).reshape(-1)]
        else:
            act = np.asarray(actions, dtype=np.float32).reshape(len(obs), -1)
        return np.concatenate([obs, act], axis=1)

    def update(self, obs, actions, next_obs, stamps) -> list[int]:
        """Feed transitions in arrival order; returns the change points declared by this call."""
        obs, next_obs = np.asarray(obs, dtype=np.float32), np.asarray(next_obs, dtype=np.float32)
        stamps = np.asarray(stamps, dtype=np.int64).reshape(-1)
        if not (len(obs) == len(actions) == len(next_obs) == len(stamps)) or obs.shape != next_obs.shape:
            raise ValueError("obs, actions, next_obs and stamps must have the same length (and obs / next_obs "
                             "the same shape)")
        if len(obs) == 0:
            return []
        x = self._inputs(obs, actions)
        y = (next_obs - obs).reshape(len(obs), -1)
        found = []
        s = self.settings
        for i in range(len(x)):
            self._x.append(x[i])
            self._y.append(y[i])
            self._stamps.append(int(stamps[i]))
            self._since_check += 1
            if self._since_check >= s.check_every and len(self._x) == 2 * s.window:
                self._since_check = 0
                change = self._check()
                if change is not None:
                    found.append(change)
        return found

    # ---- one check
    def _fit(self, x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
        s = self.settings
        torch.manual_seed(int(self.rng.integers(2**31)))
        model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], s.hidden), torch.nn.Tanh(),
                                    torch.nn.Linear(s.hidden, s.hidden), torch.nn.Tanh(),
                                    torch.nn.Linear(s.hidden, y.shape[1]))
        opt = torch.optim.Adam(model.parameters(), lr=s.lr)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(s.epochs):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xt), yt)
            loss.backward()
            opt.step()
        return model

    def block_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(log block errors on the held-out reference blocks V, on the test window's blocks T)."""
        s = self.settings
        m, L = s.window, max(2, s.subseq_len)
        x, y = np.asarray(self._x, dtype=np.float32), np.asarray(self._y, dtype=np.float32)
        ref_x, ref_y = x[:m], y[:m]
        mu_x, sd_x = ref_x.mean(0), ref_x.std(0) + 1e-6
        mu_y, sd_y = ref_y.mean(0), ref_y.std(0) + 1e-6
        xn, yn = (x - mu_x) / sd_x, (y - mu_y) / sd_y
        block = np.arange(m) // L
        fit = block % 2 == 0
        model = self._fit(xn[:m][fit], yn[:m][fit])
        with torch.no_grad():
            err = ((model(torch.from_numpy(xn)) - torch.from_numpy(yn)) ** 2).mean(1).numpy()

        def per_block(e):
            n = len(e) // L
            return np.log(e[:n * L].reshape(n, L).mean(1) + 1e-12)

        held = err[:m][~fit]
        return per_block(held), per_block(err[m:])

    def _check(self) -> int | None:
        s = self.settings
        v, t = self.block_scores()
        score = float(t.mean() - v.mean())
        self.scores.append(score)
        if s.threshold is None:
            both = np.concatenate([v, t])
            null = []
            for _ in range(s.permutations):
                perm = self.rng.permutation(len(both))
                null.append(both[perm[len(v):]].mean() - both[perm[:len(v)]].mean())
            self.threshold = max(float(np.quantile(null, s.quantile)), float(np.log(s.dynamics_min_ratio)))
        stamp_now = self._stamps[-1]
        change = self._streak.observe(score > self.threshold and stamp_now >= self._cooldown_until,
                                      self._stamps[s.window])  # start of the test window
        if change is not None:
            self.change_points.append(change)
            self._cooldown_until = stamp_now + s.cooldown
        return change

    # ---- checkpoints
    def get_state(self) -> dict:
        return {"kind": "dynamics", "settings": dict(vars(self.settings)), "n_actions": self.n_actions,
                "x": np.asarray(self._x).tolist(), "y": np.asarray(self._y).tolist(), "stamps": list(self._stamps),
                "since_check": self._since_check, "streak": self._streak.count, "streak_start": self._streak.start,
                "cooldown_until": self._cooldown_until, "change_points": list(self.change_points),
                "scores": list(self.scores), "threshold": self.threshold,
                "rng": self.rng.bit_generator.state}

    @classmethod
    def from_state(cls, state: dict) -> "DynamicsChangeDetector":
        det = cls(DetectorSettings(**state["settings"]), state["n_actions"])
        for row in state["x"]:
            det._x.append(np.asarray(row, dtype=np.float32))
        for row in state["y"]:
            det._y.append(np.asarray(row, dtype=np.float32))
        det._stamps.extend(int(v) for v in state["stamps"])
        det._since_check = state["since_check"]
        det._streak.count, det._streak.start = state["streak"], state["streak_start"]
        det._cooldown_until, det.change_points = state["cooldown_until"], list(state["change_points"])
        det.scores, det.threshold = list(state["scores"]), state["threshold"]
        det.rng.bit_generator.state = state["rng"]
        return det
