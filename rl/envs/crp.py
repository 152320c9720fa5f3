"""Multi-server FL client selection as a simulation (RL-CRP's environment; the RLlib wrapper is
`rl.envs.crp_rllib`). No Ray: built on `pipelines.population` and `pipelines.selection` only,
the same profiles, link model, coverage geometry, timing formula and conflict rule as the FL
runtime (actors/aggregator.py), so a policy trained here selects in an FL run of the same
population.

One round, as the FL runtime plays it with `clock.deadline_s` unset and no dropouts (the parts of
the clock this simulation leaves out):
  1. availability: client c is online with probability `availability[c]`, drawn per (seed, round)
     as the runtime's clock draws it;
  2. every edge server picks k = ceil(clients_per_round / num_edges) of the online clients it
     covers (the runtime's per-edge count with over_selection 1), each from its own observations;
  3. `resolve_conflicts` with `conflict_rule` (share: a client picked by j edges gives each 1/j of
     its bandwidth; fail: it serves one, the others lose it), the runtime's generator;
  4. client time `population.timing(profile, size * local_epochs, model_bytes, model_bytes,
     link(round, c), share)`; edge m's latency T_m = the slowest client that served m (0 if none),
     the runtime's `edge_round_s`;
  5. each edge observes only its own picks (`edge_observations`: status, time, contenders).

Reward of edge m for a round [R: the paper's exact form was not recovered; notes/rl.md A1 step 7]:
    r_m = - latency_weight * T_m / T_ref - conflict_weight * conflicts_m + fairness_weight * F_m
T_ref = the population's median static round-time estimate; conflicts_m = the other edges that
picked each of m's picks, summed (pairs involving m); F_m by `fairness`:
    jain  = the rise this round of Jain's index (sum c)^2 / (n sum c^2) over the participation
            counts c (picks by any edge) of the clients m covers (its sum over an episode is the
            index reached: long-term participation);
    bonus = mean over m's picks of 1 / (1 + c_i), c_i before this round;
    none  = 0.

When the conflict term is paid, `conflict_credit` [R, our reconstruction; the RLlib env only]:
    round = all of r_m at the round's last pick step (k steps per round), so the k picks and,
            through the discount, the earlier rounds share the blame of a conflict;
    pick  = the conflict term per pick: at pick step j, edge m pays conflict_weight for each other
            edge that picked one of m's clients with one of them picking it at step j (a pair is
            charged once, to both its edges, at the later of its two picks); the rest of r_m at the
            round's last step. An episode's sum of rewards is the same under both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeray.config import param
from edgeray.errors import UserError
from pipelines.population import (COVERAGES, LinkModel, PopulationView, disc_coverage, load_trace, modulo_coverage,
                                  sample_profiles, timing)
from pipelines.selection import (CONFLICT_RULES, ClientOutcome, RoundObservation, SelectionRequest, edge_observations,
                                 estimated_round_s, resolve_conflicts)
from pipelines.selection.conflict_risk import CODINGS, RiskSettings
from pipelines.selection.crp import HOME_RULES, EdgeTracker, client_scales

FAIRNESS = ("jain", "bonus", "none")
CONFLICT_CREDITS = ("round", "pick")


@dataclass
class CRPEnvSection:
    """The population, the edges and the reward of RL-CRP's environment (rl.envs.crp)."""
    name: str = param("crp", "environment name (part of the run name)")
    seed: int = param(0, "the FL run's seed: profiles (when sampled), coverage and per-round draws", ge=0)
    num_clients: int = param(40, "clients (data.num_clients of the FL run)", ge=2)
    num_edges: int = param(4, "edge servers, one agent each (runtime.num_edge_servers)", ge=2)
    coverage: str = param("modulo", "runtime.coverage of the FL run", choices=COVERAGES)
    edge_overlap: int = param(1, "runtime.edge_overlap (coverage=modulo)", ge=0)
    coverage_radius: float = param(0.5, "runtime.coverage_radius (coverage=disc)", gt=0)
    trace: str | None = param(None, "client profiles to train on: a run's client_profiles.json (or any "
                              "clock.trace CSV/JSON); unset: sampled as the FL runtime samples them")
    speed_median: float = param(500.0, "clock.speed_median (sampled profiles)", gt=0)
    speed_sigma: float = param(0.5, "clock.speed_sigma (sampled profiles)", ge=0)
    uplink_median_mbps: float = param(5.0, "clock.uplink_median_mbps (sampled profiles)", gt=0)
    downlink_median_mbps: float = param(20.0, "clock.downlink_median_mbps (sampled profiles)", gt=0)
    bandwidth_sigma: float = param(0.7, "clock.bandwidth_sigma (sampled profiles)", ge=0)
    min_availability: float = param(1.0, "clock.min_availability (sampled profiles)", ge=0, le=1)
    examples_per_client: int = param(600, "local examples of every client, unless sizes_file is given", ge=1)
    sizes_file: str | None = param(None, "per-client local examples: a JSON list, or a run's label_histogram.npy")
    local_epochs: float = param(1.0, "strategy.local_epochs: work = examples x local_epochs", gt=0)
    model_bytes: float = param(1.0e6, "bytes of the model sent down and of the update sent up", ge=0)
    link_model: str = param("static", "clock.link_model: static, rayleigh, or markov (good / bad link states that "
                            "persist over rounds; pipelines/population.py) [R]",
                            choices=("static", "rayleigh", "markov"))
    link_min_gain: float = param(0.05, "clock.link_min_gain (rayleigh: the fade floor; markov: the bad state's rate "
                                 "fraction)", gt=0, le=1)
    clients_per_round: int = param(8, "strategy.clients_per_round; each edge picks ceil(this / num_edges)", ge=1)
    conflict_rule: str = param("share", "selection.conflict_rule", choices=CONFLICT_RULES)
    rounds: int = param(30, "FL rounds per episode", ge=2)
    latency_weight: float = param(1.0, "reward weight of T_m / T_ref [R]", ge=0)
    conflict_weight: float = param(2.0, "reward weight beta of conflicts_m [R]", ge=0)
    fairness_weight: float = param(2.0, "reward weight eta of the fairness term [R]", ge=0)
    fairness: str = param("jain", "fairness term: rise of Jain's index over the edge's clients, a "
                          "1/(1+count) bonus, or none [R]", choices=FAIRNESS)
    conflict_credit: str = param("round", "when the conflict term is paid: at the round's end, or at the pick "
                                 "step that made the conflict (module docstring) [R]", choices=CONFLICT_CREDITS)
    coverage_features: bool = param(False, "per-client home / overlap features from the coverage geometry "
                                    "(pipelines/selection/crp.py FEATURES) [R]")
    home_rule: str = param("first", "which server the home feature marks: the first edge a client's coverage lists "
                           "(first), or, for a client covered by one server only, that server (exclusive: shared "
                           "clients have no owner, the contested setting) [R]", choices=HOME_RULES)
    observed_feature: bool = param(False, "per-client feature: the client's simulated time when this server last "
                                   "picked it (pipelines/selection/crp.py FEATURES) [R]")
    use_crp: bool = param(True, "conflict risk in the observation (false: the no-CRP ablation)")
    risk_coding: str = param("three_symbol", "sparse coding of the HMM (pipelines/selection/conflict_risk.py) [R]",
                             choices=CODINGS)
    risk_states: int = param(2, "hidden states K of the conflict-risk HMM", ge=1)
    risk_lag: int = param(2, "d: an outcome is known d rounds later", ge=1)
    risk_refit_every: int = param(5, "R: refit the HMM every R known rounds", ge=1)
    risk_iters: int = param(30, "Baum-Welch iterations per fit", ge=1)
    stale_rounds: int = param(20, "staleness feature: rounds since the last pick / this, capped at 1 [R]", ge=1)

    def validate(self) -> None:
        if self.coverage == "modulo" and self.edge_overlap >= self.num_edges:
            raise UserError(f"env.edge_overlap={self.edge_overlap} must be < env.num_edges={self.num_edges}")

    def risk(self) -> RiskSettings:
        return RiskSettings(self.risk_coding, self.risk_states, self.risk_lag, self.risk_refit_every, self.risk_iters)

    @property
    def picks_per_edge(self) -> int:
        return math.ceil(self.clients_per_round / self.num_edges)


