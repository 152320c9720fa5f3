"""Multi-vehicle routing on a road network: a PettingZoo ParallelEnv (LEED's environment).

N vehicles ("Agent_0" ... "Agent_{N-1}"), each with a start intersection, a goal intersection and
a departure step, drive on a road graph (`rl.envs.road_graph`: grid, random planar, or a file).
At an intersection a vehicle picks an outgoing road (or waits); on a road it travels for a time
that grows with the number of vehicles on that road (congestion). The episode ends when every
vehicle has arrived or after `max_steps` steps. This light simulator is the fast default; the
same agents run on SUMO with `backend: sumo` (`rl.envs.routing_sumo`).

LEED (arXiv 2509.14680) evaluates vehicle routing in SUMO on city networks [P]; the paper's
observation, action and reward definitions were not recoverable, so all of the following is
OUR RECONSTRUCTION [R]:
  * step: `step_s` simulated seconds; a road's travel time is fixed when a vehicle enters it,
    by the BPR rule t = t_free * (1 + bpr_alpha * (load / capacity) ** bpr_beta), with load the
    vehicles on the road including the one entering, capacity = capacity_per_lane * lanes, and
    t_free = length / speed_mps; vehicles entering in the same step are taken in agent order;
  * action: Discrete(D + 1), D the largest out-degree; slot k < D = the k-th outgoing road by
    compass angle, slot D = wait; a slot the current intersection does not have also waits;
  * observation (Box [0, 1]): one-hot of the vehicle's intersection (the road's end while it
    drives), one-hot of its goal, per slot the load / capacity of that road (clipped to 1) and
    whether the slot exists, the status one-hot (not departed, at an intersection, on a road)
    and the elapsed share of the episode;
  * reward: -1 / max_steps per step between departure and arrival (a vehicle that never arrives
    collects about -1), +arrival_bonus on arrival; nothing before departure;
  * placement: distinct start intersections (`agents_per_start` vehicles each at most), goals
    at least `min_trip_hops` roads away where the network allows, departures uniform in
    [0, depart_window_steps]; seeded by `trip_seed`, fixed across episodes (each agent keeps its
    task, as in the paper's per-agent start / goal / departure).
Only vehicles at an intersection after their departure make a decision; at all other steps
every action acts as wait (`info["decision"]` says which steps were decisions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from edgeray.config import param
from edgeray.errors import UserError
from rl.envs.road_graph import RoadGraph, grid_graph, load_network, planar_graph

NETWORKS = ("grid", "planar", "file")
BACKENDS = ("graph", "sumo")
WAITING, AT_NODE, ON_ROAD, ARRIVED = range(4)


@dataclass
class RoutingEnvSection:
    """The road network, the vehicles and the traffic model (rl.envs.routing)."""
    name: str = param("grid", "network: a grid, a random planar graph, or network_file", choices=NETWORKS)
    backend: str = param("graph", "simulator: the light graph simulator, or SUMO through libsumo (needs "
                         "`pip install eclipse-sumo libsumo`; a grid built by netgenerate or a .net.xml network_file)",
                         choices=BACKENDS)
    grid_rows: int = param(4, "grid: intersections per column", ge=2)
    grid_cols: int = param(4, "grid: intersections per row", ge=2)
    planar_nodes: int = param(30, "planar: intersections", ge=4)
    network_seed: int = param(0, "planar: seed of the random network", ge=0)
    network_file: str = param("", "file: a SUMO .net.xml or a .json network (see rl/envs/road_graph.py)")
    spacing_m: float = param(200.0, "grid / planar: mean road length in metres", gt=0)
    num_agents: int = param(4, "vehicles (agents)", ge=1)
    agents_per_start: int = param(1, "most vehicles that may start at one intersection", ge=1)
    min_trip_hops: int = param(3, "fewest roads between a vehicle's start and goal (where the network allows)", ge=1)
    depart_window_steps: int = param(4, "departures are uniform in [0, this] steps", ge=0)
    trip_seed: int = param(0, "seed of start / goal / departure placement (fixed across training seeds)", ge=0)
    max_steps: int = param(60, "steps per episode", ge=2)
    step_s: float = param(5.0, "simulated seconds per step", gt=0)
    speed_mps: float = param(13.9, "free-flow speed (13.9 m/s = 50 km/h)", gt=0)
    capacity_per_lane: float = param(2.0, "vehicles per lane a road holds before its travel time rises "
                                     "noticeably (BPR capacity) [R]", gt=0)
    bpr_alpha: float = param(0.15, "BPR congestion factor alpha", ge=0)
    bpr_beta: float = param(4.0, "BPR congestion exponent beta", ge=0)
    arrival_bonus: float = param(1.0, "reward on reaching the goal", ge=0)

    def validate(self) -> None:
        if self.name == "file" and not self.network_file:
            raise UserError("env.name=file needs env.network_file (a SUMO .net.xml or a .json network)")
        if self.backend == "sumo" and not (self.network_file.endswith(".net.xml") or self.name != "file"):
            raise UserError("env.backend=sumo needs a SUMO network: env.network_file=*.net.xml, "
                            "or env.name=grid (built with netgenerate)")


def build_graph(cfg: RoutingEnvSection) -> RoadGraph:
    if cfg.name == "grid":
        return grid_graph(cfg.grid_rows, cfg.grid_cols, cfg.spacing_m)
    if cfg.name == "planar":
        return planar_graph(cfg.planar_nodes, seed=cfg.network_seed, spacing_m=cfg.spacing_m)
    return load_network(cfg.network_file)


@dataclass(frozen=True)
class Trip:
    start: int
    goal: int
    depart: int


def agent_ids(n: int) -> list[str]:
    return [f"Agent_{i}" for i in range(n)]


def place_trips(graph: RoadGraph, cfg: RoutingEnvSection) -> list[Trip]:
    """Seeded start / goal / departure of each vehicle; UserError when the network cannot place them."""
    reachable = [u for u in range(graph.num_nodes) if (graph.hops_from(u) > 0).any()]
    room = len(reachable) * cfg.agents_per_start
    if cfg.num_agents > room:
        raise UserError(f"env.num_agents={cfg.num_agents} is more than the network can place: "
                        f"{len(reachable)} start intersections x env.agents_per_start={cfg.agents_per_start} "
                        f"= {room}; use a larger network or raise env.agents_per_start")
    rng = np.random.default_rng(cfg.trip_seed)
    starts: list[int] = []
    while len(starts) < cfg.num_agents:  # each round uses every start intersection at most once
        starts += [int(s) for s in rng.permutation(reachable)[: cfg.num_agents - len(starts)]]
    trips = []
    for start in starts:
        hops = graph.hops_from(start)
        far = np.flatnonzero(hops >= cfg.min_trip_hops)
        goal = int(rng.choice(far)) if len(far) else int(np.argmax(hops))  # else: the farthest there is
        trips.append(Trip(start, goal, int(rng.integers(0, cfg.depart_window_steps + 1))))
    return trips


class RoutingEnvBase(ParallelEnv):
    """What both simulators share: agents, trips, spaces, the observation layout, the episode
    bookkeeping and the interface the expert executor uses. A simulator says which road each
    action slot of an agent's intersection leads to (`slot_roads`) and how many vehicles a road
    holds now (`road_vehicles`)."""

    def __init__(self, cfg: RoutingEnvSection, graph: RoadGraph):
        self.cfg, self.graph = cfg, graph
        self.trips = place_trips(graph, cfg)
        self.possible_agents = agent_ids(cfg.num_agents)
        self.agents: list[str] = []
        self.num_slots = graph.max_out_degree
        self.wait_action = self.num_slots
        self.capacity = cfg.capacity_per_lane * graph.lanes
        obs_dim = 2 * graph.num_nodes + 2 * self.num_slots + 4
        # one space object per agent, built once: PettingZoo requires the same object on every call
        self.observation_spaces = {a: spaces.Box(0.0, 1.0, (obs_dim,), np.float32) for a in self.possible_agents}
        self.action_spaces = {a: spaces.Discrete(self.num_slots + 1) for a in self.possible_agents}

    def observation_space(self, agent):
        return self.observation_spaces[agent]

    def action_space(self, agent):
        return self.action_spaces[agent]

    def slot_roads(self, i: int) -> list[int | None]:
        """Per action slot at agent i's intersection, the road it takes (None: not from here)."""
        raise NotImplementedError

    def road_vehicles(self, e: int) -> float:
        raise NotImplementedError

    def _reset_agents(self) -> None:
        n = len(self.possible_agents)
        self.t = 0
        self.status = np.full(n, WAITING)
        self.node = np.array([trip.start for trip in self.trips])   # intersection, or road end while driving
        self.road = np.full(n, -1)
        self.travel_s = np.zeros(n)
        self.peak_load = np.zeros(len(self.graph.edges), dtype=int)
        self.agents = list(self.possible_agents)
        self._depart_due()

    def _first_observations(self):
        return {a: self._obs(i) for i, a in self._live()}, {a: self._info(i) for i, a in self._live()}

    def _finish_step(self, live, decided, rewards, terminated):
        """Advance the clock, let due vehicles depart, truncate at max_steps, drop finished agents."""
        self.t += 1
        self._depart_due()
        truncated = {a: self.t >= self.cfg.max_steps and not terminated[a] for _, a in live}
        obs = {a: self._obs(i) for i, a in live}
        infos = {a: self._info(i, decision=i in decided) for i, a in live}
        self.agents = [a for _, a in live if not (terminated[a] or truncated[a])]
        return obs, rewards, terminated, truncated, infos

    def _live(self):
        index = {a: i for i, a in enumerate(self.possible_agents)}
        return [(index[a], a) for a in self.agents]

    def _depart_due(self):
        for i, trip in enumerate(self.trips):
            if self.status[i] == WAITING and self.t >= trip.depart:
                self.status[i] = AT_NODE

    def _obs(self, i: int) -> np.ndarray:
        n, d = self.graph.num_nodes, self.num_slots
        obs = np.zeros(self.observation_spaces[self.possible_agents[i]].shape, np.float32)
        obs[self.node[i]] = 1.0
        obs[n + self.trips[i].goal] = 1.0
        for k, e in enumerate(self.slot_roads(i)):
            if e is not None:
                obs[2 * n + k] = min(1.0, self.road_vehicles(e) / self.capacity[e])
                obs[2 * n + d + k] = 1.0
        obs[2 * n + 2 * d + (AT_NODE if self.status[i] == ARRIVED else int(self.status[i]))] = 1.0
        obs[-1] = min(1.0, self.t / self.cfg.max_steps)
        return obs

    def _info(self, i: int, decision: bool = False) -> dict:
        return {"node": self.graph.names[self.node[i]], "status": int(self.status[i]), "decision": decision,
                "arrived": bool(self.status[i] == ARRIVED), "travel_s": float(self.travel_s[i])}

    # ------------------------------------------------------------------ what the expert needs
    def at_decision(self, agent: str) -> bool:
        """True when `agent`'s next action moves it (it has departed and stands at an intersection)."""
        return self.status[self.possible_agents.index(agent)] == AT_NODE

    def position(self, agent: str) -> int:
        return int(self.node[self.possible_agents.index(agent)])

    def action_toward(self, agent: str, next_node: int) -> int:
        """The action slot of the road from `agent`'s intersection to `next_node` (wait if none)."""
        for k, e in enumerate(self.slot_roads(self.possible_agents.index(agent))):
            if e is not None and self.graph.edges[e][1] == next_node:
                return k
        return self.wait_action

    def congested_roads(self) -> list[tuple[int, int, float]]:
        """(edge index, peak vehicles, peak load / capacity) of the roads that reached capacity this
        episode, most congested first."""
        over = np.flatnonzero(self.peak_load >= self.capacity)
        return sorted(((int(e), int(self.peak_load[e]), float(self.peak_load[e] / self.capacity[e])) for e in over),
                      key=lambda r: -r[2])


