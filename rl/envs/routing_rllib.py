"""The routing ParallelEnv as an RLlib MultiAgentEnv (`register_routing_env()`; name "edgeray-routing").

RLlib's `ParallelPettingZooEnv` ends an episode only when every agent is terminated, or every
agent truncated; here a vehicle may arrive (terminated) in the very step the others are cut off
(truncated), and the episode must end then too. So "__all__" is set from whether any agent is
left, and which of the two flags carries it from whether the last step truncated anyone.
"""

from __future__ import annotations

from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv

from rl.envs.routing import make_routing_env

ROUTING_ENV = "edgeray-routing"


class RoutingMultiAgentEnv(ParallelPettingZooEnv):
    def step(self, action_dict):
        obs, rewards, terminated, truncated, infos = self.par_env.step(action_dict)
        over = not self.par_env.agents
        truncated["__all__"] = over and any(truncated.values())
        terminated["__all__"] = over and not truncated["__all__"]
        return obs, rewards, terminated, truncated, infos


def register_routing_env() -> None:
    from ray.tune.registry import register_env

    register_env(ROUTING_ENV, lambda cfg: RoutingMultiAgentEnv(make_routing_env(dict(cfg))))
