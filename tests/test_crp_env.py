"""RL-CRP's environment without Ray: the simulation's rules (latency, conflicts, masks, k picks),
RLlib's multi-agent env check, and bad input."""

import json

import numpy as np
import pytest

from edgeray.config import load_config
from edgeray.errors import UserError
from pipelines.population import timing
from pipelines.selection import GreedyLatencySelector, RandomSelector
from pipelines.selection.crp import FEATURES, observation_size
from rl.envs.crp import CRPEnvSection, CRPSimulation, episode_metrics, jain, run_selector

AVAILABLE, PICKED = FEATURES.index("available"), FEATURES.index("picked")


def _sim(**kw):
    return CRPSimulation(CRPEnvSection(**{"num_clients": 24, "num_edges": 3, "edge_overlap": 1,
                                          "clients_per_round": 6, "rounds": 6, **kw}))


def test_edge_latency_is_the_slowest_client_it_served_with_shared_bandwidth():
    sim = _sim(num_edges=3, edge_overlap=2)            # every client covered by all three edges
    picks = {0: [1, 2], 1: [2, 3], 2: [2, 5]}
    result = sim.play(picks)
    s = sim.section
    def t(c, share):
        return timing(sim.population.profiles[c], s.examples_per_client * s.local_epochs, s.model_bytes,
                      s.model_bytes, sim.links.link(1, c), share).total_s
    assert result.conflicts == 3                       # client 2 picked by 3 edges: 3 pairs, counted once each
    assert result.edge_conflicts == {0: 2, 1: 2, 2: 2}  # each picker shares client 2 with two others
    for e, own in picks.items():
        assert result.edge_round_s[e] == pytest.approx(max(t(c, 1 / 3 if c == 2 else 1.0) for c in own))
    assert [o.contenders for o in result.observations[0].outcomes] == [0, 2]
    assert result.round == 1 and sim.round == 2


def test_fail_rule_losers_get_nothing_and_no_latency_from_it():
    sim = _sim(num_edges=3, edge_overlap=2, conflict_rule="fail")
    result = sim.play({0: [4], 1: [4], 2: []})
    statuses = {e: [o.status for o in result.observations[e].outcomes] for e in (0, 1)}
    winner = next(e for e in (0, 1) if statuses[e] == ["ok"])
    assert statuses[1 - winner] == ["conflict_lost"] and result.edge_round_s[1 - winner] == 0.0
    assert result.edge_round_s[winner] > 0 and result.edge_round_s[2] == 0.0 and result.conflicts == 1


def test_env_passes_rllibs_check_and_keeps_its_masks():
    from ray.rllib.utils.pre_checks.env import check_multiagent_environments

    from rl.envs.crp_rllib import CRPMultiAgentEnv

    env = CRPMultiAgentEnv({"num_clients": 24, "num_edges": 3, "clients_per_round": 6, "rounds": 4,
                            "min_availability": 0.5})
    check_multiagent_environments(env)
    assert env.possible_agents == ["edge_0", "edge_1", "edge_2"]
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    steps, rounds_done = 0, 0
    while True:
        actions = {}
        for a, o in obs.items():
            assert env.observation_spaces[a].contains(o)
            n = env.action_spaces[a].n
            assert o.shape == (observation_size(n),)
            feats, mask = o[:n * len(FEATURES)].reshape(n, len(FEATURES)), o[-n:]
            if mask.sum() < n:   # an edge still picking: only online, unpicked clients are allowed
                assert np.array_equal(mask > 0.5, (feats[:, AVAILABLE] > 0.5) & (feats[:, PICKED] < 0.5))
            allowed = np.flatnonzero(mask > 0.5)
            actions[a] = int(rng.choice(allowed))
        obs, rewards, term, trunc, info = env.step(actions)
        steps += 1
        if any(r != 0 for r in rewards.values()):
            rounds_done += 1
            result = env.results[-1]
            for e, own in result.picks.items():           # k picks, or every online client it covers
                online = env.sim.available(result.round)[env.sim.coverage[e]].sum()
                assert len(own) == min(env.sim.k, online) == len(set(own))
        if term["__all__"]:
            break
    assert rounds_done == 4 and steps == 4 * env.sim.k and info["edge_0"]["invalid_actions"] == 0
    assert {"conflicts_per_round", "latency_s", "jain"} <= set(info["edge_0"])

    env.reset(seed=3)
    env.step({a: 0 for a in env.agents})          # client 0 of each edge: taken, or replaced if offline
    obs, *_ = env.step({a: 0 for a in env.agents})  # picked already: replaced and counted
    assert env.invalid >= 3


def test_selector_episodes_are_reproducible_and_random_conflicts_more_than_the_oracle():
    from pipelines.selection import ConflictFreeOracle

    sim = _sim()
    a = episode_metrics(sim, run_selector(sim, RandomSelector(sim.population, 1), 20, 7))
    b = episode_metrics(sim, run_selector(sim, RandomSelector(sim.population, 1), 20, 7))
    assert a == b and a["conflicts_per_round"] > 0
    oracle = episode_metrics(sim, run_selector(sim, ConflictFreeOracle(sim.population, 1), 20, 7))
    assert oracle["conflicts_per_round"] == 0
    greedy = episode_metrics(sim, run_selector(sim, GreedyLatencySelector(sim.population, 1,
                                                                          model_bytes=sim.section.model_bytes), 20, 7))
    assert greedy["jain"] < a["jain"]               # greedy picks the same fast clients every round
    assert jain(np.array([1, 1, 1])) == 1.0 and jain(np.array([3, 0, 0])) == pytest.approx(1 / 3)


