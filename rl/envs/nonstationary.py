"""Non-stationary classic-control benchmarks: dynamics that shift on a schedule.

Each environment is a gymnasium classic-control task whose physical parameters are multiplied
by `1 + magnitude` during "shifted" segments. Segments are `shift_every` environment steps long
(counted over the env's whole life, across episode resets). Two schedules (`schedule`):
  * "hold" (non-reverting): segment k uses `magnitudes[min(k, len - 1)]`, e.g. [0, 1, 2] is
    nominal -> +100 % -> +200 %, and old data never becomes valid again;
  * "cycle" (reverting): segment k uses `magnitudes[k % len]`, e.g. [0, 1] alternates.
A magnitude of 2.0 is the "200 % shift" of the DEER paper (arXiv 2509.15032); the paper's own
four benchmarks were not recoverable, so the tasks, parameters and shaped rewards here are OUR
RECONSTRUCTION.

By default ONE physical quantity shifts per env (`DEFAULT_SHIFT`): scaling e.g. gravity and pole
length together keeps g/l, and with it most of the dynamics, unchanged. `shift_params` picks others.

`step_scale` (default 1) is how many global steps one `step()` counts for: RLlib steps the
`num_envs_per_env_runner` copies of a vectorized env in lockstep, so each copy advancing the
clock by that number keeps the schedule in total env steps (each copy lags by one step per
episode reset, which the vector env does in a step of its own).

Every `info` dict carries `global_step` (env steps so far), `segment`, `multiplier` and
`shift_steps` (the global steps at which shifts happened so far), so evaluation can mark shifts.

Rewards are dense so that a reward-window change detector sees the shift (DEER detects changes
from reward subsequences; CartPole's constant +1 would carry no signal):
  * ns-cartpole: 1 - |theta| / theta_threshold (in [0, 1]); can shift pole length, pole mass,
    gravity (default: gravity).
  * ns-acrobot: (tip_height - 1) / 3 (in [-1, 0]); can shift link lengths and masses (default:
    the second link's mass).
  * ns-mountaincar: -1 + 1000 * (E' - E), E the car's mechanical energy; can shift gravity and
    force (default: gravity).
  * ns-pendulum (continuous): the stock reward; can shift mass, length and gravity (default: g).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
from gymnasium.envs.classic_control.acrobot import AcrobotEnv
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.envs.classic_control.mountain_car import MountainCarEnv
from gymnasium.envs.classic_control.pendulum import PendulumEnv

from edgeray.errors import UserError

MAX_MAGNITUDE = 2.0  # +200 %
MIN_MAGNITUDE = -0.9  # a parameter never drops below 10 % of nominal
SCHEDULES = ("hold", "cycle")


class ShiftSchedule:
    """Which segment (and parameter multiplier) a global env step falls in."""

    def __init__(self, shift_every: int, magnitudes: list[float], schedule: str = "cycle"):
        if schedule not in SCHEDULES:
            raise UserError(f"schedule {schedule!r} unknown; choose one of: {', '.join(SCHEDULES)}")
        if int(shift_every) < 1:
            raise UserError(f"shift_every={shift_every!r} must be a positive number of env steps")
        if not magnitudes:
            raise UserError("magnitudes must list at least one shift magnitude")
        for m in magnitudes:
            if not MIN_MAGNITUDE <= float(m) <= MAX_MAGNITUDE:
                raise UserError(f"shift magnitude {m!r} is out of range; allowed "
                                f"{MIN_MAGNITUDE} .. {MAX_MAGNITUDE} (2.0 = +200 %)")
        self.shift_every = int(shift_every)
        self.magnitudes = [float(m) for m in magnitudes]
        self.schedule = schedule

    def magnitude(self, step: int) -> float:
        k = self.segment(step)
        return self.magnitudes[k % len(self.magnitudes) if self.schedule == "cycle" else min(k, len(self.magnitudes) - 1)]

    def segment(self, step: int) -> int:
        return step // self.shift_every

    def multiplier(self, step: int) -> float:
        return 1.0 + self.magnitude(step)

    def shift_steps(self, upto: int) -> list[int]:
        """Global steps <= upto at which the multiplier changed."""
        return [k * self.shift_every for k in range(1, self.segment(upto) + 1)
                if self.multiplier(k * self.shift_every) != self.multiplier(k * self.shift_every - 1)]


class NonStationaryMixin:
    """Adds the shift schedule to a classic-control env; subclasses name the shifted params."""

    #: attribute names scaled by the multiplier; subclasses set nominal values in `NOMINAL`.
    NOMINAL: dict[str, float] = {}
    #: the one quantity shifted when `shift_params` is not given
    DEFAULT_SHIFT: str = ""

    def _setup_shifts(self, config: dict[str, Any]) -> None:
        config = dict(config or {})
        self.schedule = ShiftSchedule(config.get("shift_every", 5000), config.get("magnitudes", [0.0, 1.0]),
                                      config.get("schedule", "cycle"))
        self.step_scale = int(config.get("step_scale", 1))
        if self.step_scale < 1:
            raise UserError(f"step_scale={self.step_scale} must be >= 1 (the number of lockstep env copies)")
        params = config.get("shift_params") or [self.DEFAULT_SHIFT]
        unknown = sorted(set(params) - set(self.NOMINAL))
        if unknown or not params:
            raise UserError(f"shift_params {params!r} not allowed for {type(self).__name__}; "
                            f"choose from: {', '.join(self.NOMINAL)}")
        self.shift_params = list(params)
        # `start_step` lets a resumed run continue the schedule where the checkpoint left it.
        self.global_step = int(config.get("start_step", 0))
        self._applied_multiplier = None
        self._apply_schedule()

    def _apply_schedule(self) -> None:
        multiplier = self.schedule.multiplier(self.global_step)
        if multiplier == self._applied_multiplier:
            return
        for name, nominal in self.NOMINAL.items():
            setattr(self, name, nominal * (multiplier if name in self.shift_params else 1.0))
        self._applied_multiplier = multiplier
        self._on_params_changed()

    def _on_params_changed(self) -> None:
        """Recompute derived constants after the shifted parameters changed."""

    def _shift_info(self, info: dict) -> dict:
        info = dict(info)
        info.update(global_step=self.global_step, segment=self.schedule.segment(self.global_step),
                    multiplier=self._applied_multiplier,
                    shift_steps=self.schedule.shift_steps(self.global_step))
        return info

    def _advance(self) -> None:
        self.global_step += self.step_scale
        self._apply_schedule()


class NSCartPole(NonStationaryMixin, CartPoleEnv):
    NOMINAL = {"length": 0.5, "masspole": 0.1, "gravity": 9.8}
    DEFAULT_SHIFT = "gravity"

    def __init__(self, config: dict | None = None):
        config = config or {}
        CartPoleEnv.__init__(self)
        self._setup_shifts(config)
        self.max_episode_steps = int(config.get("max_episode_steps", 200))
        self._t = 0

    def _on_params_changed(self) -> None:
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length

    def reset(self, *, seed=None, options=None):
        obs, info = CartPoleEnv.reset(self, seed=seed, options=options)
        self._t = 0
        return obs, self._shift_info(info)

    def step(self, action):
        obs, _, terminated, _, info = CartPoleEnv.step(self, action)
        theta = float(self.state[2])
        reward = max(0.0, 1.0 - abs(theta) / self.theta_threshold_radians)
        self._t += 1
        self._advance()
        truncated = self._t >= self.max_episode_steps and not terminated
        return obs, reward, terminated, truncated, self._shift_info(info)


class NSAcrobot(NonStationaryMixin, AcrobotEnv):
    NOMINAL = {"LINK_LENGTH_1": 1.0, "LINK_LENGTH_2": 1.0, "LINK_MASS_1": 1.0, "LINK_MASS_2": 1.0}
    DEFAULT_SHIFT = "LINK_MASS_2"

    def __init__(self, config: dict | None = None):
        config = config or {}
        AcrobotEnv.__init__(self)
        self._setup_shifts(config)
        self.max_episode_steps = int(config.get("max_episode_steps", 300))
        self._t = 0

    def _on_params_changed(self) -> None:
        # centres of mass stay in the middle of each link
        self.LINK_COM_POS_1 = self.LINK_LENGTH_1 / 2
        self.LINK_COM_POS_2 = self.LINK_LENGTH_2 / 2

    def reset(self, *, seed=None, options=None):
        obs, info = AcrobotEnv.reset(self, seed=seed, options=options)
        self._t = 0
        return obs, self._shift_info(info)

    def step(self, action):
        obs, _, terminated, _, info = AcrobotEnv.step(self, action)
        s = self.state
        tip_height = -math.cos(s[0]) - math.cos(s[1] + s[0])  # nominal-length units, in [-2, 2]
        reward = 0.0 if terminated else (tip_height - 1.0) / 3.0
        self._t += 1
        self._advance()
        truncated = self._t >= self.max_episode_steps and not terminated
        return obs, reward, terminated, truncated, self._shift_info(info)


class NSMountainCar(NonStationaryMixin, MountainCarEnv):
    NOMINAL = {"gravity": 0.0025, "force": 0.001}
    DEFAULT_SHIFT = "gravity"

    def __init__(self, config: dict | None = None):
        config = config or {}
        MountainCarEnv.__init__(self)
        self._setup_shifts(config)
        self.max_episode_steps = int(config.get("max_episode_steps", 200))
        self._t = 0

    def _energy(self) -> float:
        position, velocity = self.state
        return self.gravity * math.sin(3 * position) / 3.0 + 0.5 * velocity ** 2

    def reset(self, *, seed=None, options=None):
        obs, info = MountainCarEnv.reset(self, seed=seed, options=options)
        self._t = 0
        return obs, self._shift_info(info)

    def step(self, action):
        energy_before = self._energy()
        obs, reward, terminated, _, info = MountainCarEnv.step(self, action)
        reward = float(reward) + 1000.0 * (self._energy() - energy_before)
        self._t += 1
        self._advance()
        truncated = self._t >= self.max_episode_steps and not terminated
        return obs, reward, terminated, truncated, self._shift_info(info)


class NSPendulum(NonStationaryMixin, PendulumEnv):
    NOMINAL = {"m": 1.0, "l": 1.0, "g": 10.0}
    DEFAULT_SHIFT = "g"

    def __init__(self, config: dict | None = None):
        config = config or {}
        PendulumEnv.__init__(self)
        self._setup_shifts(config)
        self.max_episode_steps = int(config.get("max_episode_steps", 200))
        self._t = 0

    def reset(self, *, seed=None, options=None):
        obs, info = PendulumEnv.reset(self, seed=seed, options=options)
        self._t = 0
        return obs, self._shift_info(info)

    def step(self, action):
        obs, reward, terminated, _, info = PendulumEnv.step(self, action)
        self._t += 1
        self._advance()
        truncated = self._t >= self.max_episode_steps
        return obs, float(reward), terminated, truncated, self._shift_info(info)


#: env name -> (class, action kind). "discrete" envs train with DQN, "continuous" with SAC.
NS_ENVS: dict[str, tuple[type[gym.Env], str]] = {
    "ns-cartpole": (NSCartPole, "discrete"),
    "ns-acrobot": (NSAcrobot, "discrete"),
    "ns-mountaincar": (NSMountainCar, "discrete"),
    "ns-pendulum": (NSPendulum, "continuous"),
}


def make_ns_env(name: str, config: dict | None = None) -> gym.Env:
    if name not in NS_ENVS:
        raise UserError(f"unknown environment {name!r}; choose one of: {', '.join(NS_ENVS)}")
    return NS_ENVS[name][0](config or {})
