"""The client population, on plain data (no Ray): who the clients are and what strategies may
know of them.

- ``ClientProfile``: compute speed (examples per simulated second), uplink / downlink, availability
  and resource class of one virtual client; sampled from seeded log-normal distributions (the
  defaults are our choice, loosely after FedScale's device traces: a few-fold spread in speed
  and bandwidth) or loaded from a CSV / JSON trace with columns client_id, compute_speed,
  uplink_mbps, downlink_mbps, availability and optionally resource_class.
- ``PopulationView``: the read-only view a strategy gets in ``configure_round`` (profiles, local
  data sizes), so it can set per-client budgets from device profiles.
- Links per round (``LinkModel``): ``static`` (the profile's rates), ``rayleigh`` (block fading:
  each (round, client) multiplies the profile's rates by a power gain |h|² ~ Exp(1), the Rayleigh
  channel's, floored at ``min_gain``; a rate is taken proportional to the gain, our simplification
  of Shannon's log(1 + SNR·|h|²) in the low-SNR regime), ``trace`` (per-round rates from a file) or
  ``markov`` (a Gilbert-Elliott channel, OUR reconstruction for RL-CRP's contested setting: each
  client's link is in a good state (the profile's rates) or a bad one (rates x ``min_gain``) and
  switches per round with ``MARKOV_P_BAD`` good -> bad and ``MARKOV_P_GOOD`` bad -> good, so a
  client slow in recent rounds is likely still slow; the chain of client c is seeded by (seed, c)).
  Every draw is seeded by (seed, round, client) or (seed, client), so a resumed run sees the same links.
- Coverage geometry: ``modulo_coverage`` (client c's home edge is c mod S, plus ``overlap`` extra
  edges drawn with a seed) and ``disc_coverage`` (edges and clients placed in the unit square;
  an edge covers the clients within ``radius``, and every client at least by its nearest edge).
- ``timing(profile, work, down_bytes, up_bytes, link, share)``: THE formula of simulated time,
  used by the runtime's clock and by RL environments::

      download_s = down_bytes·8 / (down_mbps·1e6·share)   compute_s = work / compute_speed
      upload_s   = up_bytes·8   / (up_mbps·1e6·share)      total_s = download_s + compute_s + upload_s

  ``share`` is the fraction of the client's link it gives this transfer (1/k when k edge servers
  picked it and the conflict rule shares its bandwidth).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeray.errors import UserError

TRACE_COLUMNS = ("client_id", "compute_speed", "uplink_mbps", "downlink_mbps", "availability")


@dataclass(frozen=True)
class ClientProfile:
    client_id: int
    compute_speed: float      # examples per simulated second
    uplink_mbps: float
    downlink_mbps: float
    availability: float       # probability of being online in a round
    resource_class: str = "default"


@dataclass(frozen=True)
class Link:
    """A client's rates in one round."""

    up_mbps: float
    down_mbps: float


@dataclass
class ClientTiming:
    client_id: int
    download_s: float
    compute_s: float
    upload_s: float
    status: str = "ok"        # ok | dropout | straggler | surplus

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s


def timing(profile: ClientProfile, work: float, down_bytes: float, up_bytes: float, link: Link | None = None,
           share: float = 1.0) -> ClientTiming:
    """Simulated download, compute and upload time of one client (see the module docstring)."""
    link = link or Link(profile.uplink_mbps, profile.downlink_mbps)
    return ClientTiming(profile.client_id, down_bytes * 8 / (link.down_mbps * 1e6 * share),
                        work / profile.compute_speed, up_bytes * 8 / (link.up_mbps * 1e6 * share))


LINK_MODELS = ("static", "rayleigh", "trace", "markov")
MARKOV_P_BAD = 0.1    # good -> bad per round (markov links) [R]
MARKOV_P_GOOD = 0.3   # bad -> good per round: bad spells of 1 / 0.3 = 3.3 rounds, a quarter of all rounds [R]


