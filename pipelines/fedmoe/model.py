"""The ``moe`` model: a transformers mixture-of-experts causal LM with LoRA on attention and on
the fused expert parameters, the router trained in full (registered in ``pipelines.registry``).

One code path for tests and real runs:
- ``model.args.arch`` + ``model.args.config``: OLMoE (default), Mixtral or Qwen2-MoE built from a
  config, random init (tests, the synthetic task);
- ``model.path``: a local MoE checkpoint folder (``from_pretrained``, never a hub); its
  ``config.json`` is checked to be an MoE before torch is touched (``settings.moe_shape``) and
  replaces ``arch`` / ``config`` / ``router_std`` (so ``--set model.path=...`` on any config works);
- ``model.args.upcycle``: a dense Llama-style checkpoint (``model.path``, default the SmolLM2-135M-
  Instruct that ``scripts/assets/svd.sh`` fetched, loaded by ``edgeray.hf_models``) turned into a
  Mixtral-style MoE in the listed layers: each MLP copied into E experts with small noise, a new
  top-k router (Komatsuzaki et al. 2022, "Sparse Upcycling", arXiv:2212.05055). Mixtral's block
  renormalises the top-k gate weights, so with near-identical experts the layer computes the
  dense MLP it came from: the pretrained model's function survives upcycling.
  ``upcycle.router_init`` [R]: ``normal`` draws the router from N(0, router_std²). Measured on
  SmolLM2 (first 4 layers, E=4, top-2, drug reviews): the router logits then have a std of ~0.05
  across experts (the MLP inputs have norm ~2.5), so routing is uniform (H = 0.999·ln E), and it
  stays so, because with identical experts the router's gradient is ~0 (the top-k mix of copies
  is the same function whatever the gate) and AdamW at lr 1e-3 moves it ~1e-3 per step.
  ``kmeans`` instead clusters the MLP's inputs on the data set's public anchor tokens (cosine
  k-means, E clusters, seeded, the anchor mean removed) and sets router row e to centroid e with
  the mean direction projected out, scaled so the logits' std across experts is ``router_scale``:
  each expert starts with its own region of the token space, and the layer still computes the
  dense MLP (the experts are still copies).

Trainable (= global) tensors: LoRA A/B of attention (``lora.target_modules``) and of the fused
experts (``lora.target_parameters``), every router ``mlp.gate.weight``, and for classification
data a last-token linear head. The frozen base is built once per actor (bf16 on a GPU when
``model.dtype=bfloat16``; trainable tensors stay float32).

``head``: ``classify`` (default when the data set has ``num_classes``) returns logits of a linear
head on the last non-padding token; ``lm`` returns the causal LM (causal-LM loss; instruction data).

A ``RouterTap`` hooks every router and keeps its logits of the last forward pass (and its inputs,
when asked), with the mask of real (non-padding) tokens: the strategies read routing from it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeray.errors import UserError
from pipelines.fedmoe.layout import ROUTER_KEY
from pipelines.fedmoe.settings import MOE_ARCHS, ROUTER_INITS, moe_shape
from pipelines.registry import ModelSpec
from pipelines.tasks.lm import ARCHITECTURES, _compute_in_float32, _with_lora

BUILD_ARGS = ("arch", "config", "lora", "head", "upcycle", "router_std")
UPCYCLE_KEYS = ("experts", "top_k", "layers", "noise", "keep_layers", "router_init", "router_scale")
HEADS = ("classify", "lm")
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


class RouterTap:
    """Router logits of the last forward pass, per MoE layer, with the real-token mask."""

    def __init__(self, model: nn.Module, pad_id: int | None):
        self.pad_id = pad_id
        self.keep_inputs = False
        self.logits: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.routers: dict[int, nn.Module] = {}
        self.experts: dict[int, nn.Module] = {}    # the (LoRA-wrapped) fused experts of each MoE layer
        for name, module in model.named_modules():
            m = ROUTER_KEY.search(name + ".weight")
            if m and hasattr(module, "weight") and module.weight.dim() == 2:
                layer = int(m.group(1))
                self.routers[layer] = module
                self.experts[layer] = model.get_submodule(name.rsplit(".", 1)[0]).experts
                module.register_forward_pre_hook(self._input_hook(layer))
                module.register_forward_hook(self._output_hook(layer))
        if not self.routers:
            raise UserError("the model has no MoE router (layers.N.mlp.gate); it is not a mixture of experts")

    @property
    def layers(self) -> list[int]:
        return sorted(self.routers)

    def _input_hook(self, layer):
        def hook(_module, args):
            if self.keep_inputs:
                self.inputs[layer] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    def _output_hook(self, layer):
        def hook(_module, _args, output):
            self.logits[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    def see_inputs(self, input_ids: torch.Tensor) -> None:
        self.logits.clear()
        self.inputs.clear()
        self.mask = None if self.pad_id is None else (input_ids != self.pad_id).reshape(-1)

    def probs(self, layer: int) -> torch.Tensor:
        """Softmax routing of the real tokens of the last forward pass, (tokens, E), float32."""
        p = torch.softmax(self.logits[layer].float(), dim=-1)
        return p if self.mask is None else p[self.mask.to(p.device)]


class MoEClassifier(nn.Module):
    """A linear head on the last real token's final hidden state (right padding with ``pad_id``)."""

    def __init__(self, lm: nn.Module, num_classes: int, pad_id: int | None):
        super().__init__()
        self.lm = lm
        self.pad_id = pad_id
        self.head = nn.Linear(lm.get_base_model().config.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.get_base_model().model(input_ids=x).last_hidden_state
        if self.pad_id is None:
            last = torch.full((x.shape[0],), x.shape[1] - 1, device=x.device)
        else:
            last = ((x != self.pad_id).sum(1) - 1).clamp(min=0)
        return self.head(hidden[torch.arange(x.shape[0], device=x.device), last].float())


def expert_output(experts: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s output on the rows of ``x`` (tokens, d) alone, gate weight 1, through the
    module's own forward (so its LoRA is applied), as float32."""
    index = torch.full((len(x), 1), expert, dtype=torch.long, device=x.device)
    return experts(x, index, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)).float()


@dataclass
class AnchorRegion:
    """Expert ``expert`` of MoE layer ``layer``: the public anchor tokens the global router sends it
    (``inputs``: their MoE-block inputs under the global model) and the global expert's output there."""

    layer: int
    expert: int
    inputs: torch.Tensor
    global_output: torch.Tensor


@torch.no_grad()
def anchor_regions(model: nn.Module, top_k: int, per_expert: int, device: str = "cpu") -> list[AnchorRegion]:
    """FedAlign-MoE's region-conditioned anchors [R]: run the public anchor sequences
    (``model.fedmoe_anchors``, from the data set's ``info['anchors']``) through the model as it is
    now (the round's global model, before local training); for each layer and expert keep up to
    ``per_expert`` anchor tokens whose global top-k includes the expert, those with the highest gate
    probability for it (ties to the earlier token), with the global expert's output on them."""
    anchors = getattr(model, "fedmoe_anchors", None)
    if anchors is None or len(anchors) == 0:
        raise UserError("strategy.params.descriptor=anchor-hidden needs public anchor sequences from the data set "
                        "(moe-topics and drug-reviews give them as info['anchors']); use descriptor=update")
    tap = router_tap(model)
    was_training, keep = model.training, tap.keep_inputs
    model.eval()
    tap.keep_inputs = True
    try:
        model(torch.as_tensor(np.array(anchors), dtype=torch.long, device=device))
        regions = []
        for layer in tap.layers:
            x = tap.inputs[layer]
            if tap.mask is not None:
                x = x[tap.mask.to(x.device)]
            probs = tap.probs(layer)
            routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(top_k, dim=1).indices, True)
            for e in range(probs.shape[1]):
                score = torch.where(routed[:, e], probs[:, e], torch.tensor(-1.0, device=probs.device))
                order = torch.sort(score, descending=True, stable=True).indices[:per_expert]
                idx = torch.sort(order[score[order] >= 0]).values
                inputs = x[idx].detach().clone()
                out = expert_output(tap.experts[layer], inputs, e) if len(idx) else inputs.float()
                regions.append(AnchorRegion(layer, e, inputs, out))
    finally:
        tap.keep_inputs = keep
        model.train(was_training)
    return regions


