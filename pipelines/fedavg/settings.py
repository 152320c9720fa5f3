"""Settings of FedAvg, FedProx and FedAvgM (``strategy.params.*``); see ``strategy.py``."""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.config import param
from pipelines.settings import StrategySettings


@dataclass
class FedAvgSettings(StrategySettings):
    momentum: float = param(0.9, "local SGD momentum", ge=0, lt=1)
    weight_decay: float = param(0.0, "local SGD weight decay", ge=0)
    keep_optimizer_state: bool = param(False, "keep each client's momentum buffers across rounds (client state)")


@dataclass
class FedProxSettings(FedAvgSettings):
    mu: float = param(0.01, "proximal coefficient mu of (mu/2)·‖w − w_global‖² (0 = FedAvg)", ge=0)


@dataclass
class FedAvgMSettings(FedAvgSettings):
    server_lr: float = param(1.0, "server learning rate on the averaged update", gt=0)
    server_momentum: float = param(0.9, "server momentum beta (0 with server_lr 1 = FedAvg)", ge=0, lt=1)
