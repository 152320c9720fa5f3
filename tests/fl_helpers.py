"""Test-only strategies, importable by Ray workers (conftest puts tests/ on their PYTHONPATH)."""

from dataclasses import dataclass

from pipelines.fedavg.strategy import FedAvg
from pipelines.strategy import ClientUpdate


@dataclass
class LabelSumExchange(FedAvg):
    """A minimal per-batch exchange: for every batch the client sends its label sum to its edge
    server, which keeps a running total per client in its edge state and sends it back."""

    name = "label-sum-exchange"

    def client_update(self, ctx):
        replies = [ctx.exchange({"label_sum": int(yb.sum())})
                   for _, yb in ctx.data.batches(self.batch_size, ctx.rng)]
        return ClientUpdate(ctx.client_id, len(ctx.data), {},
                            stats={"total": replies[-1]["running_total"], "batches": len(replies)})

    def server_step(self, edge_state, client_id, payload):
        edge_state[client_id] = edge_state.get(client_id, 0) + payload["label_sum"]
        return {"running_total": edge_state[client_id]}

    def aggregate(self, rnd, global_params, state, partial):
        return global_params, state, {"label_total": float(sum(s["total"] for _, _, s in partial.stats))}
