"""LEED's demonstration generation (DG): prompt -> LLM -> parse + validate -> execute -> per-agent
expert trajectories.

    generator = DemonstrationGenerator(cfg)              # builds the env and the LLM client once
    demos = generator.generate(round=0)                  # Demonstrations: per agent (obs, actions, rewards)
    demos = generator.generate(round=1, agent_returns={...})   # a refinement round

Executing the instructions E in the environment gives the expert trajectories [P]; how an
instruction becomes an action is our reconstruction [R]: at each step where an agent stands at an
intersection after its departure, its next plan item decides: a move takes the road to that
intersection, a wait holds it for that many of its decision steps. All agents execute together,
so the demonstrations carry the congestion the plan itself causes. With
`expert.decision_steps_only` only those decision steps are kept as (observation, action) pairs:
at every other step the action does nothing, so imitating it teaches nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rl.envs.routing import RoutingParallelEnv, make_routing_env
from rl.leed.instructions import AgentPlan, RepairReport, parse_instructions, validate
from rl.leed.llm import make_client, usable_backend
from rl.leed.prompt import Feedback, Scenario, build_prompts


@dataclass
class Demonstrations:
    """One round of expert trajectories and what produced them."""
    round: int
    backend: str
    obs: dict[str, np.ndarray]          # agent -> [T_i, obs_dim]
    actions: dict[str, np.ndarray]      # agent -> [T_i]
    returns: dict[str, float]           # agent -> expert episode return
    arrived: dict[str, bool]
    congested_roads: list[tuple[int, int, float]]
    report: RepairReport
    generation_s: float
    raw_answers: list[str] = field(default_factory=list)

    @property
    def mean_return(self) -> float:
        return float(np.mean(list(self.returns.values())))

    @property
    def episode_return(self) -> float:
        """Sum over agents: comparable to RLlib's `episode_return_mean` of a multi-agent episode."""
        return float(np.sum(list(self.returns.values())))

    def for_modules(self, module_of: dict[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(obs, actions) per RLModule: one per agent, or everything under the shared module."""
        out: dict[str, list] = {}
        for agent, module_id in module_of.items():
            if len(self.actions.get(agent, ())):
                out.setdefault(module_id, []).append((self.obs[agent], self.actions[agent]))
        return {m: (np.concatenate([o for o, _ in parts]), np.concatenate([a for _, a in parts]))
                for m, parts in out.items()}

    def summary(self) -> dict:
        return {"round": self.round, "backend": self.backend, "expert_episode_return": self.episode_return,
                "expert_arrived_share": float(np.mean(list(self.arrived.values()))),
                "demo_rows": int(sum(len(a) for a in self.actions.values())),
                "generation_s": self.generation_s, "congested_roads": len(self.congested_roads),
                **self.report.as_dict()}


def execute_plans(env: RoutingParallelEnv, plans: dict[str, AgentPlan],
                  decision_steps_only: bool = True) -> tuple[dict, dict, dict, dict]:
    """Run every agent's plan together; (obs, actions, returns, arrived) per agent."""
    obs, _ = env.reset()
    cursor = {a: 0 for a in env.possible_agents}
    waited = {a: 0 for a in env.possible_agents}
    rows: dict[str, list] = {a: [] for a in env.possible_agents}
    returns = {a: 0.0 for a in env.possible_agents}
    arrived = {a: False for a in env.possible_agents}
    while env.agents:
        actions = {}
        for agent in env.agents:
            actions[agent] = env.wait_action
            if not env.at_decision(agent):
                if not decision_steps_only:
                    rows[agent].append((obs[agent], env.wait_action))
                continue
            steps = plans[agent].steps
            if cursor[agent] < len(steps):
                kind, value = steps[cursor[agent]]
                if kind == "move":
                    actions[agent] = env.action_toward(agent, value)
                    cursor[agent] += 1
                else:
                    waited[agent] += 1
                    if waited[agent] >= value:
                        cursor[agent], waited[agent] = cursor[agent] + 1, 0
            rows[agent].append((obs[agent], actions[agent]))
        obs, rewards, terminated, _, infos = env.step(actions)
        for agent, r in rewards.items():
            returns[agent] += r
            arrived[agent] = arrived[agent] or terminated[agent]
    obs_dim = env.observation_space(env.possible_agents[0]).shape[0]
    demo_obs = {a: np.asarray([o for o, _ in r], np.float32).reshape(-1, obs_dim) for a, r in rows.items()}
    demo_act = {a: np.asarray([x for _, x in r], np.int64) for a, r in rows.items()}
    return demo_obs, demo_act, returns, arrived


def preflight(cfg, uses_demonstrations: bool = True) -> None:
    """Before Ray starts: the network parses, the agents fit on it, the simulator loads, and the
    LLM backend is usable; an unusable one with `llm.fallback: planner` is replaced by the planner
    here, so the run's config.yaml records what actually generated the demonstrations."""
    make_routing_env(cfg.env).close()
    if uses_demonstrations:
        cfg.llm.backend = usable_backend(cfg.llm)


class DemonstrationGenerator:
    """Holds the env, the scenario and the client across rounds (the LLM loads once)."""

    def __init__(self, cfg, out_dir: str | Path | None = None, client=None):
        self.cfg = cfg
        self.env = make_routing_env(cfg.env)
        self.scenario = Scenario(self.env.graph, tuple(self.env.trips), tuple(self.env.possible_agents),
                                 cfg.env.capacity_per_lane, cfg.env.step_s)
        self.client = client or make_client(cfg.llm, seed=cfg.train.seed)
        self.out_dir = Path(out_dir) if out_dir else None
        self.last: Demonstrations | None = None

    def generate(self, round: int, agent_returns: dict[str, float] | None = None) -> Demonstrations:
        feedback = None
        if round > 0 and self.last is not None:
            feedback = Feedback(round - 1, dict(agent_returns or {}), dict(self.last.returns),
                                list(self.last.congested_roads))
        t0 = time.perf_counter()
        prompts = build_prompts(self.scenario, self.cfg.llm.prompt_scope, feedback)
        answers = self.client.generate(prompts)
        plans, report = {}, RepairReport()
        for prompt, answer in zip(prompts, answers):
            agent_plans, prompt_report = validate(parse_instructions(answer), self.scenario, prompt.agents)
            plans.update(agent_plans)
            report.add(prompt_report)
        obs, actions, returns, arrived = execute_plans(self.env, plans, self.cfg.expert.decision_steps_only)
        demos = Demonstrations(round, self.client.name, obs, actions, returns, arrived, self.env.congested_roads(),
                               report, time.perf_counter() - t0, list(answers))
        self.last = demos
        if self.out_dir is not None:
            self._save(demos, prompts)
        return demos

    def _save(self, demos: Demonstrations, prompts) -> None:
        """demos/round_<k>.json: prompts, raw answers and the repair report, for inspection."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {**demos.summary(), "returns": demos.returns, "arrived": demos.arrived,
                  "prompts": [list(p.messages) for p in prompts], "answers": demos.raw_answers}
        (self.out_dir / f"round_{demos.round:03d}.json").write_text(json.dumps(record, indent=1))
