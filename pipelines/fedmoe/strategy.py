"""FedAvg-MoE, HFedMoE and FedAlign-MoE: federated LoRA fine-tuning of MoE language models.

HFedMoE: Fang, Lin, Hu, Ma, Tao, Deng, Chen, Fang, "HFedMoE: Resource-aware Heterogeneous
Federated Learning with Mixture-of-Experts", arXiv:2601.00583 (2026).
FedAlign-MoE: Fang, Wang, An, Lin, Deng, Chen, Fang, "Aggregation Alignment for Federated Learning
with Mixture-of-Experts under Data Heterogeneity", arXiv:2603.21276 (2026).
Neither paper's text or code was available; the rules below follow the method note
(``notes/moe_fl.md``): equations of HFedMoE from a third-party transcription, fragments of
FedAlign-MoE from a review. Every rule that is ours is marked [R] and is a named setting
(``settings.py``); the paper's form is the default where it is known.

Common to the three (one local loop, ``MoEStrategy.client_update``): AdamW (weight decay 0) over
the trainable tensors (attention and expert LoRA, routers, head); per batch the router tap gives
G(x) = softmax(router logits) of every MoE layer over the real tokens. Client statistics per layer
l and expert e: usage u_c(e) = mean_x G_e(x) over the local tokens seen in training (eq. 16; [R]
collected during the local epoch rather than in a separate pass), importance s_c(e) = mean over
batches of s_b(e) (eq. 5), top-k token load, routing entropy H(mean G) and KL(u_c‖p_glob).

FedAvg-MoE (baseline): every trainable tensor uploaded whole, example-weighted mean.

HFedMoE [P: eqs. 3-5, 10-11, 14-17, 19-21 as transcribed]:
  client: per batch and layer, s_b(e) = λ·mean_i G_e(x_i) + (1−λ)·max_i G_e(x_i) (3-5);
    KL_e = mean_i G_e(x_i)·log(G_e(x_i)/p(z_e)), p(z_e) = mean_j G_e(x_j) (10-11);
    I_b(e) = s_b(e) − β·KL_e (14); of the experts any token routed to (E_union), the C_budget with
    the highest I_b are trained (15): the forward pass keeps every token's routing, the backward
    pass zeroes the LoRA gradients of the other experts, and after the optimizer step their slices
    are put back exactly, so momentum cannot move them either [R: exactness];
    C_budget(c) = ceil(ρ_c·E) per layer, ρ_c from tiers or the client's compute-speed rank [R].
    Upload: the expert slices with u_c(e) >= τ (Rows of the peft tensors) + dense tensors + stats.
  server: expert e = Σ_c n_c·1[u_c(e) >= τ]·E_e(c) / Σ_c n_c·1[u_c(e) >= τ] (17); an expert nobody
    qualified for keeps its value; router = Σ_c α(c)·G_c with α(c) = Σ_{e∈S_c} u_c(e)·s_c(e)/|S_global|
    (19-21), S_c = {e: u_c(e) >= τ}; the transcription leaves α unnormalised, we normalise it by
    default [R] (``router_alpha=raw`` applies it as written); other tensors: FedAvg.
FedAlign-MoE:
  [P] router rows per expert: router[l][e,:] = Σ_i ω_i(e)·router_i[l][e,:], ω_i(e) = s_i(e)/Σ_j s_j(e)
    with s_i(e) = n_i·u_i(e) [R: s is undefined in what we saw]; optional [R] factor exp(−KL(u_i‖p_glob)/T).
  [R] local gating regulariser λ_g·Σ_l KL(p_glob[l] ‖ mean G of the batch): it pulls the batch's
    routing marginal toward the global one and leaves per-token preferences free (``token``: per-token
    KL from the round's frozen global router, an ablation).
  [P form] adaptive threshold τ_e = M(e) − β·Σ(e), the mean and std of the clients' pairwise
    semantic similarities S_ij(e) for expert e; [R] S_ij(e) = cosine of per-expert descriptors.
    ``descriptor=anchor-hidden`` (default): the hidden states the review says the paper transmits,
    on public anchors so no private input is involved: every client runs the public anchor
    sequences (``info['anchors']`` of the data set) through the round's global model before it
    trains; the region of expert e is the anchor tokens whose global top-k includes e (at most
    ``anchor_tokens``, highest gate probability first), the same for all clients; after training it
    sends, for each expert it uploads, vec(f_e^(i)(X_{l,e}) − f_e^(g)(X_{l,e})), the change of the
    expert's output there (float16, metered with the update). ``update`` / ``weights``: computed on
    the server from the uploaded LoRA factors (B_iA_i − B_gA_g, or B_iA_i), nothing extra sent.
    Client i is aligned for e when mean_j S_ij(e) >= τ_e and u_i(e) > min_usage; expert e =
    example-weighted mean over the aligned clients [R].
  [R] ``expert_mode=personalised`` (the γ_ij(e) reading): besides the global model, client i gets
    expert e = Σ_j γ_ij(e)·E_j(e) over the holders j of e, γ_ij ∝ n_j·1[S_ij(e) >= τ_e], row-
    normalised; it is kept in the server state and sent with the client's next instruction (metered
    as download), and the client starts its local training from it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipelines.fedmoe.layout import MoELayout, extract_experts, moe_layout, rows_of_expert
from pipelines.fedmoe.model import anchor_regions, expert_output, router_tap
from pipelines.fedmoe.settings import (FedAlignMoESettings, FedAvgMoESettings, HFedMoESettings, MoESettings,
                                       budget_experts)
from pipelines.models import get_params
from pipelines.strategy import ClientContext, ClientUpdate, Rows, Strategy, WeightedSum

EPS = 1e-12


def entropy(p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, np.float64), EPS, None)
    return float(-(p * np.log(p)).sum())


def kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np.clip(np.asarray(p, np.float64), EPS, None), np.clip(np.asarray(q, np.float64), EPS, None)
    return float((p * np.log(p / q)).sum())


def importance(probs: torch.Tensor, mix: float) -> torch.Tensor:
    """s_b(e) = λ·mean_i G_e(x_i) + (1−λ)·max_i G_e(x_i) (HFedMoE eqs. 3-5)."""
    return mix * probs.mean(0) + (1 - mix) * probs.max(0).values


def ib_score(probs: torch.Tensor, mix: float, beta: float) -> torch.Tensor:
    """I_b(e) = s_b(e) − β·KL_e, KL_e = mean_i G_e(x_i)·log(G_e(x_i)/p(z_e)) (eqs. 10-11, 14)."""
    pz = probs.mean(0).clamp_min(EPS)
    kl_e = (probs * torch.log(probs.clamp_min(EPS) / pz)).mean(0)
    return importance(probs, mix) - beta * kl_e


def select_experts(probs: torch.Tensor, top_k: int, budget: int, how: str, mix: float, beta: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """HFedMoE eq. 15: of E_union (the experts in any token's top-k), the ``budget`` best by the IB
    score (``ib``), by s_b (``importance``) or at random; a bool mask (E,)."""
    experts = probs.shape[1]
    union = torch.zeros(experts, dtype=torch.bool)
    if len(probs):
        union[probs.topk(top_k, dim=1).indices.reshape(-1).unique().cpu()] = True
    if int(union.sum()) <= budget:
        return union
    if how == "ib":
        score = ib_score(probs, mix, beta).detach().cpu()
    elif how == "importance":
        score = importance(probs, mix).detach().cpu()
    else:
        score = torch.rand(experts, generator=generator)
    score = torch.where(union, score.float(), torch.tensor(-math.inf))
    keep = torch.zeros(experts, dtype=torch.bool)
    keep[score.topk(budget).indices] = True
    return keep


def gate_regulariser(probs: torch.Tensor, p_glob: torch.Tensor) -> torch.Tensor:
    """KL(p_glob ‖ mean routing of the batch) (FedAlign-MoE [R])."""
    marginal = probs.mean(0).clamp_min(EPS)
    p = p_glob.clamp_min(EPS)
    return (p * torch.log(p / marginal)).sum()


def load_balance(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style auxiliary loss E·Σ_e f_e·P_e (f: share of top-k slots, P: mean probability)."""
    experts = probs.shape[1]
    counts = torch.bincount(probs.topk(top_k, dim=1).indices.reshape(-1), minlength=experts).float()
    return experts * (counts / counts.sum().clamp_min(1) * probs.mean(0)).sum()


class ExpertMasks:
    """Per-layer expert masks applied to the expert LoRA gradients (gradient hooks) and, after the
    optimizer step, to the parameters themselves (unselected slices put back exactly)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], layout: MoELayout):
        self.layout = layout
        self.params = {t.key: params[t.key] for t in layout.tensors}
        self.masks = {t.key: None for t in layout.tensors}
        self.handles = [self.params[t.key].register_hook(
            lambda g, key=t.key: g if self.masks[key] is None else g * self.masks[key]) for t in layout.tensors]

    def remove(self) -> None:
        """Unhook (the runtime's hand-over also drops hooks added by a client; a plain loop may not)."""
        for handle in self.handles:
            handle.remove()

    def set(self, selected: dict[int, torch.Tensor]) -> None:
        for t in self.layout.tensors:
            sel = selected[t.layer].to(self.params[t.key].device, torch.float32)
            if t.factor == "A":
                self.masks[t.key] = sel.repeat_interleave(t.rank)[:, None]
            else:
                self.masks[t.key] = sel.repeat(t.rank)[None, :]

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def restore_unselected(self, before: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, p in self.params.items():
                m = self.masks[key].to(p.dtype)
                p.copy_(p * m + before[key] * (1 - m))


def changed_experts(layout: MoELayout, params: dict[str, torch.nn.Parameter],
                    before: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    """Which experts' LoRA slices changed in the last step, per layer (bool (E,))."""
    out = {layer: np.zeros(layout.experts, bool) for layer in layout.layers}
    for t in layout.tensors:
        diff = (params[t.key].detach() != before[t.key])
        per = diff.reshape(t.experts, t.rank, -1).any(-1).any(-1) if t.factor == "A" else \
            diff.reshape(diff.shape[0], t.rank, t.experts).any(0).any(0)
        out[t.layer] |= per.cpu().numpy()
    return out


class MoEStrategy(Strategy):
    """The local loop and statistics the three methods share; FedAvg over every tensor."""

    name = "fedavg-moe"
    uses_client_state = False
    budgeted = False           # HFedMoE: the instruction's expert budget is enforced in backward
    settings: MoESettings

    def __init__(self, settings: MoESettings | None = None):
        super().__init__(settings if settings is not None else FedAvgMoESettings())

    # ---------------------------------------------------------------- server: state and instructions
    def init_state(self, global_params):
        layout = moe_layout({k: v.shape for k, v in global_params.items()})
        return {"p_glob": np.full((len(layout.layers), layout.experts), 1.0 / layout.experts)}

    def instruction(self, rnd, state, cid, population) -> dict:
        return {"lr": self.settings.lr, "local_epochs": self.settings.local_epochs}

    def configure_round(self, rnd, state, client_ids, population):
        return {cid: self.instruction(rnd, state, cid, population) for cid in client_ids}

    def work(self, instruction, num_examples):
        """[R] forward = 1 unit per example, backward = 2 units scaled by the trained share of experts."""
        rho = instruction.get("rho", 1.0)
        return float(num_examples) * instruction.get("local_epochs", self.settings.local_epochs) * (1 + 2 * rho) / 3

    # ---------------------------------------------------------------- client
    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        s = self.settings
        model = ctx.model
        model.train()
        tap = router_tap(model)
        named = dict(model.named_parameters())
        trainable = {k: p for k, p in named.items() if p.requires_grad}
        layout = moe_layout({k: tuple(p.shape) for k, p in trainable.items()})
        top_k = self._top_k(model)
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=ctx.instruction.get("lr", s.lr),
                                      weight_decay=s.weight_decay)
        budget = ctx.instruction.get("budget") if self.budgeted else None
        masks = ExpertMasks(trainable, layout) if budget is not None else None
        gen = torch.Generator().manual_seed(int(ctx.rng.integers(2**31)))
        self.begin_local(ctx, tap, trainable, layout)
        L, E = len(layout.layers), layout.experts
        usage, s_sum, load = np.zeros((L, E)), np.zeros((L, E)), np.zeros((L, E))
        trained = np.zeros((L, E), bool)
        tokens = batches = seen = 0
        loss_sum = token_entropy = backward_tokens = 0.0
        max_trained = 0
        for _ in range(ctx.instruction.get("local_epochs", s.local_epochs)):
            for xb, yb in ctx.data.batches(s.batch_size, ctx.rng):
                xb, yb = xb.to(ctx.device, non_blocking=True), yb.to(ctx.device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = ctx.loss(model, xb, yb)
                probs = [tap.probs(layer) for layer in layout.layers]
                total = loss + self.regulariser(ctx, tap, layout, probs)
                if s.aux_loss_coef > 0:
                    total = total + s.aux_loss_coef * sum(load_balance(p, top_k) for p in probs)
                selected = None
                if masks is not None:
                    selected = {layer: select_experts(p.detach(), top_k, budget, self.settings.selection,
                                                      self.settings.importance_mix, self.settings.ib_beta, gen)
                                for layer, p in zip(layout.layers, probs)}
                    masks.set(selected)
                before = {t.key: trainable[t.key].detach().clone() for t in layout.tensors}
                total.backward()
                optimizer.step()
                if masks is not None:
                    masks.restore_unselected(before)
                changed = changed_experts(layout, trainable, before)
                with torch.no_grad():
                    for i, (layer, p) in enumerate(zip(layout.layers, probs)):
                        p = p.detach()
                        n_tok = len(p)
                        usage[i] += p.sum(0).cpu().numpy()
                        s_sum[i] += importance(p, getattr(s, "importance_mix", 0.5)).cpu().numpy()
                        top = p.topk(top_k, dim=1).indices
                        counts = torch.bincount(top.reshape(-1), minlength=E).cpu().numpy()
                        load[i] += counts
                        token_entropy += float(-(p.clamp_min(EPS) * p.clamp_min(EPS).log()).sum(1).mean()) / L
                        sel = changed[layer] if selected is None else selected[layer].numpy()
                        backward_tokens += float(counts[sel].sum())
                        trained[i] |= changed[layer]
                        max_trained = max(max_trained, int(changed[layer].sum()))
                    tokens += n_tok
                batches += 1
                loss_sum += loss.item() * len(yb)
                seen += len(yb)
        if masks is not None:
            masks.remove()
        usage /= max(tokens, 1)
        stats = {
            "usage": usage.astype(np.float32), "importance": (s_sum / max(batches, 1)).astype(np.float32),
            "load": load.astype(np.float32), "trained": trained,
            "entropy": float(np.mean([entropy(u) for u in usage])),
            "token_entropy": token_entropy / max(batches, 1),
            "gate_kl": float(np.mean([kl(u, q) for u, q in zip(usage, np.asarray(ctx.instruction.get(
                "p_glob", np.full((L, E), 1.0 / E))))])),
            "backward_expert_tokens": backward_tokens, "max_trained_experts": max_trained,
            "budget": budget,
        }
        self.end_local(ctx, tap, trainable, layout, stats)
        params = self.upload(get_params(model), layout, stats)
        stats["uploaded_experts"] = int(sum(len(v) for v in stats.pop("upload_experts", {}).values())) \
            if "upload_experts" in stats else L * E
        return ClientUpdate(ctx.client_id, len(ctx.data), params, stats=stats,
                            metrics={"train_loss": loss_sum / max(seen, 1)})

    def _top_k(self, model) -> int:
        config = model.lm.get_base_model().config if hasattr(model, "lm") else model.get_base_model().config
        return int(getattr(config, "num_experts_per_tok", 2))

    def begin_local(self, ctx, tap, trainable, layout) -> None:
        """Before the local loop (FedAlign keeps the frozen global router here)."""

    def regulariser(self, ctx, tap, layout, probs) -> torch.Tensor | float:
        return 0.0

    def end_local(self, ctx, tap, trainable, layout, stats) -> None:
        """After the local loop, before the upload (FedAlign computes its anchor descriptors here)."""

    def upload(self, params, layout, stats) -> dict:
        return params

    # ---------------------------------------------------------------- server: aggregation
    def aggregate(self, rnd, global_params, state, partial):
        new = partial.average(global_params)
        return new, self.next_state(state, partial), {**partial.mean_metrics(), **self.telemetry(partial, state)}

    def next_state(self, state, partial) -> dict:
        if not partial.stats:
            return state
        n = np.array([num for _, num, _ in partial.stats], np.float64)
        usage = np.stack([st["usage"] for _, _, st in partial.stats]).astype(np.float64)
        p_glob = (n[:, None, None] * usage).sum(0) / n.sum()
        return {**state, "p_glob": p_glob / p_glob.sum(1, keepdims=True)}

    def telemetry(self, partial, state) -> dict:
        stats = [st for _, _, st in partial.stats]
        if not stats:
            return {}
        out = {
            "expert_load": np.sum([st["load"] for st in stats], 0).mean(0).round(1).tolist(),
            "routing_entropy": float(np.mean([st["entropy"] for st in stats])),
            "routing_entropy_per_client": [round(st["entropy"], 4) for st in stats],
            "token_entropy": float(np.mean([st["token_entropy"] for st in stats])),
            "gate_kl": float(np.mean([st["gate_kl"] for st in stats])),
            "gate_kl_per_client": [round(st["gate_kl"], 4) for st in stats],
            "experts_uploaded_per_client": [st["uploaded_experts"] for st in stats],
            "backward_expert_tokens": float(sum(st["backward_expert_tokens"] for st in stats)),
            "budget_violations": int(sum(st["budget"] is not None and st["max_trained_experts"] > st["budget"]
                                         for st in stats)),
        }
        return out


class FedAvgMoE(MoEStrategy):
    name = "fedavg-moe"


def usage_threshold(settings: MoESettings, experts: int) -> float:
    return settings.usage_share / experts


class HFedMoE(MoEStrategy):
    name = "hfedmoe"
    budgeted = True
    settings: HFedMoESettings

    def __init__(self, settings: HFedMoESettings | None = None):
        super().__init__(settings if settings is not None else HFedMoESettings())

    def configure_round(self, rnd, state, client_ids, population):
        experts = np.asarray(state["p_glob"]).shape[1]
        tiers = sorted(self.settings.tiers)
        if self.settings.budget_source == "profile":
            speeds = np.array([p.compute_speed for p in population.profiles])
            rank = {c: int((speeds < speeds[c]).sum()) for c in client_ids}
            tier = {c: tiers[min(len(tiers) - 1, rank[c] * len(tiers) // len(speeds))] for c in client_ids}
        else:
            tier = {c: tiers[c % len(tiers)] for c in client_ids}
        budget = {c: budget_experts(tier[c], experts) for c in client_ids}
        return {c: {"lr": self.settings.lr, "local_epochs": self.settings.local_epochs, "rho": budget[c] / experts,
                    "budget": budget[c]} for c in client_ids}

    def upload(self, params, layout, stats):
        tau = usage_threshold(self.settings, layout.experts)
        chosen = {}
        for i, layer in enumerate(layout.layers):
            keep = stats["usage"][i] >= tau
            if self.settings.upload == "usage-and-trained":
                keep &= stats["trained"][i]
            chosen[layer] = np.flatnonzero(keep).tolist()
        stats["upload_experts"] = chosen
        dense = {k: v for k, v in params.items() if k not in layout.expert_keys}
        return {**dense, **extract_experts(params, layout, chosen)}

    def router_weight(self, stats, layout, i) -> float:
        """Σ_{e∈S_c} u_c(e)·s_c(e) (eq. 20 before dividing by |S_global|, which cancels when α is normalised)."""
        tau = usage_threshold(self.settings, layout.experts)
        u, imp = stats["usage"][i].astype(np.float64), stats["importance"][i].astype(np.float64)
        return float((u * imp)[u >= tau].sum())

    def accumulate(self, partial, update):
        layout = moe_layout({k: v.shape for k, v in update.params.items() if not isinstance(v, Rows)})
        weights = {}
        if self.settings.router_alpha != "fedavg":
            for i, layer in enumerate(layout.layers):
                weights[layout.routers[layer]] = self.router_weight(update.stats, layout, i)
        return partial.add(update, weight=weights)

    def aggregate(self, rnd, global_params, state, partial):
        new = partial.average(global_params)
        layout = moe_layout({k: v.shape for k, v in global_params.items()})
        tau = usage_threshold(self.settings, layout.experts)
        if self.settings.router_alpha == "raw" and partial.stats:
            # G = Σ_c α(c)·G_c with α(c) = w_c/|S_global| (not normalised): the weighted mean times Σ w / |S_global|
            for i, layer in enumerate(layout.layers):
                key = layout.routers[layer]
                union = np.zeros(layout.experts, bool)
                for _, _, st in partial.stats:
                    union |= st["usage"][i] >= tau
                total = float(np.sum(partial.weights.get(key, 0.0)))
                if total > 0 and union.any():
                    new[key] = (new[key] * (total / union.sum())).astype(global_params[key].dtype)
        return new, self.next_state(state, partial), {**partial.mean_metrics(), **self.telemetry(partial, state)}


class HeldExperts(WeightedSum):
    """A ``WeightedSum`` of the dense and router tensors that also keeps every client's expert
    slices, because FedAlign-MoE compares clients pairwise before it averages an expert."""

    def __init__(self):
        super().__init__()
        # (client, n, usage, {key: Rows}, {layer: {expert: anchor descriptor}})
        self.held: list[tuple[int, int, dict, dict, dict]] = []

    def merge(self, other):
        super().merge(other)
        self.held.extend(getattr(other, "held", []))
        return self


class FedAlignMoE(MoEStrategy):
    name = "fedalign-moe"
    settings: FedAlignMoESettings

    def __init__(self, settings: FedAlignMoESettings | None = None):
        super().__init__(settings if settings is not None else FedAlignMoESettings())

    def instruction(self, rnd, state, cid, population):
        out = {**super().instruction(rnd, state, cid, population), "p_glob": np.asarray(state["p_glob"], np.float32)}
        if self.settings.expert_mode == "personalised" and cid in state.get("personal", {}):
            out["personal_experts"] = state["personal"][cid]
        return out

    # ---- client
    def begin_local(self, ctx, tap, trainable, layout):
        self._p_glob = torch.as_tensor(np.asarray(ctx.instruction["p_glob"]), dtype=torch.float32, device=ctx.device)
        self._regions = []
        if self.settings.descriptor == "anchor-hidden":   # on the round's global model, before any change
            self._regions = anchor_regions(ctx.model, self._top_k(ctx.model), self.settings.anchor_tokens, ctx.device)
        with torch.no_grad():      # personalised: start from this client's γ-mixed experts
            for key, r in (ctx.instruction.get("personal_experts") or {}).items():
                p = trainable[key]
                p.index_copy_(r["axis"], torch.as_tensor(np.asarray(r["index"]), device=p.device),
                              torch.as_tensor(np.asarray(r["values"]), dtype=p.dtype, device=p.device))
        tap.keep_inputs = self.settings.gate_reg_form == "token" and self.settings.gate_reg > 0
        self._frozen = {layer: trainable[layout.routers[layer]].detach().clone() for layer in layout.layers}

    def end_local(self, ctx, tap, trainable, layout, stats):
        """anchor-hidden [R]: for each expert the client uploads, the change of the expert's output on
        its anchor region, vec(f_e^(i)(X_{l,e}) − f_e^(g)(X_{l,e})), float16."""
        if not self._regions:
            return
        row = {layer: i for i, layer in enumerate(layout.layers)}
        desc: dict[int, dict[int, np.ndarray]] = {}
        with torch.no_grad():
            for r in self._regions:
                if stats["usage"][row[r.layer]][r.expert] > self.settings.min_usage:
                    delta = expert_output(tap.experts[r.layer], r.inputs, r.expert) - r.global_output \
                        if len(r.inputs) else r.global_output
                    desc.setdefault(r.layer, {})[r.expert] = delta.reshape(-1).cpu().numpy().astype(np.float16)
        stats["descriptors"] = desc
        self._regions = []

    def regulariser(self, ctx, tap, layout, probs):
        lam = self.settings.gate_reg
        if lam == 0:
            return 0.0
        if self.settings.gate_reg_form == "batch-marginal":
            return lam * sum(gate_regulariser(p, self._p_glob[i]) for i, p in enumerate(probs))
        total = 0.0
        for i, (layer, p) in enumerate(zip(layout.layers, probs)):
            h = tap.inputs[layer].float()
            if tap.mask is not None:
                h = h[tap.mask.to(h.device)]
            q = torch.softmax(h @ self._frozen[layer].t(), -1).clamp_min(EPS)
            total = total + (q * (q.log() - p.clamp_min(EPS).log())).sum(1).mean()
        return lam * total

    def upload(self, params, layout, stats):
        chosen = {layer: np.flatnonzero(stats["usage"][i] > self.settings.min_usage).tolist()
                  for i, layer in enumerate(layout.layers)}
        stats["upload_experts"] = chosen
        dense = {k: v for k, v in params.items() if k not in layout.expert_keys}
        return {**dense, **extract_experts(params, layout, chosen)}

    # ---- edge / server
    def init_partial(self):
        return HeldExperts()

    def accumulate(self, partial, update):
        dense = {k: v for k, v in update.params.items() if not isinstance(v, Rows)}
        experts = {k: v for k, v in update.params.items() if isinstance(v, Rows)}
        layout = moe_layout({k: v.shape for k, v in dense.items()})
        weights = {}
        if self.settings.router_weighting == "routing-mass":
            for i, layer in enumerate(layout.layers):
                w = update.num_examples * update.stats["usage"][i].astype(np.float64)
                if self.settings.consistency_temperature > 0:
                    w = w * math.exp(-update.stats["gate_kl"] / self.settings.consistency_temperature)
                weights[layout.routers[layer]] = w[:, None]
        partial.add(type(update)(update.client_id, update.num_examples, dense, update.stats, update.metrics),
                    weight=weights)
        partial.held.append((update.client_id, update.num_examples, update.stats["usage"], experts,
                             update.stats.get("descriptors", {})))
        return partial

    def aggregate(self, rnd, global_params, state, partial):
        new = partial.average(global_params)
        layout = moe_layout({k: v.shape for k, v in global_params.items()})
        personalised = self.settings.expert_mode == "personalised"
        experts_sum = WeightedSum()
        personal: dict[int, dict[str, list]] = {}
        consistency = np.full((len(layout.layers), layout.experts), np.nan)
        held_pairs = aligned_pairs = peers = 0
        for i, layer in enumerate(layout.layers):
            tensors = layout.of_layer(layer)
            for e in range(layout.experts):
                holders = [h for h in partial.held
                           if h[2][i][e] > self.settings.min_usage
                           and any(t.key in h[3] for t in tensors)
                           and all(rows_of_expert(t, h[3][t.key], e) is not None for t in tensors if t.key in h[3])]
                if not holders:
                    continue
                slices = [{t.key: rows_of_expert(t, h[3][t.key], e) for t in tensors if t.key in h[3]}
                          for h in holders]
                sim = self.similarity(layout, layer, e, holders, global_params)
                tau = self.threshold(sim)
                aligned = self.aligned(sim, tau)
                if len(holders) > 1:
                    consistency[i, e] = float(sim[~np.eye(len(sim), dtype=bool)].mean())
                held_pairs += len(holders)
                aligned_pairs += int(aligned.sum())
                for h, rows, ok in zip(holders, slices, aligned):
                    if ok:
                        experts_sum.add(ClientUpdate(h[0], h[1], rows))
                if personalised:
                    gamma = personal_weights(sim, tau, np.array([h[1] for h in holders], np.float64))
                    peers += int((gamma > 0).sum())
                    for h, g_row in zip(holders, gamma):
                        mixed = personal.setdefault(h[0], {})
                        for key, r in slices[0].items():
                            values = sum(g * rows[key].values.astype(np.float64) for g, rows in zip(g_row, slices))
                            mixed.setdefault(key, []).append(Rows(r.index, values.astype(np.float32), r.axis))
        new = {**new, **{k: v for k, v in experts_sum.average(new).items() if k in layout.expert_keys}}
        metrics = {**partial.mean_metrics(), **self.telemetry(partial, state),
                   "semantic_consistency": np.where(np.isnan(consistency), None, consistency.round(4)).tolist(),
                   "expert_slices_held": held_pairs, "expert_slices_aligned": aligned_pairs,
                   "expert_slices_dropped": held_pairs - aligned_pairs}
        new_state = self.next_state(state, partial)
        if personalised:
            # a client of this round gets this round's mixes (none: it starts from the global experts);
            # a client absent this round keeps its last ones
            present = {h[0] for h in partial.held}
            new_state["personal"] = {**{c: v for c, v in state.get("personal", {}).items() if c not in present},
                                     **{cid: {key: _concat_rows(parts) for key, parts in keys.items()}
                                        for cid, keys in personal.items()}}
            metrics["personal_peers_mean"] = peers / max(held_pairs, 1)
        return new, new_state, metrics

    def similarity(self, layout, layer, expert, holders, global_params) -> np.ndarray:
        """S_ij = cosine of the holders' descriptors of ``expert`` (see ``settings.descriptor``)."""
        if self.settings.descriptor == "anchor-hidden":
            vecs = [h[4].get(layer, {}).get(expert) for h in holders]
            if any(v is None for v in vecs):
                raise ValueError(f"descriptor=anchor-hidden: a client uploaded expert {expert} of layer {layer} "
                                 f"without its anchor descriptor")
            mat = np.stack([np.asarray(v, np.float64) for v in vecs]) if vecs[0].size else np.zeros((len(vecs), 0))
            if mat.shape[1] == 0:       # no anchor token reaches this expert: nothing to compare, all agree
                return np.ones((len(holders), len(holders)))
            gram = mat @ mat.T
        else:
            gram = self._factor_gram(layout, layer, expert, [h[3] for h in holders], global_params)
        norm = np.sqrt(np.clip(np.diag(gram), EPS, None))
        return gram / norm[:, None] / norm[None, :]

    def _factor_gram(self, layout, layer, expert, uploads, global_params) -> np.ndarray:
        """Inner products of vec of each LoRA'd projection's B_iA_i − B_gA_g (``update``) or B_iA_i
        (``weights``), concatenated, in the factored form Σ((P_iᵀP_j) ⊙ (Q_iQ_jᵀ)) (no out × in matrix)."""
        factors = []
        for rows in uploads:
            per = []
            for a, b in layout.pairs(layer):
                A = rows_of_expert(a, rows[a.key], expert).values.astype(np.float64)   # (r, in)
                B = rows_of_expert(b, rows[b.key], expert).values.astype(np.float64)   # (out, r)
                if self.settings.descriptor == "update":
                    A = np.concatenate([A, a.slice(global_params[a.key], expert)], 0)
                    B = np.concatenate([B, -b.slice(global_params[b.key], expert)], 1)
                per.append((B, A))
            factors.append(per)
        n = len(factors)
        gram = np.zeros((n, n))
        for i in range(n):
            for j in range(i, n):
                gram[i, j] = gram[j, i] = sum(float(((Bi.T @ Bj) * (Ai @ Aj.T)).sum())
                                              for (Bi, Ai), (Bj, Aj) in zip(factors[i], factors[j]))
        return gram

    def threshold(self, sim: np.ndarray) -> float:
        """τ_e = M(e) − β·Σ(e) over the off-diagonal S (−inf with the filter off or <= 2 holders)."""
        n = len(sim)
        if n <= 2 or not self.settings.semantic_filter:
            return -math.inf
        off = sim[~np.eye(n, dtype=bool)]
        return float(off.mean() - self.settings.semantic_beta * off.std())

    def aligned(self, sim: np.ndarray, tau: float | None = None) -> np.ndarray:
        """Client i is aligned when mean_j≠i S_ij >= τ_e."""
        n = len(sim)
        tau = self.threshold(sim) if tau is None else tau
        if n <= 1 or tau == -math.inf:
            return np.ones(n, bool)
        score = (sim.sum(1) - np.diag(sim)) / (n - 1)
        return score >= tau - 1e-12


def personal_weights(sim: np.ndarray, tau: float, n: np.ndarray) -> np.ndarray:
    """γ_ij(e) ∝ n_j·1[S_ij(e) >= τ_e], each row normalised (S_ii = 1 keeps a client's own expert) [R]."""
    mask = (sim >= tau - 1e-12) | np.eye(len(sim), dtype=bool)
    gamma = mask * n[None, :]
    return gamma / gamma.sum(1, keepdims=True)


def _concat_rows(parts: list[Rows]) -> dict:
    """Several experts' ``Rows`` of one tensor as one plain dict (index, values, axis): server state
    stays plain arrays (checkpointed)."""
    axis = parts[0].axis
    return {"index": np.concatenate([np.asarray(p.index) for p in parts]),
            "values": np.concatenate([p.values for p in parts], axis=axis), "axis": axis}
