"""Steering-vector decoding (SVDecode), the per-step math, in plain torch.

Paper: Hu, Han et al., "Distribution-Aligned Decoding for Efficient LLM Task Adaptation",
arXiv 2509.15888 (NeurIPS 2025). Notation: p_theta is the base model, p_phi the warm-started
(PEFT) model, z their logits at one decoding step, over the whole vocabulary.

Paper's rules:
  * steering vector in logit space, Eq. 10: delta = (diag(p_phi) - p_phi p_phi^T)(-log(p_phi/p_theta) - 1)
  * confidence mask, Eq. 12-13: I(y) = 1[p_phi(y) >= alpha * max p_phi], masked entries get lambda
    (alpha = 0.1, lambda = -inf by default, Table 6)
  * steered logits: z_hat = z_phi + mu * delta_hat, then any decoder (greedy by default)
  * per-token Gauss-Newton strength: mu* = <e_y - p_phi, delta> / (||delta||^2 + eps), eps = 1e-12;
    mu_bar = mean of mu* over the labelled tokens of the calibration split (Eq. 46 gives the
    sequence-form ratio of sums as an alternative).

OUR RECONSTRUCTION (each is a named choice in `SteeringConfig` / `calibrate`, with a test):
  * `steering_vector` uses the O(V) closed form delta = p_phi * (KL(p_phi||p_theta) - r),
    r = log p_phi - log p_theta: the "+1" of Eq. 10 cancels against the softmax Jacobian.
  * The mask is applied as its own step, `masked_fill(~I, lambda)` AFTER adding mu * delta:
    with lambda = -inf and a negative mu, mu * lambda would be +inf (notes/serving.md §1.1,
    catch 2). The calibrated mu is never clamped: it came out negative in our runs.
  * For calibration (and for /svd/score's default) masked entries of delta are set to 0
    ("zero"); the paper's Algorithm 2 would use the -inf-filled vector, which is undefined.
  * mu_bar estimator: "mean" (the paper's default), "median", or "ratio" (Eq. 46).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import LogitsProcessor

EPS = 1e-12
# transformers 5 renamed the KV-cache argument and output field `past_key_values` to `cache`.
CACHE_KEY = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
MASK_FILLS = ("neg_inf", "zero")
MU_ESTIMATORS = ("mean", "median", "ratio")


def steering_vector(logits_phi: torch.Tensor, logits_theta: torch.Tensor) -> torch.Tensor:
    """delta = J_softmax(z_phi) . (-grad KL) = p_phi * (KL(p_phi||p_theta) - log(p_phi/p_theta)).

    Works on any leading shape; the last dimension is the vocabulary. Computed in float32.
    """
    logp_phi = torch.log_softmax(logits_phi.float(), dim=-1)
    logp_theta = torch.log_softmax(logits_theta.float(), dim=-1)
    p_phi = logp_phi.exp()
    ratio = logp_phi - logp_theta
    kl = (p_phi * ratio).sum(-1, keepdim=True)
    return p_phi * (kl - ratio)


def confidence_mask(logits_phi: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """I(y) = 1[p_phi(y) >= alpha * max_y p_phi(y)]; alpha may be a per-row tensor. With
    alpha = 0.1 this is exactly min-p filtering on p_phi."""
    logp = torch.log_softmax(logits_phi.float(), dim=-1)
    alpha = torch.as_tensor(alpha, dtype=logp.dtype, device=logp.device)
    while alpha.dim() < logp.dim():
        alpha = alpha.unsqueeze(-1)
    threshold = logp.max(-1, keepdim=True).values + torch.log(alpha.clamp_min(1e-30))
    return logp >= threshold


def steer_logits(logits_phi: torch.Tensor, logits_theta: torch.Tensor, mu: torch.Tensor | float,
                 alpha: torch.Tensor | float, mask_fill: str = "neg_inf") -> torch.Tensor:
    """z_hat = z_phi + mu * delta, then the confidence mask as a separate step.

    `mask_fill="neg_inf"` is the paper's lambda = -inf (used for decoding); "zero" leaves masked
    entries at z_phi (no steering there, nothing removed), used for scoring. `mu` and `alpha` are
    scalars or one value per row; a row with mu = 0 and alpha = 0 is returned unchanged.
    """
    if mask_fill not in MASK_FILLS:
        raise ValueError(f"mask_fill must be one of {MASK_FILLS}, got {mask_fill!r}")
    delta = steering_vector(logits_phi, logits_theta)
    keep = confidence_mask(logits_phi, alpha)
    mu = torch.as_tensor(mu, dtype=delta.dtype, device=delta.device)
    while mu.dim() < delta.dim():
        mu = mu.unsqueeze(-1)
    if mask_fill == "zero":
        return logits_phi.float() + mu * delta * keep
    return (logits_phi.float() + mu * delta).masked_fill(~keep, float("-inf"))


def token_mu_terms(logits_phi: torch.Tensor, logits_theta: torch.Tensor, targets: torch.Tensor,
                   alpha: float, mask_fill: str = "zero") -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator <e_y - p_phi, delta_hat> and denominator ||delta_hat||^2 of the Gauss-Newton
    step mu*, per token. logits: [N, V]; targets: [N]. With mask_fill="zero" the masked entries
    of delta are zeroed (lambda = 0, OUR RECONSTRUCTION); "none" uses the unmasked delta."""
    delta = steering_vector(logits_phi, logits_theta)
    if mask_fill == "zero":
        delta = delta * confidence_mask(logits_phi, alpha)
    elif mask_fill != "none":
        raise ValueError(f"calibration mask_fill must be 'zero' or 'none', got {mask_fill!r}")
    residual = -torch.softmax(logits_phi.float(), dim=-1)
    residual[torch.arange(len(targets)), targets] += 1.0
    return (residual * delta).sum(-1), (delta * delta).sum(-1)


