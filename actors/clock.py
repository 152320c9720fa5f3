"""Virtual clock: simulated device heterogeneity, deadlines, over-selection and dropouts.

No Ray, no sleeping: every client has a profile {compute speed, uplink, downlink,
availability}, and a round's simulated time is computed, not waited for:

    client time  = download_bytes / downlink + work_examples / compute_speed + upload_bytes / uplink
    round time   = finish time of the last client the server keeps (or the deadline when fewer
                   than the target finished in time) + the slowest edge server's upload

Per round (all draws seeded by (seed, round), so a resumed run draws the same):
1. availability: client c is online with probability ``availability[c]``;
2. the strategy invites ``ceil(target * over_selection)`` of the online clients;
3. each invited client drops out mid-round with probability ``dropout_prob``;
4. of the rest, those whose predicted time exceeds the deadline are stragglers; the server keeps
   the ``target`` earliest finishers and does not wait for (or train) anyone else.

Profiles are sampled from seeded log-normal distributions (the defaults are our choice, loosely
after FedScale's device traces: a few-fold spread in speed and bandwidth) or loaded from a CSV /
JSON trace with columns client_id, compute_speed, uplink_mbps, downlink_mbps, availability and
optionally resource_class.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeray.errors import UserError

TRACE_COLUMNS = ("client_id", "compute_speed", "uplink_mbps", "downlink_mbps", "availability")


@dataclass
class ClientProfile:
    client_id: int
    compute_speed: float      # examples per simulated second
    uplink_mbps: float
    downlink_mbps: float
    availability: float       # probability of being online in a round
    resource_class: str = "default"


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


@dataclass
class RoundPlan:
    kept: list[int]                                 # clients to train and aggregate
    timings: dict[int, ClientTiming] = field(default_factory=dict)
    sim_time_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.timings.values())


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


class VirtualClock:
    def __init__(self, profiles: list[ClientProfile], seed: int, *, deadline_s: float | None = None,
                 over_selection: float = 1.0, dropout_prob: float = 0.0):
        self.profiles = profiles
        self.seed = seed
        self.deadline_s = deadline_s
        self.over_selection = over_selection
        self.dropout_prob = dropout_prob
        self.now_s = 0.0

    def _rng(self, rnd: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, rnd, stream])

    def available(self, rnd: int) -> list[int]:
        draw = self._rng(rnd, 1).random(len(self.profiles))
        return [p.client_id for p in self.profiles if draw[p.client_id] < p.availability]

    def invite_count(self, target: int) -> int:
        return math.ceil(target * self.over_selection)

    def timing(self, cid: int, work_examples: float, down_bytes: float, up_bytes: float) -> ClientTiming:
        p = self.profiles[cid]
        return ClientTiming(cid, down_bytes * 8 / (p.downlink_mbps * 1e6), work_examples / p.compute_speed,
                            up_bytes * 8 / (p.uplink_mbps * 1e6))

    def plan_round(self, rnd: int, invited: list[int], target: int, work: dict[int, float],
                   down_bytes: dict[int, float], up_bytes: dict[int, float]) -> RoundPlan:
        """Who drops out, who is too slow, and which ``target`` clients the server keeps."""
        drops = self._rng(rnd, 2).random(len(self.profiles))
        timings = {c: self.timing(c, work[c], down_bytes[c], up_bytes[c]) for c in invited}
        finishers = []
        for c in invited:
            if drops[c] < self.dropout_prob:
                timings[c].status = "dropout"
            elif self.deadline_s is not None and timings[c].total_s > self.deadline_s:
                timings[c].status = "straggler"
            else:
                finishers.append(c)
        finishers.sort(key=lambda c: (timings[c].total_s, c))
        for c in finishers[target:]:
            timings[c].status = "surplus"
        kept = sorted(finishers[:target])
        return RoundPlan(kept, timings, self.round_time([timings[c] for c in kept], target))

    def round_time(self, kept: list[ClientTiming], target: int, edge_upload_s: float = 0.0) -> float:
        """The server closes the round when `target` clients reported, else at the deadline."""
        last = max((t.total_s for t in kept), default=0.0)
        if len(kept) < target and self.deadline_s is not None:
            last = self.deadline_s
        return last + edge_upload_s

    def advance(self, seconds: float) -> float:
        self.now_s += seconds
        return self.now_s