def router_tap(model: nn.Module) -> RouterTap:
    tap = getattr(model, "fedmoe_tap", None)
    if tap is None:
        raise UserError("the fedmoe strategies need model.name=moe (its router tap is missing)")
    return tap


def build_moe(spec: ModelSpec) -> nn.Module:
    import transformers

    args = dict(spec.args)
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise UserError(f"model moe has no model.args.{unknown[0]}; allowed: {', '.join(BUILD_ARGS)}")
    moe_shape("moe", args, spec.path)          # missing path / not an MoE: one line, before any weights load
    info = spec.data_info
    head = args.get("head", "classify" if "num_classes" in info else "lm")
    if head not in HEADS:
        raise UserError(f"model.args.head={head!r} is not one of {', '.join(HEADS)}")
    if head == "classify" and "num_classes" not in info:
        raise UserError("model.args.head=classify needs a classification data set (one with num_classes)")
    if args.get("upcycle") is not None:
        base = upcycle(spec.path, args["upcycle"], info, args.get("router_std", 0.02))
    elif spec.path:   # the checkpoint's config.json rules: model.args.arch / config / router_std are not used
        from pipelines.models import DTYPES
        base = transformers.AutoModelForCausalLM.from_pretrained(Path(spec.path), dtype=DTYPES[spec.dtype],
                                                                 local_files_only=True)
    else:
        arch = args.get("arch", "olmoe")
        if arch not in MOE_ARCHS:
            raise UserError(f"model.args.arch={arch!r} is not one of {', '.join(MOE_ARCHS)}")
        config = {"vocab_size": info.get("vocab_size"), "pad_token_id": None, "bos_token_id": None,
                  "eos_token_id": None, **args.get("config", {})}
        try:
            base = transformers.AutoModelForCausalLM.from_config(getattr(transformers, ARCHITECTURES[arch])(**config))
        except (TypeError, ValueError) as exc:
            raise UserError(f"model.args.config for {arch}: {' '.join(str(exc).split())[:300]}") from None
        if "router_std" in args:
            for name, p in base.named_parameters():
                if ROUTER_KEY.search(name):
                    nn.init.normal_(p, std=float(args["router_std"]))
    base.config.use_cache = False
    lora = {"target_modules": ATTENTION, "target_parameters": EXPERT_PARAMETERS, **args.get("lora", {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lm = _with_lora(base, lora)
    for module_name, module in lm.named_modules():
        own = [p for n, p in module.named_parameters(recurse=False) if ROUTER_KEY.search(f"{module_name}.{n}")]
        for p in own:
            p.requires_grad_(True)
        if own and spec.dtype != "float32":
            _compute_in_float32(module, spec.dtype)
    pad_id = info.get("pad_id")
    model = MoEClassifier(lm, int(info["num_classes"]), pad_id) if head == "classify" else lm
    tap = RouterTap(model, pad_id)
    model.register_forward_pre_hook(lambda _m, a, kw: tap.see_inputs(kw.get("input_ids", a[0] if a else None)),
                                    with_kwargs=True)
    model.fedmoe_tap = tap
    model.fedmoe_anchors = info.get("anchors")     # public anchor sequences (FedAlign-MoE's descriptors)
    return model


def upcycle(path: str | None, cfg: dict, info: dict, router_std: float) -> nn.Module:
    """A dense Llama-style causal LM with the MLPs of ``cfg['layers']`` replaced by Mixtral MoE
    blocks: E copies of the MLP (plus Gaussian noise of ``noise`` times each weight's std) and a
    new router (normal, std ``router_std``). ``keep_layers`` keeps only the first N decoder layers
    (a size cut for CPU runs; the kept layers are the pretrained ones)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from edgeray.hf_models import SMOLLM2_GGUF, load_model, resolve_source

    unknown = sorted(set(cfg) - set(UPCYCLE_KEYS))
    if unknown:
        raise UserError(f"model.args.upcycle has no key {unknown[0]!r}; allowed: {', '.join(UPCYCLE_KEYS)}")
    if info.get("vocab") == "compact":
        raise UserError("model.args.upcycle keeps the checkpoint's vocabulary: set data.args.vocab=full")
    model, _ = load_model(resolve_source(path or SMOLLM2_GGUF))
    model.train()
    decoder = model.model
    keep = cfg.get("keep_layers")
    if keep is not None:
        if not 1 <= int(keep) <= len(decoder.layers):
            raise UserError(f"model.args.upcycle.keep_layers={keep} must be in 1..{len(decoder.layers)}")
        decoder.layers = decoder.layers[:int(keep)]
        model.config.num_hidden_layers = int(keep)
    n = len(decoder.layers)
    layers = sorted({int(i) % n for i in cfg.get("layers", [n - 2, n - 1])})
    experts, top_k, noise = int(cfg.get("experts", 4)), int(cfg.get("top_k", 2)), float(cfg.get("noise", 0.01))
    router_init, router_scale = cfg.get("router_init", "normal"), float(cfg.get("router_scale", 2.0))
    if router_init not in ROUTER_INITS:
        raise UserError(f"model.args.upcycle.router_init={router_init!r} is not one of {', '.join(ROUTER_INITS)}")
    if not router_scale > 0:
        raise UserError(f"model.args.upcycle.router_scale={router_scale} must be > 0")
    mlp_inputs = _mlp_inputs(model, layers, info) if router_init == "kmeans" else {}
    c = model.config
    moe_config = MixtralConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                               num_local_experts=experts, num_experts_per_tok=top_k, hidden_act=c.hidden_act)
    gen = torch.Generator().manual_seed(0)
    for i in layers:
        mlp = decoder.layers[i].mlp
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise UserError(f"layer {i} of the checkpoint has no gate/up/down MLP to upcycle")
        block = MixtralSparseMoeBlock(moe_config)
        with torch.no_grad():
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)
            down = mlp.down_proj.weight
            for e in range(experts):
                block.experts.gate_up_proj[e] = gate_up + noise * gate_up.std() * torch.randn(gate_up.shape, generator=gen)
                block.experts.down_proj[e] = down + noise * down.std() * torch.randn(down.shape, generator=gen)
            if router_init == "kmeans":
                block.gate.weight.copy_(kmeans_router(mlp_inputs[i], experts, router_scale, gen))
            else:
                block.gate.weight.normal_(0.0, router_std, generator=gen)
        decoder.layers[i].mlp = block
    return model


@torch.no_grad()
def _mlp_inputs(model: nn.Module, layers: list[int], info: dict) -> dict[int, torch.Tensor]:
    """The inputs of the MLPs of ``layers`` on the public anchors' real tokens (float32)."""
    anchors = info.get("anchors")
    if anchors is None or len(anchors) == 0:
        raise UserError("model.args.upcycle.router_init=kmeans clusters the MLP inputs on the data set's public anchor "
                        "sequences (info['anchors']); this data set has none: use router_init=normal")
    x = torch.as_tensor(np.array(anchors), dtype=torch.long)
    keep = (x != info["pad_id"]).reshape(-1) if info.get("pad_id") is not None else torch.ones(x.numel(), dtype=torch.bool)
    seen: dict[int, list] = {i: [] for i in layers}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda _m, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float())) for i in layers]
    try:
        was = model.training
        model.eval()
        for lo in range(0, len(x), 16):
            model.model(input_ids=x[lo:lo + 16])
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(seen[i])[keep] for i in layers}


