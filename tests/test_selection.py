"""Per-edge client selection and conflicts between edge servers (no Ray)."""

import numpy as np
import pytest

from edgeray.errors import UserError
from pipelines.population import ClientProfile, PopulationView, sample_profiles
from pipelines.selection import (ClientOutcome, ConflictFreeOracle, GreedyLatencySelector, RandomSelector,
                                 SelectionRequest, Selector, edge_observations, resolve_conflicts)

NUM_CLIENTS, NUM_EDGES, BLOCK, PICKS = 40, 4, 10, 5


def _ring_requests(num=PICKS):
    """40 clients in 4 blocks of 10; block b is covered by edges b and b+1 (mod 4). Every client is
    in exactly 2 edges' candidate sets, each of size m = 20."""
    covers = {e: sorted(c for b in (e, (e - 1) % NUM_EDGES) for c in range(b * BLOCK, (b + 1) * BLOCK))
              for e in range(NUM_EDGES)}
    return [SelectionRequest(e, tuple(covers[e]), num, ()) for e in range(NUM_EDGES)]


def _population(n=NUM_CLIENTS):
    return PopulationView(tuple(sample_profiles(n, seed=3)), tuple([50] * n))


def _outcome(client, edge, status="ok", sim_s=1.0):
    return ClientOutcome(client, edge, status, sim_s)


# ----------------------------------------------------------------------------- conflicts

def test_conflicts_are_counted_once_per_pair():
    rng = np.random.default_rng(0)
    assert resolve_conflicts({0: [1, 2], 1: [3]}, "share", rng).conflicts == 0
    assert resolve_conflicts({0: [1, 2], 1: [2, 3]}, "share", rng).conflicts == 1        # k=2: one pair
    assert resolve_conflicts({0: [7], 1: [7], 2: [7]}, "share", rng).conflicts == 3      # k=3: three pairs
    assert resolve_conflicts({0: [7, 8], 1: [7, 8], 2: [7]}, "fail", rng).conflicts == 3 + 1


def test_share_rule_splits_bandwidth_and_aggregates_once_at_the_lowest_picker():
    res = resolve_conflicts({2: [5, 6], 0: [5], 1: [5, 9]}, "share", np.random.default_rng(0))
    assert res.share[5] == pytest.approx(1 / 3) and res.share[6] == res.share[9] == 1.0
    assert res.served_by[5] == (0, 1, 2) and res.served_by[6] == (2,) and res.served_by[9] == (1,)
    assert res.aggregate_at == {5: 0, 6: 2, 9: 1}
    assert res.lost == {0: (), 1: (), 2: ()}


def test_fail_rule_the_loser_receives_nothing_and_sees_conflict_lost():
    picks = {0: [4, 5], 1: [5, 6]}
    res = resolve_conflicts(picks, "fail", np.random.default_rng(1))
    winner = res.aggregate_at[5]
    loser = 1 - winner
    assert res.served_by[5] == (winner,) and res.share[5] == 1.0
    assert res.lost[loser] == (5,) and res.lost[winner] == ()
    assert res.served_by[4] == (0,) and res.served_by[6] == (1,)

    outcomes = {4: _outcome(4, 0, sim_s=2.0), 5: _outcome(5, winner, sim_s=3.0), 6: _outcome(6, 1, "dropout", 0.0)}
    obs = edge_observations(7, picks, outcomes, {0: 3.0, 1: 4.0}, res)
    assert set(obs) == {0, 1}
    assert [o.client_id for o in obs[0].outcomes] == [4, 5] and [o.client_id for o in obs[1].outcomes] == [5, 6]
    lost = next(o for o in obs[loser].outcomes if o.client_id == 5)
    assert lost == ClientOutcome(5, loser, "conflict_lost", 0.0, contenders=1)
    kept = next(o for o in obs[winner].outcomes if o.client_id == 5)
    assert kept.status == "ok" and kept.sim_s == 3.0 and kept.contenders == 1   # the winner learns of it too
    assert obs[0].outcomes[0].contenders == 0                  # client 4: only edge 0 picked it
    assert obs[1].outcomes[1].status == "dropout"               # an edge sees only its own clients
    assert obs[0].round == 7 and obs[0].edge_id == 0 and obs[1].edge_round_s == 4.0


def test_fail_rule_winner_is_seeded_and_either_edge_can_win():
    picks = {0: [5], 1: [5]}
    winners = [resolve_conflicts(picks, "fail", np.random.default_rng(s)).aggregate_at[5] for s in range(200)]
    again = [resolve_conflicts(picks, "fail", np.random.default_rng(s)).aggregate_at[5] for s in range(200)]
    assert winners == again
    assert 60 < winners.count(0) < 140                         # uniform: about 100 of 200


def test_share_observations_relabel_the_one_outcome_for_each_picker():
    picks = {0: [5], 1: [5]}
    res = resolve_conflicts(picks, "share", np.random.default_rng(0))
    obs = edge_observations(1, picks, {5: _outcome(5, 0, sim_s=2.5)}, {0: 2.5, 1: 2.5}, res)
    assert obs[0].outcomes == (ClientOutcome(5, 0, "ok", 2.5, contenders=1),)
    assert obs[1].outcomes == (ClientOutcome(5, 1, "ok", 2.5, contenders=1),)


