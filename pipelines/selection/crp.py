"""RL-CRP (Conflict-Aware Client Selection for Multi-Server Federated Learning, arXiv:2602.02458):
what one edge server knows and how its trained policy picks clients, on plain data (no Ray, no
RLlib; torch only to run the exported policy).

Reading order: ``EdgeTracker`` (one server's local record, fed with its own ``RoundObservation``s
only, and the observation its policy reads), ``choose`` (k picks, one client at a time, masked),
the export format, ``RLCRPSelector`` (the registered FL selector ``rl-crp``, which loads the
exported torch weights). The RLlib environment (rl/envs/crp.py) builds its observations with the
same ``EdgeTracker`` and the same pick loop, so a policy sees in the FL runtime exactly what it
saw in training.

Per covered client, the observation holds ``FEATURES`` [R: the paper's state was not recovered;
notes/rl.md A1 step 4]:
  risk            p_i(t) from the conflict-risk HMM (pipelines/selection/conflict_risk.py); 0 for
                  the ablation without CRP (``use_crp`` false)
  participation   the share of this server's rounds in which it picked the client
  staleness       rounds since this server last picked it / ``stale_rounds`` (1 if never, capped at 1)
  latency         the client's static round-time estimate / the population's median estimate
  observed        the client's simulated time when this server last picked it / the population's
                  median estimate (capped), the static ``latency`` feature before its first pick;
                  with ``observed_feature`` off it is 0 [R]. Under time-varying links (``markov``)
                  it tells a client seen slow lately from one seen fast.
  size            local examples / the population's mean
  home            1 if this server is the client's home edge, by ``home_rule`` [R]: ``first`` (the
                  first edge its coverage lists: c mod S under modulo coverage, the nearest under
                  disc coverage) or ``exclusive`` (only a client no other server covers has a home:
                  the contested setting, where shared clients have no owner); 0 with
                  ``coverage_features`` off [R]
  overlap         the other servers covering the client (coverage geometry; 0 with the switch off) [R]
  available       1 if the client is online and covered now
  picked          1 if this server already picked it in this round
and edge-wide ``GLOBALS``: picks left this round / k. The mask: available and not yet picked.
The action is one client per step; k steps make the round's picks (the paper's "k sequential
Discrete picks", notes/rl.md A1 step 5, option 2). In the FL runtime each pick is drawn
from the policy with the edge's seeded generator (``sample``, default) or is the arg-max.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgeray.errors import UserError
from pipelines.population import PopulationView
from pipelines.selection import RoundObservation, Selector, estimated_round_s
from pipelines.selection.conflict_risk import ConflictRiskModel, RiskSettings

FEATURES = ("risk", "participation", "staleness", "latency", "observed", "size", "home", "overlap", "available",
            "picked")
HOME_RULES = ("first", "exclusive")
GLOBALS = ("picks_left",)
FEATURE_CAP = 10.0                    # latency and size ratios are clipped here (observation bound)
EXPORT_FORMAT = "edgeray-rl-crp/1"
EXPORT_FILE = "crp_policy.pt"         # in an RL run's checkpoints/ folder


def observation_size(num_clients: int) -> int:
    return num_clients * len(FEATURES) + len(GLOBALS) + num_clients


def client_scales(population: PopulationView, local_epochs: float, model_bytes: float) -> tuple[np.ndarray, np.ndarray]:
    """(latency, size) features of every client: its static round-time estimate over the median
    estimate, its local examples over the mean, both capped at ``FEATURE_CAP``."""
    est = estimated_round_s(population, local_epochs, model_bytes)
    sizes = np.asarray(population.sizes, dtype=float)
    return (np.clip(est / max(float(np.median(est)), 1e-12), 0, FEATURE_CAP),
            np.clip(sizes / max(float(sizes.mean()), 1e-12), 0, FEATURE_CAP))


def latency_reference(population: PopulationView, local_epochs: float, model_bytes: float) -> float:
    """The population's median static round-time estimate (the scale of ``latency`` and ``observed``)."""
    return float(np.median(estimated_round_s(population, local_epochs, model_bytes)))


