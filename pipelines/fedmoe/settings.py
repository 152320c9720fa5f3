"""Settings of FedAvg-MoE, HFedMoE and FedAlign-MoE (``strategy.params.*``); see ``strategy.py``.

Imports no torch: the driver checks a config against these classes, and ``check_task`` checks the
model section against a strategy (an MoE, a budget of at least top-k experts) from the model's
``config.json`` or ``model.args`` before Ray starts. Fields marked [R] are our reconstructions
(the papers' text was not available); the paper's form is the default where it is known.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from edgeray.config import param
from edgeray.errors import UserError
from pipelines.settings import StrategySettings

MOE_ARCHS = {"olmoe": "num_experts", "mixtral": "num_local_experts", "qwen2_moe": "num_experts"}
ROUTER_INITS = ("normal", "kmeans")


@dataclass(frozen=True)
class MoEShape:
    """Experts per MoE layer and experts per token, as the model's config states them."""

    experts: int
    top_k: int


def moe_shape(model_name: str, args: dict, path: str | None) -> MoEShape | None:
    """The MoE shape of a ``moe`` model section, read without torch: from the checkpoint's
    ``config.json`` (``model.path``), from ``model.args.upcycle`` or from ``model.args.config``.
    A path that is missing or holds no MoE is a ``UserError`` naming it; other models give None."""
    if model_name != "moe":
        return None
    upcycle = args.get("upcycle")
    if upcycle is not None:
        if not isinstance(upcycle, dict):
            raise UserError("model.args.upcycle must be a mapping (experts, top_k, layers, noise)")
        shape = MoEShape(int(upcycle.get("experts", 4)), int(upcycle.get("top_k", 2)))
        if upcycle.get("router_init", "normal") not in ROUTER_INITS:
            raise UserError(f"model.args.upcycle.router_init={upcycle['router_init']!r} is not one of "
                            f"{', '.join(ROUTER_INITS)}")
        scale = upcycle.get("router_scale", 2.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise UserError(f"model.args.upcycle.router_scale={scale!r} must be a number > 0")
    elif path:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise UserError(f"model.path={path} is not a transformers checkpoint folder (no config.json); put "
                            f"the MoE checkpoint's config.json and safetensors files there")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"model.path={path}: config.json is not readable JSON ({exc})") from None
        experts = config.get("num_local_experts", config.get("num_experts"))
        if not experts or "num_experts_per_tok" not in config:
            raise UserError(f"model.path={path} is not a mixture-of-experts checkpoint: its config.json "
                            f"(model_type {config.get('model_type')!r}) has no num_experts / num_local_experts and "
                            f"num_experts_per_tok; give an OLMoE, Mixtral or Qwen2-MoE checkpoint, or set "
                            f"model.args.upcycle to turn a dense one into an MoE")
        shape = MoEShape(int(experts), int(config["num_experts_per_tok"]))
    else:
        arch = args.get("arch", "olmoe")
        if arch not in MOE_ARCHS:
            raise UserError(f"model.args.arch={arch!r} is not one of {', '.join(MOE_ARCHS)}")
        config = args.get("config", {}) or {}
        shape = MoEShape(int(config.get(MOE_ARCHS[arch], 8)), int(config.get("num_experts_per_tok", 2)))
    if shape.experts < 2 or not 1 <= shape.top_k <= shape.experts:
        raise UserError(f"the model has {shape.experts} experts and top_k={shape.top_k}: an MoE needs >= 2 experts "
                        f"and 1 <= top_k <= experts")
    return shape


@dataclass
class MoESettings(StrategySettings):
    weight_decay: float = param(0.0, "AdamW weight decay of the trainable tensors; keep 0: with decay AdamW moves "
                                "experts that got no gradient (measured), which breaks HFedMoE's budget", ge=0)
    aux_loss_coef: float = param(0.0, "[R] Switch-style load-balancing loss E·Σ_e f_e·P_e per MoE layer, added "
                                 "to the task loss (0 = off)", ge=0)
    usage_share: float = param(0.5, "usage threshold τ in units of the uniform share 1/E: expert e counts for a "
                               "client when u_c(e) >= usage_share/E (HFedMoE eq. 17; [R] value 0.5)", ge=0, le=1)

    def check_task(self, model_name: str, args: dict, path: str | None) -> None:
        """Called by the driver before Ray starts: the model must be an MoE (``moe``)."""
        if moe_shape(model_name, args, path) is None:
            raise UserError(f"strategy needs model.name=moe (a mixture-of-experts causal LM); got {model_name!r}")


@dataclass
class FedAvgMoESettings(MoESettings):
    pass


BUDGET_SOURCES = ("tiers", "profile")
SELECTIONS = ("ib", "importance", "random")
ROUTER_ALPHAS = ("normalised", "raw", "fedavg")
UPLOADS = ("usage", "usage-and-trained")


