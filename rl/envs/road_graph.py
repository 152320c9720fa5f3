"""Road networks for the routing environments: a directed graph of intersections and roads.

    graph = grid_graph(4, 4, spacing_m=200)            # 16 intersections, 48 roads (both ways)
    graph = planar_graph(30, seed=0)                    # random planar (Delaunay) network
    graph = load_network("city.net.xml")                # a SUMO network, or our JSON format

Nodes are named ("Intersection_5" for generated graphs, the junction id for a SUMO network);
those names are what the LLM sees in its prompt and writes back in `[MoveTo, Intersection_5,
Agent_3]`. Each node's outgoing roads are ordered by compass angle, so action slot k means
"the k-th road counter-clockwise from east" wherever the agent stands.

The JSON format (`*.json`)::

    {"nodes": [["A", 0, 0], ["B", 200, 0], ...],          # name, x (m), y (m)
     "edges": [["A", "B", 200.0, 1], ...],                # from, to, length (m), lanes
     "bidirectional": true}                               # optional: add the reverse roads

A `.net.xml` (SUMO) is read with the standard library only: its non-internal junctions become
nodes and its non-internal edges roads (length from the first lane, lanes counted), so the light
simulator and the SUMO backend run on the same network.
"""

from __future__ import annotations

import heapq
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeray.errors import UserError


@dataclass(frozen=True)
class RoadGraph:
    names: tuple[str, ...]
    xy: np.ndarray                         # [n, 2] positions in metres
    edges: tuple[tuple[int, int], ...]     # directed (from, to) node indices
    edge_names: tuple[str, ...]
    lengths: np.ndarray                    # [E] metres
    lanes: np.ndarray                      # [E]
    out_edges: tuple[tuple[int, ...], ...] = field(init=False)   # per node, edge indices by angle
    _index: dict = field(init=False, repr=False)

    def __post_init__(self):
        outs: list[list[int]] = [[] for _ in self.names]
        for e, (u, v) in enumerate(self.edges):
            outs[u].append(e)
        for u, es in enumerate(outs):
            es.sort(key=lambda e: _angle(self.xy[self.edges[e][0]], self.xy[self.edges[e][1]]))
        object.__setattr__(self, "out_edges", tuple(tuple(es) for es in outs))
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(self.names)})

    @property
    def num_nodes(self) -> int:
        return len(self.names)

    @property
    def max_out_degree(self) -> int:
        return max(len(es) for es in self.out_edges)

    def node(self, name: str) -> int | None:
        """Index of a node name (None when the graph has no such node)."""
        return self._index.get(name)

    def edge_between(self, u: int, v: int) -> int | None:
        for e in self.out_edges[u]:
            if self.edges[e][1] == v:
                return e
        return None

    def distances_to(self, goal: int, weights: np.ndarray | None = None) -> np.ndarray:
        """Shortest-path cost from every node to `goal` (inf where unreachable); weights per edge,
        default the lengths."""
        w = self.lengths if weights is None else weights
        incoming: list[list[int]] = [[] for _ in self.names]
        for e, (u, v) in enumerate(self.edges):
            incoming[v].append(e)
        dist = np.full(self.num_nodes, np.inf)
        dist[goal] = 0.0
        heap = [(0.0, goal)]
        while heap:
            d, v = heapq.heappop(heap)
            if d > dist[v]:
                continue
            for e in incoming[v]:
                u = self.edges[e][0]
                if d + w[e] < dist[u]:
                    dist[u] = d + w[e]
                    heapq.heappush(heap, (dist[u], u))
        return dist

    def shortest_path(self, start: int, goal: int, weights: np.ndarray | None = None) -> list[int]:
        """Node indices from `start` to `goal` inclusive ([] when unreachable)."""
        w = self.lengths if weights is None else weights
        dist = self.distances_to(goal, w)
        if not np.isfinite(dist[start]):
            return []
        path, node = [start], start
        while node != goal:
            # the outgoing road that lies on a shortest path (ties: the lowest slot)
            node = min((self.edges[e][1] for e in self.out_edges[node]),
                       key=lambda v: w[self.edge_between(node, v)] + dist[v])
            path.append(node)
        return path

    def hops_from(self, start: int) -> np.ndarray:
        """Road count of the fewest-roads path from `start` to every node (-1 where unreachable)."""
        hops = np.full(self.num_nodes, -1)
        hops[start] = 0
        frontier = [start]
        while frontier:
            nxt = []
            for u in frontier:
                for e in self.out_edges[u]:
                    v = self.edges[e][1]
                    if hops[v] < 0:
                        hops[v] = hops[u] + 1
                        nxt.append(v)
            frontier = nxt
        return hops


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return math.atan2(float(b[1] - a[1]), float(b[0] - a[0])) % (2 * math.pi)


def _build(names, xy, edge_list, source: str) -> RoadGraph:
    """RoadGraph from [(u, v, length, lanes, name)], dropping duplicate roads and self-loops."""
    seen, edges, edge_names, lengths, lanes = set(), [], [], [], []
    for u, v, length, n_lanes, name in edge_list:
        if u == v or (u, v) in seen:
            continue
        seen.add((u, v))
        edges.append((u, v))
        edge_names.append(name)
        lengths.append(float(length))
        lanes.append(max(1, int(n_lanes)))
    if len(names) < 2 or not edges:
        raise UserError(f"network {source} needs at least 2 intersections and 1 road, "
                        f"got {len(names)} and {len(edges)}")
    return RoadGraph(tuple(names), np.asarray(xy, dtype=float), tuple(edges), tuple(edge_names),
                     np.asarray(lengths), np.asarray(lanes, dtype=int))