class LinkModel:
    """Each client's rates per round, drawn per (seed, round, client)."""

    def __init__(self, profiles: list[ClientProfile] | tuple[ClientProfile, ...], seed: int, kind: str = "static",
                 min_gain: float = 0.05, trace: dict[tuple[int, int], Link] | None = None):
        if kind not in LINK_MODELS:
            raise UserError(f"link model {kind!r} is not one of {', '.join(LINK_MODELS)}")
        if kind == "trace" and not trace:
            raise UserError("the trace link model needs a link trace (clock.link_trace)")
        self.profiles, self.seed, self.kind, self.min_gain, self.trace = profiles, seed, kind, min_gain, trace or {}
        self._chains: dict[int, np.ndarray] = {}   # markov: client -> bad-state flags of rounds 0..len-1

    def link(self, rnd: int, client_id: int) -> Link:
        p = self.profiles[client_id]
        if self.kind == "static":
            return Link(p.uplink_mbps, p.downlink_mbps)
        if self.kind == "markov":
            gain = self.min_gain if self.bad(rnd, client_id) else 1.0
            return Link(p.uplink_mbps * gain, p.downlink_mbps * gain)
        if self.kind == "trace":
            return self.trace.get((rnd, client_id)) or self.trace.get((-1, client_id)) or \
                Link(p.uplink_mbps, p.downlink_mbps)
        up_gain, down_gain = np.maximum(np.random.default_rng([self.seed, rnd, client_id, 11]).exponential(1.0, 2),
                                        self.min_gain)
        return Link(p.uplink_mbps * float(up_gain), p.downlink_mbps * float(down_gain))

    def bad(self, rnd: int, client_id: int) -> bool:
        """Markov links: whether client ``client_id``'s link is in the bad state in round ``rnd``
        (round 0 starts in the chain's stationary distribution)."""
        chain = self._chains.get(client_id)
        if chain is None or rnd >= len(chain):
            length = max(64, 2 * (rnd + 1))
            # one uniform per round from (seed, client): the same prefix whatever the length drawn
            u = np.random.default_rng([self.seed, client_id, 13]).random(length)
            chain = np.empty(length, dtype=bool)
            chain[0] = u[0] < MARKOV_P_BAD / (MARKOV_P_BAD + MARKOV_P_GOOD)
            for r in range(1, length):
                chain[r] = u[r] >= MARKOV_P_GOOD if chain[r - 1] else u[r] < MARKOV_P_BAD
            self._chains[client_id] = chain
        return bool(chain[rnd])


LINK_TRACE_COLUMNS = ("round", "client_id", "uplink_mbps", "downlink_mbps")


def load_link_trace(path: str | Path) -> dict[tuple[int, int], Link]:
    """Per-round rates from a CSV with columns round, client_id, uplink_mbps, downlink_mbps
    (round -1: the client's rates in every round not listed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"link trace not found: {path}")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    links = {}
    for i, row in enumerate(rows):
        missing = [c for c in LINK_TRACE_COLUMNS if c not in row]
        if missing:
            raise UserError(f"link trace {path} row {i} lacks {', '.join(missing)}; "
                            f"columns needed: {', '.join(LINK_TRACE_COLUMNS)}")
        try:
            link = Link(float(row["uplink_mbps"]), float(row["downlink_mbps"]))
            key = (int(row["round"]), int(row["client_id"]))
        except ValueError as exc:
            raise UserError(f"link trace {path} row {i}: {exc}") from None
        if min(link.up_mbps, link.down_mbps) <= 0:
            raise UserError(f"link trace {path} row {i}: rates must be > 0")
        links[key] = link
    return links


COVERAGES = ("modulo", "disc")


def modulo_coverage(num_clients: int, num_edges: int, overlap: int, seed: int) -> list[list[int]]:
    """Client c's home edge is c mod S, plus ``overlap`` other edges drawn with a seed (home first)."""
    if overlap >= num_edges and num_edges > 1:
        raise UserError(f"runtime.edge_overlap={overlap} must be < runtime.num_edge_servers={num_edges}")
    rng = np.random.default_rng([seed, 104729])
    coverage = []
    for cid in range(num_clients):
        home = cid % num_edges
        others = [e for e in range(num_edges) if e != home]
        extra = rng.choice(others, size=overlap, replace=False).tolist() if overlap and others else []
        coverage.append([home, *sorted(extra)])
    return coverage