class EdgeTracker:
    """One edge server's local knowledge of the clients it covers (``covered``, sorted), built only
    from its own observations: what it picked, and the conflicts it learned of."""

    def __init__(self, edge_id: int, covered, latency: np.ndarray, size: np.ndarray, *,
                 risk: RiskSettings = RiskSettings(), use_crp: bool = True, stale_rounds: int = 20, seed: int = 0,
                 client_edges: list[list[int]] | None = None, home_rule: str = "first",
                 latency_ref: float | None = None):
        """``client_edges``: every client's covering edges, home first (the coverage geometry,
        known to every server); given, the ``home`` (by ``home_rule``) and ``overlap`` features are
        filled, else 0. ``latency_ref``: the population's median round-time estimate; given, the
        ``observed`` feature is filled, else 0."""
        if home_rule not in HOME_RULES:
            raise UserError(f"home rule {home_rule!r} is not one of {', '.join(HOME_RULES)}")
        self.edge_id = edge_id
        self.covered = np.asarray(sorted(int(c) for c in covered), dtype=np.int64)
        self.index = {int(c): i for i, c in enumerate(self.covered)}
        self.latency, self.size = latency[self.covered], size[self.covered]
        self.latency_ref = latency_ref
        n = len(self.covered)
        self.home = np.array([float(client_edges[c][0] == edge_id and (home_rule == "first" or len(client_edges[c]) == 1))
                              for c in self.covered]) if client_edges else np.zeros(n)
        self.overlap = np.array([float(len(client_edges[c]) - 1) for c in self.covered]) if client_edges \
            else np.zeros(n)
        self.risk_settings, self.use_crp, self.stale_rounds, self.seed = risk, use_crp, stale_rounds, seed
        self.reset()

    def reset(self) -> None:
        n = len(self.covered)
        self.risk = ConflictRiskModel(n, self.risk_settings, self.seed)
        self.picks = np.zeros(n)
        self.last_pick = np.full(n, np.nan)
        self.observed = self.latency.copy() if self.latency_ref else np.zeros(n)
        self.rounds_seen = 0
        self.consumed = 0          # observations taken from a history (``sync``)
        self.conflicts_seen = 0

    def observe(self, obs: RoundObservation) -> None:
        """This server's outcome of one round (only the clients it picked)."""
        outside = [o.client_id for o in obs.outcomes if o.client_id not in self.index]
        if outside:
            raise UserError(f"edge {self.edge_id} picked client {outside[0]}, which it does not cover in the "
                            f"policy's coverage: the checkpoint was trained on another coverage")
        picked = [self.index[o.client_id] for o in obs.outcomes]
        conflicted = [self.index[o.client_id] for o in obs.outcomes if o.contenders > 0 or o.status == "conflict_lost"]
        self.risk.record(obs.round, picked, conflicted)
        self.picks[picked] += 1
        self.last_pick[picked] = obs.round
        if self.latency_ref:
            for o in obs.outcomes:
                if o.status == "ok" and o.sim_s > 0:
                    self.observed[self.index[o.client_id]] = min(o.sim_s / self.latency_ref, FEATURE_CAP)
        self.rounds_seen += 1
        self.conflicts_seen += len(conflicted)

    def sync(self, history: tuple[RoundObservation, ...] | list[RoundObservation]) -> None:
        """Take in the observations of ``history`` (oldest first) not seen yet; a history shorter than
        what was taken (a resumed run) starts the record over."""
        if len(history) < self.consumed or (self.consumed and history[self.consumed - 1].round != self.risk.rounds[-1]):
            self.reset()
        for obs in history[self.consumed:]:
            self.observe(obs)
        self.consumed = len(history)

    def features(self, rnd: int, available: np.ndarray) -> np.ndarray:
        """(num covered, len(FEATURES)) before any pick of round ``rnd``; ``available`` a 0/1 mask."""
        n = len(self.covered)
        risk = self.risk.risks(rnd) if self.use_crp else np.zeros(n)
        stale = np.where(np.isnan(self.last_pick), 1.0,
                         np.minimum((rnd - np.nan_to_num(self.last_pick)) / self.stale_rounds, 1.0))
        return np.stack([risk, self.picks / max(self.rounds_seen, 1), stale, self.latency, self.observed, self.size,
                         self.home, np.minimum(self.overlap, FEATURE_CAP), available.astype(float), np.zeros(n)],
                        axis=1)

    @staticmethod
    def observation(features: np.ndarray, picked: np.ndarray, picks_left: int, k: int) -> np.ndarray:
        """The flat observation of one pick step: features with the picked flag set, picks left / k,
        and the mask (available, not picked). With nothing left to pick the mask is all ones (the
        step's action is ignored), so a policy always has a valid action."""
        feats = features.copy()
        feats[:, FEATURES.index("picked")] = picked
        mask = (feats[:, FEATURES.index("available")] > 0.5) & (picked < 0.5)
        if picks_left <= 0 or not mask.any():
            mask[:] = True
        return np.concatenate([feats.ravel(), [picks_left / max(k, 1)], mask.astype(float)]).astype(np.float32)


