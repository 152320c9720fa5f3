"""Per-edge client selection and conflicts between edge servers, on plain data (no Ray, no torch).

Reading order: the data an edge sees (``SelectionRequest``, ``RoundObservation``), the
``Selector`` protocol and its three baselines, then what happens when edges pick the same client
(``resolve_conflicts``) and what each edge learns afterwards (``edge_observations``).

**Per-edge and decentralized.** Every edge server chooses its own clients among the available
clients it covers (coverage may overlap), from its own request only: its candidates, how many
to pick, and its own past observations, with a generator seeded by (selector seed, round, edge).
``Selector.select`` answers one edge; ``Selector.select_all`` only loops over the edges, so no
edge learns what another picks. The one exception is ``ConflictFreeOracle``, a central planner
that sees every edge's request at once: a bound to compare against, not a deployable method.

**Conflicts.** When k > 1 edges pick the same client in one round, that is C(k, 2) conflicts
(once per pair of edges). The setting is RL-CRP's (Conflict-Aware Client Selection for
Multi-Server Federated Learning, arXiv:2602.02458): servers with overlapping coverage that pick
the same client compete for its bandwidth, which causes time-outs or failed training. The paper's
text we could read does not say what exactly happens to such a client; both rules below are OUR
reconstruction (``CONFLICT_RULES``), chosen by configuration:

- ``share``: the client serves every edge that picked it, its bandwidth split 1/k per transfer
  (``population.timing(..., share=1/k)``); it trains once, and its update is aggregated once, at
  the lowest-id picker, so no update is counted twice;
- ``fail``: the client serves one picker, drawn uniformly with the round's generator; the other
  pickers lose it and receive nothing from it.

**Observations are sparse.** After a round, an edge observes only the clients it picked itself
(``edge_observations``): their status and simulated time, ``conflict_lost`` for a client it
lost under ``fail``, and how many other edges contended for each of them (``contenders``: under
``share`` the client served them all at a fraction of its bandwidth; under ``fail`` it turned
them away; either way the client knows, and we let it tell the edge, OUR reconstruction of "a
server observes the conflict events of the clients it picked"). It never sees clients picked
only by other edges. This sparse, per-server record
is what RL-CRP's conflict-risk HMM consumes; strategies get the whole round (``edge_id`` None).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgeray.errors import UserError
from pipelines.population import PopulationView, timing

OUTCOME_STATUSES = ("ok", "failed", "dropout", "straggler", "surplus", "conflict_lost")


@dataclass(frozen=True)
class ClientOutcome:
    client_id: int
    edge_id: int | None      # the edge that picked it (None: picked by the strategy's global selection)
    status: str              # one of OUTCOME_STATUSES
    sim_s: float             # the client's simulated time this round (0.0 when it never ran)
    contenders: int = 0      # other edges that picked it this round (what an edge learns of a conflict)

    def __post_init__(self):
        if self.status not in OUTCOME_STATUSES:
            raise ValueError(f"client {self.client_id}: status {self.status!r} is not one of "
                             f"{', '.join(OUTCOME_STATUSES)}")


@dataclass(frozen=True)
class RoundObservation:
    round: int
    edge_id: int | None                  # whose observation (None: the whole round, what strategies get)
    outcomes: tuple[ClientOutcome, ...]  # for an edge: only the clients THIS edge picked (it sees nothing else)
    edge_round_s: float                  # the edge's simulated round time (the whole round's for edge_id None)


@dataclass(frozen=True)
class SelectionRequest:
    """One edge's question in one round."""

    edge_id: int
    candidates: tuple[int, ...]             # available clients this edge covers (sorted)
    num: int                                # how many it should pick
    history: tuple[RoundObservation, ...]   # this edge's own past observations, oldest first

    def __post_init__(self):
        if self.num < 0:
            raise ValueError(f"edge {self.edge_id}: num={self.num} must be >= 0")
        if any(a >= b for a, b in zip(self.candidates, self.candidates[1:])):
            raise ValueError(f"edge {self.edge_id}: candidates must be sorted and distinct")