def disc_coverage(num_clients: int, num_edges: int, radius: float, seed: int) -> list[list[int]]:
    """Edges on a jittered grid and clients uniformly in the unit square; an edge covers the clients
    within ``radius`` (a larger radius, more overlap). Each client's nearest edge comes first (its
    home) and covers it even when it is farther than ``radius``."""
    if radius <= 0:
        raise UserError(f"runtime.coverage_radius={radius} must be > 0")
    rng = np.random.default_rng([seed, 15485863])
    side = int(np.ceil(np.sqrt(num_edges)))
    cells = (np.stack(np.divmod(np.arange(num_edges), side), axis=1) + 0.5) / side
    edges = np.clip(cells + rng.uniform(-0.1, 0.1, cells.shape) / side, 0, 1)
    clients = rng.uniform(0, 1, (num_clients, 2))
    dist = np.linalg.norm(clients[:, None, :] - edges[None, :, :], axis=2)
    coverage = []
    for c in range(num_clients):
        order = np.argsort(dist[c], kind="stable")
        coverage.append([int(order[0]), *[int(e) for e in order[1:] if dist[c, e] <= radius]])
    return coverage


@dataclass(frozen=True)
class PopulationView:
    """What a strategy may know of the clients: read-only (tuples of frozen profiles)."""

    profiles: tuple[ClientProfile, ...]
    sizes: tuple[int, ...]           # local training examples per client

    def __len__(self) -> int:
        return len(self.profiles)

    @property
    def resource_classes(self) -> tuple[str, ...]:
        return tuple(p.resource_class for p in self.profiles)


def sample_profiles(num_clients: int, seed: int, *, speed_median: float = 500.0, speed_sigma: float = 0.5,
                    uplink_median: float = 5.0, downlink_median: float = 20.0, bandwidth_sigma: float = 0.7,
                    min_availability: float = 1.0, resource_classes: dict[str, float] | None = None
                    ) -> list[ClientProfile]:
    """Seeded profiles; ``resource_classes`` maps class name -> fraction of clients."""
    rng = np.random.default_rng([seed, 7919])
    speeds = speed_median * rng.lognormal(0.0, speed_sigma, num_clients)
    up = uplink_median * rng.lognormal(0.0, bandwidth_sigma, num_clients)
    down = downlink_median * rng.lognormal(0.0, bandwidth_sigma, num_clients)
    avail = rng.uniform(min_availability, 1.0, num_clients) if min_availability < 1 else np.ones(num_clients)
    classes = ["default"] * num_clients
    if resource_classes:
        names = list(resource_classes)
        probs = np.array([resource_classes[n] for n in names], dtype=float)
        classes = [names[i] for i in rng.choice(len(names), size=num_clients, p=probs / probs.sum())]
    return [ClientProfile(i, float(speeds[i]), float(up[i]), float(down[i]), float(avail[i]), classes[i])
            for i in range(num_clients)]


def load_trace(path: str | Path, num_clients: int) -> list[ClientProfile]:
    """Profiles from a CSV or JSON trace; the trace must cover every client id 0..num_clients-1."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"client trace not found: {path}")
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
    elif path.suffix == ".csv":
        with path.open() as f:
            rows = list(csv.DictReader(f))
    else:
        raise UserError(f"client trace {path} must be .csv or .json")
    profiles = {}
    for i, row in enumerate(rows):
        missing = [c for c in TRACE_COLUMNS if c not in row]
        if missing:
            raise UserError(f"client trace {path} row {i} lacks {', '.join(missing)}; "
                            f"columns needed: {', '.join(TRACE_COLUMNS)}")
        try:
            p = ClientProfile(int(row["client_id"]), float(row["compute_speed"]), float(row["uplink_mbps"]),
                              float(row["downlink_mbps"]), float(row["availability"]),
                              str(row.get("resource_class") or "default"))
        except ValueError as exc:
            raise UserError(f"client trace {path} row {i}: {exc}") from None
        if min(p.compute_speed, p.uplink_mbps, p.downlink_mbps) <= 0 or not 0 <= p.availability <= 1:
            raise UserError(f"client trace {path} row {i}: speeds must be > 0 and availability in [0, 1]")
        profiles[p.client_id] = p
    absent = [c for c in range(num_clients) if c not in profiles]
    if absent:
        raise UserError(f"client trace {path} has no row for {len(absent)} of {num_clients} clients "
                        f"(first: {absent[:5]})")
    return [profiles[c] for c in range(num_clients)]


def save_trace(profiles: list[ClientProfile], path: str | Path) -> None:
    Path(path).write_text(json.dumps([asdict(p) for p in profiles]))
