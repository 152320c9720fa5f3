"""Image classification: model builders and the evaluation (registered in ``pipelines.registry``).

``cnn``: the CNN of the Flower anchor / McMahan et al. 2017 for 28x28 inputs (conv 1->32 5x5,
pool, conv 32->64 5x5, pool, fc 1024->128->10; 184,586 parameters on MNIST). On 8x8 digits it
uses 3x3 convolutions with padding so the same layout fits.
``mlp``: one hidden layer, for quick checks.
Both read ``input_shape`` and ``num_classes`` from the data set's info; every parameter is trainable.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from pipelines.registry import ModelSpec


def build_cnn(spec: ModelSpec) -> nn.Module:
    input_shape = tuple(spec.data_info["input_shape"])
    channels, height, _ = input_shape
    kernel, pad = (5, 0) if height >= 20 else (3, 1)
    conv = nn.Sequential(
        nn.Conv2d(channels, 32, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    with torch.no_grad():
        flat = conv(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(conv, nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, spec.data_info["num_classes"]))


def build_mlp(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(spec.data_info["input_shape"])), 128), nn.ReLU(),
                         nn.Linear(128, spec.data_info["num_classes"]))


def classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate_classification(model: nn.Module, x: np.ndarray, y: np.ndarray, device: str = "cpu",
                            batch_size: int = 1000) -> dict[str, float]:
    """Sums over the rows: correct predictions (``test_accuracy``) and cross-entropy (``test_loss``)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only object-store views
        for lo in range(0, len(y), batch_size):
            xb = torch.from_numpy(x[lo:lo + batch_size]).to(device)
            yb = torch.from_numpy(y[lo:lo + batch_size]).to(device)
            logits = model(xb)
            loss_sum += float(nn.functional.cross_entropy(logits.float(), yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    return {"count": len(y), "test_accuracy": correct, "test_loss": loss_sum}
