"""Settings of split learning (``strategy.params.*``) and the split models' cut points; no torch.

The driver checks a config against ``SplitSettings`` before anything starts (a τ or ρ outside
(0, 1], bits not in {2, 4, 8}, a budget ≤ 0 fail with the field's name), and ``check_task`` checks
the model and ``model.args.cut`` against the cut points below, also without torch. See ``strategy.py`` for what
each mode does and ``compressors.py`` for the compressors (which rules are the papers' and which
are our reconstructions).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.config import param
from edgeray.errors import UserError
from pipelines.settings import StrategySettings

MODES = ("sequential", "splitfed")
COMPRESSORS = ("identity", "quant", "randtopk", "acp", "nsc")
ACP_SCORERS = ("fisher", "taylor")
ACP_RESELECT = ("round", "batch")
ACP_EVAL_MASKS = ("expected", "majority")
NSC_EF_MODES = ("none", "step", "sample")
NSC_UNFOLDS = ("channel", "batch", "spatial")

# Where a split model can be cut: the blocks after which the client's bottom model ends.
# (name of the block, smashed-data shape on a 1x28x28 input) - used in messages and docs.
SPLIT_CUTS = {
    "split-cnn": (("conv1", "32x12x12"), ("conv2", "64x4x4")),
    "split-resnet8": (("stem", "16x28x28"), ("stage1", "16x28x28"), ("stage2", "32x14x14")),
}


def check_cut(model: str, cut) -> int:
    """The cut point of ``model.args.cut`` as an int in 1..len(cut points), or a UserError that names it."""
    cuts = SPLIT_CUTS[model]
    listing = ", ".join(f"{i}={name} ({shape})" for i, (name, shape) in enumerate(cuts, 1))
    if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut <= len(cuts):
        raise UserError(f"model.args.cut={cut!r} is beyond model {model} (it has {len(cuts)} cut points: {listing})")
    return cut


@dataclass
class SplitSettings(StrategySettings):
    mode: str = param("sequential", "sequential: clients of an edge take turns, the bottom model relayed between "
                      "them and one top model on the edge (vanilla SL); splitfed: SplitFed-v1, clients in parallel, "
                      "bottom models averaged, per-client top copies averaged at the end of the edge's round",
                      choices=MODES)
    momentum: float = param(0.9, "SGD momentum of the bottom (client) and top (edge) optimizers", ge=0, lt=1)
    compressor: str = param("identity", "smashed-data / gradient compressor (identity = vanilla SL)",
                            choices=COMPRESSORS)
    compress_down: bool = param(True, "compress the downlink gradient too (ACP and RandTopK: the kept entries)")
    step_budget_s: float | None = param(None, "per-transfer latency budget T_s: the bit budget of one exchange is "
                                        "link rate x T_s (caps NSC's rank, and ACP's channels with acp_bandwidth_cap); "
                                        "unset: no bandwidth cap", gt=0)
    bits: int = param(8, "quant: bits per value (stochastic rounding, packed)", choices=(2, 4, 8))
    topk_ratio: float = param(0.1, "randtopk: fraction k/n of each sample's entries sent", gt=0, le=1)
    randtopk_alpha: float = param(0.1, "randtopk: probability mass given to the non-top-k entries", ge=0, lt=1)
    acp_tau: float = param(0.9, "acp: cumulative score mass the kept channels must reach", gt=0, le=1)
    acp_rho_min: float = param(0.25, "acp: floor on the fraction of channels kept", gt=0, le=1)
    acp_beta: float = param(0.9, "acp: EMA factor of the channel scores", ge=0, lt=1)
    acp_scorer: str = param("fisher", "acp: label-aware channel score: fisher (client, between/within-class "
                            "variance of pooled channels) or taylor (edge, abs of the sum of A*dL/dA per channel)",
                            choices=ACP_SCORERS)
    acp_warmup_rounds: int = param(1, "acp: rounds that send every channel while the scores settle", ge=0)
    acp_reselect: str = param("round", "acp: choose the kept channels once per round or every batch",
                              choices=ACP_RESELECT)
    acp_bandwidth_cap: bool = param(False, "acp: also cap the kept channels by the step's bit budget")
    acp_eval_mask: str = param("expected", "acp: evaluation mask: expected (each channel scaled by the share of "
                               "training examples that sent it) or majority (kept by >= half)",
                               choices=ACP_EVAL_MASKS)
    nsc_energy: float = param(0.95, "nsc: singular-value energy the rank must hold (eta)", gt=0, le=1)
    nsc_iters: int = param(2, "nsc: alternating orthogonal iterations per step (T)", ge=1)
    nsc_rank_max: int = param(32, "nsc: largest rank", ge=1)
    nsc_ef_mode: str = param("none", "nsc: residual feedback: none, step (the last step's residual is added to "
                             "the next batch, other samples), sample (a residual per training sample, added when "
                             "it comes back)",
                             choices=NSC_EF_MODES)
    nsc_unfold: str = param("channel", "nsc: matrix view of the tensor: channel C x (B*H*W), batch B x (C*H*W), "
                            "spatial (B*C) x (H*W)", choices=NSC_UNFOLDS)
    nsc_warm_start: bool = param(True, "nsc: start the iteration from the last step's basis")
    nsc_center: bool = param(True, "nsc: send the row means of the unfolded matrix apart and choose the rank on "
                             "the centered matrix (otherwise the mean of post-ReLU activations takes the rank)")
    turn_timeout_s: float = param(60.0, "sequential: how long a client waits for its turn before it takes over "
                                  "(its predecessor failed)", gt=0)

    def check_task(self, model_name: str, args: dict, path: str | None) -> None:
        """Called by the driver before anything starts (no torch): a split model and a cut it has."""
        if model_name not in SPLIT_CUTS:
            raise UserError(f"strategy split needs a split model (model.name: {', '.join(SPLIT_CUTS)}), "
                            f"not {model_name!r}")
        unknown = sorted(set(args) - {"cut"})
        if unknown:
            raise UserError(f"model {model_name} has no model.args.{unknown[0]}; allowed: cut")
        check_cut(model_name, args.get("cut", 1))