class Selector:
    """Base: per-edge, decentralized. ``select_all`` asks ``select`` for each edge with its own
    seeded generator and checks every answer. A subclass names its settings and their defaults
    in ``defaults``; ``self.settings`` holds them, overridden by the keyword arguments."""

    name = "base"
    defaults: dict[str, Any] = {}

    def __init__(self, population: PopulationView, seed: int, **settings):
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise UserError(f"selector {self.name!r} has no setting {', '.join(map(repr, unknown))}; "
                            f"its settings: {', '.join(self.defaults) or 'none'}")
        self.population, self.seed = population, seed
        self.settings = {**self.defaults, **settings}

    def select(self, request: SelectionRequest, rnd: int, rng: np.random.Generator) -> list[int]:
        raise NotImplementedError

    def select_all(self, requests: list[SelectionRequest], rnd: int) -> dict[int, list[int]]:
        """Edge id -> its picks (sorted), each edge answered on its own."""
        _check_distinct_edges(requests)
        return {r.edge_id: self._checked(r, self.select(r, rnd, np.random.default_rng([self.seed, rnd, r.edge_id, 17])))
                for r in requests}

    def _checked(self, request: SelectionRequest, picks: list[int]) -> list[int]:
        """The picks as sorted ints, or ValueError if they are not a subset of at most ``num`` candidates."""
        picks = [int(c) for c in picks]
        where = f"selector {self.name!r} ({type(self).__name__}) for edge {request.edge_id}"
        if len(set(picks)) != len(picks):
            raise ValueError(f"{where} picked a client twice: {sorted(picks)}")
        if len(picks) > request.num:
            raise ValueError(f"{where} picked {len(picks)} clients, more than num={request.num}")
        outside = sorted(set(picks) - set(request.candidates))
        if outside:
            raise ValueError(f"{where} picked clients that are not its candidates: {outside[:10]}")
        return sorted(picks)


def _check_distinct_edges(requests: list[SelectionRequest]) -> None:
    edges = [r.edge_id for r in requests]
    if len(set(edges)) != len(edges):
        raise ValueError(f"one request per edge expected, got edges {edges}")


class RandomSelector(Selector):
    """Each edge picks ``num`` of its candidates uniformly (all of them when it has no more)."""

    name = "random"

    def select(self, request, rnd, rng):
        if request.num >= len(request.candidates):
            return list(request.candidates)
        return rng.choice(request.candidates, size=request.num, replace=False).tolist()


def estimated_round_s(population: PopulationView, local_epochs: float, model_bytes: float) -> np.ndarray:
    """Each client's round time from its static profile (no fading, no conflicts), through
    ``population.timing``: work = local examples · ``local_epochs``, ``model_bytes`` down and up."""
    return np.array([timing(p, size * local_epochs, model_bytes, model_bytes).total_s
                     for p, size in zip(population.profiles, population.sizes)])


class GreedyLatencySelector(Selector):
    """Each edge picks the ``num`` candidates with the lowest estimated round time, ties by client
    id. The estimate uses the static profile only (no fading, no conflicts), through the one
    formula of simulated time, ``population.timing``: work = local examples · ``local_epochs``,
    and ``model_bytes`` both down and up."""

    name = "greedy-latency"
    defaults = {"local_epochs": 1, "model_bytes": 0.0}

    def __init__(self, population: PopulationView, seed: int, **settings):
        super().__init__(population, seed, **settings)
        epochs, model_bytes = self.settings["local_epochs"], self.settings["model_bytes"]
        if not epochs > 0 or not model_bytes >= 0:
            raise UserError(f"selector {self.name!r}: local_epochs={epochs} must be > 0 and "
                            f"model_bytes={model_bytes} >= 0")
        self.estimate_s = estimated_round_s(population, epochs, model_bytes)

    def select(self, request, rnd, rng):
        candidates = np.asarray(request.candidates, dtype=np.int64)
        order = np.lexsort((candidates, self.estimate_s[candidates]))  # by estimate, then by id
        return candidates[order[:request.num]].tolist()


