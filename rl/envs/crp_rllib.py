"""RL-CRP's environment as an RLlib `MultiAgentEnv` (`register_crp_env()`; name "edgeray-crp").

One agent per edge server ("edge_0" ...), each with its own spaces: observation
`Box(0, FEATURE_CAP, (observation_size(covered),))` from `EdgeTracker.observation`, action
`Discrete(covered)`: one of the clients it covers. A round takes k steps: every agent picks one
client per step (masked: online, covered, not yet picked; an edge with fewer than k online clients
ignores its surplus steps); after the k-th step the round is played (`CRPSimulation.play`) and each
agent gets its reward r_m (0 on the other steps; with `env.conflict_credit` "pick" the conflict
term is paid at the step that made the conflict, `pick_conflicts`). An episode is `env.rounds` rounds; all agents act
in every step and the episode ends for all at once. A masked action that arrives anyway (RLlib's
env check samples the action space) is replaced by the first allowed client and counted in
`info["invalid_actions"]`.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from edgeray.config import build_section
from pipelines.selection.crp import FEATURE_CAP, FEATURES, observation_size
from rl.envs.crp import CRPEnvSection, CRPSimulation, episode_metrics

CRP_ENV = "edgeray-crp"
AVAILABLE = FEATURES.index("available")


def agent_id(edge: int) -> str:
    return f"edge_{edge}"


class CRPMultiAgentEnv(MultiAgentEnv):
    def __init__(self, config: dict | CRPEnvSection | None = None):
        super().__init__()
        section = config if isinstance(config, CRPEnvSection) else build_section(CRPEnvSection, dict(config or {}),
                                                                                   prefix="env.")
        self.sim = CRPSimulation(section)
        self.edges = sorted(self.sim.coverage)
        self.possible_agents = [agent_id(e) for e in self.edges]
        self.agents = list(self.possible_agents)
        self.observation_spaces = {agent_id(e): spaces.Box(0.0, FEATURE_CAP, (observation_size(len(cov)),), np.float32)
                                   for e, cov in self.sim.coverage.items()}
        self.action_spaces = {agent_id(e): spaces.Discrete(len(cov)) for e, cov in self.sim.coverage.items()}
        self.episodes = 0
        self.results = []

    def reset(self, *, seed=None, options=None):
        # every episode its own per-round draws; a seeded reset pins them
        draw_seed = int(seed) if seed is not None else self.sim.section.seed * 100_003 + self.episodes
        self.episodes += 1
        self.sim.start(draw_seed)
        self.results, self.invalid = [], 0
        self._begin_round()
        return self._observations(), {a: {} for a in self.agents}

    def _begin_round(self) -> None:
        online = self.sim.available(self.sim.round)
        self.step_in_round = 0
        self.features, self.picked = {}, {}
        for e in self.edges:
            tracker = self.sim.trackers[e]
            self.features[e] = tracker.features(self.sim.round, online[tracker.covered].astype(float))
            self.picked[e] = np.zeros(len(tracker.covered))
        self.quota = {e: min(self.sim.k, int(self.features[e][:, AVAILABLE].sum())) for e in self.edges}

    def _observations(self) -> dict:
        return {agent_id(e): self.sim.trackers[e].observation(self.features[e], self.picked[e],
                                                              self.quota[e] - int(self.picked[e].sum()), self.sim.k)
                for e in self.edges}

    def step(self, action_dict):
        new = {}
        for e in self.edges:
            if self.picked[e].sum() >= self.quota[e]:
                continue
            allowed = (self.features[e][:, AVAILABLE] > 0.5) & (self.picked[e] < 0.5)
            a = int(action_dict.get(agent_id(e), -1))
            if not (0 <= a < len(allowed) and allowed[a]):
                self.invalid += 1
                a = int(np.flatnonzero(allowed)[0])
            self.picked[e][a] = 1
            new[e] = int(self.sim.trackers[e].covered[a])
        self.step_in_round += 1
        per_pick = self.sim.section.conflict_credit == "pick"
        rewards = {a: 0.0 for a in self.agents}
        if per_pick:
            earlier = {e: set(self.sim.trackers[e].covered[self.picked[e] > 0.5].tolist()) - {new.get(e)}
                       for e in self.edges}
            for e, count in pick_conflicts(earlier, new).items():
                rewards[agent_id(e)] -= self.sim.section.conflict_weight * count
        done = False
        if self.step_in_round >= self.sim.k:
            picks = {e: self.sim.trackers[e].covered[self.picked[e] > 0.5].tolist() for e in self.edges}
            result = self.sim.play(picks)
            self.results.append(result)
            for e in self.edges:
                rewards[agent_id(e)] += float(self.sim.reward(result, e, conflicts=not per_pick))
            done = self.sim.round > self.sim.section.rounds
            if not done:
                self._begin_round()
        info = {"invalid_actions": self.invalid}
        if done:
            info.update(episode_metrics(self.sim, self.results))
        obs = self._observations()
        return (obs, rewards, {"__all__": done, **{a: done for a in self.agents}},
                {"__all__": False, **{a: False for a in self.agents}}, {a: dict(info) for a in self.agents})


def pick_conflicts(earlier: dict[int, set[int]], new: dict[int, int]) -> dict[int, int]:
    """Conflicts charged at one pick step (``env.conflict_credit`` "pick"): ``earlier[e]`` the
    clients edge e picked at the round's previous steps, ``new[e]`` its pick at this step (absent:
    none). A pair of edges sharing a client is charged once, to both, at the later of their two
    picks of it: here if at least one of them picked it now. Summed over a round's steps, each
    edge's count is the round's ``edge_conflicts``."""
    count = {e: 0 for e in earlier}
    for e, c in new.items():
        for o in earlier:
            if o == e:
                continue
            if c in earlier[o]:                     # e now, o before: charge both
                count[e] += 1
                count[o] += 1
            elif new.get(o) == c and e < o:         # both now: charge both, once
                count[e] += 1
                count[o] += 1
    return count


def register_crp_env() -> None:
    from ray.tune.registry import register_env

    register_env(CRP_ENV, lambda cfg: CRPMultiAgentEnv(dict(cfg)))
