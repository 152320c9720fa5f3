"""The `rl-crp` selector without Ray or RLlib: an exported policy (plain torch weights) picks k of
each edge's candidates from that edge's own history, sees what the env's agent saw, and refuses a
checkpoint that does not match the run."""

import numpy as np
import pytest
import torch

from edgeray.errors import UserError
from pipelines.selection import SelectionRequest
from pipelines.selection.conflict_risk import RiskSettings
from pipelines.selection.crp import RLCRPSelector, choose, export_meta, save_export
from pipelines.selection.crp_policy import CRPPolicyNet
from rl.envs.crp import CRPEnvSection, CRPSimulation


def _export(tmp_path, sim, hidden=(8,)):
    torch.manual_seed(0)
    policies = {e: CRPPolicyNet(len(cov), hidden).state_dict() for e, cov in sim.coverage.items()}
    s = sim.section
    meta = export_meta(num_clients=s.num_clients, coverage=sim.coverage, coverage_rule="modulo", picks_per_edge=sim.k,
                       hidden=hidden, use_crp=True, risk=s.risk(), stale_rounds=s.stale_rounds,
                       local_epochs=s.local_epochs, model_bytes=s.model_bytes, client_edges=sim.client_edges,
                       coverage_features=s.coverage_features)
    return save_export(tmp_path / "crp_policy.pt", meta, policies)


def assert_selector_is_the_env_agent(selector, sim, request, picks):
    """The selector's record, rebuilt from the request's history, equals the env's own, and its
    arg-max picks are the env agent's, through the same observation and pick loop."""
    tracker, mine = selector.trackers[request.edge_id], sim.trackers[request.edge_id]
    online = sim.available(sim.round)[mine.covered].astype(float)
    assert np.allclose(tracker.features(sim.round, online), mine.features(sim.round, online))
    net = selector.nets[request.edge_id]
    with torch.no_grad():
        local = choose(lambda o: net(torch.as_tensor(o)[None])[0][0].numpy(), mine.features(sim.round, online), sim.k)
    assert sorted(mine.covered[local].tolist()) == picks[request.edge_id]


@pytest.fixture
def sim():
    return CRPSimulation(CRPEnvSection(num_clients=24, num_edges=3, clients_per_round=6, rounds=5,
                                       coverage_features=True))


def test_the_selector_sees_what_the_env_agent_saw_and_picks_within_candidates(tmp_path, sim):
    path = _export(tmp_path, sim)
    selector = RLCRPSelector(sim.population, 0, checkpoint=str(path), sample=False)
    sim.start(0)
    for _ in range(8):                           # past the first HMM fit (refit every 5 known rounds)
        requests = sim.requests(sim.round)
        picks = selector.select_all(requests, sim.round)
        for r in requests:
            assert len(picks[r.edge_id]) == sim.k and set(picks[r.edge_id]) <= set(r.candidates)
            assert_selector_is_the_env_agent(selector, sim, r, picks)
        sim.play(picks)
    assert sim.trackers[0].risk.fits >= 1
    again = RLCRPSelector(sim.population, 0, checkpoint=str(tmp_path))   # a folder holding the export works too
    sampled = [again.select_all(sim.requests(sim.round), sim.round) for _ in range(2)]
    assert sampled[0] == sampled[1]              # sampling is seeded by (seed, round, edge)


def test_a_checkpoint_that_does_not_match_the_run_is_refused(tmp_path, sim):
    path = _export(tmp_path, sim)
    other = CRPSimulation(CRPEnvSection(num_clients=30, num_edges=3, clients_per_round=6))
    with pytest.raises(UserError, match="trained on 24 clients, this run has 30"):
        RLCRPSelector(other.population, 0, checkpoint=str(path))
    selector = RLCRPSelector(sim.population, 0, checkpoint=str(path))
    with pytest.raises(UserError, match=r"policies for edges \[0, 1, 2\].*edge 3"):
        selector.select_all([SelectionRequest(3, (0, 1), 1, ())], 1)
    outside = sorted(set(range(24)) - set(sim.coverage[0]))[0]
    with pytest.raises(UserError, match=f"edge 0 covers client {outside} in this run but not"):
        selector.select_all([SelectionRequest(0, (outside,), 1, ())], 1)
    with pytest.raises(UserError, match="must pick 99 clients but covers only"):
        selector.select_all([SelectionRequest(0, tuple(sim.coverage[0]), 99, ())], 1)
    with pytest.raises(UserError, match="not found"):
        RLCRPSelector(sim.population, 0, checkpoint=str(tmp_path / "none.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="is not an RL-CRP policy export"):
        RLCRPSelector(sim.population, 0, checkpoint=str(tmp_path / "bad.pt"))
    with pytest.raises(UserError, match="needs selection.settings.checkpoint"):
        RLCRPSelector(sim.population, 0)
    assert RiskSettings(**selector.meta["risk"]) == sim.section.risk()


def test_client_bias_is_a_per_client_logit_offset_that_exports_and_loads(tmp_path, sim):
    net = CRPPolicyNet(5, (8,), client_bias=True)
    from pipelines.selection.crp import observation_size
    obs = torch.rand(2, observation_size(5))
    obs[:, -5:] = 1
    base = net(obs)[0]
    with torch.no_grad():
        net.bias[3] += 2.0
    assert torch.allclose(net(obs)[0] - base, torch.tensor([0, 0, 0, 2.0, 0]).expand(2, 5), atol=1e-6)
    assert CRPPolicyNet(5, (8,)).bias is None                       # off: the feature-only scorer
    torch.manual_seed(0)
    policies = {}
    for e, cov in sim.coverage.items():
        n = CRPPolicyNet(len(cov), (8,), client_bias=True)
        with torch.no_grad():
            n.bias.copy_(torch.linspace(0, 1, len(cov)))
        policies[e] = n.state_dict()
    s = sim.section
    meta = export_meta(num_clients=s.num_clients, coverage=sim.coverage, coverage_rule="modulo", picks_per_edge=sim.k,
                       hidden=(8,), use_crp=True, risk=s.risk(), stale_rounds=s.stale_rounds, client_bias=True,
                       local_epochs=s.local_epochs, model_bytes=s.model_bytes)
    selector = RLCRPSelector(sim.population, 0, checkpoint=str(save_export(tmp_path / "b.pt", meta, policies)))
    assert torch.allclose(selector.nets[0].bias, torch.linspace(0, 1, len(sim.coverage[0])))


def test_coverage_features_mark_home_clients_and_an_export_with_other_features_is_refused(tmp_path, sim):
    from pipelines.selection.crp import FEATURES, load_export

    home, overlap = FEATURES.index("home"), FEATURES.index("overlap")
    for e, tracker in sim.trackers.items():
        feats = tracker.features(1, np.ones(len(tracker.covered)))
        # modulo coverage, overlap 1: client c's home is c mod 3, and one other edge covers it too
        assert np.array_equal(feats[:, home], (tracker.covered % 3 == e).astype(float))
        assert np.all(feats[:, overlap] == 1.0)
    off = CRPSimulation(CRPEnvSection(num_clients=24, num_edges=3, clients_per_round=6))
    assert not off.trackers[0].features(1, np.ones(len(off.trackers[0].covered)))[:, [home, overlap]].any()
    path = _export(tmp_path, sim)
    meta, states = load_export(path)
    stale = save_export(tmp_path / "old.pt", {**meta, "features": [f for f in FEATURES if f not in ("home", "overlap")]},
                        states)
    with pytest.raises(UserError, match="features .* retrain"):
        RLCRPSelector(sim.population, 0, checkpoint=str(stale))
