"""The routing ParallelEnv on the real SUMO simulator (`env.backend: sumo`), through libsumo.

Same agents, trips, observation and action layout, rewards and expert interface as the light
simulator (`rl.envs.routing`), on a SUMO network: `env.network_file` (a .net.xml), or for
`env.name: grid` one built once by SUMO's `netgenerate` (cached next to this run in the system
temp folder). SUMO drives the vehicles (car following, junctions, lane changes, insertion
queues): congestion is SUMO's own, not the BPR rule. Needs `pip install eclipse-sumo libsumo`
(1.28; about 235 MB of wheels).

How an agent's decision reaches SUMO [R]: a vehicle enters the simulation when it picks its
first road; on every road it enters it gets a stop at the road's end, so it never runs off the
end of its route while undecided; while it is on a road whose end is not its goal, the agent
"stands at" that end intersection and decides: a road SUMO connects to the current one is
appended to the route (and the stop removed, or the stopped vehicle resumed); wait, or a slot
without a connection, keeps it driving towards the stop. A vehicle arrives when it leaves the
last road of its route, the one that ends at its goal. One env step is `step_s` seconds of
SUMO time at 1 s resolution.

libsumo runs ONE simulation per process: a second SUMO env in the same process is refused.
RLlib therefore needs `train.num_env_runners >= 1` with this backend (the driver also runs the
expert rollouts on its own SUMO).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from edgeray.errors import UserError
from rl.envs.road_graph import load_network
from rl.envs.routing import ARRIVED, AT_NODE, ON_ROAD, WAITING, RoutingEnvBase, RoutingEnvSection, _section

_ACTIVE_OWNER: list = []  # the env that holds this process's libsumo simulation


def import_libsumo():
    try:
        import libsumo
    except ImportError as exc:
        raise UserError(f"env.backend=sumo needs SUMO's Python API: `pip install eclipse-sumo libsumo` "
                        f"({exc})") from None
    return libsumo


def sumo_network(cfg: RoutingEnvSection) -> Path:
    """The .net.xml of `cfg`: the given file, or a netgenerate grid cached by its parameters."""
    if cfg.name == "file":
        return Path(cfg.network_file)
    if cfg.name != "grid":
        raise UserError("env.backend=sumo runs env.name=grid (built by netgenerate) or env.name=file "
                        "with a .net.xml; a random planar network has no SUMO form here")
    import sumo

    key = hashlib.sha1(f"{cfg.grid_rows}x{cfg.grid_cols}x{cfg.spacing_m}".encode()).hexdigest()[:10]
    path = Path(tempfile.gettempdir()) / "edgeray-sumo" / f"grid-{key}.net.xml"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.xml")
        cmd = [os.path.join(sumo.SUMO_HOME, "bin", "netgenerate"), "--grid", f"--grid.x-number={cfg.grid_cols}",
               f"--grid.y-number={cfg.grid_rows}", f"--grid.length={cfg.spacing_m}", "--default.lanenumber=1",
               "--no-turnarounds", "true", "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise UserError(f"netgenerate failed: {' '.join(proc.stderr.split())[:300]}")
        os.replace(tmp, path)
    return path


def _connections(net_file: Path) -> set[tuple[str, str]]:
    """(from road, to road) pairs SUMO connects at junctions."""
    root = ET.parse(net_file).getroot()
    return {(c.get("from"), c.get("to")) for c in root.iter("connection") if not c.get("from", ":").startswith(":")}


class SumoRoutingParallelEnv(RoutingEnvBase):
    """See the module docstring."""

    metadata = {"name": "edgeray_routing_sumo_v0", "render_modes": []}

    def __init__(self, cfg: RoutingEnvSection | dict | None = None):
        cfg = _section(cfg)
        self.libsumo = import_libsumo()
        self.net_file = sumo_network(cfg)
        super().__init__(cfg, load_network(self.net_file))
        self.connected = _connections(self.net_file)
        self.edge_index = {name: e for e, name in enumerate(self.graph.edge_names)}
        self._started = False

    def slot_roads(self, i: int) -> list[int | None]:
        """A slot whose road SUMO does not connect to the vehicle's road (a U-turn on a
        no-turnaround network) is None: choosing it waits."""
        roads = self.graph.out_edges[self.node[i]]
        if self.road[i] < 0:
            return list(roads)
        here = self.graph.edge_names[self.road[i]]
        return [e if (here, self.graph.edge_names[e]) in self.connected else None for e in roads]

    def road_vehicles(self, e: int) -> float:
        return self.libsumo.edge.getLastStepVehicleNumber(self.graph.edge_names[e]) if self._started else 0

    # ------------------------------------------------------------------ simulation
    def _sumo_args(self) -> list[str]:
        return ["-n", str(self.net_file), "--step-length", "1", "--no-step-log", "true", "--no-warnings", "true",
                "--seed", str(self.cfg.trip_seed), "--time-to-teleport", "-1"]

    def reset(self, seed=None, options=None):
        if _ACTIVE_OWNER and _ACTIVE_OWNER[0] is not self:
            raise UserError("libsumo runs one simulation per process and another SUMO env holds it; "
                            "use train.num_env_runners >= 1 with env.backend=sumo")
        if self._started:
            self.libsumo.load(self._sumo_args())
        else:
            self.libsumo.start(["sumo", *self._sumo_args()])
            self._started = True
            _ACTIVE_OWNER[:] = [self]
        self._reset_agents()
        return self._first_observations()

    def step(self, actions):
        if not self.agents:
            raise RuntimeError("step() after the episode ended; call reset()")
        cfg, ls = self.cfg, self.libsumo
        live = self._live()
        decided = {i for i, _ in live if self.status[i] == AT_NODE}
        for i, agent in live:
            if i in decided:
                self._decide(i, int(actions.get(agent, self.wait_action)))
        arrived: set[str] = set()
        for _ in range(max(1, int(round(cfg.step_s)))):
            ls.simulation.step()
            arrived.update(ls.simulation.getArrivedIDList())  # only the last 1 s step's arrivals
        for e, name in enumerate(self.graph.edge_names):
            self.peak_load[e] = max(self.peak_load[e], ls.edge.getLastStepVehicleNumber(name))
        rewards = {a: 0.0 for _, a in live}
        terminated = {a: False for _, a in live}
        present = set(ls.vehicle.getIDList())
        for i, agent in live:
            if self.status[i] == WAITING:
                continue
            rewards[agent] -= 1.0 / cfg.max_steps
            self.travel_s[i] += cfg.step_s
            if agent in arrived:
                self.status[i] = ARRIVED
                rewards[agent] += cfg.arrival_bonus
                terminated[agent] = True
            elif agent in present:
                self._track(i, agent)
        return self._finish_step(live, decided, rewards, terminated)

    def _decide(self, i: int, action: int) -> None:
        allowed = self.slot_roads(i)
        if not 0 <= action < len(allowed) or allowed[action] is None:
            return  # wait, or a road this intersection does not offer from here
        ls, agent, e = self.libsumo, self.possible_agents[i], allowed[action]
        name = self.graph.edge_names[e]
        if self.road[i] < 0:  # first road: the vehicle enters the simulation now
            ls.route.add(f"route_{agent}_{self.t}", [name])
            ls.vehicle.add(agent, f"route_{agent}_{self.t}", departPos="base", departSpeed="max", departLane="best")
        else:
            current = self.graph.edge_names[self.road[i]]
            ls.vehicle.setRoute(agent, [current, name])
            if ls.vehicle.isStopped(agent):
                ls.vehicle.resume(agent)
            elif ls.vehicle.getStops(agent):
                ls.vehicle.replaceStop(agent, 0, "")
        self.status[i] = ON_ROAD

    def _track(self, i: int, agent: str) -> None:
        """Follow the vehicle onto its next road: there it stands at that road's end intersection."""
        ls = self.libsumo
        road = self.edge_index.get(ls.vehicle.getRoadID(agent))  # None on a junction's internal lane
        if road is None or road == self.road[i]:
            return
        self.road[i] = road
        self.node[i] = self.graph.edges[road][1]
        if self.node[i] == self.trips[i].goal:
            self.status[i] = ON_ROAD  # its route ends here: it arrives when it leaves this road
            return
        lane = ls.vehicle.getLaneIndex(agent)
        length = ls.lane.getLength(f"{self.graph.edge_names[road]}_{lane}")
        ls.vehicle.setStop(agent, self.graph.edge_names[road], pos=length - 0.1, laneIndex=lane, duration=1e6)
        self.status[i] = AT_NODE

    def close(self):
        if self._started:
            self.libsumo.close()
            self._started = False
            _ACTIVE_OWNER.clear()
