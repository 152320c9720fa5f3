"""ClientActor: one process of the fixed-size pool; it trains many virtual clients in turn.

A virtual client is data, not an actor: its partition indices, its profile and its state in the
`ClientStateStore`. For each assignment the actor loads the round's global weights (an object
store view, no copy through the driver), loads the client's state, runs the strategy's
``client_update`` and returns the update with its metered size. The dataset arrays are put in
the object store once per run and read zero-copy here. The actor is run-agnostic: it binds to
a run from the refs that come with the first call for that run (see ``actors.warm``). The work
itself is ``actors.client_worker.ClientWorker``, imported in the actor's process only.
"""

from __future__ import annotations

import ray

from actors.warm import IdleExit


@ray.remote(max_restarts=-1, max_task_retries=0)
class ClientActor(IdleExit):
    def __init__(self, threads: int = 1, idle_exit_s: float | None = None):
        # Run-agnostic: a run is bound lazily from its store (actors.warm), so a restarted actor,
        # or a warm one reused by the next run, needs nothing from its constructor but threads.
        from actors.client_worker import ClientWorker  # torch is imported here, in the actor only

        self.worker = ClientWorker(threads)
        self.start_idle_exit(idle_exit_s)

    def train(self, run: str, refs, rnd: int, job, global_params: dict, edge=None, edge_node: str | None = None):
        """Run one virtual client (``job``: an ``actors.messages.ClientJob``) of run ``run``
        (``refs``: the run's ``RunRefs``; ``edge``: its edge server, on node ``edge_node``);
        returns (ClientUpdate, ClientReport)."""
        with self.busy():
            return self.worker.train(run, refs, rnd, job, global_params, edge, edge_node)

    def initial_params(self, run: str, refs) -> dict:
        with self.busy():
            return self.worker.initial_params(run, refs)

    def evaluate(self, run: str, refs, global_params: dict, lo: int, hi: int) -> dict:
        with self.busy():
            return self.worker.evaluate(run, refs, global_params, lo, hi)

    def release(self, run: str) -> None:
        self.worker.release(run)
