"""What a ClientActor does, in its own process: bind a run, train a virtual client, evaluate.

Kept apart from ``actors.client`` so that the driver, which imports the actor class to start it,
never imports torch or the model code (``edgeray run`` starts ~0.8 s sooner); this module is
imported only inside the actor's process.

Binding a run builds its model once, on the actor's GPU when Ray gave it one (``ctx.device``),
with the frozen base in the model's dtype; only the trainable tensors come and go with every
client. Between two virtual clients the shared model object is restored as built
(``pipelines.models.ClientHandover``). Releasing the run drops the model and returns its GPU
memory, so an idle warm actor holds none.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import ray
import torch

from actors.malloc import keep_large_allocations_on_heap
from actors.messages import ClientJob, ClientReport, RunBinding, RunRefs
from actors.metering import payload_bytes
from actors.shm_channel import SHM_MAX, SHM_THRESHOLD, Inbox, Outbox, segment_prefix
from actors.store import find_store, load_state, save_state
from pipelines.models import ClientHandover, build_model, get_params, set_params
from pipelines.registry import EVALUATIONS, load, materialize
from pipelines.strategy import ClientContext, ClientData


def actor_device() -> str:
    """``cuda`` when Ray assigned this actor a GPU (it sets CUDA_VISIBLE_DEVICES), else ``cpu``."""
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class MeteredExchange:
    """``ctx.exchange``: one per-batch round trip to the client's edge server (``server_step``),
    metered on the exact objects sent (request up, reply down) and bounded by the round's
    remaining wall-clock budget: a reply that does not come in time fails the client. A large
    payload to an edge on the same node goes through shared memory (``actors.shm_channel``)."""

    def __init__(self, edge, run: str, client_id: int, deadline: float, mailboxes: tuple | None = None):
        self.edge, self.run, self.client_id, self.deadline = edge, run, client_id, deadline
        self.mailboxes = mailboxes   # (Outbox, Inbox) when the edge shares this node
        self.calls = self.up_bytes = self.down_bytes = 0
        self.wall_s = 0.0

    def __call__(self, payload):
        started = time.perf_counter()
        sent = payload_bytes(payload)
        remaining = self.deadline - started
        if remaining <= 0:
            raise TimeoutError(f"client {self.client_id}: no round time left for an exchange")
        if self.mailboxes is not None and SHM_THRESHOLD <= sent <= SHM_MAX:
            outbox, inbox = self.mailboxes
            answer = ray.get(self.edge.exchange_shm.remote(self.run, self.client_id, outbox.write(payload)),
                             timeout=remaining)
            reply, received = inbox.read(answer), answer.nbytes   # the message's size is the reply's metered size
        else:
            reply = ray.get(self.edge.exchange.remote(self.run, self.client_id, payload), timeout=remaining)
            received = payload_bytes(reply)
        self.up_bytes += sent
        self.down_bytes += received
        self.calls += 1
        self.wall_s += time.perf_counter() - started
        return reply


class ClientWorker:
    def __init__(self, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        keep_large_allocations_on_heap()
        self.device = actor_device()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.run = None

    def _bind(self, run: str, refs: RunRefs) -> None:
        """Load run ``run``'s strategy, model and data (zero-copy views) from its ``refs``; one run
        at a time. The run's store is looked up only by strategies that keep client state."""
        if run == self.run:
            return
        self.release(self.run)
        binding: RunBinding
        binding, train, partition, test = ray.get([refs.binding, refs.train, refs.partition, refs.test])
        self.strategy = materialize(binding.strategy)
        self.model = build_model(binding.task.model, self.device)
        self.handover = ClientHandover(self.model)
        evaluation = EVALUATIONS[binding.task.evaluation]
        self.evaluate_fn, self.loss_fn = load(evaluation.target), load(evaluation.loss)
        self.seed = binding.seed
        self.train_x, self.train_y = train["x"], train["y"]
        self.partition = partition
        self.test_x, self.test_y = test["x"], test["y"]
        self.store = find_store(run) if self.strategy.uses_client_state else None
        self.mailboxes = (Outbox(f"{segment_prefix(run)}-c{os.getpid()}"), Inbox())
        self.run = run

    def release(self, run: str | None) -> None:
        """Drop run ``run`` (its data views pin object-store memory; its model, GPU memory)."""
        if run is None or run != self.run:
            return
        for mailbox in self.mailboxes:
            mailbox.close()
        self.run = self.strategy = self.model = self.handover = self.store = self.mailboxes = None
        self.train_x = self.train_y = self.partition = self.test_x = self.test_y = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def initial_params(self, run: str, refs: RunRefs) -> dict:
        """The trainable tensors of the freshly built model: the run's initial global state."""
        self._bind(run, refs)
        return get_params(self.model)

    def train(self, run: str, refs: RunRefs, rnd: int, job: ClientJob, global_params: dict, edge=None,
              edge_node: str | None = None):
        """Run one virtual client of run ``run`` (``edge``: its edge server, on node ``edge_node``);
        returns (ClientUpdate, ClientReport)."""
        started = time.perf_counter()
        self._bind(run, refs)
        self.handover.restore()
        set_params(self.model, global_params)
        cid = job.client_id
        idx = self.partition[cid]
        stateful = self.strategy.uses_client_state
        state = load_state(self.store, cid) if stateful else {}
        had_state = bool(state)
        store_calls = int(stateful)
        torch.manual_seed(hash((self.seed, rnd, cid)) & 0xFFFFFFFF)
        exchange = None if edge is None else MeteredExchange(
            edge, run, cid, started + job.budget_s, self.mailboxes if edge_node == self.node_id else None)
        ctx = ClientContext(
            client_id=cid, round=rnd, model=self.model, data=ClientData(self.train_x[idx], self.train_y[idx]),
            instruction=job.instruction, state=state, rng=np.random.default_rng([self.seed, rnd, cid]),
            loss=self.loss_fn, device=self.device, link=job.link, exchange=exchange)
        update_started = time.perf_counter()
        update = self.strategy.client_update(ctx)
        update_s = time.perf_counter() - update_started
        if stateful and (ctx.state or had_state):
            save_state(self.store, cid, ctx.state)
            store_calls += 1
        meter = exchange or MeteredExchange(None, run, cid, 0.0)
        report = ClientReport(cid, payload_bytes(update), time.perf_counter() - started, update_s, os.getpid(),
                              store_calls, meter.calls, meter.up_bytes, meter.down_bytes, meter.wall_s,
                              self.node_id[:12])
        return update, report

    def evaluate(self, run: str, refs: RunRefs, global_params: dict, lo: int, hi: int) -> dict:
        self._bind(run, refs)
        self.handover.restore()
        set_params(self.model, global_params)
        return self.evaluate_fn(self.model, self.test_x[lo:hi], self.test_y[lo:hi], self.device)
