"""The strategy protocol: what an FL method tells the runtime, on plain tensors, with no Ray.

The runtime (``actors/``) never branches on the strategy; it calls these hooks in this order
every round::

    aggregator  available -> select_clients -> configure_round        (one instruction per client;
                                                                        it sees the population view)
    client      client_update(ctx) -> ClientUpdate                     (inside a ClientActor)
                    ctx.exchange(payload) -> reply                     (optional per-batch round
                                                                        trip: server_step on the
                                                                        client's edge server)
    edge        partial = init_partial(); accumulate(partial, update)  (as updates arrive)
    aggregator  aggregate(round, global, state, merge(partials))       (new global + server state)
    aggregator  observe_round(round, state, observation)               (how the round went)

and on each edge server, around its clients: ``begin_edge_round`` ... ``end_edge_round``, with
the edge's own state, which the runtime saves with the run (checkpointed, restored on resume and
after an edge restart).

What this design carries beyond FedAvg:
- per-client instructions: ``configure_round`` returns a dict per client (a compute budget, a
  learning rate, which named tensors to download/train);
- partial updates: ``ClientUpdate.params`` may hold any subset of the named tensors; the
  ``WeightedSum`` partial keeps a weight per tensor, so a tensor nobody sent keeps its value;
- statistics beside the update: ``ClientUpdate.stats`` (e.g. per-expert routing usage), kept in
  the partial's ``stats`` list for ``aggregate``;
- server-side state across rounds: ``init_state`` / ``aggregate`` thread a dict through rounds.
  It is checkpointed with the global weights and restored by ``--resume``, and it is the ONLY
  place for cross-round state: a strategy object is rebuilt from its settings in every actor,
  after every actor restart and on resume, so anything kept on ``self`` is lost;
- the task's training loss (``ctx.loss``) and device (``ctx.device``): a strategy trains any
  registered task on the actor's CPU or GPU;
- weights per client, per tensor or per element, and slices of a tensor (``Rows``): see
  ``WeightedSum``;
- per-batch exchange (split learning): ``ctx.exchange`` sends a payload to the client's edge
  server, which runs ``server_step`` with its own per-edge state and returns the reply.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipelines.population import Link, PopulationView
from pipelines.settings import StrategySettings

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
    model: torch.nn.Module           # global (trainable) tensors already loaded; restored between clients
    data: ClientData
    instruction: dict                # from configure_round
    state: dict                      # this client's persistent state (mutate it in place)
    rng: np.random.Generator         # seeded by (run seed, round, client id)
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # the task's training loss
    exchange: Callable[[Any], Any] | None = None   # metered round trip to the edge server's server_step
    device: str = "cpu"              # where the model is: move batches here
    link: Link | None = None         # this round's up/down rates (a bandwidth-adaptive compressor reads them)


@dataclass(frozen=True)
class Rows:
    """Slices of one tensor: ``values`` holds the entries ``index`` of the full tensor along
    ``axis`` (one expert's rows of a LoRA A matrix, its columns of B with axis=1)."""

    index: np.ndarray
    values: np.ndarray
    axis: int = 0


@dataclass
class ClientUpdate:
    client_id: int
    num_examples: int
    params: dict[str, np.ndarray | Rows]   # any subset of the named tensors, whole or as Rows
    stats: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


Weight = float | np.ndarray


@dataclass
class WeightedSum:
    """Partial aggregate of weighted tensors: decomposable, so edge servers can sum their clients
    and the aggregator can sum the edges (hierarchical == flat).

    A client's weight is its example count by default, or given to ``add``: one number, a number
    or array per tensor name, or an array broadcastable to the tensor (e.g. shape (rows, 1): one
    weight per row). Each element is averaged over the weights that reached it; an element nobody
    sent (total weight 0) keeps its previous value. ``Rows`` payloads are scattered into the full
    tensor at ``average`` time with their weights (a 1-D weight of len(index) is one per slice).

    Floating tensors are summed in their own precision (float32) with one fused in-place
    ``acc += w * x`` pass, as fast as a plain in-place sum; float64 accumulation costs about
    half the throughput. Summation order still matters at the last bit, so the runtime folds
    updates in a fixed order (the edge server reorders arrivals): a seeded run is bit-exact.
    Integer tensors (e.g. counters) are averaged in float64 and cast back."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, Weight] = field(default_factory=dict)
    rows: dict[str, dict[tuple[int, int], list]] = field(default_factory=dict)  # key -> (axis, i) -> [sum, weight]
    num_examples: int = 0
    num_clients: int = 0
    metric_sums: dict[str, float | np.ndarray] = field(default_factory=dict)
    stats: list[tuple[int, int, dict]] = field(default_factory=list)  # (client, n, stats)

    def add(self, update: ClientUpdate, weight: Weight | dict[str, Weight] | None = None) -> "WeightedSum":
        for key, value in update.params.items():
            w = weight.get(key, update.num_examples) if isinstance(weight, dict) else \
                (update.num_examples if weight is None else weight)
            if isinstance(value, Rows):
                self._add_rows(key, value, w)
            else:
                self._add_dense(key, value, w)
        self.num_examples += update.num_examples
        self.num_clients += 1
        for key, value in update.metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + np.asarray(value, np.float64) * update.num_examples
        if update.stats:
            self.stats.append((update.client_id, update.num_examples, update.stats))
        return self

    def _add_dense(self, key: str, value: np.ndarray, w: Weight) -> None:
        if key in self.sums:
            _axpy(self.sums[key], value, w)
        else:
            self.sums[key] = _accumulator(value) * (w if np.ndim(w) == 0 else np.asarray(w, np.float32))
        self.weights[key] = _add_weight(self.weights.get(key, 0.0), w)

    def _add_rows(self, key: str, rows: Rows, w: Weight) -> None:
        w = np.asarray(w, np.float64)
        if w.ndim == 1 and rows.values.ndim > 1:  # one weight per slice
            w = w.reshape([-1 if d == rows.axis else 1 for d in range(rows.values.ndim)])
        w = np.broadcast_to(w, rows.values.shape) if w.ndim else w
        acc = self.rows.setdefault(key, {})
        for j, i in enumerate(np.asarray(rows.index).tolist()):
            value = np.take(rows.values, j, axis=rows.axis).astype(np.float64)
            wj = np.take(w, j, axis=rows.axis) if w.ndim else float(w)
            if (rows.axis, i) in acc:
                acc[(rows.axis, i)][0] += wj * value
                acc[(rows.axis, i)][1] = acc[(rows.axis, i)][1] + wj
            else:
                acc[(rows.axis, i)] = [wj * value, wj]

    def merge(self, other: "WeightedSum") -> "WeightedSum":
        for key, value in other.sums.items():
            if key in self.sums:
                _axpy(self.sums[key], value, 1.0)
            else:
                self.sums[key] = value.copy()
            self.weights[key] = _add_weight(self.weights.get(key, 0.0), other.weights[key])
        for key, slices in other.rows.items():
            acc = self.rows.setdefault(key, {})
            for where, (value, w) in slices.items():
                if where in acc:
                    acc[where] = [acc[where][0] + value, acc[where][1] + w]
                else:
                    acc[where] = [value.copy(), w]
        self.num_examples += other.num_examples
        self.num_clients += other.num_clients
        for key, value in other.metric_sums.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value
        self.stats.extend(other.stats)
        return self

    def average(self, previous: Params) -> Params:
        """The weighted mean of each element; elements nobody sent keep their previous value."""
        out = {}
        for key, old in previous.items():
            if key not in self.sums and key not in self.rows:
                out[key] = old
            elif key not in self.rows and np.ndim(self.weights[key]) == 0:  # the common case: one weight
                out[key] = (self.sums[key] / self.weights[key]).astype(old.dtype) if self.weights[key] > 0 else old
            else:
                out[key] = self._average_elements(key, old)
        return out

    def _average_elements(self, key: str, old: np.ndarray) -> np.ndarray:
        total = np.zeros(old.shape, np.float64)
        weight = np.zeros(old.shape, np.float64)
        if key in self.sums:
            total += self.sums[key]
            weight += self.weights[key]
        for (axis, i), (value, w) in self.rows.get(key, {}).items():
            at = (slice(None),) * axis + (i,)
            total[at] += value
            weight[at] += w
        mean = total / np.where(weight > 0, weight, 1.0)
        return np.where(weight > 0, mean, old).astype(old.dtype)

    def mean_metrics(self) -> dict[str, float | np.ndarray]:
        n = max(self.num_examples, 1)
        return {k: (v / n).item() if np.ndim(v) == 0 else v / n for k, v in self.metric_sums.items()}


def _accumulator(value: np.ndarray) -> np.ndarray:
    return value.astype(value.dtype if np.issubdtype(value.dtype, np.floating) else np.float64)


def _add_weight(total: Weight, w: Weight) -> Weight:
    return total + w if np.ndim(w) == 0 and np.ndim(total) == 0 else np.asarray(total) + np.asarray(w, np.float64)


def _axpy(acc: np.ndarray, x: np.ndarray, alpha: Weight) -> None:
    """acc += alpha * x in place (one pass through torch; x may be a read-only object-store view;
    alpha a number or an array broadcastable to x)."""
    if acc.dtype == np.float64:  # integer tensors accumulate in float64
        acc += np.asarray(alpha) * x
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if np.ndim(alpha) == 0:
            torch.from_numpy(acc).add_(torch.from_numpy(x), alpha=float(alpha))
        else:
            torch.from_numpy(acc).addcmul_(torch.from_numpy(x), torch.from_numpy(np.asarray(alpha, acc.dtype)))


class Strategy:
    """Base class; FedAvg-style defaults for every hook but ``client_update``. A strategy is
    built from its settings (``pipelines.settings``) wherever it runs."""

    name = "base"
    uses_client_state = True   # False skips the state store round trip for every client
    # "edge": server_step calls of one edge run one at a time (they share e.g. one top model);
    # "client": calls of different clients run concurrently (state kept per client)
    server_step_concurrency = "edge"

    def __init__(self, settings: StrategySettings | None = None):
        self.settings = settings if settings is not None else StrategySettings()

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

    def configure_round(self, rnd: int, state: dict, client_ids: list[int],
                        population: PopulationView) -> dict[int, dict]:
        """One instruction dict per selected client (``population``: profiles and data sizes)."""
        return {cid: {} for cid in client_ids}

    def work(self, instruction: dict, num_examples: int) -> float:
        """Examples the client will process under this instruction (drives simulated compute time)."""
        return float(num_examples) * instruction.get("local_epochs", self.settings.local_epochs)

    def estimate_traffic(self, instruction: dict, num_examples: int) -> tuple[float, float]:
        """(down, up) bytes of per-batch exchanges the client is expected to cause, beside the
        download and the update: the round planner adds them to its time estimate (deadlines,
        stragglers). The metered traffic is what counts in the round's bytes and time."""
        return 0.0, 0.0

    def clients_take_turns(self) -> bool:
        """True when the clients of one edge run one after another (sequential split learning): the
        virtual clock then times an edge's round as the sum of its clients' times, not the slowest."""
        return False

    def download_keys(self, instruction: dict, global_params: Params) -> list[str]:
        """Named tensors the client downloads (all by default)."""
        return list(global_params)

    def aggregate(self, rnd: int, global_params: Params, state: dict, partial: Any) -> tuple[Params, dict, dict]:
        """(new global params, new server state, metrics) from the merged partial."""
        return partial.average(global_params), state, partial.mean_metrics()

    def observe_round(self, rnd: int, state: dict, observation: Any) -> dict:
        """What happened in round ``rnd`` (a ``pipelines.selection.RoundObservation``: every invited
        client's outcome, edge and simulated time); returns the new server state."""
        return state

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

    def begin_edge_round(self, rnd: int, edge_state: dict, client_ids: list[int], global_params: Params) -> None:
        """An edge server starts its part of round ``rnd`` (``edge_state``: its own, persistent;
        ``global_params``: the round's global tensors, read-only, e.g. to copy a top model)."""

    def end_edge_round(self, rnd: int, edge_state: dict, partial: Any) -> Any:
        """An edge server ends its part of round ``rnd``; returns the partial it sends up (e.g. with
        its per-client top models averaged in). ``edge_state`` is then saved with the run."""
        return partial

    def server_step(self, edge_state: dict, client_id: int, payload: Any) -> Any:
        """Answer one per-batch payload from a client (split learning); edge_state persists on
        the edge server across calls."""
        raise NotImplementedError(f"strategy {self.name!r} has no per-batch exchange")
