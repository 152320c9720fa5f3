"""Models built from a name and the data's shape (random init; no hub).

``cnn``: the CNN of the Flower anchor / McMahan et al. 2017 for 28x28 inputs (conv 1->32 5x5,
pool, conv 32->64 5x5, pool, fc 1024->128->10; 184,586 parameters on MNIST). On 8x8 digits it
uses 3x3 convolutions with padding so the same layout fits.
``mlp``: one hidden layer, for quick checks.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from edgeray.errors import UserError
from pipelines.registry import MODELS


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    channels, height, width = input_shape
    if name == "cnn":
        kernel, pad = (5, 0) if height >= 20 else (3, 1)
        conv = nn.Sequential(
            nn.Conv2d(channels, 32, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        with torch.no_grad():
            flat = conv(torch.zeros(1, *input_shape)).shape[1]
        return nn.Sequential(conv, nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, 128), nn.ReLU(),
                             nn.Linear(128, num_classes))
    raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


Params = dict[str, np.ndarray]


def get_params(model: nn.Module) -> Params:
    """The model's state (parameters and buffers) as float32/int numpy arrays, detached copies."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_params(model: nn.Module, params: Params) -> None:
    """Copy (a subset of) named arrays into the model; arrays may be read-only object-store views."""
    state = model.state_dict()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns on read-only numpy views
        for key, value in params.items():
            state[key].copy_(torch.from_numpy(value))


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> tuple[int, float, int]:
    """(correct, summed cross-entropy, count) on the given arrays."""
    model.eval()
    correct, loss_sum = 0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for lo in range(0, len(y), batch_size):
            xb = torch.from_numpy(x[lo:lo + batch_size])
            yb = torch.from_numpy(y[lo:lo + batch_size])
            logits = model(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    return correct, loss_sum, len(y)