def kmeans_router(inputs: torch.Tensor, experts: int, scale: float, gen: torch.Generator,
                  iters: int = 30) -> torch.Tensor:
    """Router weights (E, d) from a cosine k-means of ``inputs`` (tokens, d) [R]: the mean input is
    removed, k-means++ seeds from ``gen``; row e = centroid e with the mean direction projected out
    (so no expert gets a constant bonus), scaled so the logits on ``inputs`` have a mean std of
    ``scale`` across experts."""
    if len(inputs) < experts:
        raise UserError(f"router_init=kmeans: {len(inputs)} anchor tokens for {experts} experts; give the data set more "
                        f"anchors (data.args.anchor_size)")
    mean = inputs.mean(0)
    z = torch.nn.functional.normalize(inputs - mean, dim=1)
    centres = [z[torch.randint(len(z), (1,), generator=gen)].squeeze(0)]
    for _ in range(1, experts):                      # k-means++ on 1 − cosine
        dist = (1 - z @ torch.stack(centres).t()).min(1).values.clamp_min(0)
        centres.append(z[torch.multinomial(dist + 1e-12, 1, generator=gen)].squeeze(0))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = (z @ c.t()).argmax(1)
        for e in range(experts):
            members = z[assign == e]
            if len(members):
                c[e] = torch.nn.functional.normalize(members.mean(0), dim=0)
    direction = torch.nn.functional.normalize(mean, dim=0)
    w = c - (c @ direction)[:, None] * direction[None, :]
    spread = (inputs @ w.t()).std(1).mean().clamp_min(1e-12)
    return w * (scale / spread)


@torch.no_grad()
def evaluate_answer(model: nn.Module, x: np.ndarray, y: np.ndarray, device: str = "cpu",
                    batch_size: int = 32) -> dict[str, float]:
    """Instruction data: accuracy and cross-entropy of the answer tokens only (targets != -100;
    the model shifts: position t predicts token t+1). ``count`` is the number of answer tokens."""
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for lo in range(0, len(y), batch_size):
            xb = torch.from_numpy(x[lo:lo + batch_size]).to(device)
            targets = torch.from_numpy(y[lo:lo + batch_size, 1:]).to(device)
            logits = model(input_ids=xb).logits[:, :-1].float()
            keep = targets != -100
            loss_sum += float(nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
            count += int(keep.sum())
    return {"count": count, "test_accuracy": correct, "test_loss": loss_sum}
