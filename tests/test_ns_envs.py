"""Non-stationary benchmarks: shifts happen on schedule, change the physics, show up in info."""

import numpy as np
import pytest

from edgeray.errors import UserError
from rl.envs import NS_ENVS, ShiftSchedule, make_ns_env, register_ns_envs


def test_schedule_segments_and_shift_steps():
    schedule = ShiftSchedule(100, [0.0, 2.0])
    assert schedule.multiplier(0) == 1.0 and schedule.multiplier(99) == 1.0
    assert schedule.multiplier(100) == 3.0 and schedule.multiplier(200) == 1.0
    assert schedule.shift_steps(250) == [100, 200]
    # a repeated magnitude is no shift
    assert ShiftSchedule(100, [0.5, 0.5, 1.0]).shift_steps(300) == [200, 300]


@pytest.mark.parametrize("magnitudes", [[2.5], [-1.0], []])
def test_schedule_rejects_out_of_range(magnitudes):
    with pytest.raises(UserError):
        ShiftSchedule(100, magnitudes)


@pytest.mark.parametrize("name", sorted(NS_ENVS))
def test_env_shifts_parameters_and_reports_them(name):
    env = make_ns_env(name, {"shift_every": 30, "magnitudes": [0.0, 2.0]})
    nominal = {p: getattr(env, p) for p in env.NOMINAL}
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert info["segment"] == 0 and info["shift_steps"] == []
    for _ in range(45):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert np.isfinite(reward)
        if terminated or truncated:
            env.reset()
    assert info["global_step"] == 45 and info["segment"] == 1 and info["shift_steps"] == [30]
    assert info["multiplier"] == 3.0
    for p, value in nominal.items():
        assert getattr(env, p) == pytest.approx(3.0 * value)


def test_cartpole_derived_constants_follow_the_shift():
    env = make_ns_env("ns-cartpole", {"shift_every": 1, "magnitudes": [0.0, 1.0], "shift_params": ["masspole"]})
    env.reset(seed=0)
    env.step(0)
    assert env.masspole == pytest.approx(0.2) and env.length == pytest.approx(0.5)
    assert env.total_mass == pytest.approx(1.2) and env.polemass_length == pytest.approx(0.1)


def test_shift_changes_the_dynamics():
    """The same state and torque lead elsewhere once mass, length and gravity have tripled."""
    a = make_ns_env("ns-pendulum", {"shift_every": 10_000, "magnitudes": [0.0]})
    b = make_ns_env("ns-pendulum", {"shift_every": 10_000, "magnitudes": [2.0]})
    a.reset(seed=1)
    b.reset(seed=1)
    obs_a = a.step(np.array([1.0], dtype=np.float32))[0]
    obs_b = b.step(np.array([1.0], dtype=np.float32))[0]
    assert not np.allclose(obs_a, obs_b)


def test_start_step_resumes_the_schedule():
    env = make_ns_env("ns-acrobot", {"shift_every": 100, "magnitudes": [0.0, 1.0], "start_step": 150})
    _, info = env.reset(seed=0)
    assert info["segment"] == 1 and info["shift_steps"] == [100] and env.LINK_MASS_1 == 2.0


def test_bad_env_inputs():
    with pytest.raises(UserError, match="unknown environment"):
        make_ns_env("ns-nope")
    with pytest.raises(UserError, match="shift_params"):
        make_ns_env("ns-cartpole", {"shift_params": ["wheels"]})


def test_gymnasium_registration():
    import gymnasium as gym

    register_ns_envs()
    env = gym.make("edgeray/ns-mountaincar", config={"shift_every": 5})
    _, info = env.reset(seed=0)
    assert info["segment"] == 0
