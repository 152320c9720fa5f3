"""LEED's prompt: the road network as adjacency text, each agent's task and the objectives; on
refinement rounds also the recent returns and the congested roads.

What the paper gives [P]: the prompt holds environment information, the road-network adjacency
graph and each agent's start, goal and departure time; the LLM answers with executable
`[Command, Parameter, AgentID]` items such as `[MoveTo, Intersection_5, Agent_3]`; the prompt is
refined periodically from the agents' exploration and the expert trajectories.
Our reconstruction [R]: the wording, the command set (MoveTo / Wait / Stop), the JSON-only answer
format, the feedback shown on refinement (per-agent mean return of the agents and of the expert,
the roads that reached capacity in the expert rollout), and `per_agent` prompts for small models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rl.envs.road_graph import RoadGraph
from rl.envs.routing import Trip

COMMANDS = ("MoveTo", "Wait", "Stop")

SYSTEM_PROMPT = """You plan routes for vehicles on a road network.
Each vehicle is an agent. Give each agent a sequence of instructions. An instruction is a JSON list
[Command, Parameter, AgentID] with one of these commands:
  ["MoveTo", "<intersection>", "<agent>"]  drive to that intersection (best an adjacent one)
  ["Wait", "<steps>", "<agent>"]           stay at the current intersection for that many steps
  ["Stop", "", "<agent>"]                  the agent has reached its goal
Answer with JSON only: one list of instructions, in driving order, e.g.
[["MoveTo", "Intersection_1", "Agent_0"], ["MoveTo", "Intersection_2", "Agent_0"], ["Stop", "", "Agent_0"]]"""


@dataclass(frozen=True)
class Scenario:
    """What a prompt describes (and what the planner reads directly)."""
    graph: RoadGraph
    trips: tuple[Trip, ...]
    agents: tuple[str, ...]
    capacity_per_lane: float
    step_s: float


@dataclass
class Feedback:
    """What a refinement round tells the LLM about the previous round [R]."""
    round: int
    agent_returns: dict[str, float] = field(default_factory=dict)    # the agents' own exploration
    expert_returns: dict[str, float] = field(default_factory=dict)   # the previous demonstrations
    congested_roads: list[tuple[int, int, float]] = field(default_factory=list)  # (edge, peak vehicles, x capacity)


@dataclass(frozen=True)
class Prompt:
    messages: tuple[dict, ...]
    scenario: Scenario
    agents: tuple[str, ...]          # the agents this prompt asks for (all, or one with per_agent)
    feedback: Feedback | None


def adjacency_text(graph: RoadGraph) -> str:
    lines = []
    for u, name in enumerate(graph.names):
        roads = ", ".join(f"{graph.names[graph.edges[e][1]]} ({graph.lengths[e]:.0f} m)" for e in graph.out_edges[u])
        lines.append(f"{name}: {roads}")
    return "\n".join(lines)


def task_text(scenario: Scenario, agents) -> str:
    trip_of = dict(zip(scenario.agents, scenario.trips))
    names = scenario.graph.names
    return "\n".join(f"{a}: start {names[trip_of[a].start]}, goal {names[trip_of[a].goal]}, "
                     f"departs at step {trip_of[a].depart}" for a in agents)


def feedback_text(feedback: Feedback, agents, graph: RoadGraph) -> str:
    lines = [f"Feedback from round {feedback.round} (mean episode return, higher is better):"]
    for a in agents:
        own, expert = feedback.agent_returns.get(a), feedback.expert_returns.get(a)
        if own is not None or expert is not None:
            lines.append(f"{a}: own exploration {_num(own)}, your previous plan {_num(expert)}")
    if feedback.congested_roads:
        lines.append("Congested roads in your previous plan (road: peak vehicles, times capacity):")
        lines += [f"{graph.names[graph.edges[e][0]]} -> {graph.names[graph.edges[e][1]]}: {vehicles}, {ratio:.1f}x"
                  for e, vehicles, ratio in feedback.congested_roads[:12]]
        lines.append("Route some agents around these roads or delay them with Wait.")
    return "\n".join(lines)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def build_prompts(scenario: Scenario, scope: str, feedback: Feedback | None = None) -> list[Prompt]:
    """One prompt for all agents ("joint"), or one per agent ("per_agent")."""
    groups = [scenario.agents] if scope == "joint" else [(a,) for a in scenario.agents]
    network = adjacency_text(scenario.graph)
    prompts = []
    for agents in groups:
        user = [f"Road network (intersection: roads to neighbouring intersections, with length):\n{network}",
                f"Agents:\n{task_text(scenario, agents)}",
                f"Objectives: every agent reaches its goal; the total travel time is as small as possible; "
                f"a road holds about {scenario.capacity_per_lane:g} vehicles per lane before it slows down, so "
                f"avoid sending many agents along the same road at the same time. One step is {scenario.step_s:g} s."]
        if feedback is not None:
            user.append(feedback_text(feedback, agents, scenario.graph))
        user.append("Instructions (JSON only):")
        messages = ({"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(user)})
        prompts.append(Prompt(messages, scenario, tuple(agents), feedback))
    return prompts
