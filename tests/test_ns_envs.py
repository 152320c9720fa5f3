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
    # one physical quantity at a time: only the env's default parameter moved
    for p, value in nominal.items():
        assert getattr(env, p) == pytest.approx((3.0 if p == env.DEFAULT_SHIFT else 1.0) * value)


def test_hold_schedule_does_not_revert_and_cycle_does():
    hold = ShiftSchedule(100, [0.0, 1.0, 2.0], "hold")
    assert [hold.multiplier(s) for s in (0, 100, 200, 300, 900)] == [1.0, 2.0, 3.0, 3.0, 3.0]
    assert hold.shift_steps(1000) == [100, 200]
    cycle = ShiftSchedule(100, [0.0, 1.0, 2.0], "cycle")
    assert [cycle.multiplier(s) for s in (0, 100, 200, 300)] == [1.0, 2.0, 3.0, 1.0]
    with pytest.raises(UserError, match="schedule"):
        ShiftSchedule(100, [0.0], "sometimes")


def test_gravity_shift_changes_g_over_l():
    """The old shift scaled gravity and pole length together, keeping g/l (the pole's angular
    dynamics) unchanged; the default now moves gravity alone, so the same push ends elsewhere."""
    nominal = make_ns_env("ns-cartpole", {"magnitudes": [0.0], "shift_every": 10**9})
    shifted = make_ns_env("ns-cartpole", {"magnitudes": [2.0], "shift_every": 10**9})
    assert shifted.gravity / shifted.length == pytest.approx(3 * nominal.gravity / nominal.length)
    nominal.reset(seed=3)
    shifted.reset(seed=3)
    for _ in range(5):
        a, b = nominal.step(1)[0], shifted.step(1)[0]
    assert abs(a[2] - b[2]) > 1e-3  # pole angle


def test_step_scale_counts_lockstep_copies():
    env = make_ns_env("ns-cartpole", {"shift_every": 40, "magnitudes": [0.0, 1.0], "schedule": "hold", "step_scale": 4})
    env.reset(seed=0)
    for _ in range(10):
        *_, info = env.step(0)
    assert info["global_step"] == 40 and info["segment"] == 1 and env.gravity == pytest.approx(19.6)
    with pytest.raises(UserError, match="step_scale"):
        make_ns_env("ns-cartpole", {"step_scale": 0})


def test_cartpole_derived_constants_follow_the_shift():
    env = make_ns_env("ns-cartpole", {"shift_every": 1, "magnitudes": [0.0, 1.0], "shift_params": ["masspole"]})
    assert env.shift_params == ["masspole"]
    env.reset(seed=0)
    env.step(0)
    assert env.masspole == pytest.approx(0.2) and env.length == pytest.approx(0.5)
    assert env.total_mass == pytest.approx(1.2) and env.polemass_length == pytest.approx(0.1)


def test_shift_changes_the_dynamics():
    """The same state and torque lead elsewhere once gravity has tripled."""
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
    assert info["segment"] == 1 and info["shift_steps"] == [100] and env.LINK_MASS_2 == 2.0 and env.LINK_MASS_1 == 1.0


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