class RoutingParallelEnv(RoutingEnvBase):
    """The light graph simulator (see the module docstring)."""

    metadata = {"name": "edgeray_routing_v0", "render_modes": []}

    def __init__(self, cfg: RoutingEnvSection | dict | None = None, graph: RoadGraph | None = None):
        cfg = _section(cfg)
        super().__init__(cfg, graph or build_graph(cfg))
        self.free_time_s = self.graph.lengths / cfg.speed_mps

    def slot_roads(self, i: int) -> list[int | None]:
        return list(self.graph.out_edges[self.node[i]])

    def road_vehicles(self, e: int) -> float:
        return self.load[e]

    def reset(self, seed=None, options=None):
        self.remaining_s = np.zeros(len(self.possible_agents))
        self.load = np.zeros(len(self.graph.edges), dtype=int)
        self._reset_agents()
        return self._first_observations()

    def step(self, actions):
        if not self.agents:
            raise RuntimeError("step() after the episode ended; call reset()")
        cfg = self.cfg
        live = self._live()
        decided = {i for i, _ in live if self.status[i] == AT_NODE}
        for i, agent in live:  # agent order decides who enters a road first in a step
            if i in decided:
                self._enter(i, int(actions.get(agent, self.wait_action)))
        rewards = {a: 0.0 for _, a in live}
        terminated = {a: False for _, a in live}
        for i, agent in live:
            if self.status[i] == WAITING:
                continue
            rewards[agent] -= 1.0 / cfg.max_steps
            self.travel_s[i] += cfg.step_s
            if self.status[i] == ON_ROAD:
                self.remaining_s[i] -= cfg.step_s
                if self.remaining_s[i] <= 1e-9:
                    self.load[self.road[i]] -= 1
                    self.road[i] = -1
                    self.status[i] = AT_NODE
                    if self.node[i] == self.trips[i].goal:
                        self.status[i] = ARRIVED
                        rewards[agent] += cfg.arrival_bonus
                        terminated[agent] = True
        return self._finish_step(live, decided, rewards, terminated)

    def _enter(self, i: int, action: int) -> None:
        roads = self.graph.out_edges[self.node[i]]
        if not 0 <= action < len(roads):
            return  # wait, or a slot this intersection does not have
        e = roads[action]
        self.load[e] += 1
        self.peak_load[e] = max(self.peak_load[e], self.load[e])
        ratio = self.load[e] / self.capacity[e]
        self.remaining_s[i] = self.free_time_s[e] * (1.0 + self.cfg.bpr_alpha * ratio ** self.cfg.bpr_beta)
        self.road[i] = e
        self.node[i] = self.graph.edges[e][1]
        self.status[i] = ON_ROAD


def _section(cfg) -> RoutingEnvSection:
    if isinstance(cfg, RoutingEnvSection):
        return cfg
    from edgeray.config import build_section
    return build_section(RoutingEnvSection, dict(cfg or {}), prefix="env.")


def make_routing_env(cfg: RoutingEnvSection | dict | None = None) -> ParallelEnv:
    """The ParallelEnv of `cfg.backend`: the light graph simulator or SUMO."""
    cfg = _section(cfg)
    if cfg.backend == "sumo":
        from rl.envs.routing_sumo import SumoRoutingParallelEnv
        return SumoRoutingParallelEnv(cfg)
    return RoutingParallelEnv(cfg)
