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

Profiles (sampled or from a trace) are the population's: ``pipelines.population``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipelines.population import ClientProfile


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
