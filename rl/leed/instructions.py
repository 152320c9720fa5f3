"""Parse and validate the LLM's `[Command, Parameter, AgentID]` instructions into per-agent plans.

    parsed = parse_instructions(text)                     # tolerant of prose, code fences, cut-off JSON
    plans, report = validate(parsed, scenario)            # every agent gets a plan that reaches its goal

The paper gives the instruction format [P]; everything about malformed output is OUR
RECONSTRUCTION [R] (notes A3 step 3):
  * parsing: the JSON list if the answer holds one; otherwise every complete bracketed triple,
    quoted or not (`[MoveTo, Intersection_5, Agent_3]`, as the paper writes them), so a partial
    answer cut off by the token limit keeps its complete items; a bracket that opens an item but
    does not parse is counted as malformed;
  * names: commands match case- and punctuation-insensitively (move_to, moveTo); agents and
    generated intersections also by their number ("Agent 3", "3", "intersection_5");
  * MoveTo to an adjacent intersection is one move; to a farther one it is expanded to the
    shortest path (counted as expanded, still valid); to an intersection the network does not
    have (a hallucinated node) it is dropped and counted;
  * Wait takes a whole number of steps (capped at `MAX_WAIT_STEPS`); Stop ends the agent's plan;
  * an agent whose instructions do not reach its goal (or who got none) has its plan completed
    by the shortest path from where it ended (counted): every agent always has a full plan.
The valid-instruction share is valid / (parsed + malformed), 0 when the answer held nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from rl.leed.prompt import Scenario

MAX_WAIT_STEPS = 10
_TRIPLE = re.compile(r"\[\s*([^\[\],]*?)\s*,\s*([^\[\],]*?)\s*,\s*([^\[\],]*?)\s*\]")
_ITEM_OPENING = re.compile(r"\[\s*[\"']?[A-Za-z]")  # "[MoveTo" / "['Wait": the start of one instruction


@dataclass
class ParsedInstructions:
    triples: list[tuple[str, str, str]]
    malformed: int


@dataclass
class RepairReport:
    """What the validator found and fixed, summed over the prompts of one round."""
    parsed: int = 0
    valid: int = 0
    malformed: int = 0
    unknown_command: int = 0
    unknown_agent: int = 0
    hallucinated_node: int = 0
    bad_parameter: int = 0
    expanded_moves: int = 0
    agents_without_instructions: int = 0
    agents_completed_by_shortest_path: int = 0

    @property
    def valid_share(self) -> float:
        total = self.parsed + self.malformed
        return self.valid / total if total else 0.0

    def add(self, other: "RepairReport") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "valid_share": self.valid_share}


@dataclass
class AgentPlan:
    """Hops (next intersection index) and waits, in order: ("move", node) or ("wait", steps)."""
    steps: list[tuple[str, int]] = field(default_factory=list)


def parse_instructions(text: str) -> ParsedInstructions:
    text = re.sub(r"```(?:json)?", " ", text or "")
    whole = _json_list(text)
    if whole is not None:
        triples, malformed = [], 0
        for item in whole:
            if isinstance(item, (list, tuple)) and len(item) == 3:
                triples.append(tuple(_clean(x) for x in item))
            else:
                malformed += 1
        return ParsedInstructions(triples, malformed)
    triples = [tuple(_clean(x) for x in m.groups()) for m in _TRIPLE.finditer(text)]
    openings = len(_ITEM_OPENING.findall(text))
    return ParsedInstructions(triples, max(0, openings - len(triples)))


def _json_list(text: str):
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and value and all(isinstance(x, (list, tuple)) for x in value):
        return value
    if isinstance(value, list) and len(value) == 3 and all(isinstance(x, (str, int, float)) for x in value):
        return [value]  # a single bare instruction
    return None


def _clean(x) -> str:
    return str(x).strip().strip("\"'` ").strip()


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_COMMANDS = {"moveto": "MoveTo", "move": "MoveTo", "goto": "MoveTo", "wait": "Wait", "stop": "Stop"}


class _Names:
    """Lenient lookup of agent and intersection names."""

    def __init__(self, scenario: Scenario):
        self.agents = {_key(a): a for a in scenario.agents}
        self.agent_numbers = {_number(a): a for a in scenario.agents}
        self.nodes = {_key(n): i for i, n in enumerate(scenario.graph.names)}
        generated = all(n.startswith("Intersection_") for n in scenario.graph.names)
        self.node_numbers = {_number(n): i for i, n in enumerate(scenario.graph.names)} if generated else {}

    def agent(self, name: str) -> str | None:
        return self.agents.get(_key(name)) or self.agent_numbers.get(_number(name))

    def node(self, name: str) -> int | None:
        found = self.nodes.get(_key(name))
        return found if found is not None else self.node_numbers.get(_number(name))


def _number(name: str) -> int | None:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if len(digits) == 1 else None


def validate(parsed: ParsedInstructions, scenario: Scenario, asked: tuple[str, ...] | None = None,
             weights=None) -> tuple[dict[str, AgentPlan], RepairReport]:
    """Per-agent plans for the agents `asked` about (default all), and what was repaired.
    `weights` (per road) choose the shortest paths used for expansion and completion."""
    graph, names = scenario.graph, _Names(scenario)
    asked = tuple(asked or scenario.agents)
    report = RepairReport(parsed=len(parsed.triples), malformed=parsed.malformed)
    index = {a: i for i, a in enumerate(scenario.agents)}
    position = {a: scenario.trips[index[a]].start for a in asked}
    plans = {a: AgentPlan() for a in asked}
    stopped: set[str] = set()
    for command, parameter, agent_name in parsed.triples:
        command = _COMMANDS.get(_key(command))
        agent = names.agent(agent_name)
        if command is None:
            report.unknown_command += 1
            continue
        if agent is None or agent not in plans:
            report.unknown_agent += 1
            continue
        if agent in stopped:
            continue  # after Stop: ignored, neither valid nor invalid
        if command == "Stop":
            report.valid += 1
            stopped.add(agent)
        elif command == "Wait":
            try:
                steps = int(float(parameter))
            except ValueError:
                report.bad_parameter += 1
                continue
            if steps < 0:
                report.bad_parameter += 1
                continue
            report.valid += 1
            if steps:
                plans[agent].steps.append(("wait", min(steps, MAX_WAIT_STEPS)))
        else:
            target = names.node(parameter)
            if target is None:
                report.hallucinated_node += 1
                continue
            here = position[agent]
            if target == here:
                report.valid += 1
                continue
            if graph.edge_between(here, target) is not None:
                path = [here, target]
            else:
                path = graph.shortest_path(here, target, weights)
                if not path:  # exists but cannot be reached from here: as useless as a hallucination
                    report.hallucinated_node += 1
                    continue
                report.expanded_moves += 1
            report.valid += 1
            plans[agent].steps += [("move", v) for v in path[1:]]
            position[agent] = target
    mentioned = {names.agent(a) for _, _, a in parsed.triples}
    for agent in asked:
        goal = scenario.trips[index[agent]].goal
        if agent not in mentioned:
            report.agents_without_instructions += 1
        if position[agent] != goal:
            report.agents_completed_by_shortest_path += 1
            plans[agent].steps += [("move", v) for v in graph.shortest_path(position[agent], goal, weights)[1:]]
    return plans, report