@dataclass
class HFedMoESettings(MoESettings):
    budget_source: str = param("tiers", "per-client expert budget ρ: fixed tiers dealt round-robin by client id "
                               "(tiers) or by the client's compute-speed rank in the population view (profile: "
                               "slowest clients get the lowest tier)", choices=BUDGET_SOURCES)
    tiers: list = param([0.25, 0.5, 1.0], "budget tiers ρ in (0, 1]: a client trains at most ceil(ρ·E) experts "
                        "per MoE layer per batch [R]; ceil(min ρ·E) must be >= top_k")
    importance_mix: float = param(0.5, "λ of s_b = λ·s_cumul + (1−λ)·s_spec (eq. 5; [R] value)", ge=0, le=1)
    ib_beta: float = param(0.1, "β of the IB score I_b = s_b − β·KL_e (eq. 14; [R] value)", ge=0)
    selection: str = param("ib", "rank the batch's routed experts by the IB score (paper), by s_b alone, or "
                           "randomly (ablations)", choices=SELECTIONS)
    router_alpha: str = param("normalised", "router aggregation: α-weighted (eq. 21) with α summing to 1 [R], "
                              "raw α as transcribed (not normalised), or example-weighted FedAvg",
                              choices=ROUTER_ALPHAS)
    upload: str = param("usage", "expert slices a client uploads: those with u_c(e) >= τ (paper), or only those "
                        "that were also trained in some batch [R]", choices=UPLOADS)

    def __post_init__(self):
        tiers = self.tiers
        if not isinstance(tiers, (list, tuple)) or not tiers or \
                not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in tiers):
            raise UserError(f"strategy.params.tiers={tiers!r} must be a non-empty list of budgets in (0, 1]")

    def check_task(self, model_name, args, path):
        shape = moe_shape(model_name, args, path)
        if shape is None:
            raise UserError(f"strategy hfedmoe needs model.name=moe (a mixture-of-experts causal LM); got "
                            f"{model_name!r}")
        low = min(self.tiers)
        if budget_experts(low, shape.experts) < shape.top_k:
            raise UserError(f"strategy.params.tiers: budget {low} x {shape.experts} experts = "
                            f"{budget_experts(low, shape.experts)} experts per layer is below top_k={shape.top_k}; "
                            f"raise the lowest tier to >= {shape.top_k / shape.experts:g}")


def budget_experts(rho: float, experts: int) -> int:
    """C_budget = ceil(ρ·E) (a small epsilon so 0.25·8 stays 2)."""
    return int(math.ceil(rho * experts - 1e-9))


ROUTER_WEIGHTINGS = ("routing-mass", "examples")
GATE_REGS = ("batch-marginal", "token")
DESCRIPTORS = ("anchor-hidden", "update", "weights")
EXPERT_MODES = ("global", "personalised")


@dataclass
class FedAlignMoESettings(MoESettings):
    router_weighting: str = param("routing-mass", "router rows: ω_i(e) = s_i(e)/Σ_j s_j(e) per expert row (paper's "
                                  "form) with s_i(e) = n_i·p_i(e) [R], or example-weighted (ablation)",
                                  choices=ROUTER_WEIGHTINGS)
    consistency_temperature: float = param(0.0, "[R] multiply ω by exp(−KL(p_i‖p_glob)/T) (0 = off)", ge=0)
    gate_reg: float = param(0.01, "λ_g of the local gating regulariser [R]", ge=0)
    gate_reg_form: str = param("batch-marginal", "[R] KL(p_glob‖mean routing of the batch) per layer, or the "
                               "per-token KL from the round's frozen global router (ablation)", choices=GATE_REGS)
    semantic_beta: float = param(1.0, "β of the adaptive threshold τ_e = M(e) − β·Σ(e) (paper's form; [R] value)",
                                 ge=0)
    semantic_filter: bool = param(True, "aggregate each expert over aligned clients only (False: τ = −∞)")
    descriptor: str = param("anchor-hidden", "[R] per-expert descriptor compared by cosine: anchor-hidden = the "
                            "change of expert e's output (hidden states) on the public anchor tokens the global "
                            "router sends to e, computed by the client and sent with its stats (moe_fl.md §3b); "
                            "update = the LoRA update B_iA_i − B_gA_g, weights = B_iA_i, both from the uploaded "
                            "factors on the server (nothing extra sent)", choices=DESCRIPTORS)
    anchor_tokens: int = param(8, "[R] anchor-hidden: at most this many anchor tokens per expert (those with the "
                               "highest global gate probability among the tokens routed to it); each costs d "
                               "float16 values per uploaded expert", ge=1, le=4096)
    expert_mode: str = param("global", "global: one aligned expert for all (the global model); personalised "
                             "[R, the γ_ij(e) reading]: client i also gets expert e = Σ_j γ_ij(e)·E_j(e) with "
                             "γ_ij ∝ n_j·1[S_ij(e) >= τ_e] over the holders of e, row-normalised, and starts its "
                             "next round from it (sent with its instruction, metered as download)",
                             choices=EXPERT_MODES)
    min_usage: float = param(0.01, "[R] a client holds expert e (uploads and may align) when u_i(e) > this",
                             ge=0, le=1)

    def check_task(self, model_name, args, path):
        if moe_shape(model_name, args, path) is None:
            raise UserError(f"strategy fedalign-moe needs model.name=moe (a mixture-of-experts causal LM); got "
                            f"{model_name!r}")
