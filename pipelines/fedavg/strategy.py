"""FedAvg, FedProx and FedAvgM on the strategy protocol (settings: ``settings.py``).

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (arXiv:1602.05629): clients run local SGD epochs from the global weights;
the server takes the example-weighted mean of the returned weights.

FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020
(arXiv:1812.06127): the local objective adds (mu/2)·||w − w_global||², which bounds client
drift under non-IID data. mu = 0 is FedAvg.

FedAvgM: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019 (arXiv:1909.06335): the server treats the change of the average,
Δ = w_global − mean(w_client), as a gradient and applies momentum,
v ← β·v + Δ, w_global ← w_global − η_s·v. β = 0 with η_s = 1 is FedAvg. The momentum v is
cross-round server state: it lives in the checkpointed ``state``, so ``--resume`` continues it.

Our choices (not from the papers): the local optimizer is SGD with momentum, re-created each
round unless ``keep_optimizer_state`` keeps its buffers in the client's persistent state; the
instruction may carry a per-client ``lr`` and ``local_epochs``. The loss is the task's
(``ctx.loss``), so the same strategy trains a classifier or a causal LM.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.fedavg.settings import FedAvgMSettings, FedAvgSettings, FedProxSettings
from pipelines.models import get_params
from pipelines.strategy import ClientContext, ClientUpdate, Strategy


class FedAvg(Strategy):
    name = "fedavg"
    settings: FedAvgSettings

    def __init__(self, settings: FedAvgSettings | None = None):
        super().__init__(settings if settings is not None else FedAvgSettings())

    @property
    def uses_client_state(self) -> bool:
        return self.settings.keep_optimizer_state

    def configure_round(self, rnd, state, client_ids, population):
        return {cid: {"local_epochs": self.settings.local_epochs, "lr": self.settings.lr} for cid in client_ids}

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        s = self.settings
        model = ctx.model
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=ctx.instruction.get("lr", s.lr), momentum=s.momentum,
                                    weight_decay=s.weight_decay)
        if s.keep_optimizer_state and "optimizer" in ctx.state:
            optimizer.load_state_dict(ctx.state["optimizer"])
        anchor = self._anchor(trainable)
        loss_sum, seen = 0.0, 0
        for _ in range(ctx.instruction.get("local_epochs", s.local_epochs)):
            for xb, yb in ctx.data.batches(s.batch_size, ctx.rng):
                xb, yb = xb.to(ctx.device, non_blocking=True), yb.to(ctx.device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = ctx.loss(model, xb, yb)
                total = loss + self._penalty(trainable, anchor)
                total.backward()
                optimizer.step()
                loss_sum += loss.item() * len(yb)
                seen += len(yb)
        if s.keep_optimizer_state:
            ctx.state["optimizer"] = optimizer.state_dict()
            ctx.state["rounds_trained"] = ctx.state.get("rounds_trained", 0) + 1
        return ClientUpdate(ctx.client_id, len(ctx.data), get_params(model),
                            metrics={"train_loss": loss_sum / max(seen, 1)})

    # FedAvg has no proximal term; FedProx overrides these two.
    def _anchor(self, trainable):
        return None

    def _penalty(self, trainable, anchor):
        return 0.0


class FedProx(FedAvg):
    name = "fedprox"
    settings: FedProxSettings

    def __init__(self, settings: FedProxSettings | None = None):
        super().__init__(settings if settings is not None else FedProxSettings())

    def _anchor(self, trainable):
        return [p.detach().clone() for p in trainable]

    def _penalty(self, trainable, anchor):
        return 0.5 * self.settings.mu * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor))


class FedAvgM(FedAvg):
    name = "fedavgm"
    settings: FedAvgMSettings

    def __init__(self, settings: FedAvgMSettings | None = None):
        super().__init__(settings if settings is not None else FedAvgMSettings())

    def init_state(self, global_params):
        return {"momentum": {k: np.zeros_like(v, dtype=np.float32) for k, v in global_params.items()}}

    def aggregate(self, rnd, global_params, state, partial):
        averaged = partial.average(global_params)
        momentum, new = {}, {}
        for key, old in global_params.items():
            delta = old.astype(np.float32) - averaged[key]
            momentum[key] = self.settings.server_momentum * state["momentum"][key] + delta
            new[key] = (old - self.settings.server_lr * momentum[key]).astype(old.dtype)
        return new, {**state, "momentum": momentum}, partial.mean_metrics()
