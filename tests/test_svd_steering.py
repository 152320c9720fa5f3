"""SVD math (serving/svd/steering.py) against explicit definitions: the closed-form steering
vector vs autograd's softmax Jacobian times the KL gradient, the Gauss-Newton mu*, the
identity at mu = 0, mask semantics with mu < 0, and the mu_bar estimators."""

import pytest
import torch

from serving.svd.steering import (aggregate_mu, confidence_mask, filter_top_k_top_p, optimal_mu, pick_tokens,
                                  SamplingParams, steer_logits, steering_vector, token_mu_terms)


def _logits(seed, rows=3, vocab=7, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale


def test_delta_is_softmax_jacobian_times_negative_kl_gradient():
    z_phi, z_theta = _logits(0), _logits(1)
    delta = steering_vector(z_phi, z_theta)
    for row in range(z_phi.shape[0]):
        p_theta = torch.softmax(z_theta[row], -1)
        p = torch.softmax(z_phi[row], -1).clone().requires_grad_(True)
        kl = (p * (p.log() - p_theta.log())).sum()
        (grad,) = torch.autograd.grad(kl, p)                 # = log(p/p_theta) + 1 (Eq. 7-8)
        jacobian = torch.autograd.functional.jacobian(lambda z: torch.softmax(z, -1), z_phi[row])
        expected = jacobian @ (-grad)                        # Eq. 10
        torch.testing.assert_close(delta[row].double(), expected, atol=1e-6, rtol=1e-5)


def test_delta_vanishes_when_models_agree_and_sums_to_zero():
    z = _logits(2)
    assert steering_vector(z, z + 3.0).abs().max() < 1e-6   # softmax is shift invariant
    assert steering_vector(z, _logits(3)).sum(-1).abs().max() < 1e-6


def test_mu_star_is_the_least_squares_step_on_a_constructed_case():
    # Two tokens, p_phi = (0.5, 0.5), p_theta = (0.8, 0.2): r = log(p_phi/p_theta).
    z_phi = torch.tensor([[0.0, 0.0]])
    z_theta = torch.log(torch.tensor([[0.8, 0.2]]))
    r = torch.log(torch.tensor([0.5 / 0.8, 0.5 / 0.2]))
    kl = 0.5 * r.sum()
    delta = 0.5 * (kl - r)                                   # p * (KL - r), by hand
    torch.testing.assert_close(steering_vector(z_phi, z_theta)[0], delta.float())
    # target token 1: residual e_y - p = (-0.5, 0.5); mu* = <res, delta> / ||delta||^2
    expected = float((torch.tensor([-0.5, 0.5]) * delta).sum() / (delta * delta).sum())
    got = float(optimal_mu(z_phi, z_theta, torch.tensor([1]), alpha=0.1))
    assert got == pytest.approx(expected, rel=1e-5)
    # delta points back toward the base, which prefers token 0: the target token 1 needs a step
    # away from it, so mu* is negative (as our calibrations came out; never clamp it)
    assert got < 0
    # and it is the 1-D least-squares fit of the residual by delta
    fit = torch.linalg.lstsq(delta[:, None].double(), torch.tensor([-0.5, 0.5], dtype=torch.float64)).solution
    assert got == pytest.approx(float(fit), rel=1e-5)


def test_mu_star_uses_only_unmasked_entries_with_zero_fill():
    z_phi, z_theta, y = _logits(4, rows=5, vocab=11), _logits(5, rows=5, vocab=11), torch.tensor([0, 3, 5, 7, 10])
    num, den = token_mu_terms(z_phi, z_theta, y, alpha=0.3, mask_fill="zero")
    keep = confidence_mask(z_phi, 0.3)
    delta = steering_vector(z_phi, z_theta) * keep
    residual = torch.nn.functional.one_hot(y, 11).float() - torch.softmax(z_phi.float(), -1)
    torch.testing.assert_close(num, (residual * delta).sum(-1))
    torch.testing.assert_close(den, (delta * delta).sum(-1))
    full_num, _ = token_mu_terms(z_phi, z_theta, y, alpha=0.3, mask_fill="none")
    assert not torch.allclose(num, full_num)


def test_identity_at_mu_zero():
    z_phi, z_theta = _logits(6).float(), _logits(7).float()
    torch.testing.assert_close(steer_logits(z_phi, z_theta, 0.0, 0.1, "zero"), z_phi)
    steered = steer_logits(z_phi, z_theta, 0.0, 0.1, "neg_inf")
    keep = confidence_mask(z_phi, 0.1)
    torch.testing.assert_close(steered[keep], z_phi[keep])   # only the min-p filter acts


def test_mask_semantics_with_negative_mu():
    z_phi, z_theta = _logits(8, rows=4, vocab=50, scale=3.0).float(), _logits(9, rows=4, vocab=50, scale=3.0).float()
    steered = steer_logits(z_phi, z_theta, -2.5, 0.1, "neg_inf")
    p = torch.softmax(z_phi, -1)
    keep = p >= 0.1 * p.max(-1, keepdim=True).values          # min-p 0.1 on p_phi
    assert torch.equal(torch.isfinite(steered), keep)
    assert not torch.isnan(steered).any() and not (steered == float("inf")).any()
    delta = steering_vector(z_phi, z_theta)
    torch.testing.assert_close(steered[keep], (z_phi - 2.5 * delta)[keep])
    # the argmax of p_phi always survives the mask, so a row never becomes all -inf
    assert keep[torch.arange(4), p.argmax(-1)].all()


def test_per_row_mu_and_alpha():
    z_phi, z_theta = _logits(10).float(), _logits(11).float()
    rows = steer_logits(z_phi, z_theta, torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.1, 0.2, 0.3]))
    for i, (mu, alpha) in enumerate([(0.0, 0.1), (1.0, 0.2), (-1.0, 0.3)]):
        torch.testing.assert_close(rows[i], steer_logits(z_phi[i:i + 1], z_theta[i:i + 1], mu, alpha)[0])


def test_mu_bar_estimators_keep_the_sign():
    num, den = torch.tensor([-1.0, -3.0, 2.0]), torch.tensor([1.0, 1.0, 4.0])
    assert aggregate_mu(num, den, "mean") == pytest.approx((-1 - 3 + 0.5) / 3)
    assert aggregate_mu(num, den, "median") == pytest.approx(-1.0)
    assert aggregate_mu(num, den, "ratio") == pytest.approx(-2.0 / 6.0)
    with pytest.raises(ValueError):
        aggregate_mu(num, den, "mode")


def test_sampling_filters_and_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert torch.isinf(filter_top_k_top_p(logits[0], 2, 1.0)).tolist() == [True, False, False, True]
    probs = torch.softmax(logits[0], -1)
    kept = ~torch.isinf(filter_top_k_top_p(logits[0], 0, float(probs.max()) + 1e-3))
    assert kept.tolist() == [False, True, True, False]        # nucleus: smallest set above top_p
    assert pick_tokens(logits, [SamplingParams()], [None]).tolist() == [1]
    params = [SamplingParams(temperature=1.0, top_k=1)]
    assert pick_tokens(logits, params, [torch.Generator().manual_seed(0)]).tolist() == [1]
    seeded = [pick_tokens(torch.zeros(1, 100), [SamplingParams(temperature=1.0)], [torch.Generator().manual_seed(5)])
              for _ in range(2)]
    assert torch.equal(*seeded)