def choose(policy, features: np.ndarray, k: int, rng: np.random.Generator | None = None) -> list[int]:
    """k picks (local indices), one per step: ``policy(obs) -> logits`` over the covered clients,
    masked; a draw from the softmax when ``rng`` is given, else the arg-max."""
    n = features.shape[0]
    picked = np.zeros(n)
    k = min(k, int(features[:, FEATURES.index("available")].sum()))
    out = []
    for step in range(k):
        logits = np.asarray(policy(EdgeTracker.observation(features, picked, k - step, k)), dtype=float)
        logits = np.where((features[:, FEATURES.index("available")] > 0.5) & (picked < 0.5), logits, -np.inf)
        if rng is None:
            i = int(np.argmax(logits))
        else:
            p = np.exp(logits - logits.max())
            i = int(rng.choice(n, p=p / p.sum()))
        picked[i] = 1
        out.append(i)
    return out


# ----------------------------------------------------------------------------- export format

def save_export(path: str | Path, meta: dict, policies: dict) -> Path:
    """Write the exported policies: ``meta`` (JSON-able) and one torch ``state_dict`` per edge."""
    import torch

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": EXPORT_FORMAT, "meta": json.dumps(meta),
                "policies": {str(e): sd for e, sd in policies.items()}}, tmp)
    tmp.replace(path)
    return path


def load_export(path: str | Path) -> tuple[dict, dict[int, dict]]:
    """(meta, edge -> state_dict) from an export file or an RL run directory holding one."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / EXPORT_FILE if (path / "checkpoints" / EXPORT_FILE).is_file() else path / EXPORT_FILE
    if not path.is_file():
        raise UserError(f"RL-CRP checkpoint not found: {path}; give selection.settings.checkpoint the run directory "
                        f"of `edgeray rl train rl-crp` or its checkpoints/{EXPORT_FILE}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if raw.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        meta = json.loads(raw["meta"])
        policies = {int(e): sd for e, sd in raw["policies"].items()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"{path} is not an RL-CRP policy export ({EXPORT_FORMAT}): {type(exc).__name__}: {exc}") from None
    return meta, policies


# ----------------------------------------------------------------------------- the FL selector

class RLCRPSelector(Selector):
    """The trained RL-CRP policies as a per-edge selector: each edge runs its own policy on its own
    observations (decentralized). ``checkpoint``: an RL run directory or its exported
    ``crp_policy.pt``; ``sample``: draw each pick from the policy with the edge's round generator
    (seeded, reproducible; the default), or take the arg-max. PPO learns a stochastic policy, and in
    this game the mix is the point: with arg-max every edge takes its top-scored clients each
    round, which in our runs collapsed to greedy-latency's picks and its conflicts."""

    name = "rl-crp"
    defaults = {"checkpoint": None, "sample": True}

    def __init__(self, population: PopulationView, seed: int, **settings):
        super().__init__(population, seed, **settings)
        if not self.settings["checkpoint"]:
            raise UserError("selector 'rl-crp' needs selection.settings.checkpoint (an `edgeray rl train rl-crp` "
                            "run directory or its checkpoints/crp_policy.pt)")
        self.meta, states = load_export(self.settings["checkpoint"])
        self.trackers, self.nets = build_policies(self.meta, states, population, seed)

    def select(self, request, rnd, rng):
        edge = request.edge_id
        if edge not in self.trackers:
            raise UserError(f"the RL-CRP checkpoint has policies for edges {sorted(self.trackers)} "
                            f"(num_edges={self.meta['num_edges']}), this run asks edge {edge}: "
                            f"set runtime.num_edge_servers={self.meta['num_edges']} or train on this run's edges")
        tracker = self.trackers[edge]
        outside = sorted(set(request.candidates) - set(tracker.index))
        if outside:
            raise UserError(f"edge {edge} covers client {outside[0]} in this run but not in the RL-CRP checkpoint's "
                            f"coverage ({self.meta['coverage_rule']}): train on the run's coverage "
                            f"(env.coverage, env.edge_overlap / env.coverage_radius, env.seed)")
        if request.num > len(tracker.covered):
            raise UserError(f"edge {edge} must pick {request.num} clients but covers only {len(tracker.covered)}")
        tracker.sync(request.history)
        available = np.zeros(len(tracker.covered))
        available[[tracker.index[c] for c in request.candidates]] = 1
        feats = tracker.features(rnd, available)
        net = self.nets[edge]
        picks = choose(lambda obs: _logits(net, obs), feats, request.num, rng if self.settings["sample"] else None)
        return tracker.covered[picks].tolist()