def _node_name(i: int) -> str:
    return f"Intersection_{i}"


def grid_graph(rows: int, cols: int, spacing_m: float = 200.0, lanes: int = 1) -> RoadGraph:
    """A rows x cols Manhattan grid with two-way roads of `spacing_m` metres."""
    names = [_node_name(r * cols + c) for r in range(rows) for c in range(cols)]
    xy = [(c * spacing_m, r * spacing_m) for r in range(rows) for c in range(cols)]
    edge_list = []
    for r in range(rows):
        for c in range(cols):
            u = r * cols + c
            for dr, dc in ((0, 1), (1, 0)):
                if r + dr < rows and c + dc < cols:
                    v = (r + dr) * cols + c + dc
                    edge_list += [(u, v, spacing_m, lanes, f"e{u}_{v}"), (v, u, spacing_m, lanes, f"e{v}_{u}")]
    return _build(names, xy, edge_list, f"grid {rows}x{cols}")


def planar_graph(num_nodes: int, seed: int = 0, spacing_m: float = 200.0, keep: float = 0.8,
                 lanes: int = 1) -> RoadGraph:
    """A random planar network: points in a square (mean spacing ~`spacing_m`), their Delaunay
    triangulation, then a random `keep` share of the longer roads kept while the network stays
    strongly connected (every road is two-way). Seeded, so a config names one network."""
    from scipy.spatial import Delaunay

    rng = np.random.default_rng(seed)
    side = spacing_m * math.sqrt(num_nodes)
    xy = rng.uniform(0, side, size=(num_nodes, 2))
    pairs = set()
    for simplex in Delaunay(xy).simplices:
        for i in range(3):
            a, b = sorted((int(simplex[i]), int(simplex[(i + 1) % 3])))
            pairs.add((a, b))
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    # drop roads (random order) while the network stays connected, until `keep` of them remain
    kept = list(pairs)
    for pair in pairs:
        if len(kept) <= keep * len(pairs):
            break
        trial = [p for p in kept if p != pair]
        if _connected(num_nodes, trial):
            kept = trial
    edge_list = []
    for a, b in sorted(kept):
        length = float(np.linalg.norm(xy[a] - xy[b]))
        edge_list += [(a, b, length, lanes, f"e{a}_{b}"), (b, a, length, lanes, f"e{b}_{a}")]
    return _build([_node_name(i) for i in range(num_nodes)], xy, edge_list, f"planar({num_nodes}, seed={seed})")


def _connected(n: int, pairs) -> bool:
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in pairs:
        adj[a].append(b)
        adj[b].append(a)
    seen, stack = {0}, [0]
    while stack:
        for v in adj[stack.pop()]:
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return len(seen) == n


def load_network(path: str | Path) -> RoadGraph:
    """A network file: SUMO `.net.xml` or our JSON format (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"network file not found: {path}")
    if path.name.endswith(".net.xml") or path.suffix == ".xml":
        return _load_sumo_net(path)
    if path.suffix == ".json":
        return _load_json(path)
    raise UserError(f"network file {path} has an unknown format; give a SUMO .net.xml or a .json network")


def _load_json(path: Path) -> RoadGraph:
    try:
        data = json.loads(path.read_text())
        names = [str(n[0]) for n in data["nodes"]]
        xy = [(float(n[1]), float(n[2])) for n in data["nodes"]]
        index = {name: i for i, name in enumerate(names)}
        edge_list = []
        for e in data["edges"]:
            u, v = index[str(e[0])], index[str(e[1])]
            length = float(e[2]) if len(e) > 2 else float(np.hypot(*np.subtract(xy[u], xy[v])))
            n_lanes = int(e[3]) if len(e) > 3 else 1
            edge_list.append((u, v, length, n_lanes, f"{e[0]}_{e[1]}"))
            if data.get("bidirectional"):
                edge_list.append((v, u, length, n_lanes, f"{e[1]}_{e[0]}"))
    except json.JSONDecodeError as exc:
        raise UserError(f"network file {path} is not valid JSON: {exc}") from None
    except KeyError as exc:
        raise UserError(f"network file {path}: an edge names node {exc} that is not in \"nodes\", "
                        f"or the key {exc} is missing") from None
    except (TypeError, ValueError, IndexError) as exc:
        raise UserError(f"network file {path} does not parse: expected \"nodes\": [[name, x, y], ...] and "
                        f"\"edges\": [[from, to, length, lanes], ...] ({exc})") from None
    return _build(names, xy, edge_list, str(path))


def _load_sumo_net(path: Path) -> RoadGraph:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise UserError(f"network file {path} is not valid XML: {exc}") from None
    if root.tag != "net":
        raise UserError(f"network file {path} is not a SUMO network (root element <{root.tag}>, expected <net>)")
    names, xy = [], []
    for j in root.iter("junction"):
        if j.get("type") == "internal":
            continue
        names.append(j.get("id"))
        xy.append((float(j.get("x", 0)), float(j.get("y", 0))))
    index = {name: i for i, name in enumerate(names)}
    edge_list = []
    for e in root.iter("edge"):
        if e.get("function") == "internal" or e.get("from") not in index or e.get("to") not in index:
            continue
        lanes = e.findall("lane")
        length = float(lanes[0].get("length")) if lanes else 1.0
        edge_list.append((index[e.get("from")], index[e.get("to")], length, max(1, len(lanes)), e.get("id")))
    return _build(names, xy, edge_list, str(path))
