"""Per-client persistent state (optimizer buffers, residuals, scores) that outlives actors, and
each edge server's state under the key ``("edge", edge_id)``.

The store actor keeps one ObjectRef per client id and puts every state itself, so the object is
owned by the store, not by the (possibly short-lived) ClientActor that produced it: when a
ClientActor dies or the pool is resized, every client's state is still there. (Ray 2.56 removed
``ray.put(_owner=...)``, which would have saved the store one deserialization per write.)
Readers get the ref and read the value from the object store.

The store is also the run's key: it is named (in the ``edgeray`` namespace, found with
``find_store``) and lives exactly as long as the run's driver (``actors.warm``).
"""

from __future__ import annotations

import ray

from actors.warm import NAMESPACE


@ray.remote(num_cpus=0)
class ClientStateStore:
    def __init__(self):
        self._refs: dict[int, ray.ObjectRef] = {}

    def get(self, client_id):
        """[ref] or None (a ref nested in a list is passed on, not resolved)."""
        ref = self._refs.get(client_id)
        return None if ref is None else [ref]

    def put(self, client_id, state: dict) -> None:
        self._refs[client_id] = ray.put(state)

    def snapshot(self) -> dict:
        """All states by value (for checkpoints)."""
        ids = list(self._refs)
        return dict(zip(ids, ray.get([self._refs[c] for c in ids])))

    def restore(self, states: dict) -> None:
        self._refs = {key: ray.put(s) for key, s in states.items()}

    def size(self) -> int:
        return len(self._refs)


def find_store(run: str):
    """The store of run ``run`` (its key)."""
    return ray.get_actor(run, namespace=NAMESPACE)


def load_state(store, client_id) -> dict:
    wrapped = ray.get(store.get.remote(client_id))
    return {} if wrapped is None else ray.get(wrapped[0])


def save_state(store, client_id, state: dict) -> None:
    ray.get(store.put.remote(client_id, state))