def test_reward_adds_its_named_terms():
    sim = _sim(fairness="bonus", conflict_weight=0.25, latency_weight=2.0, fairness_weight=0.5)
    result = sim.play({0: [0, 3], 1: [3], 2: []})
    r = sim.reward(result, 0)
    expected = -2.0 * result.edge_round_s[0] / sim.t_ref - 0.25 * 1 + 0.5 * 1.0   # counts were 0: bonus 1
    assert r == pytest.approx(expected)


def test_bad_input_is_one_line_naming_the_problem(tmp_path):
    from rl.crp.config import CRPConfig

    with pytest.raises(UserError, match=r"k = ceil\(env.clients_per_round / env.num_edges\) = 50.*covers only"):
        load_config(CRPConfig, "configs/crp.yaml", ["env.clients_per_round=200"])
    bad = tmp_path / "profiles.json"
    bad.write_text(json.dumps([{"client_id": 0, "compute_speed": "fast"}]))
    with pytest.raises(UserError, match="lacks .*uplink_mbps"):
        load_config(CRPConfig, "configs/crp.yaml", [f"env.trace={bad}"])
    with pytest.raises(UserError, match="edge_overlap=4 must be < env.num_edges=4"):
        load_config(CRPConfig, "configs/crp.yaml", ["env.edge_overlap=4"])
    sizes = tmp_path / "sizes.json"
    sizes.write_text("[1, 2]")
    with pytest.raises(UserError, match="must give 40 sizes"):
        load_config(CRPConfig, "configs/crp.yaml", [f"env.sizes_file={sizes}"])


def test_per_pick_conflict_credit_charges_each_pair_once_at_its_later_pick_and_keeps_the_episode_sum():
    from rl.envs.crp_rllib import CRPMultiAgentEnv, agent_id, pick_conflicts

    # edge 0 picks client 5 at step 1, edge 1 at step 2: both pay at step 2; 0 and 2 pick 7 together
    assert pick_conflicts({0: set(), 1: set(), 2: set()}, {0: 5, 1: 9, 2: 6}) == {0: 0, 1: 0, 2: 0}
    assert pick_conflicts({0: {5}, 1: {9}, 2: {6}}, {0: 7, 1: 5, 2: 7}) == {0: 2, 1: 1, 2: 1}
    cfg = {"num_clients": 24, "num_edges": 3, "edge_overlap": 2, "clients_per_round": 9, "rounds": 5,
           "conflict_weight": 1.5}
    totals = {}
    for credit in ("round", "pick"):
        env = CRPMultiAgentEnv({**cfg, "conflict_credit": credit})
        obs, _ = env.reset(seed=4)
        rng = np.random.default_rng(1)
        returns, per_step = {a: 0.0 for a in env.agents}, []
        while True:
            actions = {a: int(rng.choice(np.flatnonzero(o[-env.action_spaces[a].n:] > 0.5))) for a, o in obs.items()}
            obs, rewards, term, _, _ = env.step(actions)
            per_step.append(rewards)
            for a, r in rewards.items():
                returns[a] += r
            if term["__all__"]:
                break
        assert sum(r.conflicts for r in env.results) > 0            # overlap 2 of 3: conflicts do happen
        if credit == "pick":                                        # conflicts paid before the round's end
            mid = [r for i, r in enumerate(per_step) if (i + 1) % env.sim.k]
            assert any(v < 0 for r in mid for v in r.values())
            charged = {e: 0.0 for e in env.edges}
            for r in mid:
                for e in env.edges:
                    charged[e] += r[agent_id(e)]
            for e in env.edges:   # mid-round charges never exceed the episode's conflicts of that edge
                assert -charged[e] <= 1.5 * sum(res.edge_conflicts[e] for res in env.results) + 1e-9
        totals[credit] = returns
    for a in totals["round"]:                                       # same draws, same picks: same return
        assert totals["pick"][a] == pytest.approx(totals["round"][a])


def test_diagnostics_home_first_rule_is_conflict_free_and_auc_ranks():
    from rl.crp.diagnose import auc, baselines

    rows = baselines(CRPEnvSection(num_clients=24, num_edges=3, clients_per_round=6, rounds=6), episodes=2)
    assert rows["home-first"]["conflicts_per_round"] == 0 == rows["home-greedy"]["conflicts_per_round"]
    assert rows["oracle"]["conflicts_per_round"] == 0 and rows["greedy-latency"]["conflicts_per_round"] > 0
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5) and auc([1, 2], [1, 1]) is None


def test_ppo_loss_settings_reach_rllib_and_the_benchmark_config_loads():
    from rl.crp.algorithms import build_algo_config
    from rl.crp.config import CRPConfig

    cfg = load_config(CRPConfig, "configs/crp_mnist.yaml", ["train.kl_coeff=0", "train.vf_loss_coeff=0.1"])
    assert cfg.env.conflict_credit == "pick" and cfg.policy.client_bias
    algo = build_algo_config("rl-crp", cfg)
    assert not algo.use_kl_loss and algo.vf_loss_coeff == 0.1
    algo = build_algo_config("rl-no-crp", load_config(CRPConfig, "configs/crp_mnist.yaml", ["train.kl_coeff=0.3"]))
    assert algo.use_kl_loss and algo.kl_coeff == 0.3 and algo.env_config["use_crp"] is False
    with pytest.raises(UserError, match="kl_coeff"):
        load_config(CRPConfig, "configs/crp_mnist.yaml", ["train.kl_coeff=-1"])
    with pytest.raises(UserError, match="conflict_credit"):
        load_config(CRPConfig, "configs/crp_mnist.yaml", ["env.conflict_credit=never"])
