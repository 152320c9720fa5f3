"""Causal language models: a transformers model with LoRA adapters, and next-token evaluation.

``build_causal_lm`` (registered as ``causal-lm``) builds the same way for tests and real runs:
from ``model.args.config`` (a small Llama / OLMoE / Qwen2-MoE / Mixtral config, random init) or,
when ``model.path`` is set, from a local checkpoint folder (``from_pretrained``, never a hub).
``model.args.lora`` wraps it with peft LoRA: the base is frozen, the adapters are the trainable
tensors (the global state); ``model.args.trainable`` names further parameters trained in full
(substrings of their names, e.g. ``mlp.gate`` for an MoE router). Without ``lora`` every
parameter is trainable (full fine-tuning).

Targets of the token task are the input ids themselves: the model shifts them (HF convention).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeray.errors import UserError
from pipelines.registry import ModelSpec

ARCHITECTURES = {"llama": "LlamaConfig", "olmoe": "OlmoeConfig", "qwen2_moe": "Qwen2MoeConfig",
                 "mixtral": "MixtralConfig"}
BUILD_ARGS = ("arch", "config", "lora", "trainable")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "target_parameters")


def build_causal_lm(spec: ModelSpec) -> nn.Module:
    import transformers

    args = dict(spec.args)
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise UserError(f"model causal-lm has no model.args.{unknown[0]}; allowed: {', '.join(BUILD_ARGS)}")
    if spec.path:
        if "arch" in args or "config" in args:
            raise UserError("model.args.arch / model.args.config describe a model built from scratch; with "
                            "model.path set the checkpoint's own config.json is used: remove one of them")
        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise UserError(f"model.path={spec.path} is not a transformers checkpoint folder (no config.json); "
                            f"put the model's config.json and safetensors files there")
        from pipelines.models import DTYPES

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[spec.dtype],
                                                                  local_files_only=True)
    else:
        arch = args.get("arch", "llama")
        if arch not in ARCHITECTURES:
            raise UserError(f"model.args.arch={arch!r} is not one of {', '.join(ARCHITECTURES)}")
        config = {"vocab_size": spec.data_info.get("vocab_size"), "pad_token_id": None, "bos_token_id": None,
                  "eos_token_id": None, **args.get("config", {})}
        try:
            model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, ARCHITECTURES[arch])(**config))
        except (TypeError, ValueError) as exc:
            raise UserError(f"model.args.config for {arch}: {' '.join(str(exc).split())[:300]}") from None
    model.config.use_cache = False
    if args.get("lora"):
        model = _with_lora(model, args["lora"])
    patterns = args.get("trainable", [])
    for module_name, module in model.named_modules():
        own = [p for n, p in module.named_parameters(recurse=False) if any(x in f"{module_name}.{n}" for x in patterns)]
        for param in own:
            param.requires_grad_(True)
        if own and spec.dtype != "float32":
            _compute_in_float32(module, spec.dtype)
    return model


def _compute_in_float32(module: nn.Module, base_dtype: str) -> None:
    """A module trained in full keeps float32 weights inside a lower-precision base: its inputs
    are cast up and its outputs back down (peft does the same for LoRA adapters)."""
    from pipelines.models import DTYPES

    def cast(value, dtype):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(cast(v, dtype) for v in value)
        return value

    module.register_forward_pre_hook(lambda _, inputs: cast(inputs, torch.float32))
    module.register_forward_hook(lambda _, __, output: cast(output, DTYPES[base_dtype]))


def _with_lora(model: nn.Module, lora: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise UserError(f"model.args.lora has no key {unknown[0]!r}; allowed: {', '.join(LORA_KEYS)}")
    config = LoraConfig(r=lora.get("r", 8), lora_alpha=lora.get("alpha", 16), lora_dropout=lora.get("dropout", 0.0),
                        target_modules=lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                        target_parameters=lora.get("target_parameters"))
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"model.args.lora: {' '.join(str(exc).split())[:300]}") from None


def next_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each next token (the model shifts the targets)."""
    return model(input_ids=x, labels=y).loss


@torch.no_grad()
def evaluate_next_token(model: nn.Module, x: np.ndarray, y: np.ndarray, device: str = "cpu",
                        batch_size: int = 64) -> dict[str, float]:
    """Sums over the predicted tokens: correct argmax predictions (``test_accuracy``) and
    cross-entropy (``test_loss``); ``count`` is the number of predicted tokens."""
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only object-store views
        for lo in range(0, len(y), batch_size):
            xb = torch.from_numpy(x[lo:lo + batch_size]).to(device)
            targets = torch.from_numpy(y[lo:lo + batch_size, 1:]).to(device)
            logits = model(input_ids=xb).logits[:, :-1].float()
            loss_sum += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                          reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
    return {"count": count, "test_accuracy": correct, "test_loss": loss_sum}