def optimal_mu(logits_phi: torch.Tensor, logits_theta: torch.Tensor, targets: torch.Tensor,
               alpha: float = 0.1, mask_fill: str = "zero") -> torch.Tensor:
    """Per-token mu* = <e_y - p_phi, delta_hat> / (||delta_hat||^2 + eps)."""
    numerator, denominator = token_mu_terms(logits_phi, logits_theta, targets, alpha, mask_fill)
    return numerator / (denominator + EPS)


def aggregate_mu(numerators: torch.Tensor, denominators: torch.Tensor, estimator: str = "mean") -> float:
    """mu_bar from per-token terms: mean or median of mu*, or the sequence-form ratio of sums
    (Eq. 46). The sign is kept: never clamp to >= 0."""
    if estimator not in MU_ESTIMATORS:
        raise ValueError(f"mu estimator must be one of {MU_ESTIMATORS}, got {estimator!r}")
    if numerators.numel() == 0:
        return 0.0
    if estimator == "ratio":
        return float(numerators.sum() / (denominators.sum() + EPS))
    mus = numerators / (denominators + EPS)
    return float(mus.mean() if estimator == "mean" else mus.median())


@dataclass
class SamplingParams:
    """What a request asks of the decoder after steering. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Standard top-k then nucleus filtering of one row of logits (entries set to -inf)."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """One next token per row: greedy, or temperature / top-k / top-p sampling, per request."""
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    for row, (p, gen) in enumerate(zip(params, generators)):
        z = logits[row].float()
        if p.temperature <= 0:
            tokens[row] = int(torch.argmax(z))
            continue
        z = filter_top_k_top_p(z / p.temperature, p.top_k, p.top_p)
        tokens[row] = int(torch.multinomial(torch.softmax(z, dim=-1), 1, generator=gen))
    return tokens


class SVDLogitsProcessor(LogitsProcessor):
    """SVD as a transformers `LogitsProcessor`, for `model.generate()` on the adapted model.

    Keeps its own KV cache of the base model (like transformers'
    `UnbatchedClassifierFreeGuidanceLogitsProcessor`): on the first call it runs the base model
    on the whole prompt, afterwards only on the newest token. `base_forward(**kwargs)` takes the
    usual model keywords and returns the base model's output (for a PEFT model: the same network
    with the adapter disabled). Pass the prompt's attention mask for
    left-padded batches.
    """

    def __init__(self, base_forward, mu: float, alpha: float = 0.1,
                 attention_mask: torch.Tensor | None = None, mask_fill: str = "neg_inf"):
        self.base_forward = base_forward
        self.mu = mu
        self.alpha = alpha
        self.mask_fill = mask_fill
        self.attention_mask = attention_mask
        self.cache = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.cache is None:
            if self.attention_mask is None:
                self.attention_mask = torch.ones_like(input_ids)
            step_ids, mask = input_ids, self.attention_mask
        else:
            self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(input_ids[:, -1:])], dim=1)
            step_ids, mask = input_ids[:, -1:], self.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]
        out = self.base_forward(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                **({CACHE_KEY: self.cache} if self.cache is not None else {}))
        self.cache = getattr(out, CACHE_KEY)
        steered = steer_logits(scores, out.logits[:, -1, :], self.mu, self.alpha, self.mask_fill)
        return steered.to(scores.dtype)