def test_bad_rule_missing_outcome_and_bad_status_are_refused():
    with pytest.raises(ValueError, match="share, fail"):
        resolve_conflicts({0: [1]}, "first", np.random.default_rng(0))
    res = resolve_conflicts({0: [1]}, "share", np.random.default_rng(0))
    with pytest.raises(ValueError, match="client 1"):
        edge_observations(0, {0: [1]}, {}, {0: 1.0}, res)
    with pytest.raises(ValueError, match="conflict_lost"):
        ClientOutcome(1, 0, "timeout", 0.0)


# ----------------------------------------------------------------------------- selectors

def test_random_gives_the_expected_conflicts_and_the_oracle_none():
    # Client in block b is picked by edge b and by edge b+1 independently, each with n/m = 5/20:
    # E[conflicts] = 40 · (5/20)² = 2.5 per round.
    expected = NUM_CLIENTS * (PICKS / (2 * BLOCK)) ** 2
    requests = _ring_requests()
    population = _population()
    random_sel, oracle = RandomSelector(population, seed=11), ConflictFreeOracle(population, seed=11)
    counts = []
    for rnd in range(2000):
        picks = random_sel.select_all(requests, rnd)
        assert all(len(p) == PICKS for p in picks.values())
        counts.append(resolve_conflicts(picks, "share", np.random.default_rng(rnd)).conflicts)
        planned = oracle.select_all(requests, rnd)
        assert all(len(p) == PICKS for p in planned.values())   # 20 of 40 clients: room for every edge
        assert resolve_conflicts(planned, "fail", np.random.default_rng(rnd)).conflicts == 0
    assert np.mean(counts) == pytest.approx(expected, rel=0.05)


def test_oracle_gives_each_client_to_one_edge_when_clients_are_scarce():
    requests = [SelectionRequest(0, (1, 2, 3), 3, ()), SelectionRequest(1, (2, 3, 4), 3, ())]
    picks = ConflictFreeOracle(_population(5), seed=0).select_all(requests, 4)
    assert not set(picks[0]) & set(picks[1])
    assert sorted(picks[0] + picks[1]) == [1, 2, 3, 4]          # every client used, each once


def test_greedy_picks_the_fastest_by_its_estimate():
    speeds = [100.0, 400.0, 50.0, 400.0, 200.0]
    profiles = tuple(ClientProfile(i, s, 8.0, 8.0, 1.0) for i, s in enumerate(speeds))
    population = PopulationView(profiles, (100, 100, 100, 100, 100))
    sel = GreedyLatencySelector(population, seed=0)
    request = SelectionRequest(0, (0, 1, 2, 3, 4), 3, ())
    assert sel.select_all([request], 0) == {0: [1, 3, 4]}       # 0.25 s, 0.25 s (tie by id), 0.5 s
    # model bytes over a slow link make client 1 the slowest: 2 · 8e6 bits / 1e6 bit/s = 16 s
    slow = PopulationView(tuple(ClientProfile(i, s, 1.0 if i == 1 else 8.0, 1.0 if i == 1 else 8.0, 1.0)
                                for i, s in enumerate(speeds)), population.sizes)
    sel = GreedyLatencySelector(slow, seed=0, model_bytes=1e6, local_epochs=2)
    assert sel.select_all([request], 0) == {0: [0, 3, 4]}
    with pytest.raises(UserError, match="local_epoch"):
        GreedyLatencySelector(population, seed=0, local_epoch=2)


@pytest.mark.parametrize("cls", [RandomSelector, GreedyLatencySelector, ConflictFreeOracle])
def test_selectors_are_reproducible_and_answer_within_their_candidates(cls):
    requests = _ring_requests()
    population = _population()
    first = cls(population, seed=5).select_all(requests, 3)
    assert first == cls(population, seed=5).select_all(requests, 3)
    for r in requests:
        assert first[r.edge_id] == sorted(first[r.edge_id]) and set(first[r.edge_id]) <= set(r.candidates)
    if cls is not GreedyLatencySelector:                        # the greedy one ignores its generator
        assert first != cls(population, seed=5).select_all(requests, 4)


def test_random_picks_every_candidate_when_it_has_too_few():
    picks = RandomSelector(_population(), seed=0).select_all([SelectionRequest(2, (3, 8), 5, ())], 0)
    assert picks == {2: [3, 8]}


class _Fixed(Selector):
    name = "fixed"

    def __init__(self, population, seed, answer):
        super().__init__(population, seed)
        self.answer = answer

    def select(self, request, rnd, rng):
        return self.answer


@pytest.mark.parametrize("answer,problem", [([1, 99], "not its candidates"), ([1, 1], "twice"),
                                            ([1, 2, 3], "more than num")])
def test_a_bad_answer_raises_naming_the_selector(answer, problem):
    sel = _Fixed(_population(), 0, answer)
    with pytest.raises(ValueError, match=f"'fixed'.*{problem}"):
        sel.select_all([SelectionRequest(0, (1, 2, 3), 2, ())], 0)


def test_requests_are_checked():
    with pytest.raises(ValueError, match="sorted"):
        SelectionRequest(0, (3, 1), 1, ())
    sel = RandomSelector(_population(), seed=0)
    with pytest.raises(ValueError, match="one request per edge"):
        sel.select_all([SelectionRequest(0, (1,), 1, ()), SelectionRequest(0, (2,), 1, ())], 0)
