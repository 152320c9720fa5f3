"""Test-only strategies, importable by Ray workers (conftest puts tests/ on their PYTHONPATH)."""

import numpy as np

from pipelines.fedavg.strategy import FedAvg
from pipelines.models import get_params
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


class SplitFedProbe(FedAvg):
    """SplitFed-v1 in miniature, to test edge state: the model's last layer is the "top" model,
    kept on the edge servers. Each edge copies the global top for every client it serves
    (``begin_edge_round``); per batch a client sends a number, which the edge adds to that client's
    top copy; at the end of its round the edge averages its clients' top copies into the partial
    (one weight each). Clients upload only the bottom layers. The edge also counts, in its own
    persistent state, the rounds it served and every number it received: that state must survive
    checkpoints, resume and an edge restart."""

    name = "splitfed-probe"
    TOP = "3.weight"   # the mlp's last Linear

    def client_update(self, ctx):
        for _, yb in ctx.data.batches(self.settings.batch_size, ctx.rng):
            ctx.exchange({"delta": 0.001 * (ctx.client_id + 1), "labels": yb.numpy()})
        bottom = {k: v for k, v in get_params(ctx.model).items() if k != self.TOP}
        return ClientUpdate(ctx.client_id, len(ctx.data), bottom)

    def begin_edge_round(self, rnd, edge_state, client_ids, global_params):
        edge_state["tops"] = {c: global_params[self.TOP].copy() for c in client_ids}
        edge_state["rounds"] = edge_state.get("rounds", 0) + 1

    def server_step(self, edge_state, client_id, payload):
        edge_state["tops"][client_id] += payload["delta"]
        edge_state["received"] = edge_state.get("received", 0.0) + payload["delta"]
        return {"ok": True}

    def end_edge_round(self, rnd, edge_state, partial):
        for c, top in sorted(edge_state.pop("tops").items()):
            partial.add(ClientUpdate(c, 0, {self.TOP: top}), weight=1.0)
        partial.stats.append((-1, 0, {"edge_rounds": edge_state["rounds"], "received": edge_state["received"]}))
        return partial

    def aggregate(self, rnd, global_params, state, partial):
        new, state, metrics = super().aggregate(rnd, global_params, state, partial)
        edges = [s for c, _, s in partial.stats if c == -1]
        return new, state, {**metrics, "edge_rounds": sum(s["edge_rounds"] for s in edges),
                            "edge_received": sum(s["received"] for s in edges)}

    def observe_round(self, rnd, state, observation):
        ok = sum(o.status == "ok" for o in observation.outcomes)
        return {**state, "observed": [*state.get("observed", []), [rnd, ok, len(observation.outcomes)]]}


class BigExchange(FedAvg):
    """Per batch, a 256 kB float32 payload to the edge, which answers with it halved; the client
    checks every reply element by element."""

    name = "big-exchange"

    @staticmethod
    def payload(client_id):
        return {"x": np.arange(64 * 1024, dtype=np.float32) + client_id}

    def client_update(self, ctx):
        exact = all(np.array_equal(ctx.exchange(self.payload(ctx.client_id))["half"],
                                   self.payload(ctx.client_id)["x"] / 2)
                    for _ in ctx.data.batches(self.settings.batch_size, ctx.rng))
        return ClientUpdate(ctx.client_id, len(ctx.data), {}, metrics={"exact": float(exact)})

    def server_step(self, edge_state, client_id, payload):
        return {"half": payload["x"] / 2}


class SigkillOnce(FedAvg):
    """FedAvg whose ``victim`` client, in round ``kill_round``, SIGKILLs the ClientActor process
    that trains it — once per ``marker`` file, so the restarted actor carries on. A real process
    death at a known point of training, not ``ray.kill``."""

    name = "sigkill-once"

    def __init__(self, settings, kill_round: int, victim: int, marker: str):
        super().__init__(settings)
        self.kill_round, self.victim, self.marker = kill_round, victim, marker

    def client_update(self, ctx):
        import os
        import signal

        if ctx.round == self.kill_round and ctx.client_id == self.victim:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))   # the first time only
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().client_update(ctx)
