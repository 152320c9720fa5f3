"""Split models: a bottom (client) and a top (edge server) part, cut at ``model.args.cut``.

``SplitModel.forward(x) = top(bottom(x) * mask)``: the full model, so the runtime's evaluation,
checkpoints and resume see an ordinary classifier. ``mask`` (one entry per smashed channel) is
ACP's keep-mask. It must reach every evaluating actor, so it is global state: a parameter the
runtime averages like any other, but never trained (the forward uses it detached, so it gets no
gradient and SGD skips it). Buffers would stay with each actor (``pipelines.models``).

``split-cnn``: the CNN of ``pipelines.tasks.vision`` (McMahan et al. 2017); cut 1 after
conv1+pool (32x12x12 smashed data on MNIST, the setting of notes/split_learning.md), cut 2
after conv2+pool (64x4x4). ``split-resnet8``: a stem conv and three basic residual blocks
(16, 32, 64 channels) with GroupNorm instead of BatchNorm, our choice: BatchNorm's running
statistics are buffers that would differ between actors, so evaluation would depend on which
actor ran it.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.registry import ModelSpec
from pipelines.split.settings import check_cut

BUILD_ARGS = ("cut",)


class SplitModel(nn.Module):
    def __init__(self, bottom: nn.Module, top: nn.Module, smashed_shape: tuple):
        super().__init__()
        self.bottom, self.top = bottom, top
        self.smashed_shape = tuple(smashed_shape)          # (C, H, W) of one sample
        self.mask = nn.Parameter(torch.ones(smashed_shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smashed = self.bottom(x)
        return self.top(smashed * self.mask.detach().view(1, -1, *([1] * (smashed.dim() - 2))))


def _args(spec: ModelSpec) -> int:
    unknown = sorted(set(spec.args) - set(BUILD_ARGS))
    if unknown:   # the driver said so already (SplitSettings.check_task); a direct build says it here
        from edgeray.errors import UserError
        raise UserError(f"model {spec.name} has no model.args.{unknown[0]}; allowed: {', '.join(BUILD_ARGS)}")
    return check_cut(spec.name, spec.args.get("cut", 1))


def _assemble(blocks: list[nn.Module], cut: int, input_shape: tuple) -> SplitModel:
    bottom, top = nn.Sequential(*blocks[:cut]), nn.Sequential(*blocks[cut:])
    with torch.no_grad():
        smashed = bottom(torch.zeros(1, *input_shape)).shape[1:]
    return SplitModel(bottom, top, tuple(smashed))


def build_split_cnn(spec: ModelSpec) -> SplitModel:
    cut = _args(spec)
    input_shape = tuple(spec.data_info["input_shape"])
    channels, height, _ = input_shape
    kernel, pad = (5, 0) if height >= 20 else (3, 1)
    conv1 = nn.Sequential(nn.Conv2d(channels, 32, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2))
    conv2 = nn.Sequential(nn.Conv2d(32, 64, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2))
    with torch.no_grad():
        flat = conv2(conv1(torch.zeros(1, *input_shape))).numel()
    head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, spec.data_info["num_classes"]))
    return _assemble([conv1, conv2, head], cut, input_shape)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(min(8, cout), cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(min(8, cout), cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def build_split_resnet8(spec: ModelSpec) -> SplitModel:
    cut = _args(spec)
    input_shape = tuple(spec.data_info["input_shape"])
    stem = nn.Sequential(nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False), nn.GroupNorm(8, 16), nn.ReLU())
    blocks = [stem, BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
              nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, spec.data_info["num_classes"]))]
    return _assemble(blocks, cut, input_shape)
