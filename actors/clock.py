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

from pipelines.population import ClientProfile, ClientTiming, Link, LinkModel, timing


@dataclass
class RoundPlan:
    kept: list[int]                                 # clients to train and aggregate
    timings: dict[int, ClientTiming] = field(default_factory=dict)
    sim_time_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.timings.values())


class VirtualClock:
    def __init__(self, profiles: list[ClientProfile], seed: int, *, deadline_s: float | None = None,
                 over_selection: float = 1.0, dropout_prob: float = 0.0, links: LinkModel | None = None):
        self.profiles = profiles
        self.links = links or LinkModel(profiles, seed)
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

    def link(self, rnd: int, cid: int) -> Link:
        return self.links.link(rnd, cid)

    def timing(self, rnd: int, cid: int, work_examples: float, down_bytes: float, up_bytes: float,
               share: float = 1.0) -> ClientTiming:
        """``pipelines.population.timing`` on client ``cid``'s link of round ``rnd``."""
        return timing(self.profiles[cid], work_examples, down_bytes, up_bytes, self.link(rnd, cid), share)

    def plan_round(self, rnd: int, invited: list[int], target: int, work: dict[int, float],
                   down_bytes: dict[int, float], up_bytes: dict[int, float],
                   share: dict[int, float] | None = None) -> RoundPlan:
        """Who drops out, who is too slow, and which ``target`` clients the server keeps."""
        drops = self._rng(rnd, 2).random(len(self.profiles))
        share = share or {}
        timings = {c: self.timing(rnd, c, work[c], down_bytes[c], up_bytes[c], share.get(c, 1.0)) for c in invited}
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

    def round_time(self, kept: list[ClientTiming], target: int, edge_upload_s: float = 0.0,
                   edge_spans: list[float] | None = None) -> float:
        """The server closes the round when `target` clients reported, else at the deadline. Clients
        run in parallel, so the slowest one ends the round; with ``edge_spans`` (each edge's clients
        one after another: the sum of their times per edge) the longest edge does."""
        last = max(edge_spans, default=0.0) if edge_spans is not None else max((t.total_s for t in kept), default=0.0)
        if len(kept) < target and self.deadline_s is not None:
            last = self.deadline_s
        return last + edge_upload_s

    def advance(self, seconds: float) -> float:
        self.now_s += seconds
        return self.now_s