def build_policies(meta: dict, states: dict[int, dict], population: PopulationView, seed: int):
    """(edge -> EdgeTracker, edge -> CRPPolicyNet with the exported weights) for ``population``;
    a population of another size than the checkpoint's is a one-line error."""
    from pipelines.selection.crp_policy import CRPPolicyNet

    if meta.get("features", list(FEATURES)) != list(FEATURES):
        raise UserError(f"the RL-CRP checkpoint was exported with the per-client features {meta.get('features')}, "
                        f"this code observes {list(FEATURES)}: retrain it (edgeray rl train rl-crp)")
    if "features" not in meta:
        raise UserError("the RL-CRP checkpoint predates the home/overlap features (no 'features' in its meta): "
                        "retrain it (edgeray rl train rl-crp)")
    if len(population) != meta["num_clients"]:
        raise UserError(f"the RL-CRP checkpoint was trained on {meta['num_clients']} clients, this run has "
                        f"{len(population)} (data.num_clients)")
    latency, size = client_scales(population, meta["local_epochs"], meta["model_bytes"])
    latency_ref = latency_reference(population, meta["local_epochs"], meta["model_bytes"]) \
        if meta.get("observed_feature") else None
    risk = RiskSettings(**meta["risk"])
    trackers, nets = {}, {}
    for edge_key, covered in meta["coverage"].items():
        edge = int(edge_key)
        trackers[edge] = EdgeTracker(edge, covered, latency, size, risk=risk, use_crp=meta["use_crp"],
                                     stale_rounds=meta["stale_rounds"], seed=seed,
                                     client_edges=meta.get("client_edges") if meta.get("coverage_features") else None,
                                     home_rule=meta.get("home_rule", "first"), latency_ref=latency_ref)
        net = CRPPolicyNet(len(covered), meta["hidden"], meta.get("client_bias", False))
        net.load_state_dict(states[edge])
        nets[edge] = net.eval()
    return trackers, nets


def _logits(net, obs: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.as_tensor(obs)[None])[0][0].numpy()


def export_meta(*, num_clients: int, coverage: dict[int, list[int]], coverage_rule: str, picks_per_edge: int,
                hidden, use_crp: bool, risk: RiskSettings, stale_rounds: int, local_epochs: float,
                model_bytes: float, client_bias: bool = False, client_edges: list[list[int]] | None = None,
                coverage_features: bool = False, home_rule: str = "first", observed_feature: bool = False,
                **extra) -> dict:
    """The meta block of an export: what the selector needs to rebuild the observations."""
    return {"num_clients": num_clients, "num_edges": len(coverage),
            "coverage": {str(e): list(map(int, c)) for e, c in coverage.items()}, "coverage_rule": coverage_rule,
            "picks_per_edge": picks_per_edge, "hidden": list(hidden), "client_bias": bool(client_bias),
            "features": list(FEATURES), "coverage_features": bool(coverage_features), "home_rule": home_rule,
            "observed_feature": bool(observed_feature),
            "client_edges": [list(map(int, c)) for c in client_edges] if client_edges else None,
            "use_crp": use_crp, "risk": asdict(risk),
            "stale_rounds": stale_rounds, "local_epochs": local_epochs, "model_bytes": model_bytes, **extra}
