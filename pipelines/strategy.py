"""The strategy protocol: what an FL method tells the runtime, on plain tensors, with no Ray.

The runtime (``actors/``) never branches on the strategy; it calls these hooks in this order
every round::

    aggregator  available -> select_clients -> configure_round        (one instruction per client)
    client      client_update(ctx) -> ClientUpdate                     (inside a ClientActor)
                    ctx.exchange(payload) -> reply                     (optional per-batch round
                                                                        trip: server_step on the
                                                                        client's edge server)
    edge        partial = init_partial(); accumulate(partial, update)  (as updates arrive)
    aggregator  aggregate(round, global, state, merge(partials))       (new global + server state)

What this design carries beyond FedAvg:
- per-client instructions: ``configure_round`` returns a dict per client (a compute budget, a
  learning rate, which named tensors to download/train);
- partial updates: ``ClientUpdate.params`` may hold any subset of the named tensors; the
  ``WeightedSum`` partial keeps a weight per tensor, so a tensor nobody sent keeps its value;
- statistics beside the update: ``ClientUpdate.stats`` (e.g. per-expert routing usage), kept in
  the partial's ``stats`` list for ``aggregate``;
- server-side state across rounds: ``init_state`` / ``aggregate`` thread a dict through rounds
  (it is checkpointed with the global weights);
- per-batch exchange (split learning): ``ctx.exchange`` sends a payload to the client's edge
  server, which runs ``server_step`` with its own per-edge state and returns the reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch

Params = dict[str, np.ndarray]


@dataclass
class ClientData:
    """One virtual client's local data (views into the shared arrays)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled epoch of (x, y) tensor batches."""
        order = rng.permutation(len(self.y))
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            yield torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


@dataclass
class ClientContext:
    """Everything ``client_update`` may use; built by the runtime inside the actor."""

    client_id: int
    round: int
    model: torch.nn.Module           # global weights already loaded
    data: ClientData
    instruction: dict                # from configure_round
    state: dict                      # this client's persistent state (mutate it in place)
    rng: np.random.Generator         # seeded by (run seed, round, client id)
    exchange: Callable[[Any], Any] | None = None
    device: str = "cpu"


@dataclass
class ClientUpdate:
    client_id: int
    num_examples: int
    params: Params                   # any subset of the named tensors
    stats: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


@dataclass
class WeightedSum:
    """Partial aggregate of example-weighted tensors: decomposable, so edge servers can sum
    their clients and the aggregator can sum the edges (hierarchical == flat).

    Floating tensors are summed in their own precision (float32) with one fused in-place
    ``acc += w * x`` pass, as fast as a plain in-place sum; float64 accumulation costs about
    half the throughput. Summation order still matters at the last bit, so the runtime folds
    updates in a fixed order (the edge server reorders arrivals): a seeded run is bit-exact.
    Integer tensors (e.g. counters) are averaged in float64 and cast back."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    num_examples: int = 0
    num_clients: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)
    stats: list[tuple[int, int, dict]] = field(default_factory=list)  # (client, n, stats)

    def add(self, update: ClientUpdate, weight: float | None = None) -> "WeightedSum":
        w = float(update.num_examples if weight is None else weight)
        for key, value in update.params.items():
            if key in self.sums:
                _axpy(self.sums[key], value, w)
            else:
                self.sums[key] = _accumulator(value) * w
            self.weights[key] = self.weights.get(key, 0.0) + w
        self.num_examples += update.num_examples
        self.num_clients += 1
        for key, value in update.metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + float(value) * update.num_examples
        if update.stats:
            self.stats.append((update.client_id, update.num_examples, update.stats))
        return self

    def merge(self, other: "WeightedSum") -> "WeightedSum":
        for key, value in other.sums.items():
            if key in self.sums:
                _axpy(self.sums[key], value, 1.0)
            else:
                self.sums[key] = value.copy()
            self.weights[key] = self.weights.get(key, 0.0) + other.weights[key]
        self.num_examples += other.num_examples
        self.num_clients += other.num_clients
        for key, value in other.metric_sums.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value
        self.stats.extend(other.stats)
        return self

    def average(self, previous: Params) -> Params:
        """The weighted mean of each tensor; tensors nobody sent keep their previous value."""
        out = {}
        for key, old in previous.items():
            if self.weights.get(key, 0.0) > 0:
                out[key] = (self.sums[key] / self.weights[key]).astype(old.dtype)
            else:
                out[key] = old
        return out

    def mean_metrics(self) -> dict[str, float]:
        n = max(self.num_examples, 1)
        return {k: v / n for k, v in self.metric_sums.items()}


def _accumulator(value: np.ndarray) -> np.ndarray:
    return value.astype(value.dtype if np.issubdtype(value.dtype, np.floating) else np.float64)


def _axpy(acc: np.ndarray, x: np.ndarray, alpha: float) -> None:
    """acc += alpha * x in place (one pass through torch; x may be a read-only object-store view)."""
    if acc.dtype == np.float64 and not np.issubdtype(x.dtype, np.floating):
        acc += alpha * x
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(acc).add_(torch.from_numpy(x), alpha=alpha)


class Strategy:
    """Base class; FedAvg-style defaults for every hook but ``client_update``."""

    name = "base"
    uses_client_state = True   # False skips the state store round trip for every client

    # ---- server side (AggregatorActor)
    def init_state(self, global_params: Params) -> dict:
        """Server-side state carried across rounds (checkpointed with the weights)."""
        return {}

    def select_clients(self, rnd: int, state: dict, available: list[int], num: int,
                       rng: np.random.Generator) -> list[int]:
        """Which of the available clients to invite this round (uniform by default)."""
        if num >= len(available):
            return list(available)
        return sorted(rng.choice(available, size=num, replace=False).tolist())

    def configure_round(self, rnd: int, state: dict, client_ids: list[int]) -> dict[int, dict]:
        """One instruction dict per selected client."""
        return {cid: {} for cid in client_ids}

    def work(self, instruction: dict, num_examples: int) -> float:
        """Examples the client will process under this instruction (drives simulated compute time)."""
        return float(num_examples) * instruction.get("local_epochs", 1)

    def download_keys(self, instruction: dict, global_params: Params) -> list[str]:
        """Named tensors the client downloads (all by default)."""
        return list(global_params)

    def aggregate(self, rnd: int, global_params: Params, state: dict, partial: Any) -> tuple[Params, dict, dict]:
        """(new global params, new server state, metrics) from the merged partial."""
        return partial.average(global_params), state, partial.mean_metrics()

    # ---- client side (ClientActor)
    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        raise NotImplementedError

    # ---- edge side (EdgeServerActor)
    def init_partial(self) -> Any:
        return WeightedSum()

    def accumulate(self, partial: Any, update: ClientUpdate) -> Any:
        return partial.add(update)

    def merge(self, partials: list[Any]) -> Any:
        out = self.init_partial()
        for p in partials:
            out = out.merge(p)
        return out

    def server_step(self, edge_state: dict, client_id: int, payload: Any) -> Any:
        """Answer one per-batch payload from a client (split learning); edge_state persists on
        the edge server across calls."""
        raise NotImplementedError(f"strategy {self.name!r} has no per-batch exchange")
