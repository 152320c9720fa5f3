"""Building a registered model, and the tensors of it that are global state.

``build_model(spec, device)`` calls the model's registered builder (``pipelines.registry.MODELS``),
which returns a module whose *trainable* tensors are the parameters with ``requires_grad`` set:
that is how a builder declares them (a LoRA builder freezes the base and leaves the adapters and
router trainable). Only trainable tensors are global state: they are what the runtime puts,
downloads, uploads, aggregates and checkpoints (``get_params`` / ``set_params``); the frozen rest
is built or loaded once per actor and stays there. Buffers are local too (a BatchNorm's running
statistics stay with the actor).

The frozen tensors take ``spec.dtype`` (bfloat16 for an LLM base on a GPU); trainable tensors stay
float32, so updates are averaged in full precision and travel as float32 numpy arrays.

Virtual clients share one model object per actor. ``ClientHandover`` remembers the model as
built and restores it before the next client: ``requires_grad`` of every parameter, the hooks the
builder registered (hooks added since are removed), no gradients, training mode; optimizers are
created by each ``client_update``, so no optimizer state survives a client either.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from edgeray.errors import UserError
from pipelines.registry import MODELS, ModelSpec, entry, load

Params = dict[str, np.ndarray]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(spec: ModelSpec, device: str = "cpu") -> nn.Module:
    """The registered model of ``spec`` on ``device``: frozen tensors in ``spec.dtype``,
    trainable ones in float32."""
    if spec.dtype not in DTYPES:
        raise UserError(f"model.dtype={spec.dtype!r} is not one of {', '.join(DTYPES)}")
    builder = load(entry(MODELS, spec.name, "model").target)
    torch.manual_seed(spec.seed)
    model = builder(spec)
    if not trainable_names(model):
        raise UserError(f"model {spec.name!r} has no trainable tensors (no parameter with requires_grad); "
                        f"check its model.args")
    frozen_dtype = DTYPES[spec.dtype]
    for param in model.parameters():
        param.data = param.data.to(device, torch.float32 if param.requires_grad else frozen_dtype)
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                module._buffers[name] = buf.to(device, frozen_dtype if buf.is_floating_point() else buf.dtype)
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the global-state tensors: parameters with ``requires_grad``."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def get_params(model: nn.Module, names: list[str] | None = None) -> Params:
    """Detached float32 (or integer) numpy copies of the named parameters (default: the trainable ones)."""
    tensors = dict(model.named_parameters())
    out = {}
    for name in names if names is not None else trainable_names(model):
        t = tensors[name].detach()
        # one copy, to the CPU and float32 (bfloat16 has no numpy dtype; updates average in float32)
        out[name] = t.to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True).numpy()
    return out


def set_params(model: nn.Module, params: Params) -> None:
    """Copy named arrays into the model's parameters (cast to each one's dtype and device);
    arrays may be read-only object-store views."""
    tensors = dict(model.named_parameters())
    unknown = [k for k in params if k not in tensors]
    if unknown:
        raise KeyError(f"the model has no parameter {unknown[0]!r} (of {len(unknown)} unknown names)")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns on read-only numpy views
        for key, value in params.items():
            tensors[key].copy_(torch.from_numpy(np.asarray(value)), non_blocking=True)


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks")
_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


class ClientHandover:
    """The model as built, restored between the virtual clients that share it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.module_hooks = {name: {attr: set(getattr(m, attr, {}) or {}) for attr in _MODULE_HOOKS}
                             for name, m in model.named_modules()}
        self.tensor_hooks = {name: {attr: set(getattr(p, attr, None) or {}) for attr in _TENSOR_HOOKS}
                             for name, p in model.named_parameters()}

    def restore(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad[name])
            p.grad = None
            for attr, kept in self.tensor_hooks[name].items():
                hooks = getattr(p, attr, None)
                for key in [k for k in (hooks or {}) if k not in kept]:
                    del hooks[key]
        for name, module in self.model.named_modules():
            kept_by_attr = self.module_hooks.get(name, {})
            for attr in _MODULE_HOOKS:
                hooks = getattr(module, attr, None)
                kept = kept_by_attr.get(attr, set())
                for key in [k for k in (hooks or {}) if k not in kept]:
                    del hooks[key]
        self.model.train()
