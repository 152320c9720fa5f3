"""The configuration of an FL run (``edgeray run``): typed sections, checked when loaded.

Imports neither Ray nor torch: a bad config fails in a fraction of a second, before Ray starts.
The model, data set, evaluation and strategy are names from ``pipelines.registry``; a strategy's
own settings (``strategy.params``) are checked against its registered settings dataclass here,
and the resolved values (defaults filled in) are what ``config.yaml`` of the run records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgeray.config import param, plain_value, section
from edgeray.errors import UserError
from pipelines.data import PARTITIONS
from pipelines.population import COVERAGES, LINK_MODELS
from pipelines.registry import (DATASETS, EVALUATIONS, MODELS, SELECTORS, STRATEGIES, StrategySpec, load, settings_class,
                                strategy_settings)
from pipelines.selection import CONFLICT_RULES
from pipelines.settings import StrategySettings

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """The model: a registered builder, its arguments, and where a checkpoint is."""

    name: str = param("cnn", "registered model (docs/reference.md lists them)", choices=MODELS)
    args: dict = param({}, "the builder's own arguments (e.g. causal-lm: arch, config, lora, trainable)")
    path: str | None = param(None, "local checkpoint folder to load instead of a random init")
    dtype: str = param("float32", "dtype of the frozen tensors; trainable tensors stay float32", choices=DTYPES)


@dataclass
class DataConfig:
    """Data set, its evaluation, and how it is split among clients."""

    dataset: str = param("mnist", "registered data set", choices=DATASETS)
    path: str | None = param(None, "local file or folder of the data set (unset: the data set's default)")
    args: dict = param({}, "the data set's own arguments (e.g. text-bytes: seq_len, test_fraction, pattern)")
    evaluation: str | None = param(None, "registered evaluation (unset: the data set's own)")
    num_clients: int = param(100, "number of virtual clients", ge=1)
    partition: str = param("iid", "how samples are split among clients", choices=PARTITIONS)
    alpha: float = param(0.5, "Dirichlet concentration over labels (partition=dirichlet)", gt=0)
    min_size: int = param(10, "minimum samples per client (partition=dirichlet)", ge=1)
    shards_per_client: int = param(2, "label-sorted shards per client (partition=shards)", ge=1)

    @property
    def evaluation_name(self) -> str:
        return self.evaluation or DATASETS[self.dataset].evaluation


@dataclass
class StrategyConfig(StrategySettings):
    """The FL method: its name, the fields every strategy has, and its own settings."""

    name: str = param("fedavg", "registered strategy (`edgeray run <name>` sets it)", choices=STRATEGIES)
    params: dict = param({}, "the strategy's own settings; docs/reference.md lists them per strategy")

    @staticmethod
    def misplaced_key_hint(raw: dict, key: str) -> str | None:
        """``strategy.mu``: a setting of the strategy, which belongs under ``strategy.params``."""
        name = plain_value(raw.get("name", "fedavg"))
        if name in STRATEGIES and key in {f.name for f in dataclasses.fields(settings_class(name))}:
            return f" (it is a setting of strategy {name!r}: set strategy.params.{key})"
        return None

    def common(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(StrategySettings)}

    def spec(self) -> StrategySpec:
        """The strategy with its resolved settings, to be built where it runs."""
        return StrategySpec(self.name, dataclasses.asdict(strategy_settings(self.name, self.common(), self.params)))


@dataclass
class ClockConfig:
    """Virtual clock: device profiles, deadline, over-selection, dropouts (simulated, never slept)."""

    trace: str | None = param(None, "CSV/JSON client trace; when unset, profiles are sampled")
    speed_median: float = param(500.0, "median compute speed, examples per simulated second", gt=0)
    speed_sigma: float = param(0.5, "log-normal sigma of compute speed", ge=0)
    uplink_median_mbps: float = param(5.0, "median uplink bandwidth", gt=0)
    downlink_median_mbps: float = param(20.0, "median downlink bandwidth", gt=0)
    bandwidth_sigma: float = param(0.7, "log-normal sigma of bandwidths", ge=0)
    min_availability: float = param(1.0, "availability ~ U(min_availability, 1) per client", ge=0, le=1)
    deadline_s: float | None = param(None, "per-round deadline in simulated seconds (unset: none)", gt=0)
    over_selection: float = param(1.0, "invite ceil(clients_per_round * this) clients", ge=1)
    dropout_prob: float = param(0.0, "probability an invited client drops out mid-round", ge=0, lt=1)
    link_model: str = param("static", "client rates per round: the profile's (static), Rayleigh block fading "
                            "(rayleigh), per-round rates from clock.link_trace (trace), or good/bad Gilbert-Elliott "
                            "states that persist over rounds (markov)", choices=LINK_MODELS)
    link_min_gain: float = param(0.05, "floor of the Rayleigh power gain (rate fraction in a deep fade), or the "
                                 "bad state's rate fraction (markov)", gt=0, le=1)
    link_trace: str | None = param(None, "CSV with round, client_id, uplink_mbps, downlink_mbps (link_model=trace)")


SELECTION_METHODS = ("default", *SELECTORS)


@dataclass
class SelectionConfig:
    """Who picks the clients: the strategy's one global call (default), or each edge server for
    itself among the available clients it covers (a registered selector), and what happens to a
    client that several edges picked."""

    method: str = param("default", "default = the strategy's select_clients; otherwise a registered per-edge "
                        "selector", choices=SELECTION_METHODS)
    conflict_rule: str = param("share", "a client picked by k edges: its bandwidth split among them (share) or it "
                               "serves one and the others get nothing (fail)", choices=CONFLICT_RULES)
    settings: dict = param({}, "the selector's own settings (e.g. greedy-latency: local_epochs, model_bytes)")


WARM_POOL_MODES = ("auto", "on", "off")
RESOURCE_CLASS_KEYS = {"num_cpus": float, "num_gpus": float, "num_actors": int, "share": float}
RESOURCE_CLASS_DEFAULTS = {"num_cpus": 1, "num_gpus": 0, "num_actors": 0, "share": 1.0}


@dataclass
class RuntimeConfig:
    """Ray placement: the actor pool, edge servers and timeouts."""

    address: str | None = param(None, "Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")
    num_cpus: int | None = param(None, "CPUs of the local Ray when not attaching (unset: all cores)", ge=1)
    resource_classes: dict = param(
        {"default": dict(RESOURCE_CLASS_DEFAULTS)},
        "ClientActor classes: name -> {num_cpus, num_gpus per actor, num_actors (0 = as many as fit), "
        "share (fraction of clients in this class)}; an actor with num_gpus > 0 builds its model on its GPU")
    num_edge_servers: int = param(1, "edge servers (1 = flat FL)", ge=1)
    coverage: str = param("modulo", "which edges cover a client: its home edge (id mod S) plus edge_overlap "
                          "others (modulo), or the edges within coverage_radius in the unit square (disc)",
                          choices=COVERAGES)
    edge_overlap: int = param(0, "extra edge servers covering each client (coverage=modulo)", ge=0)
    coverage_radius: float = param(0.5, "edge coverage radius in the unit square (coverage=disc)", gt=0)
    sticky_edges: bool = param(False, "a client always goes to its home edge while that edge lives")
    edge_resources: dict = param({"num_cpus": 0, "num_gpus": 0, "threads": 1},
                                 "per EdgeServerActor: CPUs and GPUs reserved, torch threads of its server steps")
    edge_uplink_mbps: float = param(100.0, "edge server to aggregator bandwidth (simulated)", gt=0)
    inflight_per_actor: int = param(2, "assignments queued per ClientActor (prefetches the next client)", ge=1)
    actor_retries: int = param(2, "times a client whose ClientActor process died (or is restarting) is run again "
                               "on a live actor of its class before it counts as failed", ge=0)
    round_timeout_s: float = param(600.0, "wall-clock limit of one round; later clients count as failed", gt=0)
    warm_pool: str = param("auto", "keep the actors running between runs (detached, found again by the next run "
                           "of the same code): auto = when attaching to a running cluster", choices=WARM_POOL_MODES)
    warm_idle_exit_s: float = param(600.0, "a warm actor ends itself after this long without calls", gt=0)
    actor_start_timeout_s: float = param(120.0, "wall-clock limit for the run's actors to start", gt=0)


@dataclass
class FLConfig:
    name: str = param("fedavg", "run name (prefix of the run id)")
    rounds: int = param(10, "number of rounds", ge=1)
    seed: int = param(0, "seed of every random draw (init, partition, profiles, selection, shuffles)")
    output_dir: str = param("runs", "where run directories are created")
    eval_every: int = param(1, "evaluate the global model every N rounds", ge=1)
    target_accuracy: float | None = param(None, "test accuracy whose first round the summary reports "
                                          "(rounds_to_target)", gt=0, le=1)
    checkpoint_every: int = param(1, "checkpoint every N rounds", ge=1)
    keep_checkpoints: int = param(2, "checkpoints kept (older ones are deleted)", ge=1)
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    strategy: StrategyConfig = section(StrategyConfig)
    clock: ClockConfig = section(ClockConfig)
    selection: SelectionConfig = section(SelectionConfig)
    runtime: RuntimeConfig = section(RuntimeConfig)

    def validate(self) -> None:
        if self.strategy.clients_per_round > self.data.num_clients:
            raise UserError(f"strategy.clients_per_round={self.strategy.clients_per_round} exceeds "
                            f"data.num_clients={self.data.num_clients}")
        if self.data.evaluation is not None and self.data.evaluation not in EVALUATIONS:
            raise UserError(f"data.evaluation={self.data.evaluation!r} is not allowed; choose one of: "
                            f"{', '.join(EVALUATIONS)}")
        # the strategy's own settings: checked, and recorded with their defaults filled in
        built = strategy_settings(self.strategy.name, self.strategy.common(), self.strategy.params)
        if hasattr(built, "check_task"):   # a strategy that needs a kind of model checks it here, without torch
            built.check_task(self.model.name, self.model.args, self.model.path)
        settings = dataclasses.asdict(built)
        self.strategy.params = {k: v for k, v in settings.items() if k not in self.strategy.common()}
        _check_resource_classes(self.runtime.resource_classes)
        self.runtime.edge_resources = _check_edge_resources(self.runtime.edge_resources)
        if self.selection.method != "default":
            allowed = load(SELECTORS[self.selection.method].target).defaults
            unknown = sorted(set(self.selection.settings) - set(allowed))
            if unknown:
                raise UserError(f"selector {self.selection.method!r} has no setting selection.settings.{unknown[0]}; "
                                f"its settings: {', '.join(allowed) or 'none'}")
        if self.clock.link_model == "trace" and not self.clock.link_trace:
            raise UserError("clock.link_model=trace needs clock.link_trace (a CSV of per-round rates)")


def _check_resource_classes(classes: dict) -> None:
    if not classes:
        raise UserError("runtime.resource_classes must name at least one class")
    for name, spec in classes.items():
        if not isinstance(spec, dict):
            raise UserError(f"runtime.resource_classes.{name} must be a mapping of {', '.join(RESOURCE_CLASS_KEYS)}")
        spec.update(_numbers(f"runtime.resource_classes.{name}", spec, RESOURCE_CLASS_KEYS, RESOURCE_CLASS_DEFAULTS))
        if spec["num_cpus"] == 0 and spec["num_gpus"] == 0:
            raise UserError(f"runtime.resource_classes.{name} needs num_cpus or num_gpus > 0")


EDGE_RESOURCE_KEYS = {"num_cpus": float, "num_gpus": float, "threads": int}
EDGE_RESOURCE_DEFAULTS = {"num_cpus": 0.0, "num_gpus": 0.0, "threads": 1}


def _check_edge_resources(spec: dict) -> dict:
    return _numbers("runtime.edge_resources", spec, EDGE_RESOURCE_KEYS, EDGE_RESOURCE_DEFAULTS, {"threads": 1})


def _numbers(where: str, spec: dict, kinds: dict, defaults: dict, minimums: dict | None = None) -> dict:
    """``spec`` (a mapping of ``kinds``' keys to numbers) with defaults filled in and each value cast;
    an unknown key or a value below its minimum (0 unless given) is a one-line error naming it."""
    unknown = set(spec) - set(kinds)
    if unknown:
        raise UserError(f"unknown key {where}.{sorted(unknown)[0]}; allowed: {', '.join(kinds)}")
    out = {}
    for key, kind in kinds.items():
        value, minimum = spec.get(key, defaults[key]), (minimums or {}).get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise UserError(f"{where}.{key}={value!r} must be a number >= {minimum}")
        out[key] = kind(value)
    return out
