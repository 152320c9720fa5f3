"""RL-CRP's contested setting (configs/crp_contested.yaml, docs/rl_crp.md): Gilbert-Elliott links
(`population.LinkModel` kind ``markov``), shared clients without an owner (``env.home_rule=exclusive``),
the ``observed`` feature; env invariants on it, the exported policy seeing what the env's agent saw,
and parity with the FL runtime (coverage, availability, links and per-edge round time)."""

import math

import numpy as np
import pytest
import torch

from edgeray.config import load_config
from edgeray.errors import UserError
from pipelines.population import MARKOV_P_BAD, MARKOV_P_GOOD, Link, LinkModel, disc_coverage, sample_profiles
from pipelines.selection import GreedyLatencySelector, RandomSelector
from pipelines.selection.crp import FEATURES, RLCRPSelector, export_meta, save_export
from pipelines.selection.crp_policy import CRPPolicyNet
from rl.crp.config import CRPConfig
from rl.envs.crp import CRPSimulation, run_selector
from test_crp_selector import assert_selector_is_the_env_agent

CONTESTED = "configs/crp_contested.yaml"
HOME, OVERLAP, OBSERVED, LATENCY = (FEATURES.index(f) for f in ("home", "overlap", "observed", "latency"))


def _sim(seed=0, *overrides):
    return CRPSimulation(load_config(CRPConfig, CONTESTED, [f"env.seed={seed}", *overrides]).env)


