"""Non-stationary gymnasium benchmarks (see `rl.envs.nonstationary`).

`register_ns_envs()` registers every env with gymnasium (`gym.make("edgeray/ns-cartpole")`) and
with RLlib's registry (`config.environment("ns-cartpole", env_config={...})`).
"""

from rl.envs.nonstationary import NS_ENVS, ShiftSchedule, make_ns_env


def register_ns_envs() -> None:
    import gymnasium as gym
    from ray.tune.registry import register_env

    for name, (cls, _) in NS_ENVS.items():
        gym_id = f"edgeray/{name}"
        if gym_id not in gym.registry:
            gym.register(gym_id, entry_point=cls, kwargs={"config": {}})
        register_env(name, lambda cfg, cls=cls: cls(dict(cfg)))


__all__ = ["NS_ENVS", "ShiftSchedule", "make_ns_env", "register_ns_envs"]
