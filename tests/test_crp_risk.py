"""RL-CRP's conflict-risk HMM (pipelines/selection/conflict_risk.py): no Ray, no torch."""

import numpy as np
import pytest

from edgeray.errors import UserError
from pipelines.selection.conflict_risk import CODINGS, ConflictRiskModel, RiskSettings

BURSTS = [(21, 30), (51, 60), (71, 80)]


def _in_burst(t):
    return any(lo <= t <= hi for lo, hi in BURSTS)


def _feed(model, rounds, seed=0):
    """Client 0 is picked every round and conflicts in bursts; client 1 is picked every round and
    never conflicts; client 2 is picked now and then and never conflicts."""
    rng = np.random.default_rng(seed)
    for t in rounds:
        picked = [0, 1] + ([2] if rng.random() < 0.3 else [])
        model.record(t, picked, [0] if _in_burst(t) else [])


@pytest.mark.parametrize("coding", CODINGS)
def test_risk_rises_for_clustered_conflicts_and_stays_low_without_conflicts(coding):
    model = ConflictRiskModel(3, RiskSettings(coding=coding, lag=2, refit_every=10), seed=0)
    risk_in, risk_out, never = [], [], []
    for t in range(1, 81):
        _feed(model, [t])
        r = model.risks(t + 1)                    # the next round's risk, from rounds <= t - 1
        never.append(r[1:])
        if t > 40 and _in_burst(t - 1) and _in_burst(t - 2):
            risk_in.append(r[0])
        elif t > 40 and not _in_burst(t - 1):
            risk_out.append(r[0])
    assert model.fits == 7 and model.hmm is not None    # 79 known rounds at round 81, R = 10
    assert np.mean(risk_in) > 0.6                 # deep in a burst: conflict likely
    assert np.mean(risk_out) < 0.2                # between bursts the risk falls back
    never = np.array(never[40:])
    assert never[:, 0].mean() < 0.1 and never[:, 0].max() < 0.3   # picked every round, never conflicted
    # picked now and then: between its picks its state drifts toward the pooled stationary mix
    assert never[:, 1].mean() < 0.2


def test_outcomes_inside_the_lag_do_not_change_the_risk():
    a = ConflictRiskModel(3, RiskSettings(lag=3, refit_every=5), seed=0)
    b = ConflictRiskModel(3, RiskSettings(lag=3, refit_every=5), seed=0)
    _feed(a, range(1, 41))
    _feed(b, range(1, 39))
    b.record(39, [0, 1, 2], [0, 1, 2])            # rounds 39, 40 are not known yet at round 41 (d = 3)
    b.record(40, [0, 1, 2], [0, 1, 2])
    assert np.allclose(a.risks(41), b.risks(41))
    assert not np.allclose(a.risks(43), b.risks(43))   # two rounds later they are


def test_refits_every_r_known_rounds_and_empirical_rate_before_the_first_fit():
    model = ConflictRiskModel(2, RiskSettings(lag=1, refit_every=4), seed=0)
    for t in range(1, 4):
        model.record(t, [0, 1], [0] if t == 2 else [])
    # no HMM yet: each client's share, shrunk toward the pooled 1 conflict in 6 picks
    assert model.risks(4) == pytest.approx([(1 + 1 / 6) / 4, (0 + 1 / 6) / 4])
    assert model.fits == 0 and model.hmm is None
    model.record(4, [0], [])
    model.risks(5)
    assert model.fits == 1
    for t in range(5, 12):
        model.record(t, [1], [])
    model.risks(12)
    assert model.fits == 2 and ConflictRiskModel(2).risks(1).tolist() == [0.0, 0.0]


def test_bad_settings_and_records_are_refused():
    with pytest.raises(UserError, match="coding 'v2'.*three_symbol"):
        RiskSettings(coding="v2")
    with pytest.raises(UserError, match="lag=0"):
        RiskSettings(lag=0)
    model = ConflictRiskModel(3)
    model.record(2, [0], [])
    with pytest.raises(ValueError, match="round 2 recorded after round 2"):
        model.record(2, [0], [])
    with pytest.raises(ValueError, match="not picked"):
        model.record(3, [0], [1])
