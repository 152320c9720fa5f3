"""The FL methods and models by name, and where their code lives, without importing it.

The driver (``edgeray run``) checks names and starts a run from this table alone: a method's
module (torch today, transformers for the MoE methods) is imported only in the processes that
run it, so the command is ready in a fraction of a second and a bad name fails at once.
A strategy travels as a ``StrategySpec`` (name + keyword arguments) and is built where it runs;
the runtime also accepts a built strategy object (tests pass their own).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

from edgeray.errors import UserError

STRATEGIES = {
    "fedavg": ("pipelines.fedavg:FedAvg",
               "FedAvg (McMahan et al. 2017): example-weighted mean of local SGD weights"),
    "fedprox": ("pipelines.fedavg:FedProx",
                "FedProx (Li et al. 2020): FedAvg with a proximal term mu/2·||w - w_global||²"),
}
MODELS = ("cnn", "mlp")


@dataclass(frozen=True)
class StrategySpec:
    name: str
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise UserError(f"unknown strategy {self.name!r}; choose one of: {', '.join(STRATEGIES)}")

    @property
    def target(self) -> tuple[str, str]:
        module, attr = STRATEGIES[self.name][0].split(":")
        return module, attr

    def build(self):
        module, attr = self.target
        return getattr(importlib.import_module(module), attr)(**self.kwargs)

    def source_file(self) -> str:
        return importlib.util.find_spec(self.target[0]).origin


def materialize(strategy):
    """The strategy object: built from a ``StrategySpec``, or the object itself."""
    return strategy.build() if isinstance(strategy, StrategySpec) else strategy
