"""One training run of RL-CRP / RL without CRP: their hooks into the shared loop (rl.loop).

What is RL-CRP-specific here:
  * the algorithm: `build_algo_config(method, cfg)` (multi-agent PPO, one module per edge server);
  * the metrics columns: per-edge mean returns and the env's episode metrics (conflicts per round,
    mean edge latency, Jain's index, invalid actions), smoothed by RLlib over 20 episodes;
  * checkpoints/crp_policy.pt, written with every checkpoint: the policies as plain torch weights
    plus what the FL selector needs to rebuild the observations (`export_policy`). The FL runtime
    loads it with `selection.method=rl-crp`, without RLlib.
Everything else (run directory, checkpoints/latest, progress.json, resume) is rl.loop's.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.selection.crp import EXPORT_FILE, export_meta, save_export
from rl.crp.algorithms import build_algo_config, method_env
from rl.crp.callbacks import EPISODE_KEYS
from rl.crp.config import CRPConfig
from rl.loop import TrainHooks


class CRPHooks(TrainHooks):
    def __init__(self, method: str):
        self.method = method

    def build_algo(self, cfg: CRPConfig, start_step: int):
        self.cfg = cfg
        return build_algo_config(self.method, cfg).build_algo()

    def extra_metrics(self, result: dict) -> dict:
        runners = result.get("env_runners", {})
        row = {"agent_returns": {a: float(r) for a, r in (runners.get("agent_episode_returns_mean") or {}).items()}}
        for key in EPISODE_KEYS:
            if f"crp_{key}" in runners:
                row[key] = float(runners[f"crp_{key}"])
        return row

    def save_extra(self, algo, checkpoints_dir: Path) -> None:
        export_policy(algo, self.method, self.cfg, checkpoints_dir / EXPORT_FILE)


def export_policy(algo, method: str, cfg: CRPConfig, path: Path) -> Path:
    """The learners' current weights of every edge's module as plain torch `state_dict`s."""
    import torch

    from rl.envs.crp import CRPSimulation
    from rl.envs.crp_rllib import agent_id

    env = method_env(method, cfg)
    sim = CRPSimulation(env)
    weights = algo.learner_group.get_weights()
    policies = {}
    for edge in sim.coverage:
        state = weights[agent_id(edge)]
        policies[edge] = {k[len("net."):]: torch.as_tensor(v).detach().clone() for k, v in state.items()
                          if k.startswith("net.")}
    rule = (f"{env.coverage}, edge_overlap={env.edge_overlap}" if env.coverage == "modulo"
            else f"disc, coverage_radius={env.coverage_radius}") + f", seed={env.seed}"
    meta = export_meta(num_clients=env.num_clients, coverage=sim.coverage, coverage_rule=rule,
                       picks_per_edge=sim.k, hidden=cfg.policy.hidden,
                       client_bias=cfg.policy.client_bias, client_edges=sim.client_edges,
                       coverage_features=env.coverage_features, home_rule=env.home_rule,
                       observed_feature=env.observed_feature, use_crp=env.use_crp, risk=env.risk(),
                       stale_rounds=env.stale_rounds, local_epochs=env.local_epochs, model_bytes=env.model_bytes,
                       method=method, conflict_rule=env.conflict_rule)
    return save_export(path, meta, policies)
