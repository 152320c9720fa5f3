"""Multiple-choice evaluation of SVD (arXiv 2509.15888) against its warm start, counting every
fallback. Scores come from teacher-forced logits of the adapted model (p_phi) and the base
model (p_theta), one batch at a time (`SVDEngine.prompt_option_logits` for cloze: each prompt once,
its options on its KV cache; `SVDEngine.option_logits` for letters); items of similar prompt
length are batched together.

Two formats (serving/svd/mcdata.py renders them):
  * "letter": one answer token decides. Under each decoder the option letters are ranked by
    their logit at the answer position. min-p (the confidence mask alone) and SVD use the
    paper's lambda = -inf there: a letter below alpha * max p_phi is removed. When EVERY
    letter is removed the item FALLS BACK to the warm start's letter; the count of such
    fallbacks is returned per decoder, never hidden.
  * "cloze": each option is a continuation; its score is the summed log-probability of its
    tokens under softmax(z_hat), divided by its length in characters ("acc_per_char", as OLMES
    does; OUR CHOICE). SVD steers only the kept (confidence-mask) entries and never puts -inf
    on an option token (`mask_fill="zero"`, OUR RECONSTRUCTION): with -inf a long option
    almost always holds a masked token, and the old scorer then fell back to the warm start on
    nearly every item. How often that would have happened is still reported
    (`neginf_all_masked`). For cloze, min-p with zero fill equals the warm start by
    construction, so it is not a separate decoder.
TruthfulQA: MC1 = the right answer ranked first among the MC1 options by UNnormalised summed
log-probability (as the benchmark defines it); MC2 = probability mass on the true answers,
sum_true p / sum_all p with p = exp(summed log-prob).

Decoders: "base" (p_theta), "warmstart" (p_phi), "minp" (letter only) and "svd:<name>" for
every mu value passed in (e.g. one per mu estimator, so their signs and effects are reported
side by side).
"""

from __future__ import annotations

import numpy as np
import torch

from serving.svd.mctasks import MCItem
from serving.svd.steering import confidence_mask, steering_vector

FORMATS = ("letter", "cloze")


def _decoders(mus: dict[str, float], fmt: str) -> list[str]:
    return ["base", "warmstart"] + (["minp"] if fmt == "letter" else []) + [f"svd:{k}" for k in mus]


def _letter_scores(phi: torch.Tensor, theta: torch.Tensor, letter_ids: list[int], mus: dict[str, float],
                   alpha: float):
    """Per decoder: (scores over the letters with -inf for removed ones, fallback flag)."""
    phi, theta = phi.float(), theta.float()
    ids = torch.tensor(letter_ids)
    keep = confidence_mask(phi, alpha)[ids]
    delta = steering_vector(phi, theta)[ids]
    out = {"base": (theta[ids], False), "warmstart": (phi[ids], False)}
    out["minp"] = (phi[ids].masked_fill(~keep, float("-inf")), not bool(keep.any()))
    for name, mu in mus.items():
        out[f"svd:{name}"] = ((phi[ids] + mu * delta).masked_fill(~keep, float("-inf")), not bool(keep.any()))
    return out


def _option_logprobs(phi: torch.Tensor, theta: torch.Tensor, targets: torch.Tensor, mus: dict[str, float],
                     alpha: float):
    """Summed log-prob of one option's tokens per decoder, and whether lambda = -inf would
    have removed one of its tokens under the confidence mask."""
    phi, theta = phi.float(), theta.float()
    index = targets[:, None]
    keep = confidence_mask(phi, alpha)
    delta = steering_vector(phi, theta) * keep
    out = {"base": float(torch.log_softmax(theta, -1).gather(-1, index).sum()),
           "warmstart": float(torch.log_softmax(phi, -1).gather(-1, index).sum())}
    for name, mu in mus.items():
        out[f"svd:{name}"] = float(torch.log_softmax(phi + mu * delta, -1).gather(-1, index).sum())
    return out, not bool(keep.gather(-1, index).all())


