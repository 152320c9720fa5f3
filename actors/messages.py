"""What travels between the driver, the aggregator, the edge servers and the client actors.

Frozen dataclasses, so every message has named, typed fields instead of keyword lists and
string-keyed dicts. ObjectRefs inside them are not resolved by Ray (only top-level arguments
are): an actor reads the data it needs with ``ray.get`` when it binds to a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.population import Link, PopulationView
from pipelines.registry import TaskSpec


@dataclass(frozen=True)
class RunBinding:
    """What every actor of a run builds itself from (put in the object store once per run)."""

    strategy: Any            # a pipelines.registry.StrategySpec, or a built strategy (tests)
    task: TaskSpec
    seed: int


@dataclass(frozen=True)
class RunRefs:
    """The run's object-store refs, passed with every call so that any actor (a restarted one, a
    warm one serving several runs) can bind to the run from the call alone."""

    binding: Any             # ObjectRef[RunBinding]
    train: Any               # ObjectRef[{"x", "y"}]
    test: Any                # ObjectRef[{"x", "y"}]
    partition: Any           # ObjectRef[list of index arrays]


@dataclass(frozen=True)
class RoundSettings:
    """The aggregator's fixed settings of a run (the virtual clock's among them)."""

    clients_per_round: int
    deadline_s: float | None
    over_selection: float
    dropout_prob: float
    test_size: int
    seed: int
    round_timeout_s: float
    inflight_per_actor: int
    edge_uplink_mbps: float
    actor_retries: int
    link_model: str = "static"
    link_min_gain: float = 0.05
    link_trace: dict | None = None           # (round, client) -> Link, for link_model "trace"
    sticky_edges: bool = False
    selection_method: str = "default"         # "default" or a registered per-edge selector
    conflict_rule: str = "share"
    selection_settings: dict | None = None


@dataclass(frozen=True)
class RunSpec:
    """Everything the aggregator opens a run with."""

    run: str                 # the run key (its state store's name)
    run_id: str              # the run directory's name (metrics tags)
    method: str
    refs: RunRefs
    population: PopulationView
    coverage: tuple[tuple[int, ...], ...]   # edge servers covering each client
    edges: tuple
    pool: dict               # resource class -> ClientActor handles
    store: Any
    settings: RoundSettings


@dataclass(frozen=True)
class ClientJob:
    client_id: int
    instruction: dict
    resource_class: str
    link: Link                # the client's rates this round (ctx.link)
    budget_s: float           # wall-clock seconds left in the round when dispatched: the bound of every exchange


@dataclass(frozen=True)
class ClientReport:
    """A finished client, beside its update: the bytes it uploaded and where its time went."""

    client_id: int
    upload_bytes: int
    train_s: float           # the whole assignment inside the actor
    update_s: float          # inside the strategy's client_update
    pid: int
    store_calls: int
    exchange_calls: int = 0          # per-batch round trips to the edge server (split learning)
    exchange_up_bytes: int = 0       # their requests, metered on the exact objects sent
    exchange_down_bytes: int = 0     # their replies
    exchange_wall_s: float = 0.0     # wall time waiting for them
    node: str = ""                   # the Ray node that trained it (first 12 hex digits of its id)


@dataclass(frozen=True)
class ClientFailure:
    client_id: int
    error: str


@dataclass(frozen=True)
class EdgeResult:
    """An edge server's round: the partial aggregate of its clients, never their raw updates."""

    edge_id: int | None      # None: the clients no live edge server covered
    partial: Any
    reports: tuple[ClientReport, ...] = ()
    failures: tuple[ClientFailure, ...] = ()
    actor_calls: int = 0
    actor_failures: int = 0  # assignments lost with their ClientActor's process, then run again elsewhere
