"""Test-only strategies, importable by Ray workers (conftest puts tests/ on their PYTHONPATH)."""

from pipelines.fedavg.strategy import FedAvg
from pipelines.strategy import ClientUpdate


class LabelSumExchange(FedAvg):
    """A minimal per-batch exchange: for every batch the client sends its label sum to its edge
    server, which keeps a running total per client in its edge state and sends it back."""

    name = "label-sum-exchange"

    def client_update(self, ctx):
        replies = [ctx.exchange({"label_sum": int(yb.sum())})
                   for _, yb in ctx.data.batches(self.settings.batch_size, ctx.rng)]
        return ClientUpdate(ctx.client_id, len(ctx.data), {},
                            stats={"total": replies[-1]["running_total"], "batches": len(replies)})

    def server_step(self, edge_state, client_id, payload):
        edge_state[client_id] = edge_state.get(client_id, 0) + payload["label_sum"]
        return {"running_total": edge_state[client_id]}

    def aggregate(self, rnd, global_params, state, partial):
        return global_params, state, {"label_total": float(sum(s["total"] for _, _, s in partial.stats))}


class LeakProbe(FedAvg):
    """Records what each virtual client finds when it starts (frozen parameters, extra hooks,
    leftover gradients), then changes the shared model the way a method might: it freezes a
    client-dependent subset and registers a forward hook and a gradient hook."""

    name = "leak-probe"

    def client_update(self, ctx):
        model = ctx.model
        found = {"frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
                 "hooks": sum(len(m._forward_hooks) for m in model.modules()),
                 "grads": sum(p.grad is not None for p in model.parameters())}
        params = list(model.parameters())
        for p in params[: 1 + ctx.client_id % 3]:          # a different trainable subset per client
            p.requires_grad_(False)
        model.register_forward_hook(lambda _m, _i, out: out * 0.5)
        params[-1].register_hook(lambda g: g * 2)
        update = super().client_update(ctx)
        update.stats = {"found": found}
        return update

    def aggregate(self, rnd, global_params, state, partial):
        new, state, metrics = super().aggregate(rnd, global_params, state, partial)
        found = [s["found"] for _, _, s in partial.stats]
        return new, state, {**metrics, "leaked_frozen": sum(len(f["frozen"]) for f in found),
                            "leaked_hooks": sum(f["hooks"] for f in found),
                            "leaked_grads": sum(f["grads"] for f in found), "probed": len(found)}