def evaluate(engine, task, items: list[MCItem], fmt: str, mus: dict[str, float], alpha: float = 0.1,
             batch_rows: int = 32, mc1_options: list[list[int]] | None = None,
             true_options: list[tuple[int, ...]] | None = None) -> dict:
    """Score `items` under every decoder. Returns {"correct": {decoder: 0/1 array},
    "fallbacks": {decoder: count}, "neginf_all_masked": count (cloze), "mc2": {decoder: array}
    (when `true_options` is given)}. `mc1_options[i]` restricts item i's ranking to those
    option indices (TruthfulQA MC1, unnormalised scores)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    tok = engine.tokenizer
    decoders = _decoders(mus, fmt)
    correct = {d: np.zeros(len(items)) for d in decoders}
    fallbacks = {d: 0 for d in decoders}
    mc2 = {d: np.zeros(len(items)) for d in decoders} if true_options is not None else None
    neginf_all_masked = 0

    def rank(scores: list[float], allowed: list[int] | None) -> int:
        allowed = allowed if allowed is not None else list(range(len(scores)))
        return max(allowed, key=lambda i: scores[i])

    def flush(batch):
        nonlocal neginf_all_masked
        if fmt == "letter":
            letter_ids = [[tok(o, add_special_tokens=False).input_ids[-1] for o in item.options] for _, item in batch]
            prompts = [tok(item.prompt, add_special_tokens=False).input_ids for _, item in batch]
            phi, theta, _ = engine.option_logits(task, prompts, [ids[:1] for ids in letter_ids])
            for row, (index, item) in enumerate(batch):
                per = _letter_scores(phi[row][0], theta[row][0], letter_ids[row], mus, alpha)
                warm = int(torch.argmax(per["warmstart"][0]))
                for d in decoders:
                    scores, fell_back = per[d]
                    fallbacks[d] += int(fell_back)
                    choice = warm if fell_back else int(torch.argmax(scores))
                    correct[d][index] = choice == item.answer
            return
        # each prompt runs once, its options continue from its KV cache
        prompts = [tok(item.prompt, add_special_tokens=False).input_ids for _, item in batch]
        options = [[tok(option, add_special_tokens=False).input_ids for option in item.options] for _, item in batch]
        phi, theta, targets = engine.prompt_option_logits(task, prompts, options)
        row = 0
        for k, (index, item) in enumerate(batch):
            per_option, would_mask = [], []
            for option in item.options:
                scores, masked = _option_logprobs(phi[row], theta[row], targets[row], mus, alpha)
                per_option.append(scores)
                would_mask.append(masked)
                row += 1
            neginf_all_masked += int(all(would_mask))
            allowed = mc1_options[index] if mc1_options is not None else None
            for d in decoders:
                sums = [s[d] for s in per_option]
                ranked = sums if allowed is not None else [v / max(1, len(o)) for v, o in zip(sums, item.options)]
                correct[d][index] = rank(ranked, allowed) == item.answer
                if mc2 is not None:
                    p = np.exp(np.array(sums) - max(sums))
                    mc2[d][index] = float(p[list(true_options[index])].sum() / p.sum())

    # items of similar prompt length share a batch (less left padding); results keep item order
    order = sorted(range(len(items)), key=lambda i: len(tok(items[i].prompt, add_special_tokens=False).input_ids))
    batch, rows = [], 0
    for index in order:
        item = items[index]
        batch.append((index, item))
        rows += 1 if fmt == "letter" else len(item.options)
        if rows >= batch_rows:
            flush(batch)
            batch, rows = [], 0
    if batch:
        flush(batch)
    out = {"correct": correct, "fallbacks": fallbacks,
           "neginf_all_masked": neginf_all_masked if fmt == "cloze" else None, "n": len(items)}
    if mc2 is not None:
        out["mc2"] = mc2
    return out

