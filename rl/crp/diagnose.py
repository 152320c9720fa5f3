"""Cheap diagnostics of RL-CRP's environment (no Ray, no RLlib; numpy, hmmlearn, torch on CPU).

    python -m rl.crp.diagnose [--config configs/crp_mnist.yaml] [--seeds 0 1 2] [--episodes 200]

Questions it answers, each on the environment of the config (`rl.envs.crp`), every number over
evaluation episodes whose per-round draws training never saw:

1. ``baselines``: how far random is from the conflict-free oracle, and whether a *decentralized*
   rule reaches <= 0.5 x random's conflicts at all. ``home-first`` is such a rule: each edge
   picks among the online clients whose home edge it is (coverage geometry, known locally), the
   rest only to fill up. If it reaches ~0 conflicts, the target is attainable without
   communication, by any policy that can tell its clients apart.
2. ``risk``: is the conflict signal learnable from the observation? AUC of the HMM risk feature
   for "this pick conflicted", (a) when the other servers pick uniformly at random (conflicts are
   then unpredictable: AUC ~ 0.5 is the correct answer) and (b) when every server has fixed
   per-client preferences (persistently contested clients exist, so a useful risk has AUC > 0.5);
   next to the AUC of the true conflict probability (the ceiling).
3. ``learners``: can the policy express and learn "avoid the contested clients"? Independent
   REINFORCE per edge (the same ``CRPPolicyNet``, the same observations and pick loop as RLlib's
   env) with and without ``client_bias``, with the round-level reward and with per-pick conflict
   credit (``env.conflict_credit``); conflicts per round of the sampled policy afterwards.

4. ``trained`` (``--runs RUN_DIR ...``, trained rl-crp / rl-no-crp runs of the config's seed): is
   the HMM risk predictive under the trained policies? Each run's exported policy picks through
   the FL selector; for every pick, the edge's HMM risk before the round (computed for the
   ablation too, which does not observe it) against "this pick conflicted": AUC, and the
   conflict rate among the picks in the top and bottom half of risk.

Writes bench/results/rl_crp_diag/diag.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgeray.config import load_config
from pipelines.selection import Selector, estimated_round_s
from rl.crp.analysis import EVAL_SEED0, baseline_factories
from rl.crp.config import CRPConfig
from rl.envs.crp import CRPSimulation, episode_metrics, run_selector


class HomeFirst(Selector):
    """Decentralized rule (a diagnostic, not a method): pick uniformly among the online clients
    whose home edge (``homes[c]``, the first edge covering c) is this edge; fill up from the rest."""

    name = "home-first"
    defaults = {"homes": None, "order": None}

    def select(self, request, rnd, rng):
        homes, order = self.settings["homes"], self.settings["order"]
        rank = (lambda cs: sorted(cs, key=lambda c: order[c])) if order is not None else rng.permutation
        own = [c for c in request.candidates if homes[c] == request.edge_id]
        rest = [c for c in request.candidates if homes[c] != request.edge_id]
        picks = list(rank(own))[:request.num]
        if len(picks) < request.num:
            picks += list(rank(rest))[:request.num - len(picks)]
        return [int(c) for c in picks]


def homes_of(sim: CRPSimulation) -> list[int]:
    """Each client's home edge: the first edge its coverage lists (population.modulo_coverage:
    c mod E; disc_coverage: the nearest edge)."""
    from pipelines.population import disc_coverage, modulo_coverage

    s = sim.section
    lists = modulo_coverage(s.num_clients, s.num_edges, s.edge_overlap, s.seed) if s.coverage == "modulo" \
        else disc_coverage(s.num_clients, s.num_edges, s.coverage_radius, s.seed)
    return [edges[0] for edges in lists]


def baselines(env, episodes: int) -> dict:
    sim = CRPSimulation(env)
    factories = {**baseline_factories(env),
                 "home-first": lambda pop, seed: HomeFirst(pop, seed, homes=homes_of(sim)),
                 "home-greedy": lambda pop, seed: HomeFirst(pop, seed, homes=homes_of(sim), order=list(
                     estimated_round_s(pop, env.local_epochs, env.model_bytes)))}
    out = {}
    for name, make in factories.items():
        rows = [episode_metrics(sim, run_selector(sim, make(sim.population, i), env.rounds, EVAL_SEED0 + i))
                for i in range(episodes)]
        out[name] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Rank AUC (ties share ranks); None without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels.sum()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * (len(labels) - pos)))


def pick_outcomes(result, picks: dict):
    """(edge, client, whether that pick conflicted) for every pick of a played round."""
    for e, chosen in picks.items():
        conflicted = {o.client_id for o in result.observations[e].outcomes if o.contenders > 0}
        for c in chosen:
            yield e, c, c in conflicted


def risk_auc(env, episodes: int, preference_scale: float) -> dict:
    """AUC of the risk feature (and of the true conflict probability) for picks that conflicted.
    Every edge picks k without replacement from softmax(pref_e), pref_e ~ N(0, scale) per client,
    fixed for the whole run (scale 0: uniform random)."""
    sim = CRPSimulation(env)
    rng = np.random.default_rng(123)
    prefs = {e: rng.normal(0, preference_scale, len(cov)) for e, cov in sim.coverage.items()}
    # P(edge e picks its local client i) by Monte Carlo (all clients online in these envs)
    pick_p = {}
    for e, cov in sim.coverage.items():
        w = np.exp(prefs[e] - prefs[e].max())
        hits = np.zeros(len(cov))
        for _ in range(2000):
            hits[rng.choice(len(cov), sim.k, replace=False, p=w / w.sum())] += 1
        pick_p[e] = {int(c): hits[i] / 2000 for i, c in enumerate(cov)}
    risks, truth, labels = [], [], []
    for ep in range(episodes):
        sim.start(EVAL_SEED0 + ep)
        for _ in range(env.rounds):
            rnd = sim.round
            online = sim.available(rnd)
            picks, feats = {}, {}
            for e, cov in sim.coverage.items():
                tracker = sim.trackers[e]
                feats[e] = tracker.features(rnd, online[tracker.covered].astype(float))[:, 0]
                ok = np.flatnonzero(online[tracker.covered])
                w = np.exp(prefs[e][ok] - prefs[e][ok].max())
                chosen = rng.choice(ok, min(sim.k, len(ok)), replace=False, p=w / w.sum())
                picks[e] = tracker.covered[chosen].tolist()
            result = sim.play(picks)
            if rnd <= env.risk_lag + 1:
                continue
            for e, c, conflicted in pick_outcomes(result, picks):
                risks.append(feats[e][sim.trackers[e].index[c]])
                truth.append(1 - np.prod([1 - pick_p[o][c] for o in sim.coverage if o != e and c in pick_p[o]]))
                labels.append(conflicted)
    labels = np.asarray(labels)
    return {"preference_scale": preference_scale, "picks": int(len(labels)), "conflict_rate": float(labels.mean()),
            "risk_auc": auc(np.asarray(risks), labels), "true_probability_auc": auc(np.asarray(truth), labels)}


def trained_risk(env, run_dir: Path, episodes: int) -> dict:
    """The HMM risk's AUC for "this pick conflicted" when the run's exported policies pick (see 4.)."""
    from pipelines.selection.crp import RLCRPSelector

    sim = CRPSimulation(env)
    risks, labels = [], []
    for ep in range(episodes):
        selector = RLCRPSelector(sim.population, ep, checkpoint=str(run_dir))
        sim.start(EVAL_SEED0 + ep)
        for _ in range(env.rounds):
            rnd = sim.round
            picks = selector.select_all(sim.requests(rnd), rnd)
            before = {e: selector.trackers[e].risk.risks(rnd) for e in picks}   # synced to rounds < rnd
            result = sim.play(picks)
            if rnd <= env.risk_lag + 1:
                continue
            for e, c, conflicted in pick_outcomes(result, picks):
                risks.append(before[e][selector.trackers[e].index[c]])
                labels.append(conflicted)
    risks, labels = np.asarray(risks), np.asarray(labels)
    high = risks > np.median(risks)
    return {"run": run_dir.name, "picks": int(len(labels)), "conflict_rate": float(labels.mean()),
            "risk_auc": auc(risks, labels),
            "conflict_rate_high_risk": float(labels[high].mean()) if high.any() else None,
            "conflict_rate_low_risk": float(labels[~high].mean()) if (~high).any() else None}


def learn(env, episodes: int, *, client_bias: bool, credit: str, lr: float, hidden=(64, 64), seed: int = 0,
          eval_episodes: int = 3) -> dict:
    """Independent REINFORCE per edge on the env's own observations and pick loop (one update per
    episode, advantage = reward minus the edge's running mean, no discount: each pick is credited
    with its round's reward; ``credit`` "pick": the conflict part is the pick's own conflicts)."""
    import torch

    from pipelines.selection.crp import EdgeTracker
    from pipelines.selection.crp_policy import CRPPolicyNet

    torch.manual_seed(seed)
    sim = CRPSimulation(env)
    s = env
    nets = {e: CRPPolicyNet(len(cov), list(hidden), client_bias=client_bias) for e, cov in sim.coverage.items()}
    opts = {e: torch.optim.Adam(n.parameters(), lr=lr) for e, n in nets.items()}
    base = {e: 0.0 for e in nets}
    rng = np.random.default_rng(seed)
    curve = []

    def play_round(train: bool):
        rnd = sim.round
        online = sim.available(rnd)
        picks, logps = {}, {}
        for e, net in nets.items():
            tracker = sim.trackers[e]
            feats = tracker.features(rnd, online[tracker.covered].astype(float))
            picked = np.zeros(len(tracker.covered))
            k = min(sim.k, int(online[tracker.covered].sum()))
            lp, out = [], []
            for step in range(k):
                obs = torch.as_tensor(EdgeTracker.observation(feats, picked, k - step, sim.k))
                logits = net(obs[None])[0][0]
                dist = torch.distributions.Categorical(logits=logits)
                a = dist.sample()
                lp.append(dist.log_prob(a))
                picked[int(a)] = 1
                out.append(int(a))
            picks[e] = tracker.covered[out].tolist()
            logps[e] = lp
        result = sim.play(picks)
        return result, picks, logps

    started = time.perf_counter()
    for ep in range(episodes):
        sim.start(int(rng.integers(1 << 30)))
        losses = {e: [] for e in nets}
        conflicts = []
        for _ in range(s.rounds):
            result, picks, logps = play_round(True)
            conflicts.append(result.conflicts)
            for e in nets:
                r = sim.reward(result, e)
                if credit == "pick":
                    own = {o.client_id: o.contenders for o in result.observations[e].outcomes} \
                        if e in result.observations else {}
                    rest = r + s.conflict_weight * result.edge_conflicts[e]
                    adv = [rest - base[e] - s.conflict_weight * own.get(c, 0) + s.conflict_weight *
                           result.edge_conflicts[e] / max(len(picks[e]), 1) for c in picks[e]]
                else:
                    adv = [r - base[e]] * len(picks[e])
                base[e] += 0.05 * (r - base[e])
                losses[e] += [-lp * a for lp, a in zip(logps[e], adv)]
        for e, net in nets.items():
            if losses[e]:
                opts[e].zero_grad()
                torch.stack(losses[e]).sum().div(s.rounds).backward()
                opts[e].step()
        curve.append(float(np.mean(conflicts)))
    train_s = time.perf_counter() - started
    evals = []
    with torch.no_grad():
        for i in range(eval_episodes):
            sim.start(EVAL_SEED0 + i)
            results = [play_round(False)[0] for _ in range(s.rounds)]
            evals.append(episode_metrics(sim, results))
    window = max(1, episodes // 10)
    return {"client_bias": client_bias, "credit": credit, "lr": lr, "episodes": episodes,
            "env_steps": episodes * s.rounds * sim.k, "train_s": train_s,
            "train_conflicts_first": float(np.mean(curve[:window])), "train_conflicts_last": float(np.mean(curve[-window:])),
            **{f"eval_{k}": float(np.mean([m[k] for m in evals])) for k in evals[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description="RL-CRP environment diagnostics (no Ray)")
    parser.add_argument("--config", default="configs/crp_mnist.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--episodes", type=int, default=120, help="training episodes per learner")
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--parts", nargs="+", default=["baselines", "risk", "learners"])
    parser.add_argument("--learners", nargs="+", default=["features:round", "features:pick", "bias:round", "bias:pick"],
                        help="learner variants, policy:credit (policy features | bias, credit round | pick)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. env.conflict_weight=4")
    parser.add_argument("--runs", nargs="*", default=[], help="trained runs for the 'trained' part (their seed must "
                        "be the first of --seeds)")
    parser.add_argument("--out", default="bench/results/rl_crp_diag")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    report = {"config": args.config, "overrides": args.set, "seeds": args.seeds}
    for seed in args.seeds:
        env = load_config(CRPConfig, args.config, [f"env.seed={seed}", *args.set]).env
        row = {}
        if "baselines" in args.parts:
            row["baselines"] = baselines(env, args.eval_episodes)
            print(json.dumps({"seed": seed, "baselines": row["baselines"]}), flush=True)
        if "risk" in args.parts:
            row["risk"] = [risk_auc(env, args.eval_episodes, scale) for scale in (0.0, 1.5)]
            print(json.dumps({"seed": seed, "risk": row["risk"]}), flush=True)
        if "learners" in args.parts:
            row["learners"] = []
            for variant in args.learners:
                policy, _, credit = variant.partition(":")
                if policy not in ("features", "bias") or credit not in ("round", "pick"):
                    parser.error(f"--learners {variant!r}: expected features|bias:round|pick")
                row["learners"].append(learn(env, args.episodes, client_bias=policy == "bias", credit=credit,
                                             lr=args.lr, seed=seed, eval_episodes=args.eval_episodes))
                print(json.dumps({"seed": seed, "learner": row["learners"][-1]}), flush=True)
        if "trained" in args.parts:
            for run in args.runs:
                if not Path(run).is_dir():
                    parser.error(f"--runs {run}: not a directory")
            row["trained"] = [trained_risk(env, Path(run), args.eval_episodes) for run in args.runs]
            print(json.dumps({"seed": seed, "trained": row["trained"]}), flush=True)
        report[str(seed)] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diag.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
