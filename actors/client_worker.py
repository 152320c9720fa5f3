"""What a ClientActor does, in its own process: bind a run, train a virtual client, evaluate.

Kept apart from ``actors.client`` so that the driver, which imports the actor class to start it,
never imports torch or the model code (``edgeray run`` starts ~0.8 s sooner); this module is
imported only inside the actor's process.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from actors.malloc import keep_large_allocations_on_heap
from actors.metering import payload_bytes
from actors.store import find_store, load_state, save_state
from pipelines.models import build_model, evaluate, set_params
from pipelines.registry import materialize
from pipelines.strategy import ClientContext, ClientData


class ClientWorker:
    def __init__(self, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        keep_large_allocations_on_heap()
        self.run = None

    def _bind(self, run: str, refs: dict) -> None:
        """Load run ``run``'s strategy, model and data (zero-copy views) from its ``refs``; one run
        at a time. The run's store is looked up only by strategies that keep client state."""
        if run == self.run:
            return
        self.run = None  # a failed bind leaves no half-bound run behind
        binding, train, partition, test = ray.get([refs["binding"], refs["train"], refs["partition"], refs["test"]])
        self.strategy = materialize(binding["strategy"])
        self.model = build_model(**binding["model_spec"])
        self.seed = binding["seed"]
        self.train_x, self.train_y = train["x"], train["y"]
        self.partition = partition
        self.test_x, self.test_y = test["x"], test["y"]
        self.store = find_store(run) if self.strategy.uses_client_state else None
        self.run = run

    def release(self, run: str) -> None:
        """Drop run ``run`` (its data views pin object-store memory)."""
        if run == self.run:
            self.run = self.strategy = self.model = self.store = None
            self.train_x = self.train_y = self.partition = self.test_x = self.test_y = None

    def train(self, run: str, refs: dict, rnd: int, client_id: int, instruction: dict, global_params: dict,
              edge=None):
        """Run one virtual client of run ``run``; returns (ClientUpdate, report)."""
        started = time.perf_counter()
        self._bind(run, refs)
        set_params(self.model, global_params)
        idx = self.partition[client_id]
        stateful = self.strategy.uses_client_state
        state = load_state(self.store, client_id) if stateful else {}
        had_state = bool(state)
        store_calls = int(stateful)
        torch.manual_seed(hash((self.seed, rnd, client_id)) & 0xFFFFFFFF)
        ctx = ClientContext(
            client_id=client_id, round=rnd, model=self.model,
            data=ClientData(self.train_x[idx], self.train_y[idx]), instruction=instruction, state=state,
            rng=np.random.default_rng([self.seed, rnd, client_id]),
            exchange=None if edge is None else
            (lambda payload: ray.get(edge.exchange.remote(run, client_id, payload))))
        update_started = time.perf_counter()
        update = self.strategy.client_update(ctx)
        update_s = time.perf_counter() - update_started
        if stateful and (ctx.state or had_state):
            save_state(self.store, client_id, ctx.state)
            store_calls += 1
        report = {"client_id": client_id, "upload_bytes": payload_bytes(update),
                  "train_s": time.perf_counter() - started, "update_s": update_s, "pid": os.getpid(),
                  "store_calls": store_calls}
        return update, report

    def evaluate(self, run: str, refs: dict, global_params: dict, lo: int, hi: int):
        self._bind(run, refs)
        set_params(self.model, global_params)
        return evaluate(self.model, self.test_x[lo:hi], self.test_y[lo:hi])