class ConflictFreeOracle(Selector):
    """A central planner that sees every edge's request and gives each client to at most one edge,
    so there are no conflicts. A bound to compare against, NOT deployable: real edge servers
    decide without knowing each other's picks. Edges take turns, round-robin in an order shuffled
    per round, each taking one client uniformly among its candidates nobody has taken yet, until
    each has ``num`` or runs out. Our construction (RL-CRP names no oracle)."""

    name = "oracle"

    def select(self, request, rnd, rng):
        raise NotImplementedError("the oracle plans all edges at once: call select_all")

    def select_all(self, requests: list[SelectionRequest], rnd: int) -> dict[int, list[int]]:
        _check_distinct_edges(requests)
        rng = np.random.default_rng([self.seed, rnd, 23])
        taken: set[int] = set()
        picks: dict[int, list[int]] = {r.edge_id: [] for r in requests}
        turn = [requests[i] for i in rng.permutation(len(requests))]
        while turn:
            still = []
            for r in turn:
                free = [c for c in r.candidates if c not in taken]
                if len(picks[r.edge_id]) >= r.num or not free:
                    continue
                client = free[int(rng.integers(len(free)))]
                taken.add(client)
                picks[r.edge_id].append(client)
                still.append(r)
            turn = still
        return {r.edge_id: self._checked(r, picks[r.edge_id]) for r in requests}


# ----------------------------------------------------------------------------- conflicts

CONFLICT_RULES = ("share", "fail")


@dataclass(frozen=True)
class Resolution:
    aggregate_at: dict[int, int]            # client -> the one edge whose partial aggregate gets its update
    share: dict[int, float]                 # client -> fraction of its bandwidth per transfer (1/k | 1.0)
    served_by: dict[int, tuple[int, ...]]   # client -> edges it sends to (all pickers | the one winner)
    lost: dict[int, tuple[int, ...]]        # edge -> clients it picked but lost ("fail" only); every edge present
    conflicts: int                          # sum over clients of C(k, 2), k = edges that picked it


def resolve_conflicts(picks: dict[int, list[int]], rule: str, rng: np.random.Generator) -> Resolution:
    """Who serves whom when several edges picked the same client (rules: module docstring).
    Under ``fail`` the winner of each contested client is drawn from ``rng``, clients in id order."""
    if rule not in CONFLICT_RULES:
        raise ValueError(f"unknown conflict rule {rule!r}; allowed: {', '.join(CONFLICT_RULES)}")
    pickers: dict[int, list[int]] = defaultdict(list)
    for edge in sorted(picks):
        if len(set(picks[edge])) != len(picks[edge]):
            raise ValueError(f"edge {edge} picked a client twice: {sorted(picks[edge])}")
        for client in picks[edge]:
            pickers[int(client)].append(edge)
    aggregate_at, share, served_by = {}, {}, {}
    lost: dict[int, list[int]] = {edge: [] for edge in picks}
    conflicts = 0
    for client in sorted(pickers):
        edges = pickers[client]  # ascending edge ids
        k = len(edges)
        conflicts += k * (k - 1) // 2
        if rule == "share":
            aggregate_at[client], share[client], served_by[client] = edges[0], 1.0 / k, tuple(edges)
        else:
            winner = edges[int(rng.integers(k))] if k > 1 else edges[0]
            aggregate_at[client], share[client], served_by[client] = winner, 1.0, (winner,)
            for edge in edges:
                if edge != winner:
                    lost[edge].append(client)
    return Resolution(aggregate_at, share, served_by, {e: tuple(c) for e, c in lost.items()}, conflicts)


def edge_observations(rnd: int, picks: dict[int, list[int]], outcomes: dict[int, ClientOutcome],
                      edge_round_s: dict[int, float], resolution: Resolution) -> dict[int, RoundObservation]:
    """What each edge learns of round ``rnd``: only the clients it picked, in id order, each with
    its outcome (re-labelled with this edge's id; under ``share`` every picker sees the client's
    one outcome), or ``conflict_lost`` with sim_s 0.0 for a client it lost under ``fail``; each
    with its ``contenders`` (the other edges that picked it). An edge missing from
    ``edge_round_s`` ran nothing: round time 0.0."""
    pickers: dict[int, int] = defaultdict(int)
    for edge_picks in picks.values():
        for client in edge_picks:
            pickers[int(client)] += 1
    observations = {}
    for edge in sorted(picks):
        lost = set(resolution.lost.get(edge, ()))
        seen = []
        for client in sorted(int(c) for c in picks[edge]):
            contenders = pickers[client] - 1
            if client in lost:
                seen.append(ClientOutcome(client, edge, "conflict_lost", 0.0, contenders))
            elif client in outcomes:
                seen.append(replace(outcomes[client], edge_id=edge, contenders=contenders))
            else:
                raise ValueError(f"round {rnd}: no outcome for client {client}, which edge {edge} picked and kept")
        observations[edge] = RoundObservation(rnd, edge, tuple(seen), float(edge_round_s.get(edge, 0.0)))
    return observations
