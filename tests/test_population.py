"""The population model (no Ray): links per round, coverage geometry, the one timing formula,
and what an exchange payload costs on the wire."""

import numpy as np
import pytest
import torch

from actors.metering import payload_bytes
from edgeray.errors import UserError
from pipelines.population import (ClientProfile, Link, LinkModel, disc_coverage, load_link_trace, modulo_coverage,
                                  timing)

PROFILES = [ClientProfile(i, 100.0 * (i + 1), 8.0, 16.0, 1.0) for i in range(50)]


def test_timing_is_download_compute_upload_with_a_shared_link():
    t = timing(PROFILES[0], work=500, down_bytes=2e6, up_bytes=1e6, link=Link(8.0, 16.0))
    assert (t.download_s, t.compute_s, t.upload_s) == pytest.approx((1.0, 5.0, 1.0))
    halved = timing(PROFILES[0], 500, 2e6, 1e6, Link(8.0, 16.0), share=0.5)
    assert (halved.download_s, halved.upload_s) == pytest.approx((2.0, 2.0)) and halved.compute_s == t.compute_s


def test_rayleigh_links_are_seeded_per_round_and_client_with_mean_gain_one():
    links = LinkModel(PROFILES, seed=3, kind="rayleigh")
    assert links.link(4, 7) == LinkModel(PROFILES, seed=3, kind="rayleigh").link(4, 7)   # a resume draws the same
    assert links.link(4, 7) != links.link(5, 7)
    gains = np.array([links.link(r, c).up_mbps / PROFILES[c].uplink_mbps for r in range(200) for c in range(50)])
    assert gains.min() >= 0.05 and gains.mean() == pytest.approx(1.0, abs=0.05)   # E|h|² = 1 (floor adds a little)
    assert LinkModel(PROFILES, 0).link(9, 2) == Link(8.0, 16.0)                     # static: the profile's


def test_link_trace(tmp_path):
    path = tmp_path / "links.csv"
    path.write_text("round,client_id,uplink_mbps,downlink_mbps\n1,0,2.0,4.0\n-1,0,1.0,3.0\n")
    links = LinkModel(PROFILES, 0, "trace", trace=load_link_trace(path))
    assert links.link(1, 0) == Link(2.0, 4.0) and links.link(7, 0) == Link(1.0, 3.0)
    assert links.link(1, 5) == Link(8.0, 16.0)                                       # not in the trace: profile
    path.write_text("round,client_id,uplink_mbps\n1,0,2.0\n")
    with pytest.raises(UserError, match="lacks downlink_mbps"):
        load_link_trace(path)


def test_coverage_geometries_put_the_home_edge_first():
    mod = modulo_coverage(30, 3, overlap=1, seed=0)
    assert all(c[0] == cid % 3 and len(set(c)) == 2 for cid, c in enumerate(mod))
    small, large = disc_coverage(200, 4, 0.2, seed=1), disc_coverage(200, 4, 0.9, seed=1)
    assert all(len(c) >= 1 for c in small) and np.mean([len(c) for c in large]) > np.mean([len(c) for c in small])
    assert [c[0] for c in small] == [c[0] for c in large]                            # the nearest edge is home
    assert disc_coverage(200, 4, 0.9, seed=1) == large


def test_metered_bytes_of_a_cloned_tensor_and_of_a_view():
    """What crosses the actor boundary is what is pickled: a clone costs its elements plus a
    header under 1 kB, a view of a batch costs its whole storage (the trap split learning must avoid)."""
    batch = torch.randn(64, 32, 12, 12)
    smashed = batch[:4]
    elements = smashed.numel() * smashed.element_size()
    assert elements <= payload_bytes(smashed.clone()) < elements + 1024
    assert payload_bytes(smashed) >= batch.numel() * batch.element_size()
