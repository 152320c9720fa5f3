"""FedAvg and FedProx on the strategy protocol.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (arXiv:1602.05629): clients run local SGD epochs from the global weights;
the server takes the example-weighted mean of the returned weights.

FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020
(arXiv:1812.06127): the local objective adds (mu/2)·||w − w_global||², which bounds client
drift under non-IID data. mu = 0 is FedAvg.

Our choices (not from the papers): the local optimizer is SGD with momentum, re-created each
round unless ``keep_optimizer_state`` keeps its buffers in the client's persistent state; the
instruction may carry a per-client ``lr`` and ``local_epochs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipelines.strategy import ClientContext, ClientUpdate, Strategy
from pipelines.models import get_params


@dataclass
class FedAvg(Strategy):
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    keep_optimizer_state: bool = False

    name = "fedavg"

    @property
    def uses_client_state(self) -> bool:
        return self.keep_optimizer_state

    def configure_round(self, rnd, state, client_ids):
        return {cid: {"local_epochs": self.local_epochs, "lr": self.lr} for cid in client_ids}

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        model = ctx.model
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=ctx.instruction.get("lr", self.lr),
                                    momentum=self.momentum, weight_decay=self.weight_decay)
        if self.keep_optimizer_state and "optimizer" in ctx.state:
            optimizer.load_state_dict(ctx.state["optimizer"])
        anchor = self._anchor(model)
        loss_sum, seen = 0.0, 0
        for _ in range(ctx.instruction.get("local_epochs", self.local_epochs)):
            for xb, yb in ctx.data.batches(self.batch_size, ctx.rng):
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(xb), yb)
                total = loss + self._penalty(model, anchor)
                total.backward()
                optimizer.step()
                loss_sum += loss.item() * len(yb)
                seen += len(yb)
        if self.keep_optimizer_state:
            ctx.state["optimizer"] = optimizer.state_dict()
            ctx.state["rounds_trained"] = ctx.state.get("rounds_trained", 0) + 1
        return ClientUpdate(ctx.client_id, len(ctx.data), get_params(model),
                            metrics={"train_loss": loss_sum / max(seen, 1)})

    # FedAvg has no proximal term; FedProx overrides these two.
    def _anchor(self, model):
        return None

    def _penalty(self, model, anchor):
        return 0.0


@dataclass
class FedProx(FedAvg):
    mu: float = 0.01

    name = "fedprox"

    def _anchor(self, model):
        return [p.detach().clone() for p in model.parameters()]

    def _penalty(self, model, anchor):
        return 0.5 * self.mu * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