def test_markov_links_are_persistent_two_state_and_redrawn_identically():
    profiles = sample_profiles(50, 3)
    links = LinkModel(profiles, 3, "markov", min_gain=0.25)
    bad = np.array([[links.bad(r, c) for r in range(400)] for c in range(50)])
    for c in (0, 17):
        for r in (0, 5, 399):
            p = profiles[c]
            gain = 0.25 if bad[c, r] else 1.0
            assert links.link(r, c) == Link(p.uplink_mbps * gain, p.downlink_mbps * gain)
    stationary = MARKOV_P_BAD / (MARKOV_P_BAD + MARKOV_P_GOOD)
    assert bad.mean() == pytest.approx(stationary, abs=0.04)
    stay_bad = (bad[:, 1:] & bad[:, :-1]).sum() / bad[:, :-1].sum()
    assert stay_bad == pytest.approx(1 - MARKOV_P_GOOD, abs=0.05)      # persistent: a slow client stays slow
    assert stay_bad > 2 * bad.mean()
    # a resumed run (a fresh model, rounds asked in another order, past the first chain length) draws the same
    fresh = LinkModel(profiles, 3, "markov", min_gain=0.25)
    assert [fresh.link(r, 9) for r in (300, 2, 150)] == [links.link(r, 9) for r in (300, 2, 150)]
    assert not np.array_equal(bad, np.array([[LinkModel(profiles, 4, "markov").bad(r, c) for r in range(400)]
                                             for c in range(50)]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_clients_have_no_owner_and_every_edge_must_take_shared_ones(seed):
    sim = _sim(seed)
    edges = sim.client_edges
    assert edges == disc_coverage(40, 4, 0.5, seed)                  # the FL runtime's own geometry
    shared = [c for c in range(40) if len(edges[c]) > 1]
    assert len(shared) >= 25 and all(2 <= len(edges[c]) <= 4 for c in shared)
    exclusive_per_edge = []
    for e, tracker in sim.trackers.items():
        feats = tracker.features(1, np.ones(len(tracker.covered)))
        for i, c in enumerate(tracker.covered):
            assert feats[i, HOME] == float(edges[c] == [e])           # a home only where no one else covers
            assert feats[i, OVERLAP] == len(edges[c]) - 1
        exclusive_per_edge.append(int(feats[:, HOME].sum()))
        assert len(tracker.covered) >= 2 * sim.k
    assert min(exclusive_per_edge) < sim.k                           # some edge can never fill k alone
    # the old rule: the nearest edge is every client's home
    first = _sim(seed, "env.home_rule=first")
    assert sum(t.features(1, np.ones(len(t.covered)))[:, HOME].sum() for t in first.trackers.values()) == 40


def test_contested_round_invariants_and_the_observed_feature():
    sim = _sim(1)
    sim.start(5)
    random = RandomSelector(sim.population, 5)
    for _ in range(12):
        rnd, online = sim.round, sim.available(sim.round)
        assert 0 < online.sum() < 40                                  # availability U(0.7, 1), drawn per round
        requests = sim.requests(rnd)
        picks = random.select_all(requests, rnd)
        for r in requests:                                            # masks: online and covered only
            assert set(picks[r.edge_id]) <= set(r.candidates) <= set(sim.coverage[r.edge_id])
            assert all(online[c] for c in r.candidates) and len(picks[r.edge_id]) == min(sim.k, len(r.candidates))
        result = sim.play(picks)
        pickers = {c: [e for e, p in picks.items() if c in p] for c in {c for p in picks.values() for c in p}}
        assert result.conflicts == sum(math.comb(len(es), 2) for es in pickers.values())   # once per pair
        assert sum(result.edge_conflicts.values()) == 2 * result.conflicts
        for e, p in picks.items():
            times = [sim.client_time(rnd, c, 1 / len(pickers[c])) for c in p]
            assert result.edge_round_s[e] == pytest.approx(max(times, default=0.0))
            # the observed feature: the time this edge saw, over the population's median estimate
            tracker = sim.trackers[e]
            feats = tracker.features(sim.round, np.ones(len(tracker.covered)))
            for c, t in zip(p, times):
                assert feats[tracker.index[c], OBSERVED] == pytest.approx(min(t / sim.t_ref, 10.0))
    never = [i for i, n in enumerate(sim.trackers[0].picks) if n == 0]
    feats = sim.trackers[0].features(sim.round, np.ones(len(sim.trackers[0].covered)))
    assert never and np.allclose(feats[never, OBSERVED], feats[never, LATENCY])   # the estimate until seen
    off = _sim(1, "env.observed_feature=false")
    assert not off.trackers[0].features(1, np.ones(len(off.trackers[0].covered)))[:, OBSERVED].any()


def test_a_static_greedy_keeps_picking_clients_through_their_bad_spells():
    """Greedy by the static estimate cannot see a bad spell: some of its picks are in one."""
    sim = _sim(0)
    greedy = GreedyLatencySelector(sim.population, 0, local_epochs=1, model_bytes=sim.section.model_bytes)
    results = run_selector(sim, greedy, 20, 3)
    slow = [sim.links.bad(r.round, c) for r in results for p in r.picks.values() for c in p]
    assert 0 < np.mean(slow) < 1


def test_the_selector_sees_what_the_env_agent_saw_in_the_contested_setting(tmp_path):
    sim = _sim(2)
    s = sim.section
    torch.manual_seed(0)
    policies = {e: CRPPolicyNet(len(cov), [8], True).state_dict() for e, cov in sim.coverage.items()}
    meta = export_meta(num_clients=40, coverage=sim.coverage, coverage_rule="disc", picks_per_edge=sim.k, hidden=[8],
                       client_bias=True, use_crp=True, risk=s.risk(), stale_rounds=s.stale_rounds,
                       local_epochs=s.local_epochs, model_bytes=s.model_bytes, client_edges=sim.client_edges,
                       coverage_features=True, home_rule=s.home_rule, observed_feature=s.observed_feature)
    path = save_export(tmp_path / "crp_policy.pt", meta, policies)
    selector = RLCRPSelector(sim.population, 0, checkpoint=str(path), sample=False)
    sim.start(0)
    for _ in range(8):
        requests = sim.requests(sim.round)
        picks = selector.select_all(requests, sim.round)
        for r in requests:
            assert_selector_is_the_env_agent(selector, sim, r, picks)
        sim.play(picks)
    observed = sim.trackers[0].features(sim.round, np.ones(len(sim.trackers[0].covered)))[:, OBSERVED]
    assert not np.allclose(observed, sim.trackers[0].latency)        # the feature moved with what was seen
    # an export made before the observed feature existed is refused with a one-line "retrain"
    old = save_export(tmp_path / "old.pt", {**meta, "features": [f for f in FEATURES if f != "observed"]}, policies)
    with pytest.raises(UserError, match="retrain"):
        RLCRPSelector(sim.population, 0, checkpoint=str(old))


def test_bad_home_rule_and_link_model_are_one_line_errors():
    with pytest.raises(UserError, match="env.home_rule"):
        load_config(CRPConfig, CONTESTED, ["env.home_rule=nearest"])
    with pytest.raises(UserError, match="env.link_model"):
        load_config(CRPConfig, CONTESTED, ["env.link_model=trace"])
    with pytest.raises(UserError, match="link model 'gilbert'"):
        LinkModel(sample_profiles(2, 0), 0, "gilbert")


@pytest.mark.ray
def test_contested_env_equals_the_fl_runtime(ray_session, tmp_path):
    """The FL runtime on the contested population (disc coverage, markov links, availability
    U(0.7, 1)): the same coverage, online clients and per-edge round times as the env for the
    same picks, two rounds."""
    from actors.config import FLConfig
    from rl.envs.crp import CRPEnvSection
    from rl.loop import torch_threads
    from test_crp_rllib import two_fl_rounds

    cfg = load_config(FLConfig, "configs/fedavg_digits.yaml",
                      ["model.name=mlp", "selection.method=greedy-latency", "runtime.num_edge_servers=4",
                       "runtime.coverage=disc", "runtime.coverage_radius=0.5", "clock.link_model=markov",
                       "clock.link_min_gain=0.25", "clock.min_availability=0.7", "strategy.clients_per_round=8"])
    with torch_threads(1):
        prepared, rows, _ = two_fl_rounds(ray_session, cfg, tmp_path)
    model_bytes = (rows[0]["bytes_down"] + rows[0]["bytes_up"]) / (2 * rows[0]["clients_completed"])
    sim = CRPSimulation(CRPEnvSection(num_clients=10, num_edges=4, coverage="disc", coverage_radius=0.5,
                                      clients_per_round=8, seed=cfg.seed, link_model="markov", link_min_gain=0.25,
                                      trace=str(tmp_path / "client_profiles.json"),
                                      sizes_file=str(tmp_path / "sizes.json"), local_epochs=cfg.strategy.local_epochs,
                                      model_bytes=model_bytes, home_rule="exclusive", coverage_features=True,
                                      observed_feature=True))
    assert sim.client_edges == [list(c) for c in prepared.coverage]
    sim.start(cfg.seed)
    greedy = GreedyLatencySelector(sim.population, cfg.seed)
    for row in rows:
        result = sim.play(greedy.select_all(sim.requests(sim.round), sim.round))
        assert result.conflicts == row["conflicts"]
        assert np.allclose([result.edge_round_s[e] for e in range(4)], row["edge_round_s"], rtol=0.01)
    # what the contested setting adds was in play: offline clients, and picks in a bad link state
    assert not all(sim.available(r).all() for r in (1, 2))
    assert any(sim.links.bad(obs.round, o.client_id) for history in sim.histories.values() for obs in history
               for o in obs.outcomes)
