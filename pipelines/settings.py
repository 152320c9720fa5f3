"""Strategy settings: the fields every strategy has, and the base of each method's own.

A method declares its settings as a dataclass that subclasses ``StrategySettings`` with
``edgeray.config.param`` fields (doc, bounds, choices), in a module that imports no torch: the
driver checks ``strategy.params.*`` of a config against it before anything starts, and the
reference docs list it. The common fields are set as ``strategy.<field>``, the method's own as
``strategy.params.<field>``; the strategy object receives one settings object with both.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.config import param


@dataclass
class StrategySettings:
    clients_per_round: int = param(10, "clients aggregated per round (the target; see clock.over_selection)", ge=1)
    local_epochs: int = param(1, "local epochs per round", ge=1)
    batch_size: int = param(32, "local batch size", ge=1)
    lr: float = param(0.05, "local learning rate", gt=0)