def load_sizes(path: str | Path, num_clients: int) -> list[int]:
    """Local examples per client from a JSON list or a run's label_histogram.npy (row sums)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"env.sizes_file not found: {path}")
    try:
        sizes = np.load(path).sum(axis=1) if path.suffix == ".npy" else np.asarray(json.loads(path.read_text()))
        sizes = [int(s) for s in np.asarray(sizes).ravel()]
    except (ValueError, OSError, TypeError) as exc:
        raise UserError(f"env.sizes_file {path}: {exc}") from None
    if len(sizes) != num_clients or min(sizes) < 1:
        raise UserError(f"env.sizes_file {path} must give {num_clients} sizes >= 1, got {len(sizes)}")
    return sizes


@dataclass
class RoundResult:
    round: int
    picks: dict[int, list[int]]
    conflicts: int                      # pairs of edges that picked the same client, summed over clients
    edge_conflicts: dict[int, int]      # per edge: the other edges that picked its picks
    edge_round_s: dict[int, float]      # per edge: T_m
    observations: dict[int, RoundObservation]
    fairness: dict[int, float] = field(default_factory=dict)


class CRPSimulation:
    """The population and its edges; `play` runs one round of given picks. Every edge keeps its own
    `EdgeTracker` (what its policy observes) and its own history (what a `Selector` gets)."""

    def __init__(self, section: CRPEnvSection):
        section.validate()
        s = self.section = section
        if s.trace:
            profiles = load_trace(s.trace, s.num_clients)
        else:
            profiles = sample_profiles(s.num_clients, s.seed, speed_median=s.speed_median, speed_sigma=s.speed_sigma,
                                       uplink_median=s.uplink_median_mbps, downlink_median=s.downlink_median_mbps,
                                       bandwidth_sigma=s.bandwidth_sigma, min_availability=s.min_availability)
        sizes = load_sizes(s.sizes_file, s.num_clients) if s.sizes_file else [s.examples_per_client] * s.num_clients
        self.population = PopulationView(tuple(profiles), tuple(sizes))
        client_edges = modulo_coverage(s.num_clients, s.num_edges, s.edge_overlap, s.seed) if s.coverage == "modulo" \
            else disc_coverage(s.num_clients, s.num_edges, s.coverage_radius, s.seed)
        self.client_edges = client_edges
        self.coverage = {e: [c for c in range(s.num_clients) if e in client_edges[c]] for e in range(s.num_edges)}
        empty = [e for e, cov in self.coverage.items() if not cov]
        if empty:
            raise UserError(f"edge {empty[0]} covers no client (env.coverage={s.coverage}); raise "
                            f"env.coverage_radius or lower env.num_edges")
        self.k = s.picks_per_edge
        smallest = min(self.coverage, key=lambda e: len(self.coverage[e]))
        if self.k > len(self.coverage[smallest]):
            raise UserError(f"each edge picks k = ceil(env.clients_per_round / env.num_edges) = {self.k} clients, "
                            f"but edge {smallest} covers only {len(self.coverage[smallest])}")
        self.work = {c: sizes[c] * s.local_epochs for c in range(s.num_clients)}
        self.t_ref = float(np.median(estimated_round_s(self.population, s.local_epochs, s.model_bytes)))
        latency, size = client_scales(self.population, s.local_epochs, s.model_bytes)
        self.trackers = {e: EdgeTracker(e, cov, latency, size, risk=s.risk(), use_crp=s.use_crp,
                                        stale_rounds=s.stale_rounds, seed=s.seed,
                                        client_edges=client_edges if s.coverage_features else None,
                                        home_rule=s.home_rule, latency_ref=self.t_ref if s.observed_feature else None)
                         for e, cov in self.coverage.items()}
        self.start(s.seed)

    def start(self, draw_seed: int) -> None:
        """A new episode: round 1, empty records; per-round draws (availability, links, fail
        winners) seeded by `draw_seed` (the FL run's seed reproduces its draws)."""
        self.draw_seed = draw_seed
        self.links = LinkModel(list(self.population.profiles), draw_seed, self.section.link_model,
                               self.section.link_min_gain)
        self.round = 1
        self.histories: dict[int, list[RoundObservation]] = {e: [] for e in self.coverage}
        self.counts = np.zeros(self.section.num_clients)   # picks by any edge, per client
        for tracker in self.trackers.values():
            tracker.reset()

    def available(self, rnd: int) -> np.ndarray:
        """The runtime clock's availability draw of round `rnd`."""
        draw = np.random.default_rng([self.draw_seed, rnd, 1]).random(self.section.num_clients)
        return draw < np.array([p.availability for p in self.population.profiles])

    def requests(self, rnd: int) -> list[SelectionRequest]:
        """Each edge's question of round `rnd`, as the FL runtime asks it."""
        online = self.available(rnd)
        return [SelectionRequest(e, tuple(c for c in cov if online[c]), self.k, tuple(self.histories[e]))
                for e, cov in self.coverage.items()]

    def client_time(self, rnd: int, client: int, share: float = 1.0) -> float:
        s = self.section
        return timing(self.population.profiles[client], self.work[client], s.model_bytes, s.model_bytes,
                      self.links.link(rnd, client), share).total_s

    def play(self, picks: dict[int, list[int]]) -> RoundResult:
        """Run the current round with these picks (edge -> clients) and move to the next."""
        s, rnd = self.section, self.round
        resolution = resolve_conflicts(picks, s.conflict_rule, np.random.default_rng([self.draw_seed, rnd, 5]))
        served = {c: self.client_time(rnd, c, resolution.share[c]) for c in resolution.aggregate_at}
        edge_round_s = {e: max((t for c, t in served.items() if e in resolution.served_by[c]), default=0.0)
                        for e in self.coverage}
        outcomes = {c: ClientOutcome(c, resolution.aggregate_at[c], "ok", t) for c, t in served.items()}
        observations = edge_observations(rnd, picks, outcomes, edge_round_s, resolution)
        edge_conflicts = {e: sum(o.contenders for o in observations[e].outcomes) if e in observations else 0
                          for e in self.coverage}
        before = {e: jain(self.counts[cov]) for e, cov in self.coverage.items()}
        bonus = {e: float(np.mean([1 / (1 + self.counts[c]) for c in picks.get(e, [])])) if picks.get(e) else 0.0
                 for e in self.coverage}
        for edge_picks in picks.values():
            self.counts[list(edge_picks)] += 1
        fairness = {e: (jain(self.counts[cov]) - before[e]) if s.fairness == "jain" else
                    bonus[e] if s.fairness == "bonus" else 0.0 for e, cov in self.coverage.items()}
        for e, obs in observations.items():
            self.histories[e].append(obs)
            self.trackers[e].observe(obs)
        self.round += 1
        return RoundResult(rnd, picks, resolution.conflicts, edge_conflicts, edge_round_s, observations, fairness)

    def reward(self, result: RoundResult, edge: int, conflicts: bool = True) -> float:
        """r_m of the round; ``conflicts`` False leaves out the conflict term (paid per pick)."""
        s = self.section
        return (-s.latency_weight * result.edge_round_s[edge] / self.t_ref
                - (s.conflict_weight * result.edge_conflicts[edge] if conflicts else 0.0)
                + s.fairness_weight * result.fairness[edge])


def jain(counts: np.ndarray) -> float:
    """Jain's fairness index (sum c)^2 / (n sum c^2); 0 before anyone participated."""
    counts = np.asarray(counts, dtype=float)
    total = float(np.sum(counts ** 2))
    return float(np.sum(counts) ** 2 / (len(counts) * total)) if total > 0 else 0.0


def run_selector(sim: CRPSimulation, selector, rounds: int, draw_seed: int) -> list[RoundResult]:
    """One episode of `rounds` rounds in which a `pipelines.selection.Selector` picks (the
    baselines, and the exported RL-CRP policy through `RLCRPSelector`)."""
    sim.start(draw_seed)
    results = []
    for _ in range(rounds):
        picks = selector.select_all(sim.requests(sim.round), sim.round)
        results.append(sim.play(picks))
    return results


def episode_metrics(sim: CRPSimulation, results: list[RoundResult]) -> dict:
    """Conflicts per round, mean edge latency (over edges and rounds), Jain's index of all clients'
    participation at the end, mean per-round reward over edges."""
    return {"conflicts_per_round": float(np.mean([r.conflicts for r in results])),
            "latency_s": float(np.mean([t for r in results for t in r.edge_round_s.values()])),
            "round_latency_s": float(np.mean([max(r.edge_round_s.values()) for r in results])),
            "jain": jain(sim.counts),
            "reward": float(np.mean([sim.reward(r, e) for r in results for e in sim.coverage]))}
