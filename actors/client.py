"""ClientActor: one process of the fixed-size pool; it trains many virtual clients in turn.

A virtual client is data, not an actor: its partition indices, its profile and its state in the
`ClientStateStore`. For each assignment the actor loads the round's global weights (an object
store view, no copy through the driver), loads the client's state, runs the strategy's
``client_update`` and returns the update with its metered size. The dataset arrays are put in
the object store once per run and read zero-copy here. The actor is run-agnostic: it binds to
a run from the run's store on the first call for that run (see ``actors.warm``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from actors.malloc import keep_large_allocations_on_heap
from actors.metering import payload_bytes
from actors.store import find_run, load_state, save_state
from actors.warm import IdleExit
from pipelines.models import build_model, evaluate, set_params
from pipelines.strategy import ClientContext, ClientData


@ray.remote(max_restarts=-1, max_task_retries=0)
class ClientActor(IdleExit):
    def __init__(self, threads: int = 1, idle_exit_s: float | None = None):
        # Run-agnostic: a run is bound lazily from its store (actors.warm), so a restarted actor,
        # or a warm one reused by the next run, needs nothing from its constructor but threads.
        torch.set_num_threads(max(1, threads))
        keep_large_allocations_on_heap()
        self.run = None
        self.start_idle_exit(idle_exit_s)

    def _bind(self, run: str) -> None:
        """Load run ``run``'s strategy, model and data (zero-copy views); one run at a time."""
        if run == self.run:
            return
        self.run = None  # a failed bind leaves no half-bound run behind
        store, refs = find_run(run)
        binding, train, partition, test = ray.get([refs["binding"], refs["train"], refs["partition"], refs["test"]])
        self.strategy = binding["strategy"]
        self.model = build_model(**binding["model_spec"])
        self.seed = binding["seed"]
        self.train_x, self.train_y = train["x"], train["y"]
        self.partition = partition
        self.test_x, self.test_y = test["x"], test["y"]
        self.store = store
        self.run = run

    def release(self, run: str) -> None:
        """Drop run ``run`` (its data views pin object-store memory)."""
        if run == self.run:
            self.run = self.strategy = self.model = self.store = None
            self.train_x = self.train_y = self.partition = self.test_x = self.test_y = None

    def train(self, run: str, rnd: int, client_id: int, instruction: dict, global_params: dict, edge=None):
        """Run one virtual client of run ``run``; returns (ClientUpdate, report)."""
        with self.busy():
            started = time.perf_counter()
            self._bind(run)
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

    def evaluate(self, run: str, global_params: dict, lo: int, hi: int):
        with self.busy():
            self._bind(run)
            set_params(self.model, global_params)
            return evaluate(self.model, self.test_x[lo:hi], self.test_y[lo:hi])
